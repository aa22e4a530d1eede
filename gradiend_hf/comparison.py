"""Comparing adapters across runs, seeds, features and pruning levels, from their tensors alone (no base model).

Every weight of an adapter has a global key: (base parameter name, flat index into that parameter). Dense adapters
cover every entry of their parameters, pruned ones only their kept `indices`; both use base-parameter coordinates,
so a pruned run and a dense run (or two differently pruned runs) compare key by key.

An adapter's *weights* are one number per key, chosen with `by`:

- ``"decoder"``: W_d of latent unit `unit` (default 0), or ``unit="norm"`` for the L2 norm over all latent units;
- ``"encoder"``: W_e, same `unit` rules;
- ``"decoder_bias"`` (alias ``"offset"``, the kind's name in adapter files): the decoder bias b_d;
- ``"decoder_sum"``: W_d[unit] + b_d, i.e. dec(h) at h = 1 for unit `unit` before the decoder activation.

Adapters can be given as GradiendModel / Bottleneck objects, saved adapter folders or Hub ids (read with
`read_adapter`, no base model is loaded) or `AdapterTensors` loaded once with `adapter_tensors` for repeated use.

- `top_k`: the exact global top-k keys by |weight| (ties broken by parameter name, then flat index);
- `overlap_matrix`: |A∩B| / min(|A|, |B|) and Jaccard |A∩B| / |A∪B| of top-k sets, as DataFrames;
- `decoder_cosine`: cosine similarity of weight vectors on the union of keys (missing keys count as 0);
- `feature_location`: where a feature lives, i.e. the share of weight mass per layer and module type;
- `seed_stability`: pairwise overlap and cosine among seeds (the "stability" entry of seed_report.json).
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import pandas as pd
import torch

from .bottleneck import Bottleneck
from .config import POST_PRUNE_CRITERIA
from .serialization import read_adapter
from .topk import count_to_keep, kth_largest_bits, magnitude_bits

BY = POST_PRUNE_CRITERIA  # the same views post-pruning ranks entries by
_ALIASES = {"offset": "decoder_bias"}
_KINDS = {
    "decoder": ("decoder",), "encoder": ("encoder",), "decoder_bias": ("offset",), "decoder_sum": ("decoder", "offset")
}
MODULE_TYPES = ("attention", "mlp", "embeddings", "norm", "other")
Unit = Union[int, str]


# --- adapters as plain tensors ---------------------------------------------------------------------------------------
@dataclass
class AdapterTensors:
    """An adapter's tensors by base parameter name and kind ('encoder', 'decoder', 'offset', 'index'), as returned
    by `read_adapter`: W_e/W_d have shape (latent_dim, *entries), b_d has the entries' shape, 'index' holds the flat
    base-parameter indices a pruned tensor keeps (absent = dense)."""

    tensors: dict[str, dict[str, torch.Tensor]]
    latent_dim: int
    label: str = ""

    @property
    def names(self) -> list[str]:
        """Parameter names in sorted order (the tie-breaking order of `top_k`, the same for every adapter)."""
        return sorted(self.tensors)

    def index(self, name: str) -> Optional[torch.Tensor]:
        return self.tensors[name].get("index")

    def size(self, name: str) -> int:
        """Number of entries (weights) this adapter holds for parameter `name`."""
        parts = self.tensors[name]
        index = parts.get("index")
        if index is not None:
            return index.numel()
        for kind in ("decoder", "encoder"):
            if kind in parts:
                return parts[kind].numel() // self.latent_dim
        return parts["offset"].numel()

    @property
    def num_entries(self) -> int:
        return sum(self.size(n) for n in self.tensors)

    def _latent(self, name: str, kind: str, unit: Unit) -> torch.Tensor:
        if kind not in self.tensors[name]:
            raise ValueError(f"{self.label or 'The adapter'} has no {kind} tensor for {name}.")
        rows = self.tensors[name][kind].detach().reshape(self.latent_dim, -1)
        if unit == "norm":
            return rows.float().norm(dim=0)
        if not isinstance(unit, int) or not 0 <= unit < self.latent_dim:
            raise ValueError(f"unit must be 'norm' or a latent unit in [0, {self.latent_dim}), got {unit!r}.")
        return rows[unit].float()

    def vector(self, name: str, by: str = "decoder", unit: Unit = 0) -> torch.Tensor:
        """The adapter's weights of parameter `name` (flat, float32, in the order of `index(name)`)."""
        by = _check_by(by)
        if by in ("decoder", "encoder"):
            return self._latent(name, by, unit)
        offset = self.tensors[name].get("offset")
        if by == "decoder_bias":
            if offset is None:
                raise ValueError(f"{self.label or 'The adapter'} has no decoder bias (offset); use by='decoder'.")
            return offset.detach().reshape(-1).float()
        if unit == "norm":
            raise ValueError("by='decoder_sum' needs one latent unit (an int), not unit='norm'.")
        weight = self._latent(name, "decoder", unit)
        return weight if offset is None else weight + offset.detach().reshape(-1).to(weight.device).float()

    def keys(self, name: str) -> torch.Tensor:
        """Flat base-parameter indices of the entries of `name` (arange for dense tensors)."""
        index = self.index(name)
        if index is not None:
            return index.reshape(-1).long()
        return torch.arange(self.size(name))


def _check_by(by: str) -> str:
    by = _ALIASES.get(by, by)
    if by not in BY:
        raise ValueError(f"by must be one of {list(BY)}, got {by!r}.")
    return by


def adapter_tensors(adapter: Any, by: Optional[str] = None, label: str = "") -> AdapterTensors:
    """An adapter's tensors without its base model: from a GradiendModel, a Bottleneck, a saved adapter folder or
    Hub id (read with `read_adapter`), or an `AdapterTensors` (returned as is).

    With `by`, only the kinds that view needs are kept from a file (less memory when comparing many adapters)."""
    if isinstance(adapter, AdapterTensors):
        return adapter
    bottleneck = getattr(adapter, "bottleneck", adapter)
    if isinstance(bottleneck, Bottleneck):
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for name in bottleneck.names:
            parts = {"encoder": bottleneck.encoder(name).detach(), "decoder": bottleneck.decoder(name).detach()}
            if bottleneck.has_decoder_bias:
                parts["offset"] = bottleneck.offset(name).detach()
            if bottleneck.indices[name] is not None:
                parts["index"] = bottleneck.indices[name]
            tensors[name] = parts
        return AdapterTensors(tensors, bottleneck.latent_dim, label or type(adapter).__name__)
    if isinstance(adapter, (str, os.PathLike)):
        config, grouped = read_adapter(adapter)
        keep = set(_KINDS[_check_by(by)]) | {"index"} if by is not None else None
        tensors = {n: {k: parts[k] for k in parts if keep is None or k in keep} for n, parts in grouped.items()}
        return AdapterTensors(tensors, config.latent_dim, label or str(adapter))
    raise TypeError(
        f"Cannot compare a {type(adapter).__name__}: pass a GradiendModel, a Bottleneck, a saved adapter path or "
        "AdapterTensors."
    )


# --- top-k sets of global keys ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeySet:
    """A set of global keys (base parameter name, flat index), stored as name -> sorted unique LongTensor (CPU)."""

    indices: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, indices: Mapping[str, Any]) -> "KeySet":
        cleaned = {}
        for name in sorted(indices):
            idx = torch.unique(torch.as_tensor(indices[name], dtype=torch.long).reshape(-1).cpu())  # sorted
            if idx.numel():
                cleaned[name] = idx
        return cls(cleaned)

    def __len__(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    def __contains__(self, key: tuple[str, int]) -> bool:
        name, flat = key
        idx = self.indices.get(name)
        if idx is None:
            return False
        pos = int(torch.searchsorted(idx, torch.tensor([int(flat)]))[0])
        return pos < idx.numel() and int(idx[pos]) == int(flat)

    def __and__(self, other: "KeySet") -> "KeySet":
        return KeySet.of({n: a[torch.isin(a, other.indices[n])] for n, a in self.indices.items() if n in other.indices})

    def __or__(self, other: "KeySet") -> "KeySet":
        names = set(self.indices) | set(other.indices)
        empty = torch.empty(0, dtype=torch.long)
        return KeySet.of({n: torch.cat([self.indices.get(n, empty), other.indices.get(n, empty)]) for n in names})

    def intersection_size(self, other: "KeySet") -> int:
        return sum(int(torch.isin(a, other.indices[n]).sum()) for n, a in self.indices.items() if n in other.indices)

    def to_set(self) -> set[tuple[str, int]]:
        """As a Python set of (name, flat index) pairs (for small sets and tests)."""
        return {(n, int(i)) for n, idx in self.indices.items() for i in idx}


def top_k(adapter: Any, k: Union[int, float], by: str = "decoder", unit: Unit = 0) -> KeySet:
    """The exact global top-k keys of an adapter by |weight| over all its parameters.

    `k` is a count (int) or a fraction (float in (0, 1]) of the adapter's own entries (for a pruned adapter: of its
    kept entries, rounded half up; pass an int to compare sets of equal size). Ties at the threshold are broken
    deterministically: parameters in sorted name order, then ascending flat index."""
    by = _check_by(by)
    if isinstance(adapter, KeySet):
        return adapter
    tensors = adapter_tensors(adapter, by)
    count = count_to_keep(k, tensors.num_entries, allow_zero=True)
    if count == 0:
        return KeySet()
    threshold = kth_largest_bits(
        lambda: (magnitude_bits(tensors.vector(name, by, unit)) for name in tensors.names), count
    )
    above, ties = {}, {}
    for name in tensors.names:
        bits = magnitude_bits(tensors.vector(name, by, unit))
        keys = tensors.keys(name).to(bits.device)
        above[name] = keys[bits > threshold].cpu()
        ties[name] = torch.sort(keys[bits == threshold].cpu()).values
    missing = count - sum(int(a.numel()) for a in above.values())
    for name in tensors.names:  # fill up from the threshold value in (name, index) order
        take = ties[name][:missing]
        missing -= int(take.numel())
        above[name] = torch.cat([above[name], take])
    return KeySet.of(above)


# --- overlap and cosine matrices -------------------------------------------------------------------------------------
def _labelled(adapters: Union[Mapping[Any, Any], Sequence[Any]]) -> list[tuple[str, Any]]:
    if isinstance(adapters, (str, os.PathLike, AdapterTensors, Bottleneck, torch.nn.Module)):
        raise TypeError("Pass several adapters: a dict {label: adapter} or a list.")
    if isinstance(adapters, Mapping):
        items = [(str(label), adapter) for label, adapter in adapters.items()]
    else:
        items = [
            (Path(a).name if isinstance(a, (str, os.PathLike)) else f"adapter {i}", a) for i, a in enumerate(adapters)
        ]
    if len({label for label, _ in items}) != len(items):
        raise ValueError("The adapters need distinct labels; pass a dict {label: adapter}.")
    return items


@dataclass(frozen=True)
class Overlap:
    """Top-k overlap between adapters: |A∩B| / min(|A|, |B|) (`overlap`), |A∩B| / |A∪B| (`jaccard`), the raw
    intersection counts and the set sizes (label-indexed). 0/0 (empty sets) is NaN."""

    overlap: pd.DataFrame
    jaccard: pd.DataFrame
    intersection: pd.DataFrame
    sizes: pd.Series
    k: Union[int, float]
    by: str


def overlap_matrix(
    adapters: Union[Mapping[Any, Any], Sequence[Any]], k: Union[int, float], by: str = "decoder", unit: Unit = 0
) -> Overlap:
    """Pairwise top-k overlap of adapters (dict label -> adapter, or a list). Values may also be precomputed
    `KeySet`s from `top_k`."""
    by = _check_by(by)
    items = _labelled(adapters)
    labels = [label for label, _ in items]
    sets = {label: top_k(a, k, by, unit) for label, a in items}
    sizes = pd.Series({label: len(s) for label, s in sets.items()}, dtype=float)
    inter = pd.DataFrame(0.0, index=labels, columns=labels)
    for i, a in enumerate(labels):
        for b in labels[i:]:
            inter.loc[a, b] = inter.loc[b, a] = float(sets[a].intersection_size(sets[b]))
    smaller = pd.DataFrame([[min(sizes[a], sizes[b]) for b in labels] for a in labels], index=labels, columns=labels)
    union = pd.DataFrame([[sizes[a] + sizes[b] for b in labels] for a in labels], index=labels, columns=labels) - inter
    overlap = (inter / smaller.replace(0.0, float("nan"))).astype(float)
    jaccard = (inter / union.replace(0.0, float("nan"))).astype(float)
    return Overlap(overlap=overlap, jaccard=jaccard, intersection=inter, sizes=sizes, k=k, by=by)


def _common_dot(a: AdapterTensors, b: AdapterTensors, name: str, by: str, unit: Unit) -> float:
    """sum over keys present in both adapters of a[key] * b[key] for one parameter (float64)."""
    va = a.vector(name, by, unit).double()
    vb = b.vector(name, by, unit).double().to(va.device)
    ia, ib = a.index(name), b.index(name)
    if ia is None and ib is None:
        if va.numel() != vb.numel():
            raise ValueError(f"{name} has {va.numel()} entries in one adapter and {vb.numel()} in the other; "
                             "these adapters belong to different base models.")
        return float(va @ vb)
    if ia is None:
        va, vb, ia, ib = vb, va, ib, ia  # make `a` the pruned one
    ia = ia.reshape(-1).long().to(va.device)
    if ib is None:
        if ia.numel() and int(ia.max()) >= vb.numel():
            raise ValueError(f"Pruning indices of {name} exceed its {vb.numel()} entries in the dense adapter; "
                             "these adapters belong to different base models.")
        return float(va @ vb[ia])
    ib = ib.reshape(-1).long().to(va.device)
    order = torch.argsort(ib)
    sorted_ib = ib[order]
    pos = torch.searchsorted(sorted_ib, ia).clamp(max=max(sorted_ib.numel() - 1, 0))
    if sorted_ib.numel() == 0:
        return 0.0
    hit = sorted_ib[pos] == ia
    return float(va[hit] @ vb[order[pos[hit]]])


def _norm(a: AdapterTensors, by: str, unit: Unit) -> float:
    return math.sqrt(sum(float(a.vector(n, by, unit).double().pow(2).sum()) for n in a.names))


def decoder_cosine(
    adapters: Union[Mapping[Any, Any], Sequence[Any]], by: str = "decoder", unit: Unit = 0
) -> pd.DataFrame:
    """Pairwise cosine similarity of the adapters' weight vectors (decoder by default) over the union of their keys;
    a key an adapter lacks (pruned away, or a parameter it does not cover) counts as 0. Signed: a sign-flipped
    run reads -1. A zero vector gives NaN."""
    by = _check_by(by)
    items = [(label, adapter_tensors(a, by)) for label, a in _labelled(adapters)]
    labels = [label for label, _ in items]
    norms = {label: _norm(t, by, unit) for label, t in items}
    frame = pd.DataFrame(float("nan"), index=labels, columns=labels)
    for (la, a), (lb, b) in itertools.combinations_with_replacement(items, 2):
        dot = sum(_common_dot(a, b, n, by, unit) for n in sorted(set(a.tensors) & set(b.tensors)))
        denominator = norms[la] * norms[lb]
        frame.loc[la, lb] = frame.loc[lb, la] = dot / denominator if denominator > 0 else float("nan")
    return frame


# --- where a feature lives -------------------------------------------------------------------------------------------
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|albert_layers)\.(\d+)(?:\.|$)")
_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query", "key", "value", "query_key_value",
              "q_lin", "k_lin", "v_lin", "out_lin", "out_proj", "wq", "wk", "wv"}
_MLP = {"fc", "fc1", "fc2", "c_fc", "up_proj", "down_proj", "gate_proj", "gate_up_proj", "lin1", "lin2", "w1", "w2",
        "w3", "dense_h_to_4h", "dense_4h_to_h", "experts"}
_HEAD = ("lm_head", "cls", "predictions", "vocab_transform", "vocab_projector", "vocab_layer_norm", "pooler",
         "classifier", "score", "head")


def module_type(name: str) -> str:
    """'attention', 'mlp', 'embeddings', 'norm' or 'other' for a base parameter name (common HF architectures)."""
    parts = name.lower().split(".")
    modules = parts[:-1] or parts
    if any("norm" in p or p.startswith("ln_") or p == "ln" for p in modules):
        return "norm"
    if any("attn" in p or "attention" in p or p in _ATTENTION for p in modules):
        return "attention"
    if any("mlp" in p or "ffn" in p or "feed_forward" in p or "intermediate" in p or "densereludense" in p or p in _MLP
           for p in modules):
        return "mlp"
    match = _LAYER.search(name)
    if match and name[match.end():].startswith("output."):  # BERT-style layer.N.output.dense: the MLP's second half
        return "mlp"
    if any("embed" in p or p in ("wte", "wpe", "shared") for p in modules):
        return "embeddings"
    return "other"


def layer_of(name: str) -> tuple[str, Optional[int]]:
    """(row label, layer number) of a parameter: 'layer N' for transformer blocks (`layers.N.`, `layer.N.`, `h.N.`,
    `blocks.N.`), otherwise 'embeddings', 'final norm', 'head' or 'other' (layer number None)."""
    match = _LAYER.search(name)
    if match:
        return f"layer {int(match.group(1))}", int(match.group(1))
    kind = module_type(name)
    lowered = name.lower().split(".")
    if kind == "embeddings" or any("embed" in p for p in lowered):
        return "embeddings", None
    if any(p in _HEAD or p.startswith("lm_head") for p in lowered):
        return "head", None
    if kind == "norm":
        return "final norm", None
    return "other", None


def _layer_order(label: str) -> tuple:
    fixed = {"embeddings": (0, 0), "final norm": (2, 0), "head": (3, 0), "other": (4, 0)}
    return fixed.get(label) or (1, int(label.split()[-1]))


@dataclass(frozen=True)
class FeatureLocation:
    """Where an adapter's weight mass lies. `parameters`: one row per parameter (layer, module, entries, mass,
    share); `by_layer` / `by_module`: the same summed per layer row / module type; `table`: share per layer (rows,
    embeddings first, then layers in order, final norm, head, other) x module type (columns); all shares sum to 1."""

    parameters: pd.DataFrame
    by_layer: pd.DataFrame
    by_module: pd.DataFrame
    table: pd.DataFrame
    measure: str
    by: str


def feature_location(adapter: Any, by: str = "decoder", unit: Unit = 0, measure: str = "abs") -> FeatureLocation:
    """The share of weight mass per layer and module type (attention, MLP, embeddings, norms, other).

    measure='abs' (default): mass = sum of |w| (L1), so the share reads "fraction of the total |decoder| weight";
    measure='squared': mass = sum of w^2, the share of the squared L2 norm (the energy of the edit direction)."""
    if measure not in ("abs", "squared"):
        raise ValueError(f"measure must be 'abs' or 'squared', got {measure!r}.")
    by = _check_by(by)
    tensors = adapter_tensors(adapter, by)
    rows = []
    for name in tensors.names:
        vector = tensors.vector(name, by, unit).double()
        mass = float(vector.abs().sum() if measure == "abs" else vector.pow(2).sum())
        layer, number = layer_of(name)
        rows.append(dict(parameter=name, layer=layer, layer_number=number, module=module_type(name),
                         entries=tensors.size(name), mass=mass))
    parameters = pd.DataFrame(rows, columns=["parameter", "layer", "layer_number", "module", "entries", "mass"])
    total = parameters["mass"].sum()
    parameters["share"] = parameters["mass"] / total if total > 0 else 0.0
    layers = sorted(parameters["layer"].unique(), key=_layer_order)
    modules = [m for m in MODULE_TYPES if (parameters["module"] == m).any()]
    columns = ["entries", "mass", "share"]
    by_layer = parameters.groupby("layer")[columns].sum().reindex(layers)
    by_module = parameters.groupby("module")[columns].sum().reindex(modules)
    table = parameters.pivot_table(index="layer", columns="module", values="share", aggfunc="sum", fill_value=0.0)
    table = table.reindex(index=layers, columns=modules, fill_value=0.0).astype(float)
    table.index.name, table.columns.name = "layer", "module"
    return FeatureLocation(
        parameters=parameters, by_layer=by_layer, by_module=by_module, table=table, measure=measure, by=by
    )


# --- seed stability --------------------------------------------------------------------------------------------------
def _summary(values: list[float]) -> dict[str, Optional[float]]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return {"mean": sum(finite) / len(finite) if finite else None, "min": min(finite) if finite else None}


def _finite(value: float) -> Optional[float]:
    return float(value) if value is not None and math.isfinite(value) else None


def seed_stability(
    adapters_by_seed: Mapping[int, Any],
    k: Union[int, float] = 0.01,
    by: str = "decoder",
    unit: Unit = 0,
    converged: Optional[Union[Mapping[int, bool], Iterable[int]]] = None,
) -> dict[str, Any]:
    """How much seeds agree: pairwise top-k overlap (|A∩B|/min), Jaccard and cosine of the weight vectors, with mean
    and min over all pairs and over the pairs of converged seeds (`converged`: seed -> bool, or the converged seeds).

    JSON-ready (lists, not seed-keyed dicts; undefined values are None) for seed_report.json."""
    by = _check_by(by)
    seeds = list(adapters_by_seed)
    loaded = {seed: adapter_tensors(adapters_by_seed[seed], by, label=f"seed {seed}") for seed in seeds}
    if converged is None:
        good = None
    elif isinstance(converged, Mapping):
        good = [s for s in seeds if converged.get(s)]
    else:
        good = [s for s in seeds if s in set(converged)]
    labelled = {str(s): loaded[s] for s in seeds}
    overlap = overlap_matrix({label: top_k(t, k, by, unit) for label, t in labelled.items()}, k, by, unit)
    cosine = decoder_cosine(labelled, by, unit)
    pairs = []
    for a, b in itertools.combinations(seeds, 2):
        pairs.append({"seeds": [a, b], "overlap": _finite(overlap.overlap.loc[str(a), str(b)]),
                      "jaccard": _finite(overlap.jaccard.loc[str(a), str(b)]),
                      "cosine": _finite(cosine.loc[str(a), str(b)])})

    def summarise(chosen: list[dict]) -> dict[str, Any]:
        out: dict[str, Any] = {"pairs": len(chosen)}
        for metric in ("overlap", "jaccard", "cosine"):
            stats = _summary([p[metric] for p in chosen])
            out[f"{metric}_mean"], out[f"{metric}_min"] = stats["mean"], stats["min"]
        return out

    return {
        "k": k,
        "by": by,
        "unit": unit,
        "seeds": seeds,
        "top_k_sizes": [int(overlap.sizes[str(s)]) for s in seeds],
        "converged_seeds": good,
        "pairs": pairs,
        "all": summarise(pairs),
        "converged": (
            summarise([p for p in pairs if good is not None and set(p["seeds"]) <= set(good)])
            if good is not None
            else None
        ),
    }
