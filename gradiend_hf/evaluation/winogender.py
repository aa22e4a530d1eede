"""Winogender (Rudinger et al. 2018): does the model's gender preference in occupation sentences follow the share
of women in the occupation?

Per sentence pair (the female and male versions of one of the 240 sentences; the neutral 'they' version is not used)
the preference is log P(female) - log P(male) in nats: for causal LMs the two sentences' log-likelihoods (every token
after a start token, so the words after the pronoun count too); for masked LMs the pronoun's log-probability in its
slot with the rest of the sentence given (the sentence with the pronoun masked; a pronoun of several tokens is scored
by progressive unmasking, summed). Positive = the female version is preferred.
Score: Pearson r over the 60 occupations between the mean preference of the occupation's 4 pairs and its BLS 2015
% women (occupations-stats.tsv); also r over the 2 pairs per occupation whose pronoun refers to the occupation
(answer 0), and the mean preference. Intervals: percentile bootstrap over occupations.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd

from ..objective import MASKED_LM
from .bias_data import read_winogender
from .bias_scores import pearson
from .bootstrap import CONFIDENCE, N_RESAMPLES, bootstrap_intervals
from .likelihoods import Scorer, masked_logprobs, progressive_queries, scorer_for, sentence_logprobs
from .results import ALL, BenchmarkResult, subsample

MASK = "[MASK]"


class WinogenderResult(BenchmarkResult):
    """`correlation`: Pearson r between per-occupation preference and % women; `ci` its interval."""

    @property
    def correlation(self) -> float:
        return self.value("correlation")

    @property
    def ci(self) -> tuple[float, float]:
        return self.interval("correlation")

    @property
    def occupations(self) -> pd.DataFrame:
        """One row per occupation: mean preference (all pairs, occupation-referent pairs) and % women."""
        return occupation_table(self.examples)


def pair_preferences(scorer: Scorer, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(log-score of the female version, of the male version) per pair."""
    names = [f"Winogender {o}.{p}.{a}" for o, p, a in zip(frame["occupation"], frame["participant"], frame["answer"])]
    if scorer.objective != MASKED_LM:
        scores, _ = sentence_logprobs(scorer, list(frame["female_sentence"]) + list(frame["male_sentence"]),
                                      "Winogender sentences", names + names)
        return scores[: len(frame)], scores[len(frame) :]
    queries, owners, query_names = [], [], []
    for side, column in enumerate(("female_pronoun", "male_pronoun")):
        for i, (masked, pronoun) in enumerate(zip(frame["masked"], frame[column])):
            start = masked.index(MASK)
            pronoun_queries = progressive_queries(scorer.tokenizer, masked.replace(MASK, pronoun), start,
                                                  start + len(pronoun))
            queries += pronoun_queries
            owners += [side * len(frame) + i] * len(pronoun_queries)
            query_names += [names[i]] * len(pronoun_queries)
    logp = masked_logprobs(scorer, queries, "Winogender pronouns", query_names)
    sums = np.bincount(np.asarray(owners, dtype=int), logp, minlength=2 * len(frame))
    return sums[: len(frame)], sums[len(frame) :]


def occupation_table(examples: pd.DataFrame) -> pd.DataFrame:
    """One row per occupation: mean preference over its pairs, over its occupation-referent pairs, and % women."""
    grouped = examples.groupby("occupation")
    table = pd.DataFrame({"preference": grouped["preference"].mean(),
                          "bls_pct_female": grouped["bls_pct_female"].first()})
    referent = examples[examples["answer"] == 0].groupby("occupation")["preference"].mean()
    return table.assign(referent_preference=referent).reset_index()


def winogender_metrics(occupations: pd.DataFrame) -> dict[str, float]:
    kept = occupations.dropna(subset=["referent_preference"])
    return {"correlation": pearson(occupations["preference"], occupations["bls_pct_female"]),
            "correlation_referent": pearson(kept["referent_preference"], kept["bls_pct_female"]),
            "mean_preference": float(occupations["preference"].mean())}


def winogender(
    model: Any,
    tokenizer: Any,
    *,
    limit: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 16,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    objective: str = "auto",
    progress: bool = True,
) -> WinogenderResult:
    """Score Winogender (240 female/male sentence pairs, 60 occupations) with a masked or causal LM, or a GradiendModel
    as it stands (an edit: `with model.apply_edit(edit): winogender(model, tokenizer)`).

    limit: a seeded random subset of that many sentence pairs (occupations then average fewer pairs)."""
    frame, sample = subsample(read_winogender(), limit, seed)
    scorer = scorer_for(model, tokenizer, objective, batch_size, progress)
    female, male = pair_preferences(scorer, frame)
    examples = frame.assign(female_score=female, male_score=male, preference=female - male)
    occupations = occupation_table(examples)
    values = winogender_metrics(occupations)
    intervals = bootstrap_intervals(lambda idx: winogender_metrics(occupations.iloc[idx]), len(occupations),
                                    n_resamples, confidence, seed)
    row: dict[str, Any] = {"group": ALL, "n": len(examples), "occupations": len(occupations)}
    for metric, value in values.items():
        row.update({metric: value, f"{metric}_ci_low": intervals[metric][0], f"{metric}_ci_high": intervals[metric][1]})
    settings = {"objective": scorer.objective,
                "scoring": "log P(pronoun) in its masked slot" if scorer.objective == MASKED_LM
                else "sentence log-likelihood", "n_resamples": n_resamples, "confidence": confidence, **sample}
    return WinogenderResult("winogender", examples, pd.DataFrame([row]), settings)
