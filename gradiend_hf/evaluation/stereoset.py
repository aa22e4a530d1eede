"""StereoSet intrasentence (Nadeem et al. 2021): stereotype vs anti-stereotype vs unrelated word in a blank.

Each triple's three candidates are scored in their sentence (the context with BLANK filled in, original casing):
masked LMs score the word in the blank, the mean log-probability of its tokens with progressive unmasking (token j
masked, the word's earlier tokens in place, its later ones left out; as the paper's masked-LM evaluation; the word
count is taken at the first BLANK of the two contexts that have two, the second holding the word); causal LMs score
the sentence's mean log-probability per token, exactly as Bias Bench scores GPT-2 (likelihoods.bias_bench_scores).
SS: % stereotype preferred over anti-stereotype; LMS: % of the meaningful-vs-unrelated comparisons (stereotype vs
unrelated, anti-stereotype vs unrelated) won by the meaningful sentence; ICAT = LMS * min(SS, 100 - SS) / 50.
averaging='target' (default) averages SS and LMS over target terms within a domain as the official evaluation
script does (comparable to published numbers); 'example' pools all triples.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import numpy as np
import pandas as pd

from ..objective import MASKED_LM
from .bias_data import BLANK, read_stereoset
from .bias_scores import preference, stereoset_scores
from .bootstrap import CONFIDENCE, N_RESAMPLES
from .likelihoods import Scorer, bias_bench_scores, masked_logprobs, progressive_queries, scorer_for
from .results import BenchmarkResult, subsample, summary_table

LABELS = ("stereotype", "anti_stereotype", "unrelated")
AVERAGING = ("target", "example")


class StereoSetResult(BenchmarkResult):
    """`ss`, `lms`, `icat` (percent) over all selected triples, `ci[metric]` their intervals; `summary()` per domain."""

    @property
    def ss(self) -> float:
        return self.value("ss")

    @property
    def lms(self) -> float:
        return self.value("lms")

    @property
    def icat(self) -> float:
        return self.value("icat")

    @property
    def ci(self) -> dict[str, tuple[float, float]]:
        return {m: self.interval(m) for m in ("ss", "lms", "icat")}


def candidate_scores(scorer: Scorer, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per label, each triple's candidate score (mean token log-prob of the word for masked LMs, of the sentence for
    causal LMs)."""
    names = [f"StereoSet example {i}" for i in frame["id"]]
    if scorer.objective != MASKED_LM:
        texts = [t for label in LABELS for t in frame[f"{label}_sentence"]]
        scores = bias_bench_scores(scorer, texts, "StereoSet sentences", names * len(LABELS))
        return {label: scores[k * len(frame) : (k + 1) * len(frame)] for k, label in enumerate(LABELS)}
    queries, owners, query_names = [], [], []
    for k, label in enumerate(LABELS):
        for i, (context, word) in enumerate(zip(frame["context"], frame[f"{label}_word"])):
            start = len(context.split(BLANK)[0])
            word_queries = progressive_queries(scorer.tokenizer, context.replace(BLANK, word), start,
                                               start + len(word))
            queries += word_queries
            owners += [k * len(frame) + i] * len(word_queries)
            query_names += [names[i]] * len(word_queries)
    logp = masked_logprobs(scorer, queries, "StereoSet masked tokens", query_names)
    owners_array = np.asarray(owners, dtype=int)
    total = np.bincount(owners_array, logp, minlength=len(LABELS) * len(frame))
    count = np.bincount(owners_array, minlength=len(LABELS) * len(frame))
    mean = total / count
    return {label: mean[k * len(frame) : (k + 1) * len(frame)] for k, label in enumerate(LABELS)}


def stereoset(
    model: Any,
    tokenizer: Any,
    domains: Union[str, Iterable[str], None] = None,
    *,
    domain: Optional[str] = None,
    averaging: str = "target",
    limit: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 16,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    objective: str = "auto",
    progress: bool = True,
) -> StereoSetResult:
    """Score StereoSet intrasentence (dev: 2,106 triples; or the given domains, e.g. "gender") with a masked or
    causal LM, or a GradiendModel as it stands (to score an edit: `with model.apply_edit(edit): stereoset(...)`).

    limit: a seeded random subset of that many triples. Intervals: percentile bootstrap over triples."""
    if domain is not None:
        if domains is not None:
            raise ValueError("Pass domains or domain, not both.")
        domains = domain
    if averaging not in AVERAGING:
        raise ValueError(f"averaging must be one of {AVERAGING}, got {averaging!r}.")
    frame, sample = subsample(read_stereoset(domains), limit, seed)
    scorer = scorer_for(model, tokenizer, objective, batch_size, progress)
    scores = candidate_scores(scorer, frame)
    examples = frame.assign(**{f"{label}_score": scores[label] for label in LABELS})
    examples["stereotype_preferred"] = preference(scores["stereotype"], scores["anti_stereotype"])
    examples["meaningful_preferred"] = (preference(scores["stereotype"], scores["unrelated"])
                                        + preference(scores["anti_stereotype"], scores["unrelated"])) / 2

    def metrics(part: pd.DataFrame) -> dict[str, float]:
        targets = part["target"] if averaging == "target" else None
        return stereoset_scores(part["stereotype_score"], part["anti_stereotype_score"], part["unrelated_score"],
                                targets)

    groups = sorted(examples["bias_type"].unique())
    table = summary_table(examples, "bias_type", metrics, groups, n_resamples, confidence,
                          seed).rename(columns={"bias_type": "domain"})
    settings = {"objective": scorer.objective, "averaging": averaging, "domains": groups,
                "scoring": "mean token log-prob of the word, progressive unmasking" if scorer.objective == MASKED_LM
                else "mean token log-probability (Bias Bench)", "n_resamples": n_resamples, "confidence": confidence,
                **sample}
    return StereoSetResult("stereoset", examples, table, settings)
