"""Per-row encoder values over a data set (forward-mode, batched) and the metrics the trainer logs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..data import RowTooLongError


def row_labels(frame: pd.DataFrame, feature_classes: Sequence[str], source: str) -> np.ndarray:
    """+1 / -1 / 0 per row: the class the source gradient points to (the alternative's class for source='alternative').

    Identity rows (factual == alternative) and classes outside the pair read 0.
    """
    column = "alternative_class" if source == "alternative" else "factual_class"
    sign = {feature_classes[0]: 1.0, feature_classes[1]: -1.0}
    labels = np.array(frame[column].map(lambda c: sign.get(c, 0.0)), dtype=float)
    identity = (frame["factual"] == frame["alternative"]).to_numpy()
    labels[identity] = 0.0
    return labels


def batches(rows: Sequence[Mapping[str, Any]], size: int) -> Iterable[list]:
    for start in range(0, len(rows), size):
        yield [rows[i] for i in range(start, min(start + size, len(rows)))]


def token_lengths(rows: Sequence[Mapping[str, Any]], collate: Callable, chunk: int = 256) -> list[int]:
    """Tokens of each row as the collator builds it (the longer of its two sides); a row too long for the model
    fails here (RowTooLongError naming its index), before any model pass."""
    lengths: list[int] = []
    for start in range(0, len(rows), chunk):
        try:
            batch = collate([rows[i] for i in range(start, min(start + chunk, len(rows)))])
        except RowTooLongError as error:
            raise error.at(start) from None
        widths = [batch[f"{side}_attention_mask"].sum(dim=1) for side in ("factual", "alternative")]
        lengths += torch.maximum(*widths).tolist()
    return lengths


@torch.no_grad()
def encode_dataset(
    model, rows: Sequence[Mapping[str, Any]], collate: Callable, batch_size: int = 16, progress: bool = True
) -> pd.DataFrame:
    """One frame row per data row: its columns plus `h` (first latent unit; h_k for every unit if latent_dim > 1).

    Rows are encoded in batches of similar token length (the per-row values do not depend on the batch), so that
    little of the forward-mode work goes into padding; the frame keeps the rows' order. A base model whose results
    padding would change runs such batches row by row inside the engine (layout.py), so every h is the row's own."""
    values = []
    order = sorted(range(len(rows)), key=token_lengths(rows, collate).__getitem__) if rows else []
    total = (len(rows) + batch_size - 1) // batch_size
    for chunk in tqdm(batches(order, batch_size), total=total, desc="encoding", disable=not progress, leave=False):
        values.append(model.encode_rows(collate([rows[i] for i in chunk])).cpu())
    h = np.zeros((0, 1))
    if values:
        h = np.empty((len(rows), values[0].shape[1]), dtype=np.float32)
        h[order] = torch.cat(values).numpy()
    frame = pd.DataFrame([dict(r) for r in rows])
    frame["h"] = h[:, 0]
    for k in range(1, h.shape[1]):
        frame[f"h_{k}"] = h[:, k]
    return frame


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def encoder_metrics(frame: pd.DataFrame, feature_classes: Sequence[str], source: str) -> dict[str, float]:
    """Pearson correlation of h with the labels, ternary accuracy, and per-class mean/std of h."""
    labels = row_labels(frame, feature_classes, source)
    h = frame["h"].to_numpy(dtype=float)
    predicted = np.where(h >= 0.5, 1.0, np.where(h <= -0.5, -1.0, 0.0))
    metrics = {
        "correlation": pearson(h, labels),
        "ternary_accuracy": float((predicted == labels).mean()) if len(h) else 0.0,
        "rows": float(len(h)),
    }
    for label, name in ((1.0, feature_classes[0]), (-1.0, feature_classes[1]), (0.0, "neutral")):
        chosen = h[labels == label]
        if len(chosen):
            metrics[f"mean_h_{name}"] = float(chosen.mean())
            metrics[f"std_h_{name}"] = float(chosen.std())
    return metrics


NEUTRAL = "neutral"
WORD_PATTERN = r"[A-Za-z]{2,}"


def neutral_rows(rows: Sequence[Mapping[str, Any]], count: int, seed: int = 0) -> list[dict]:
    """Rows whose masked word is a random non-feature word of a data sentence (identity rows: h should be ~0)."""
    import random
    import re

    from ..data import MASK

    feature_words = {r[side].lower() for r in rows for side in ("factual", "alternative")}
    rng = random.Random(seed)
    out = []
    for row in rng.sample(list(rows), min(count, len(rows))):
        text = row["masked"].replace(MASK, row["factual"], 1)
        spans = [m for m in re.finditer(WORD_PATTERN, text) if m.group().lower() not in feature_words]
        if not spans:
            continue
        span = rng.choice(spans)
        masked = text[: span.start()] + MASK + text[span.end():]
        out.append(dict(masked=masked, factual=span.group(), alternative=span.group(), factual_class=NEUTRAL,
                        alternative_class=NEUTRAL))
    return out


def stats(values: pd.Series) -> dict[str, float]:
    return {
        "count": int(values.count()), "mean": float(values.mean()), "std": float(values.std(ddof=0)),
        "q05": float(values.quantile(0.05)), "q25": float(values.quantile(0.25)), "median": float(values.median()),
        "q75": float(values.quantile(0.75)), "q95": float(values.quantile(0.95)),
    }


@dataclass(frozen=True)
class EncoderEvaluation:
    """How well the feature neuron separates the classes on held-out rows (and stays ~0 on neutral rows)."""

    correlation: float
    correlation_with_neutral: float
    binary_accuracy: float
    ternary_accuracy: float
    neutral_mean_abs_h: float
    by_class: pd.DataFrame
    by_word: pd.DataFrame
    frame: pd.DataFrame

    def summary(self) -> dict[str, float]:
        means = {f"mean_h_{k}": float(v) for k, v in self.by_class["mean"].items()}
        return {"correlation": self.correlation, "correlation_with_neutral": self.correlation_with_neutral,
                "binary_accuracy": self.binary_accuracy, "ternary_accuracy": self.ternary_accuracy,
                "neutral_mean_abs_h": self.neutral_mean_abs_h, **means}


def summarise(frame: pd.DataFrame, feature_classes: Sequence[str], source: str) -> EncoderEvaluation:
    """Metrics of an encoded frame (columns of the rows plus `h`), computed from the labels in `row_labels`."""
    frame = frame.copy()
    frame["label"] = row_labels(frame, feature_classes, source)
    names = {1.0: feature_classes[0], -1.0: feature_classes[1], 0.0: NEUTRAL}
    frame["label_class"] = frame["label"].map(names)
    word_column = "alternative" if source == "alternative" else "factual"
    frame["word"] = frame[word_column]
    h, labels = frame["h"].to_numpy(dtype=float), frame["label"].to_numpy(dtype=float)
    feature = labels != 0
    ternary = np.where(h >= 0.5, 1.0, np.where(h <= -0.5, -1.0, 0.0))
    by_class = pd.DataFrame(
        {c: stats(frame.loc[frame["label_class"] == c, "h"]) for c in frame["label_class"].unique()}
    ).T
    by_word = pd.DataFrame(
        {w: {"class": g["label_class"].iloc[0], **stats(g["h"])} for w, g in frame.groupby("word")}
    ).T
    neutral = np.abs(h[~feature])
    return EncoderEvaluation(
        correlation=pearson(h[feature], labels[feature]),
        correlation_with_neutral=pearson(h, labels),
        binary_accuracy=float((np.sign(h[feature]) == labels[feature]).mean()) if feature.any() else float("nan"),
        ternary_accuracy=float((ternary == labels).mean()) if len(h) else float("nan"),
        neutral_mean_abs_h=float(neutral.mean()) if len(neutral) else float("nan"),
        by_class=by_class,
        by_word=by_word,
        frame=frame,
    )


def evaluate_encoder(
    model, dataset: Any, tokenizer: Any, batch_size: int = 16, neutral: int = 64, seed: int = 0, progress: bool = True,
    truncation: str = "error",
) -> EncoderEvaluation:
    """Encode every held-out row (forward-mode, batched) plus `neutral` re-masked non-feature rows; see summarise.

    A row longer than the model's position limit is refused naming it before any model pass (truncation='left' cuts
    its left context instead)."""
    from ..lengths import collator_for
    from ..schema import prepare_rows

    config = model.gradiend_config
    rows = list(prepare_rows(dataset, config.feature_classes, seed=seed, tokenizer=tokenizer))
    rows += neutral_rows(rows, neutral, seed=seed)
    collate = collator_for(model.get_base_model(), tokenizer, model.objective, config.feature_classes, truncation)
    frame = encode_dataset(model, rows, collate, batch_size=batch_size, progress=progress)
    return summarise(frame, config.feature_classes, config.source)
