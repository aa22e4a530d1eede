"""Naive reference computations the engine is checked against: one row at a time, text tokenised whole."""

from __future__ import annotations

import torch

from gradiend_hf.data import MASK


def masked_text_ids(tokenizer, masked: str, word: str) -> tuple[list[int], list[int], list[int]]:
    """(input ids, mask positions, target ids) for a masked LM, built from strings: the word's pieces in context."""
    left, right = masked.split(MASK)
    full = tokenizer(left + word + right)["input_ids"]
    stem = tokenizer(left.rstrip())["input_ids"][:-1]  # drop the trailing [SEP]
    tail = tokenizer(right)["input_ids"][1:]  # drop the leading [CLS]
    k = len(full) - len(stem) - len(tail)
    target = full[len(stem) : len(stem) + k]
    ids = stem + [tokenizer.mask_token_id] * k + tail
    return ids, list(range(len(stem), len(stem) + k)), target


def causal_text_ids(tokenizer, masked: str, word: str) -> tuple[list[int], list[int]]:
    """(ids of prefix+word, positions of the word's tokens) for a causal LM, from the whole text."""
    left = masked.split(MASK)[0]
    prefix = left.rstrip()
    head = tokenizer("")["input_ids"]  # start tokens the tokenizer adds by itself (Gemma's, Llama's <bos>), if any
    prefix_ids = tokenizer(prefix)["input_ids"] if prefix else list(head)
    start = [] if prefix_ids else [tokenizer.bos_token_id]  # no context at all: the word follows the BOS token
    full = start + tokenizer(left + word)["input_ids"]
    n_prefix = len(start) + len(prefix_ids)
    return full, list(range(n_prefix, len(full)))


def row_nll(model, tokenizer, objective: str, masked: str, word: str, dtype=None) -> torch.Tensor:
    """-log P(word | context) of one row, computed by hand from the logits; with `dtype` the forward runs under
    torch.autocast(dtype) and the loss is taken from float32 logits."""
    if objective == "masked_lm":
        ids, positions, target = masked_text_ids(tokenizer, masked, word)
    else:
        ids, scored = causal_text_ids(tokenizer, masked, word)
        positions, target = [pos - 1 for pos in scored], [ids[pos] for pos in scored]
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = logits.float().log_softmax(-1)
    return -sum(logp[pos, tok] for pos, tok in zip(positions, target))


def naive_gradients(
    model, tokenizer, objective: str, rows: list[dict], side: str, names: list[str], dtype=None
) -> dict[str, torch.Tensor]:
    """Gradient of the mean over rows of -log P(word), with a separate forward/backward per row and target (under
    autocast to `dtype` when given)."""
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
        params[n].grad = None
    for row in rows:
        (row_nll(model, tokenizer, objective, row["masked"], row[side], dtype) / len(rows)).backward()
    grads = {n: params[n].grad.detach().clone() for n in names}
    for n in names:
        params[n].requires_grad_(False)
        params[n].grad = None
    return grads
