"""How the rows of a batch may share forward passes without changing any row's loss (GradientEngine._pass_losses).

Every row's loss must be the one the row gets when it runs alone (its real tokens only, positions from 0). Three ways to
run a batch, fastest first, each used only where it is provably that computation:

- 'packed': the rows' kept tokens back to back in a few lanes, each row a block of its own in a ready 4D mask, its
  position ids restarting at 0 (forward_mode.pack_rows). transformers hands a 4D mask to the attention as given, so
  anything the model would add to its own mask is lost: sliding windows, chunked attention, local layers. Packing is
  therefore allowed only for model families known to take the rows' positions from `position_ids` and the 4D mask
  unchanged (PACKED_FAMILIES, each checked in tests/test_zoo.py), without ALiBi or unknown layer types, and only for
  batches whose longest row fits inside every window (then block mask = block mask with the window: a row shorter than
  the window never reaches its edge). Longer batches run padded.
- 'padded': right-padded rows with the 2D attention mask, the model builds its own masks (windows included). Exact for
  causal LMs (right padding comes after every real token) and for the masked-LM families whose only token mixing is
  masked attention (PADDED_ENCODERS); others mix padding into real tokens (Funnel pools it, ConvBERT convolves it)
  and run row by row. Rows of equal length have no padding, so they always share a pass.
- 'rows': each group of rows of the same length in its own unpadded pass: the plain computation.

Rotary embeddings that rescale with the sequence length ('dynamic', 'longrope') see the longest row of a pass, so rows
of different lengths share a pass only below the original context length; the causal cut (dropping tokens after a
causal row's last scored position) changes the length too and is off for them.

The decision is made from the model's class and configuration, per batch where it depends on row length; never from a
sample of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

# Families whose forward takes positions from `position_ids` and passes a ready 4D mask unchanged to every attention
# layer (transformers' masking_utils), with nothing else mixing tokens. RoBERTa-like models (positions derived from
# the padding), ALiBi models (Bloom; biases built from the 2D mask), relative-bucket and convolution models are not.
PACKED_FAMILIES = frozenset({
    "albert", "bert", "cohere", "cohere2", "distilbert", "electra", "falcon", "gemma", "gemma2", "gemma3_text", "gpt2",
    "gpt_neox", "gptj", "granite", "llama", "mistral", "mixtral", "modernbert", "nemotron", "olmo", "olmo2", "opt",
    "persimmon", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "smollm3", "stablelm", "starcoder2",
})
# Masked-LM (bidirectional) families whose padded rows equal the rows alone: attention with the 2D padding mask is
# their only token mixing. Each is checked in tests/test_zoo.py. Not here, so run row by row: Funnel (pools padding
# into real tokens), ConvBERT (convolves it), FNet (Fourier mixing of the whole padded sequence), YOSO, MRA, BigBird and
# Longformer (approximate, block-sparse or windowed attention whose blocks depend on the padded length).
PADDED_ENCODERS = frozenset({
    "albert", "bert", "camembert", "data2vec-text", "deberta", "deberta-v2", "distilbert", "electra", "ernie", "esm",
    "eurobert", "megatron-bert", "mobilebert", "modernbert", "mpnet", "rembert", "roberta", "roberta-prelayernorm",
    "roformer", "squeezebert", "xlm", "xlm-roberta", "xmod",
})
WINDOWED_LAYERS = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}
KNOWN_LAYERS = {"full_attention", *WINDOWED_LAYERS}
WINDOW_FIELDS = ("sliding_window", "attention_chunk_size", "local_attention")


@dataclass(frozen=True)
class LayoutRules:
    """What a model allows. A limit is the longest row (tokens) for which the layout is exact: None = any, 0 = none.

    `batch_limit`: rows of different lengths may share one padded pass. `pack_limit`: rows may be packed.
    `cut`: a causal row's tokens after its last scored position may be dropped. `why`: what limits packing."""

    batch_limit: Optional[int]
    pack_limit: Optional[int]
    cut: bool
    why: str

    def layout(self, lengths: torch.Tensor, right_padded: bool, may_pack: bool) -> str:
        """'packed', 'padded' or 'rows' for a batch whose rows keep `lengths` tokens (right_padded: every row's kept
        tokens come first, so a padded pass cut after the longest is the batch itself)."""
        longest = int(lengths.max()) if lengths.numel() else 0
        uniform = bool((lengths == longest).all())
        if right_padded and uniform:
            return "padded"  # no padding left after the cut: any model computes the rows as if alone
        if may_pack and fits(self.pack_limit, longest):
            return "packed"
        if right_padded and fits(self.batch_limit, longest):
            return "padded"
        return "rows"


def padded_passes_exact(model: torch.nn.Module, causal: bool, longest: Optional[int]) -> bool:
    """Whether right-padded rows of different lengths, up to `longest` tokens (None: no bound known), give every row
    the numbers it gets alone: the engine's 'padded' rule, used by the evaluation to choose padded batches or one row
    per pass (Funnel, ConvBERT and unknown masked-LM families)."""
    limit = layout_rules(model, causal, mask_kind=None).batch_limit
    return limit is None or (longest is not None and longest <= limit)


def fits(limit: Optional[int], longest: int) -> bool:
    return limit is None or longest <= limit


def tighter(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return b if a is None else a if b is None else min(a, b)


def layout_rules(model: torch.nn.Module, causal: bool, mask_kind: Optional[str]) -> LayoutRules:
    """The LayoutRules of `model` (causal: a causal LM; mask_kind: forward_mode.mask_kind, None if it takes no
    position ids or its 4D mask format is unknown)."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if causal and bidirectional(config, family):  # no cut, and packing would build block-causal masks
        return LayoutRules(None if family in PADDED_ENCODERS else 0, 0, False, "a causal-LM class attending both ways")
    rope = rope_length_limit(config)
    batch_limit = rope
    if not causal and family not in PADDED_ENCODERS:
        batch_limit = 0
    pack_limit, why = packing_limit(config, family, mask_kind)
    if rope is not None and pack_limit != 0:
        why = "; ".join(filter(None, [why, f"rows from {rope + 1} tokens on rescale the rotary embeddings"]))
    return LayoutRules(batch_limit, tighter(pack_limit, batch_limit), causal and rope is None, why)


def bidirectional(config: Any, family: Optional[str]) -> bool:
    """A causal-LM class whose configuration makes it attend both ways: Gemma 3 with use_bidirectional_attention, or an
    encoder family's *ForCausalLM / *LMHeadModel without is_decoder=True (transformers warns, and runs it unmasked)."""
    if getattr(config, "use_bidirectional_attention", False):
        return True
    return family in PADDED_ENCODERS and not getattr(config, "is_decoder", True)


def packing_limit(config: Any, family: Optional[str], mask_kind: Optional[str]) -> tuple[Optional[int], str]:
    """(pack limit, reason): 0 where packing is not known to be exact, the smallest attention window otherwise."""
    if mask_kind is None:
        return 0, "the model takes no position_ids, or its attention implementation's 4D mask format is unknown"
    if family not in PACKED_FAMILIES:
        return 0, f"model type {family!r} is not known to take packed position ids and a 4D mask as given"
    if getattr(config, "alibi", False):
        return 0, "ALiBi attention biases are built from the 2D mask"
    layer_types = list(getattr(config, "layer_types", None) or [])
    unknown = sorted(set(layer_types) - KNOWN_LAYERS)
    if unknown:
        return 0, f"unknown attention layer types {unknown}"
    windows = {field: getattr(config, field, None) for field in WINDOW_FIELDS}
    for layer, field in WINDOWED_LAYERS.items():
        if layer in layer_types and not windows[field]:
            return 0, f"{layer} layers without a {field}"
    sizes = [int(size) for size in windows.values() if isinstance(size, int) and not isinstance(size, bool) and size]
    if not sizes:
        return None, ""
    return min(sizes), f"rows longer than the attention window ({min(sizes)} tokens) run padded"


def rope_length_limit(config: Any) -> Optional[int]:
    """For rotary embeddings whose frequencies depend on the longest position of a pass ('dynamic', 'longrope'): the
    longest row below their original context length (where they are plain rotary embeddings); None for any other."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return None
    groups = [v for v in params.values() if isinstance(v, dict)] or [params]  # per layer type, or one
    limits = []
    for group in groups:
        kind = str(group.get("rope_type", group.get("type", "")))
        if "dynamic" in kind or kind == "longrope":
            lengths = [group.get("original_max_position_embeddings"),
                       getattr(config, "original_max_position_embeddings", None),
                       getattr(config, "max_position_embeddings", None)]
            known = [int(n) for n in lengths if isinstance(n, int) and n > 0]
            limits.append(min(known) - 1 if known else 0)
    return min(limits) if limits else None
