"""Log-likelihoods the bias benchmarks compare, for any masked or causal LM (plain, or a GradiendModel as it stands).

Causal LMs: log P(tokens | preceding tokens) summed over a sentence (from a start token) or over a continuation.
Masked LMs: log P(target | input with one [MASK]) for prepared inputs (pseudo-log-likelihoods, words in a blank).
Every distinct model input is run once (a sentence scored twice shares its forward), inputs are batched by length with
right padding (attention_mask 0; a model whose numbers padding would change runs one row per pass), and inputs
longer than the model takes are refused before any forward pass.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import SpecialTokens, pad, padding_id, word_tokens
from ..lengths import max_positions
from ..objective import CAUSAL_LM, MASKED_LM, lm_objective, resolve_objective, scored_row_losses
from ..layout import padded_passes_exact

MaskedQuery = tuple[tuple[int, ...], int, int]  # (input ids holding one mask, its position, the target id there)


@dataclass(frozen=True)
class Scorer:
    """What is run (the plain transformers model), how it is read (objective) and how inputs are batched."""

    model: nn.Module
    tokenizer: Any
    objective: str
    batch_size: int = 16
    progress: bool = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def scorer_for(model: nn.Module, tokenizer: Any, objective: str = "auto", batch_size: int = 16,
               progress: bool = True) -> Scorer:
    """A Scorer for a transformers LM or a GradiendModel. A GradiendModel is scored through its base model in its
    current state: inside `with model.apply_edit(...)` that is the edited model (no copy is made)."""
    from ..model import GradiendModel

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if tokenizer is None or not callable(tokenizer):
        raise TypeError("The benchmarks need the model's tokenizer (a transformers tokenizer) as second argument.")
    if isinstance(model, GradiendModel):
        base, resolved = model.get_base_model(), model.lm_objective
        if objective != "auto":
            resolved = lm_objective(objective)
    else:
        base, resolved = model, lm_objective(resolve_objective(model, objective))
    if resolved not in (MASKED_LM, CAUSAL_LM):
        raise ValueError(f"objective must be 'auto', 'masked_lm' or 'causal_lm', got {objective!r}.")
    if resolved == MASKED_LM:
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError("Scoring a masked LM needs a tokenizer with a mask token; this one has none.")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("Scoring a masked LM needs a fast tokenizer (character offsets): load it with "
                             "AutoTokenizer.from_pretrained(..., use_fast=True).")
    if base.training:
        raise ValueError("The model is in training mode (dropout makes scores random); call model.eval() first.")
    return Scorer(base, tokenizer, resolved, batch_size, progress)


def start_ids(tokenizer: Any) -> list[int]:
    """Tokens a sentence is scored after: the tokenizer's own leading special tokens (Llama's <s>) if it adds any,
    else its BOS token (GPT-2's <|endoftext|>), else its EOS token, else none (the first token is then not
    scored)."""
    head = SpecialTokens.of(tokenizer).head
    if head:
        return list(head)
    for token_id in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return [int(token_id)]
    return []


def check_lengths(scorer: Scorer, sequences: Sequence[Sequence[int]], what: Sequence[str]) -> None:
    """Refuse inputs longer than the model's position table, naming the first one, before any forward pass."""
    limit = max_positions(scorer.model)
    if limit is None:
        return
    for ids, name in zip(sequences, what):
        if len(ids) > limit:
            raise ValueError(f"{name} is {len(ids)} tokens long, but {type(scorer.model).__name__} takes at most "
                             f"{limit}; leave it out (e.g. a smaller subset) or use a model with longer inputs.")


def forward_kwargs(model: nn.Module) -> dict[str, Any]:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in parameters else {}


def batched(scorer: Scorer, sequences: Sequence[Sequence[int]], desc: str):
    """Yield (indices, inputs) over `sequences` in batches of similar length, right-padded; where padding would
    change a model's numbers (layout.padded_passes_exact: Funnel, ConvBERT, ...) rows of different lengths run one
    per pass, unpadded."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    pad_id = padding_id(scorer.tokenizer)
    causal = scorer.objective == CAUSAL_LM
    bar = tqdm(total=len(order), desc=desc, disable=not scorer.progress, leave=False)
    for start in range(0, len(order), scorer.batch_size):
        chunk = order[start : start + scorer.batch_size]
        rows = [list(sequences[i]) for i in chunk]
        longest = max(len(r) for r in rows)
        if any(len(r) != longest for r in rows) and not padded_passes_exact(scorer.model, causal, longest):
            parts = [([i], [r]) for i, r in zip(chunk, rows)]
        else:
            parts = [(chunk, rows)]
        for indices, part in parts:
            inputs = {"input_ids": pad(part, pad_id), "attention_mask": pad([[1] * len(r) for r in part], 0)}
            yield indices, {k: v.to(scorer.device) for k, v in inputs.items()}
        bar.update(len(chunk))
    bar.close()


@torch.no_grad()
def causal_logprobs(scorer: Scorer, sequences: Sequence[Sequence[int]], starts: Sequence[int],
                    desc: str = "log-likelihoods", names: Optional[Sequence[str]] = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log P(ids[i] | ids[:i]) over i >= start, number of tokens summed) per sequence; duplicates are run
    once."""
    keys = [(tuple(ids), int(s)) for ids, s in zip(sequences, starts)]
    if any(s < 1 or s >= len(ids) for ids, s in keys):
        raise ValueError("Each scored sequence needs a start in 1..length-1 (token 0 has no context).")
    unique = list(dict.fromkeys(keys))
    check_lengths(scorer, [ids for ids, _ in unique], names_of(unique, keys, names))
    sums, counts = np.zeros(len(unique)), np.zeros(len(unique), dtype=int)
    extra = forward_kwargs(scorer.model)
    for chunk, inputs in batched(scorer, [ids for ids, _ in unique], desc):
        logits = scorer.model(**inputs, **extra).logits[:, :-1]
        targets = inputs["input_ids"][:, 1:]
        lengths = inputs["attention_mask"].sum(dim=1)
        positions = torch.arange(targets.shape[1], device=targets.device) + 1  # the position of each target token
        first = torch.tensor([unique[i][1] for i in chunk], device=targets.device)
        scored = (positions[None] >= first[:, None]) & (positions[None] < lengths[:, None])
        rows = torch.arange(len(chunk), device=targets.device)[:, None].expand_as(targets)
        nll = scored_row_losses(logits[scored], targets[scored], rows[scored], len(chunk))
        sums[chunk] = (-nll).double().cpu().numpy()
        counts[chunk] = scored.sum(dim=1).cpu().numpy()
    where = {key: i for i, key in enumerate(unique)}
    index = np.array([where[key] for key in keys], dtype=int)
    return sums[index], counts[index]


def names_of(unique: Sequence[Any], keys: Sequence[Any], names: Optional[Sequence[str]]) -> list[str]:
    """A readable name per unique input for error messages (the first example that uses it)."""
    first = {}
    for i, key in enumerate(keys):
        first.setdefault(key, names[i] if names is not None else f"Input {i}")
    return [first[key] for key in unique]


def sentence_logprobs(scorer: Scorer, texts: Sequence[str], desc: str = "sentences",
                      names: Optional[Sequence[str]] = None) -> tuple[np.ndarray, np.ndarray]:
    """log P(text) of a causal LM, every token scored after `start_ids` (sum, token count)."""
    start = start_ids(scorer.tokenizer)
    encoded = scorer.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    sequences = [start + list(ids) for ids in encoded]
    for text, ids in zip(texts, encoded):
        if not ids:
            raise ValueError(f"The text {text!r} tokenizes to nothing.")
    return causal_logprobs(scorer, sequences, [max(len(start), 1)] * len(sequences), desc, names)


@torch.no_grad()
def bias_bench_scores(scorer: Scorer, texts: Sequence[str], desc: str = "sentences",
                      names: Optional[Sequence[str]] = None) -> np.ndarray:
    """Mean log-probability per token of each text, as Bias Bench scores causal LMs on CrowS-Pairs and StereoSet (the
    log of its geometric-mean token probability): the first token from the start tokens alone (start_ids), every
    later one from the text's own earlier tokens, without the start tokens. Length-normalised, so a group word of more
    tokens is not penalised for its length."""
    encoded = scorer.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, encoded):
        if not ids:
            raise ValueError(f"The text {text!r} tokenizes to nothing.")
    check_lengths(scorer, encoded, list(names) if names is not None else [f"Text {i}" for i in range(len(texts))])
    start = start_ids(scorer.tokenizer)
    first = np.zeros(len(encoded))
    if start:
        inputs = torch.tensor([start], device=scorer.device)
        logp = scorer.model(input_ids=inputs, **forward_kwargs(scorer.model)).logits[0, -1].float().log_softmax(-1)
        first = logp[[ids[0] for ids in encoded]].double().cpu().numpy()
    longer = [i for i, ids in enumerate(encoded) if len(ids) > 1]
    sums, counts = np.zeros(len(encoded)), np.zeros(len(encoded), dtype=int)
    if longer:
        rest, n = causal_logprobs(scorer, [encoded[i] for i in longer], [1] * len(longer), desc,
                                  [names[i] for i in longer] if names is not None else None)
        sums[longer], counts[longer] = rest, n
    scored = counts + (1 if start else 0)
    if (scored == 0).any():
        raise ValueError(f"The text {texts[int(np.argmax(scored == 0))]!r} is one token and the tokenizer has no start "
                         "token to score it after.")
    return (sums + first) / scored


def continuation_logprobs(scorer: Scorer, prompts: Sequence[str], continuations: Sequence[str],
                          desc: str = "continuations", names: Optional[Sequence[str]] = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """log P(" " + continuation | start + prompt) of a causal LM (sum, token count): the continuation's tokens as
    they appear after the prompt (data.word_tokens), separated from it by one space."""
    start = start_ids(scorer.tokenizer)
    contexts, targets = word_tokens(scorer.tokenizer, [p.rstrip() + " " for p in prompts], list(continuations))
    sequences = [start + list(c) + list(t) for c, t in zip(contexts, targets)]
    firsts = [max(len(start) + len(c), 1) for c in contexts]
    return causal_logprobs(scorer, sequences, firsts, desc, names)


@torch.no_grad()
def masked_logprobs(scorer: Scorer, queries: Sequence[MaskedQuery], desc: str = "masked tokens",
                    names: Optional[Sequence[str]] = None) -> np.ndarray:
    """log P(target at the masked position | the input) per query; identical queries are run once, and queries that
    share their input share the forward."""
    unique = list(dict.fromkeys(queries))
    inputs_of = list(dict.fromkeys(ids for ids, _, _ in unique))
    check_lengths(scorer, inputs_of, names_of(inputs_of, [q[0] for q in queries], names))
    slot = {ids: i for i, ids in enumerate(inputs_of)}
    by_input: dict[int, list[int]] = {}
    for q, (ids, _, _) in enumerate(unique):
        by_input.setdefault(slot[ids], []).append(q)
    values = np.zeros(len(unique))
    for chunk, inputs in batched(scorer, inputs_of, desc):
        logits = scorer.model(**inputs).logits
        rows, positions, targets, owners = [], [], [], []
        for row, input_index in enumerate(chunk):
            for q in by_input[input_index]:
                rows.append(row)
                positions.append(unique[q][1])
                targets.append(unique[q][2])
                owners.append(q)
        picked = logits[torch.tensor(rows, device=logits.device), torch.tensor(positions, device=logits.device)].float()
        logp = -torch.nn.functional.cross_entropy(picked, torch.tensor(targets, device=picked.device),
                                                  reduction="none")
        values[owners] = logp.double().cpu().numpy()
    where = {q: i for i, q in enumerate(unique)}
    return values[[where[q] for q in queries]]


def span_tokens(tokenizer: Any, text: str, start: int, end: int) -> tuple[list[int], list[int]]:
    """(token ids of `text` with the tokenizer's special tokens, positions of the tokens overlapping characters
    start:end)."""
    encoded = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    positions = [i for i, ((a, b), special) in enumerate(zip(encoded["offset_mapping"], encoded["special_tokens_mask"]))
                 if not special and a < end and b > start and b > a]
    if not positions:
        raise ValueError(f"No token of {text!r} covers characters {start}:{end} ({text[start:end]!r}).")
    return list(encoded["input_ids"]), positions


def progressive_queries(tokenizer: Any, text: str, start: int, end: int) -> list[MaskedQuery]:
    """Masked-LM queries for the word at characters start:end of `text`, one per token: token j is masked with the
    word's earlier tokens in place and its later tokens left out (StereoSet's progressive unmasking; a one-token word
    is a plain single mask)."""
    ids, positions = span_tokens(tokenizer, text, start, end)
    last = positions[-1]
    mask = tokenizer.mask_token_id
    return [(tuple(ids[:p] + [mask] + ids[last + 1 :]), p, ids[p]) for p in positions]
