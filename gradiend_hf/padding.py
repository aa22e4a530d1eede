"""Does padding change a model's numbers? Detected once per model, so that batching never silently changes results.

Batching pads shorter rows on the right with attention_mask 0. Most models then give every real position exactly the
numbers of the row alone (up to float rounding), but some do not: Funnel pools the padded sequence, ConvBERT's
convolutions read padded positions, and a model that ignores the mask sees the padding. For those, every loss the
library computes (feature-word probabilities, language-modelling scores, gradients, encodings) would depend on which
other rows share the batch. `padding_sensitive` compares one row alone with the same row padded, at every real
position (log-probabilities over the vocabulary, i.e. every LM loss), and caches the answer per model; callers then
run such models one row per pass (no padding at all). `rows_alone` / `losses_row_by_row` are that fallback for code
that holds a padded batch (the gradient engine).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from .data import MASK
from .lengths import max_positions

logger = logging.getLogger("gradiend_hf")
_RESULTS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
PROBE_TOKENS = 64  # enough to show pooling or convolution over padding; bounds the probe's (tokens x vocab) memory


def _extra(model: nn.Module) -> dict[str, Any]:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in parameters else {}


def tolerance(model: nn.Module) -> float:
    """Rounding only: relative to 1 + |log p|; a row that sees padding differs by orders of magnitude more."""
    dtype = next(model.parameters()).dtype
    return max(1e-5, 10 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-5


def probe_ids(collate: Callable, row: Mapping[str, Any]) -> list[int]:
    """Token ids of a real sentence to probe with: the row's text with its factual word put back, tokenised as the
    model reads text (with its special tokens), at most PROBE_TOKENS long. A collator without a tokenizer gives the
    row's collated factual input instead (auxiliary mask ids left out: they are not tokens of the base)."""
    tokenizer = getattr(collate, "tokenizer", None)
    if tokenizer is not None:
        ids = list(tokenizer(row["masked"].replace(MASK, row["factual"]))["input_ids"])
    else:
        batch = collate([dict(row)])
        ids = [i for i in batch["factual_input_ids"][0][batch["factual_attention_mask"][0].bool()].tolist() if i >= 0]
    return ids[:PROBE_TOKENS]


@torch.no_grad()
def padding_changes_results(model: nn.Module, ids: list[int], pad_id: int, limit: Optional[int] = None) -> float:
    """Largest change of any real position's log-probabilities when `ids` is right-padded (attention_mask 0), in
    units of the rounding tolerance (> 1: padding matters). Padded by 1 token and by about the row's length, within
    the model's position limit (the row is shortened to half the limit if needed)."""
    if limit is not None:
        ids = ids[: max(limit // 2, 1)]
    n = len(ids)
    device = next(model.parameters()).device
    extra = _extra(model)

    def log_probs(width: int) -> torch.Tensor:
        input_ids = torch.tensor([ids + [pad_id] * (width - n)], device=device)
        mask = torch.tensor([[1] * n + [0] * (width - n)], device=device)
        return model(input_ids=input_ids, attention_mask=mask, **extra).logits[0, :n].float().log_softmax(-1)

    widest = 2 * n + 3 if limit is None else min(2 * n + 3, limit)
    widths = sorted({w for w in (n + 1, widest) if limit is None or w <= limit})
    if not n or not widths:
        return 0.0
    was_training = model.training
    model.eval()  # dropout would make any two passes differ
    try:
        alone = log_probs(n)
        scale = tolerance(model) * (1 + alone.abs())
        return max(float(((log_probs(w) - alone).abs() / scale).max()) for w in widths)
    finally:
        model.train(was_training)


def _decide(model: nn.Module, ids: list[int], pad_id: int, limit: Optional[int], refresh: bool) -> bool:
    if not refresh and model in _RESULTS:
        return _RESULTS[model]
    change = padding_changes_results(model, ids, pad_id, limit)
    sensitive = change > 1.0
    if sensitive:
        logger.warning("%s gives different results for a padded row than for the same row alone (%.3g x the rounding "
                       "tolerance), so it is run one row per pass: slower, but exact.", type(model).__name__, change)
    _RESULTS[model] = sensitive
    return sensitive


def padding_sensitive(model: nn.Module, collate: Callable, row: Mapping[str, Any], refresh: bool = False) -> bool:
    """Whether padding changes `model`'s results (see the module docstring); checked on first use with `row` (a
    GRADIEND row, tokenised by `collate`) and cached per model (refresh=True checks again, e.g. after loading other
    weights). Logs a warning when it does."""
    if not refresh and model in _RESULTS:
        return _RESULTS[model]
    return _decide(model, probe_ids(collate, row), getattr(collate, "pad_id", 0), max_positions(model), refresh=True)


def inputs_padding_sensitive(model: nn.Module, inputs: Mapping[str, torch.Tensor], refresh: bool = False) -> bool:
    """padding_sensitive for code that holds collated model inputs (the gradient engine): probes with the longest row's
    real tokens (auxiliary mask ids left out), padded with the batch's own padding id (0 if nothing is padded), within
    the model's position limit. Same per-model cache."""
    if not refresh and model in _RESULTS:
        return _RESULTS[model]
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    padded = ids[~mask]
    pad_id = int(padded[0]) if len(padded) and int(padded[0]) >= 0 else 0
    longest = int(mask.sum(dim=1).argmax())
    row = [i for i in ids[longest][mask[longest]].tolist() if i >= 0][:PROBE_TOKENS]
    return _decide(model, row, pad_id, max_positions(model), refresh=True)


def rows_alone(inputs: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each row of a right-padded batch as a batch of one, cut to its own real length (attention_mask)."""
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    width = inputs["attention_mask"].shape[1]
    out = []
    for i, n in enumerate(lengths):
        out.append({k: v[i : i + 1, : int(n)] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == width
                    else v[i : i + 1] if torch.is_tensor(v) else v for k, v in inputs.items()})
    return out


def losses_row_by_row(
    losses_of: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    inputs: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Per-row losses of a padded batch computed one unpadded row per pass: `losses_of(row_inputs, row_labels)`
    returns {side: (1,) loss}; labels aligned with the input columns are cut like the inputs."""
    width = inputs["attention_mask"].shape[1]
    parts: dict[str, list[torch.Tensor]] = {side: [] for side in labels}
    for i, row in enumerate(rows_alone(inputs)):
        n = row["attention_mask"].shape[1]
        row_labels = {side: l[i : i + 1, :n] if l.dim() == 2 and l.shape[1] == width else l[i : i + 1]
                      for side, l in labels.items()}
        for side, loss in losses_of(row, row_labels).items():
            parts[side].append(loss)
    return {side: torch.cat(values) for side, values in parts.items()}
