"""Language-modelling score on neutral text: does the edited model still model language?

Masked LMs: accuracy of predicting 15% masked tokens (positions fixed by a seed, so every candidate sees the same).
Causal LMs: mean next-token NLL with the usual shift (logits at i predict token i+1); LMS = 1 / (1 + NLL), a monotone
transform, and the perplexity exp(NLL) is reported too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from ..data import pad, padding_id
from ..objective import CAUSAL_LM, IGNORE_INDEX

if TYPE_CHECKING:
    from .replay import GridForward


@dataclass
class LMSBatch:
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # aligned with the logits; IGNORE_INDEX where nothing is scored


@dataclass(frozen=True)
class LMSResult:
    lms: float
    nll: Optional[float] = None
    perplexity: Optional[float] = None
    accuracy: Optional[float] = None
    tokens: int = 0


def lms_batches(
    tokenizer, texts: Sequence[str], objective: str, batch_size: int = 16, max_length: Optional[int] = 128,
    mask_fraction: float = 0.15, seed: int = 0,
) -> list[LMSBatch]:
    """Tokenised neutral texts with their scored positions (fixed once, reused for every candidate).

    Texts are batched in order of length (the score sums over tokens, so the order does not matter), which keeps
    padding, i.e. wasted compute, small. Padding is done here (data.padding_id, attention_mask 0, never scored), so a
    tokenizer without a pad token (Llama, Mistral, GPT-NeoX) works and is not changed. `max_length` keeps the first
    max_length tokens of a longer text (the score is then that of the text's beginning; evaluate_decoder keeps it
    within the model's position limit); None keeps every token."""
    if not texts:
        raise ValueError("The language-modelling score needs neutral_texts: sentences without feature words.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    cut = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    encoded = tokenizer(list(texts), return_special_tokens_mask=True, **cut)
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    generator = torch.Generator().manual_seed(seed)
    pad_id = padding_id(tokenizer)
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = order[start : start + batch_size]
        token_ids = [encoded["input_ids"][i] for i in chunk]
        ids = pad(token_ids, pad_id)
        attention = pad([[1] * len(t) for t in token_ids], 0)
        special = pad([encoded["special_tokens_mask"][i] for i in chunk], 1).bool() | (attention == 0)
        if objective == CAUSAL_LM:
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[:, :-1] = ids[:, 1:]
            labels[:, :-1][attention[:, 1:] == 0] = IGNORE_INDEX
            out.append(LMSBatch({"input_ids": ids, "attention_mask": attention}, labels))
            continue
        if tokenizer.mask_token_id is None:
            raise ValueError("A masked-LM score needs a tokenizer with a mask token.")
        chosen = (torch.rand(ids.shape, generator=generator) < mask_fraction) & ~special
        for row in range(ids.shape[0]):  # every text scores at least one token
            candidates = (~special[row]).nonzero().flatten()
            if not chosen[row].any() and len(candidates):
                chosen[row, candidates[torch.randint(len(candidates), (1,), generator=generator)]] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        masked = torch.where(chosen, torch.full_like(ids, tokenizer.mask_token_id), ids)
        out.append(LMSBatch({"input_ids": masked, "attention_mask": attention}, labels))
    return out


@torch.no_grad()
def language_modelling_score(
    base_model: torch.nn.Module, batches: Sequence[LMSBatch], objective: str, forward: Optional["GridForward"] = None
) -> LMSResult:
    """The score over all batches; with a GridForward (decoder grids) only the scored positions' logits are computed."""
    total_nll, correct, count = 0.0, 0, 0
    for batch in batches:
        scored = batch.labels != IGNORE_INDEX
        if forward is None:
            chosen_logits = base_model(**batch.inputs).logits[scored].float()
        else:
            chosen_logits = forward.logits(id(batch), batch.inputs, scored).float()
        targets = batch.labels[scored]
        total_nll += float(torch.nn.functional.cross_entropy(chosen_logits, targets, reduction="sum"))
        if objective != CAUSAL_LM:  # accuracy is the masked-LM score; a causal LM is scored by its NLL only
            correct += int((chosen_logits.argmax(-1) == targets).sum())
        count += int(scored.sum())
    if count == 0:
        raise ValueError("No token of the neutral texts could be scored; give longer neutral texts.")
    if objective == CAUSAL_LM:
        nll = total_nll / count
        return LMSResult(lms=1.0 / (1.0 + nll), nll=nll, perplexity=math.exp(min(nll, 700.0)), tokens=count)
    return LMSResult(lms=correct / count, accuracy=correct / count, nll=total_nll / count, tokens=count)
