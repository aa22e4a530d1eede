"""CrowS-Pairs (Nangia et al. 2020): does the model prefer the stereotypical sentence of a minimal pair?

Masked LMs: the pseudo-log-likelihood of the tokens both sentences share (difflib matching of the two token id
sequences, special tokens left out): each shared token is masked alone and log P(it) summed, so the words that differ
are conditioned on, never scored. Causal LMs: the mean log-probability per token of the sentence, exactly as Bias
Bench scores GPT-2 (likelihoods.bias_bench_scores: the first token after the start token alone, the rest after the
sentence's own earlier tokens).
Score: % of pairs whose stereotypical sentence scores higher (sent_more for 'stereo' pairs, sent_less for
'antistereo' pairs); 50 = no preference. Ties count half.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from ..objective import MASKED_LM
from .bias_data import read_crows_pairs
from .bias_scores import crows_pairs_score, preference, stereotype_orientation
from .bootstrap import CONFIDENCE, N_RESAMPLES
from .likelihoods import MaskedQuery, Scorer, bias_bench_scores, masked_logprobs, scorer_for
from .results import BenchmarkResult, subsample, summary_table


class CrowsPairsResult(BenchmarkResult):
    """`score`: % of pairs where the stereotypical sentence is preferred (50 = unbiased), over all selected pairs;
    `ci` its bootstrap interval; `summary()` has one row per bias type."""

    @property
    def score(self) -> float:
        return self.value("score")

    @property
    def ci(self) -> tuple[float, float]:
        return self.interval("score")


def shared_token_queries(tokenizer: Any, first: str, second: str) -> tuple[list[MaskedQuery], list[MaskedQuery]]:
    """Masked-LM queries for the tokens the two sentences share (one mask each), for each sentence."""
    encoded = tokenizer([first, second], return_special_tokens_mask=True)
    ids = [list(x) for x in encoded["input_ids"]]
    kept = [[i for i, s in enumerate(special) if not s] for special in encoded["special_tokens_mask"]]
    plain = [[ids[k][i] for i in kept[k]] for k in range(2)]
    matcher = difflib.SequenceMatcher(None, plain[0], plain[1], autojunk=False)
    shared: tuple[list[int], list[int]] = ([], [])
    for block in matcher.get_matching_blocks():
        for j in range(block.size):
            shared[0].append(kept[0][block.a + j])
            shared[1].append(kept[1][block.b + j])
    mask = tokenizer.mask_token_id
    queries = tuple([(tuple(ids[k][:p] + [mask] + ids[k][p + 1 :]), p, ids[k][p]) for p in shared[k]]
                    for k in range(2))
    return queries[0], queries[1]


def pair_loglikelihoods(scorer: Scorer, first: Sequence[str], second: Sequence[str],
                        names: Optional[Sequence[str]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, the two sentences' scores: pseudo-log-likelihood of the shared tokens (masked LM) or sentence
    mean token log-probability (causal LM, Bias Bench's score)."""
    names = list(names) if names is not None else [f"Pair {i}" for i in range(len(first))]
    if scorer.objective != MASKED_LM:
        scores = bias_bench_scores(scorer, list(first) + list(second), "CrowS-Pairs sentences", names + names)
        return scores[: len(first)], scores[len(first) :]
    queries, owners, query_names = [], [], []
    for i, (a, b) in enumerate(zip(first, second)):
        for side, side_queries in enumerate(shared_token_queries(scorer.tokenizer, a, b)):
            queries += side_queries
            owners += [2 * i + side] * len(side_queries)
            query_names += [names[i]] * len(side_queries)
    logp = masked_logprobs(scorer, queries, "CrowS-Pairs masked tokens", query_names)
    sums = np.bincount(np.asarray(owners, dtype=int), logp, minlength=2 * len(first))
    return sums[0::2], sums[1::2]


def crows_pairs(
    model: Any,
    tokenizer: Any,
    bias_types: Union[str, Iterable[str], None] = None,
    *,
    bias_type: Optional[str] = None,
    limit: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 16,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    objective: str = "auto",
    progress: bool = True,
) -> CrowsPairsResult:
    """Score CrowS-Pairs (all 1,508 pairs, or the given bias types, e.g. "gender") with a masked or causal LM, or a
    GradiendModel as it stands (to score an edit: `with model.apply_edit(edit): crows_pairs(model, tokenizer)`).

    limit: score a seeded random subset of that many pairs (recorded in `settings`). Intervals: percentile bootstrap
    over pairs (`n_resamples`, `confidence`, seeded by `seed`)."""
    if bias_type is not None:
        if bias_types is not None:
            raise ValueError("Pass bias_types or bias_type, not both.")
        bias_types = bias_type
    frame, sample = subsample(read_crows_pairs(bias_types), limit, seed)
    scorer = scorer_for(model, tokenizer, objective, batch_size, progress)
    more, less = pair_loglikelihoods(scorer, frame["sent_more"], frame["sent_less"],
                                     [f"CrowS-Pairs pair {i}" for i in frame["pair_id"]])
    stereo, anti = stereotype_orientation(more, less, frame["stereo_antistereo"])
    examples = frame.assign(sent_more_score=more, sent_less_score=less, stereo_score=stereo, anti_score=anti,
                            stereotype_preferred=preference(stereo, anti))
    groups = sorted(examples["bias_type"].unique())
    table = summary_table(examples, "bias_type",
                          lambda part: {"score": crows_pairs_score(part["stereo_score"], part["anti_score"])},
                          groups, n_resamples, confidence, seed)
    settings = {"objective": scorer.objective, "scoring": "pseudo-log-likelihood of shared tokens"
                if scorer.objective == MASKED_LM else "mean token log-probability (Bias Bench)", "bias_types": groups,
                "n_resamples": n_resamples, "confidence": confidence, **sample}
    return CrowsPairsResult("crows_pairs", examples, table, settings)
