"""Per-row encoder values over a data set (forward-mode, batched) and the metrics the trainer logs."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm


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


@torch.no_grad()
def encode_dataset(
    model, rows: Sequence[Mapping[str, Any]], collate: Callable, batch_size: int = 16, progress: bool = True
) -> pd.DataFrame:
    """One frame row per data row: its columns plus `h` (first latent unit; h_k for every unit if latent_dim > 1)."""
    values = []
    total = (len(rows) + batch_size - 1) // batch_size
    for chunk in tqdm(batches(rows, batch_size), total=total, desc="encoding", disable=not progress, leave=False):
        values.append(model.encode_rows(collate(chunk)).cpu())
    h = torch.cat(values).numpy() if values else np.zeros((0, 1))
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
