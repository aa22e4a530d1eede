"""The language-modelling objective GRADIEND differentiates: cross-entropy at the feature position(s) only."""

from __future__ import annotations

import torch
from torch import nn

MASKED_LM = "masked_lm"
CAUSAL_LM = "causal_lm"
# causal LM + auxiliary masked-prediction head (aux_head.py): both sides of the mask count
AUXILIARY_MLM = "auxiliary_mlm"
IGNORE_INDEX = -100
AUXILIARY_MASK_ID = -1  # input id of the added mask token; its embedding row lives in the auxiliary head, not the base


def lm_objective(objective: str) -> str:
    """The objective of the model's own LM head (evaluation, LMS, rewriting): the auxiliary head is only for
    gradients."""
    return CAUSAL_LM if objective == AUXILIARY_MLM else objective


# Model classes GRADIEND's objectives cannot score, each with the reason (checked before any work).
UNSUPPORTED = {
    "XLNetLMHeadModel": "XLNet is listed as a causal LM by transformers, but its permutation LM attends both ways "
                        "unless given a perm_mask per row, so neither objective scores it",
    "NystromformerForMaskedLM": "Nystromformer's attention only takes inputs of one fixed length (its segment "
                                "means), so rows of their own lengths cannot be scored",
}


def check_supported(model: nn.Module) -> None:
    """Refuse, naming the reason, a model whose word probabilities GRADIEND cannot compute as the method defines."""
    name = type(model).__name__
    if name in UNSUPPORTED:
        raise ValueError(f"{name} is not supported: {UNSUPPORTED[name]}. Use a masked LM (BERT, RoBERTa, ...) or a "
                         "causal LM (GPT-2, Llama, ...); see README 'Tested architectures'.")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model, which GRADIEND does not support (it scores a masked "
                         "or a causal LM's own word probabilities). Use a masked LM or a causal LM.")


def resolve_objective(model: nn.Module, objective: str = "auto") -> str:
    """'masked_lm' or 'causal_lm' for a transformers model, from its class (the AutoModel mappings).

    An explicit objective ('masked_lm', 'causal_lm', 'auxiliary_mlm') is returned as given."""
    check_supported(model)
    if objective != "auto":
        return objective
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    name = type(model).__name__
    if name in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()):
        return MASKED_LM
    if name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return CAUSAL_LM
    if name.endswith("ForMaskedLM"):
        return MASKED_LM
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return CAUSAL_LM
    raise ValueError(
        f"Cannot tell whether {name} is a masked or a causal LM; pass GradiendConfig(objective='masked_lm') "
        "or objective='causal_lm'."
    )


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row -log P(target word): the sum of token cross-entropies where `labels` is set.

    `labels` is aligned with `logits` (labels[b, i] is the token that logits[b, i] should predict); the collator
    already did the causal shift, so nothing is shifted here.
    """
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    return scored_row_losses(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), rows.reshape(-1), labels.shape[0]
    )


def scored_row_losses(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """row_losses from logits at gathered positions only: `logits` (N, vocab), `labels` (N,) and the row of each
    position (N,); positions a side does not score (label -100) add nothing. The one per-row cross-entropy of the
    package: gradients, forward-mode encodings and the decoder grid's probabilities all come from here."""
    valid = labels != IGNORE_INDEX
    token_nll = torch.nn.functional.cross_entropy(logits[valid].float(), labels[valid], reduction="none")
    per_row = torch.zeros(n_rows, dtype=token_nll.dtype, device=token_nll.device)
    return per_row.index_add(0, rows[valid], token_nll)
