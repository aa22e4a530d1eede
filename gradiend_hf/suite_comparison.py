"""Comparing the pairs of a suite: does one pair's neuron also fire for another pair, do their decoders share weights
and layers, and what does each pair's edit do to every class of the data set.

- `cross_encode`: the encoder of pair A on the rows of pair B (per-row forward-mode encodings, evaluation/encoder.py);
  per (encoder pair, data pair) the Pearson correlation of h with B's labels and the mean h per class of B;
- `compare_decoders`: top-k overlap, decoder cosine and the share of decoder mass per layer (comparison.py);
- `edit_probabilities`: P(class) for every class of the data set, on rows of every class, under each pair's edits
  and on the base (evaluation/probabilities.py).

Adapters are given as a `Suite` or as {pair or 'a-b' label: adapter folder}; each is loaded onto the base in turn and
handed back after use, so the base ends as it began.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .comparison import FeatureLocation, Overlap, decoder_cosine, feature_location, overlap_matrix
from .config import CONFIG_NAME, GradiendConfig
from .edit import Edit
from .model import GradiendModel
from .schema import pair_rows
from .suite import Pair, Suite, base_state, pair_label, restore_base_state

Adapters = Union[Suite, Mapping[Any, Any]]


def labelled_adapters(adapters: Adapters) -> dict[str, tuple[Optional[Pair], Any]]:
    """{'a-b': (pair, adapter)} of a Suite or of a mapping keyed by pairs or labels."""
    if isinstance(adapters, Suite):
        return {pair_label(p): (p, r.adapter) for p, r in adapters.results.items()}
    if not isinstance(adapters, Mapping) or not adapters:
        raise TypeError("Pass a Suite or a non-empty mapping {pair or 'a-b' label: adapter folder}.")
    out = {}
    for key, adapter in adapters.items():
        pair = tuple(key) if isinstance(key, (tuple, list)) else None
        out[pair_label(pair) if pair else str(key)] = (pair, adapter)
    return out


def adapter_pair(pair: Optional[Pair], adapter: Any) -> Pair:
    """The adapter's pair: given by its key, else read from its adapter_config.json."""
    if pair is not None:
        return pair
    return tuple(GradiendConfig.from_file(Path(adapter) / CONFIG_NAME).feature_classes)


# --- encoders on each other's rows -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrossEncoding:
    """`correlation`: encoder pair (rows) x data pair (columns), Pearson r of h with the data pair's labels (+1 its
    first class, -1 its second) on that pair's rows; `means`: one row per (encoder, data pair, class) with the rows,
    mean and std of h; `frame`: every encoded row with its encoder, data pair, label and h."""

    correlation: pd.DataFrame
    means: pd.DataFrame
    frame: pd.DataFrame


def cross_encode(
    adapters: Adapters,
    base_model: nn.Module,
    data: Any,
    tokenizer: Any,
    data_pairs: Optional[Sequence[Sequence[str]]] = None,
    max_rows: Optional[int] = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> CrossEncoding:
    """Encode the rows of every data pair with the encoder of every adapter.

    A data pair's rows are its two classes' rows of `data` (`pair_rows(..., other_classes="drop")`, at most
    `max_rows`, the first ones); default data pairs: the adapters' own pairs. The diagonal is each encoder on its own
    pair's rows."""
    from .evaluation.encoder import encode_dataset, summarise
    from .lengths import collator_for

    adapters_by_label = labelled_adapters(adapters)
    state = base_state(base_model)
    frames, means, correlation = [], [], {}
    try:
        chosen = ([tuple(p) for p in data_pairs] if data_pairs is not None else
                  list(dict.fromkeys(adapter_pair(p, a) for p, a in adapters_by_label.values())))
        rows = {}
        for pair in chosen:
            selected = list(pair_rows(data, pair, seed=seed, tokenizer=tokenizer, other_classes="drop"))
            rows[pair] = selected[:max_rows] if max_rows else selected
        total = len(adapters_by_label) * len(chosen)
        bar = tqdm(total=total, desc="cross-encoding", disable=not progress)
        for label, (pair, adapter) in adapters_by_label.items():
            model = GradiendModel.from_pretrained(base_model, adapter)
            source = model.gradiend_config.source
            collate = collator_for(base_model, tokenizer, model.objective, model.gradiend_config.feature_classes)
            correlation[label] = {}
            for data_pair in chosen:
                frame = encode_dataset(model, rows[data_pair], collate, batch_size=batch_size, progress=False)
                result = summarise(frame, data_pair, source)
                correlation[label][pair_label(data_pair)] = result.correlation
                for cls in data_pair:
                    if cls in result.by_class.index:
                        stats = result.by_class.loc[cls]
                        means.append({"encoder": label, "data": pair_label(data_pair), "class": cls,
                                      "label": 1.0 if cls == data_pair[0] else -1.0, "rows": int(stats["count"]),
                                      "mean_h": float(stats["mean"]), "std_h": float(stats["std"])})
                frames.append(result.frame.assign(encoder=label, data=pair_label(data_pair)))
                bar.update(1)
            model.unload()
        bar.close()
    finally:
        restore_base_state(base_model, state)
    matrix = pd.DataFrame(correlation).T.astype(float)
    matrix.index.name, matrix.columns.name = "encoder", "data"
    return CrossEncoding(correlation=matrix, means=pd.DataFrame(means),
                         frame=pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())


# --- decoders: shared weights and layers -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderComparison:
    """Top-k overlap and cosine of the pairs' decoders, and the share of decoder mass per layer (layers x pairs)."""

    overlap: Overlap
    cosine: pd.DataFrame
    by_layer: pd.DataFrame
    locations: dict[str, FeatureLocation]


def compare_decoders(adapters: Adapters, k: Union[int, float] = 0.01, by: str = "decoder") -> DecoderComparison:
    """comparison.overlap_matrix / decoder_cosine / feature_location over the suite's adapters (no base model)."""
    from .comparison import adapter_tensors

    tensors = {label: adapter_tensors(a, by, label=label) for label, (_, a) in labelled_adapters(adapters).items()}
    locations = {label: feature_location(t, by=by) for label, t in tensors.items()}
    by_layer = pd.DataFrame({label: loc.by_layer["share"] for label, loc in locations.items()})
    order = list(dict.fromkeys(layer for loc in locations.values() for layer in loc.by_layer.index))
    by_layer = by_layer.reindex(order).fillna(0.0)
    by_layer.index.name, by_layer.columns.name = "layer", "pair"
    return DecoderComparison(overlap=overlap_matrix(tensors, k, by), cosine=decoder_cosine(tensors, by),
                             by_layer=by_layer, locations=locations)


# --- each pair's edit on every class ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class EditProbabilities:
    """One row per (pair, edit, row class, class): mean P(class) at the feature position on the rows of `row_class`,
    under the edit (`p`) and on the base (`base_p`). Edit 'base' rows hold the unedited model."""

    frame: pd.DataFrame
    classes: list[str]

    def table(self, pair: str, edit: str) -> pd.DataFrame:
        """row class (rows) x class (columns) of mean P(class) under one edit of one pair ('base': the base)."""
        chosen = self.frame[(self.frame["pair"] == pair) & (self.frame["edit"] == edit)]
        table = chosen.pivot(index="row_class", columns="class", values="p")
        return table.reindex(index=self.classes, columns=self.classes)

    def change(self) -> pd.DataFrame:
        """(pair, edit) rows x class columns: mean over all rows of P(class) under the edit minus on the base."""
        edited = self.frame[self.frame["edit"] != "base"]
        grouped = edited.assign(change=edited["p"] - edited["base_p"]).groupby(["pair", "edit", "class"], sort=False)
        return grouped["change"].mean().unstack("class").reindex(columns=self.classes)


def edit_name(edit: Edit) -> str:
    """'<goal>' for a chosen edit, else 'ff<f> lr<lr>'."""
    return edit.goal or f"ff{edit.feature_factor:g} lr{edit.learning_rate:g}"


def class_rows(data: Any, classes: Sequence[str], max_rows_per_class: Optional[int] = None) -> list[dict]:
    """Rows of every class (by factual_class), each scored with every class's words in its own context."""
    from .schema import is_missing

    taken: dict[str, int] = {c: 0 for c in classes}
    out = []
    for row in data:
        cls = row["factual_class"]
        if cls not in taken or is_missing(row.get("factual")):
            continue
        if max_rows_per_class is not None and taken[cls] >= max_rows_per_class:
            continue
        taken[cls] += 1
        out.append(dict(masked=row["masked"], factual=row["factual"], alternative=row["factual"], factual_class=cls,
                        alternative_class=cls))
    return out


def edit_probabilities(
    adapters: Adapters,
    base_model: nn.Module,
    data: Any,
    tokenizer: Any,
    edits: Optional[Mapping[str, Sequence[Edit]]] = None,
    feature_factors: Sequence[float] = (1.0, -1.0),
    learning_rate: float = 1e-2,
    max_rows_per_class: Optional[int] = None,
    batch_size: int = 16,
    progress: bool = True,
) -> EditProbabilities:
    """P(class) for every class of `data`, on rows of every class, under each pair's edits and on the base.

    edits: {'a-b' label: [Edit, ...]} (e.g. the edits evaluate_decoder chose per pair); default: feature factors
    `feature_factors` at `learning_rate` for every pair. The edit is applied in place and restored bit-exactly."""
    from .evaluation.probabilities import chunked_word_batches, class_probabilities, class_words, word_probabilities
    from .lengths import collator_for
    from .schema import classes_of

    present = list(classes_of(data))  # in the suite's order when there is one (a split may list them otherwise)
    order = adapters.classes if isinstance(adapters, Suite) else []
    classes = [c for c in order if c in present] + [c for c in present if c not in order]
    rows = class_rows(data, classes, max_rows_per_class)
    words = class_words(rows, classes, tokenizer)
    row_classes = [r["factual_class"] for r in rows]
    state = base_state(base_model)
    records = []

    def measure(model: GradiendModel, prepared) -> dict[str, torch.Tensor]:
        parts = [class_probabilities(word_probabilities(model.get_base_model(), b), words) for b in prepared]
        return {c: torch.cat([p[c] for p in parts]) for c in classes}

    def means(probs: dict[str, torch.Tensor]) -> dict[tuple[str, str], float]:
        labels = pd.Series(row_classes)
        return {(rc, c): float(probs[c][torch.tensor((labels == rc).to_numpy())].mean())
                for rc in classes for c in classes if (labels == rc).any()}

    base_means, prepared = None, None
    labelled = labelled_adapters(adapters)
    try:
        for label, (pair, adapter) in tqdm(labelled.items(), desc="edit probabilities", disable=not progress):
            model = GradiendModel.from_pretrained(base_model, adapter)
            if prepared is None:
                collate = collator_for(base_model, tokenizer, model.lm_objective)
                prepared = chunked_word_batches(rows, [w for ws in words.values() for w in ws], collate, batch_size)
                base_means = means(measure(model, prepared))
            chosen = (edits or {}).get(label)
            if chosen is None:
                chosen = [Edit(feature_factor=float(ff), learning_rate=learning_rate) for ff in feature_factors]
            for (rc, c), p in base_means.items():
                records.append({"pair": label, "edit": "base", "feature_factor": 0.0, "learning_rate": 0.0,
                                "row_class": rc, "class": c, "p": p, "base_p": p})
            for edit in chosen:
                with model.apply_edit(edit):
                    edited = means(measure(model, prepared))
                for (rc, c), p in edited.items():
                    records.append({"pair": label, "edit": edit_name(edit), "feature_factor": edit.feature_factor,
                                    "learning_rate": edit.learning_rate, "row_class": rc, "class": c, "p": p,
                                    "base_p": base_means[(rc, c)]})
            model.unload()
    finally:
        restore_base_state(base_model, state)
    return EditProbabilities(frame=pd.DataFrame(records), classes=classes)
