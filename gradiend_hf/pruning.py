"""Pruning: shrink a GRADIEND adapter to the base-weight entries that matter.

Pre-pruning (before training): the importance of every selected base-weight entry is |mean gradient| over a few rows
stratified by transition, gathered by the gradient engine's post-accumulate-grad hooks straight into ONE float32
accumulator per selected parameter (no per-batch gradient buffer, no concatenated vector). The exact global top-k
(a fraction, a count, or a threshold) is found by bisection on the float32 bit patterns of the accumulators, with ties
broken by (parameter order, flat index). The adapter is then built at the pruned size only.

Post-pruning (after training): keep the top-k entries by |decoder weight| (or |encoder weight|, |decoder bias|,
|decoder weight + bias|); the kept tensors are copied exactly.

Indices are flat indices into the base parameters (base coordinates), so differently pruned runs compare. A parameter
that keeps every entry stays dense (no index tensor); one that keeps none is dropped.
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .config import GRADIENT_KINDS, POST_PRUNE_CRITERIA, GradiendConfig
from .gradients import GradientEngine
from .model import GradiendModel
from .objective import resolve_objective
from .selection import parameter_dict, select_parameters
from .topk import Keep, bits_to_float, count_to_keep, kth_largest_bits

AGGREGATES = ("mean", "label", "abs")
POST_CRITERIA = POST_PRUNE_CRITERIA
CHUNK = 1 << 22  # entries per pass over an accumulator: bounds the temporaries of comparisons to a few MB

__all__ = [
    "AGGREGATES",
    "POST_CRITERIA",
    "ImportanceEngine",
    "accumulate_batches",
    "chunks",
    "importance",
    "importance_batches",
    "importance_weights",
    "keep_count",
    "kth_largest",
    "post_prune",
    "post_prune_scores",
    "pre_prune",
    "score_problem",
    "select_top",
]


# --- exact global top-k over per-parameter score tensors, without concatenating them -------------------------------
def keep_count(keep: Keep, total: int) -> int:
    """Entries to keep (topk.count_to_keep): a fraction of `total` rounded half up and at least 1, or a count."""
    return count_to_keep(keep, total)


def chunks(tensor: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, piece) of the flat tensor in CHUNK-sized pieces: comparisons over them keep temporaries small."""
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield start, flat[start : start + CHUNK]


def _count(scores: Mapping[str, torch.Tensor], op, value) -> int:
    return sum(int(torch.count_nonzero(op(chunk, value))) for s in scores.values() for _, chunk in chunks(s))


def score_problem(scores: Mapping[str, torch.Tensor]) -> Optional[Exception]:
    """The error that score tensors unfit for select_top deserve (None when fit): returned, not raised, so processes
    can agree on raising it together instead of one leaving the others waiting in a collective."""
    for name, s in scores.items():
        if s.dtype != torch.float32 or not s.is_contiguous():
            return TypeError(f"scores of {name} must be a contiguous float32 tensor, got {s.dtype}.")
        for _, chunk in chunks(s):
            if not bool(torch.isfinite(chunk).all()) or bool((chunk < 0).any()):
                return ValueError(f"The importance of {name} holds negative or non-finite values (NaN/inf gradients?).")
    return None


def _check_scores(scores: Mapping[str, torch.Tensor]) -> None:
    problem = score_problem(scores)
    if problem is not None:
        raise problem


def kth_largest(
    scores: Mapping[str, torch.Tensor], k: int, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
) -> float:
    """The exact k-th largest value over all score tensors (non-negative float32; topk.kth_largest_bits), read in
    chunk-sized pieces: never a copy of the scores. `reduce` sums the radix histograms over processes (see
    kth_largest_bits) when `scores` are one process's slices of the values."""
    pieces = lambda: (chunk.view(torch.int32) for s in scores.values() for _, chunk in chunks(s))  # noqa: E731
    return bits_to_float(kth_largest_bits(pieces, k, reduce))


def select_top(
    scores: dict[str, torch.Tensor],
    keep: Optional[Keep] = None,
    *,
    threshold: Optional[float] = None,
    release: bool = False,
) -> tuple[dict[str, Optional[torch.Tensor]], dict[str, Any]]:
    """The exact global top-k of per-parameter scores (or every entry >= threshold, compared in float32).

    Returns ({name: sorted flat positions (int64), or None when the parameter keeps all its entries}, info). Parameters
    keeping nothing are left out. Ties at the cut are broken by (parameter order, flat index): earlier entries first,
    i.e. the result equals a stable descending sort of the concatenated scores, cut after k.
    With `release=True` each score tensor is removed from `scores` as soon as its positions are known, so the kept
    indices replace the scores instead of adding to them (pre-pruning's accumulators).
    """
    if (keep is None) == (threshold is None):
        raise ValueError("Give exactly one of keep= (a fraction or a count) and threshold= (a minimum importance).")
    names = list(scores)
    if not release:
        scores = dict(scores)
    _check_scores(scores)
    total = sum(s.numel() for s in scores.values())
    if total == 0:
        raise ValueError("There is nothing to prune: the score tensors are empty.")
    if threshold is not None:
        cut = float(torch.tensor(float(threshold), dtype=torch.float32))
        k = _count(scores, torch.ge, cut)
        if k == 0:
            largest = max(float(s.max()) for s in scores.values() if s.numel())
            raise ValueError(f"threshold={threshold!r} keeps no entry; the largest importance is {largest:.6g}.")
        kept = {}
        for name in names:
            s = scores.pop(name)
            count = _count({name: s}, torch.ge, cut)
            if count == s.numel():
                kept[name] = None
            elif count:
                kept[name] = torch.cat([(chunk >= cut).nonzero().squeeze(1) + start for start, chunk in chunks(s)])
            del s
        return kept, {"kept": k, "total": total, "cutoff": cut}
    k = keep_count(keep, total)
    if k == total:
        scores.clear()
        return {name: None for name in names}, {"kept": total, "total": total, "cutoff": 0.0}
    cut = kth_largest(scores, k)
    ties = k - _count(scores, torch.gt, cut)  # entries equal to the cut that still fit, taken in order
    kept = {}
    for name in names:
        s = scores.pop(name)
        greater = _count({name: s}, torch.gt, cut)
        equal = min(ties, _count({name: s}, torch.eq, cut)) if ties else 0
        ties -= equal
        if greater + equal == s.numel():
            kept[name] = None
            continue
        if greater + equal == 0:
            continue
        parts, wanted = [], equal
        for start, chunk in chunks(s):
            parts.append((chunk > cut).nonzero().squeeze(1) + start)
            if wanted:
                tied = (chunk == cut).nonzero().squeeze(1)[:wanted] + start
                wanted -= tied.numel()
                parts.append(tied)
        del s
        kept[name] = torch.cat(parts).sort().values
    return kept, {"kept": k, "total": total, "cutoff": cut}


def compose(old: Optional[torch.Tensor], positions: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Base-coordinate indices of kept positions within a (possibly already pruned) entry set."""
    if positions is None:
        return old
    if old is None:
        return positions
    return old.index_select(0, positions.to(old.device))


# --- pre-pruning ----------------------------------------------------------------------------------------------------
def importance_batches(
    dataset: Any,
    feature_classes: Sequence[str],
    rows: Optional[int] = 32,
    batch_size: int = 8,
    seed: int = 0,
    tokenizer: Any = None,
) -> list[list[dict]]:
    """The rows pre-pruning reads, as single-transition batches: `rows` rows (None = all) drawn with `seed`, spread as
    evenly as possible over the transitions (round robin, so a small transition gives all it has), batched by
    transition and alternating between transitions as in training."""
    from .sampling import TransitionBatchSampler
    from .schema import prepare_rows

    data = prepare_rows(dataset, feature_classes, seed=seed, tokenizer=tokenizer)
    cols = data.select_columns(["factual_class", "alternative_class"])[:]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, transition in enumerate(zip(cols["factual_class"], cols["alternative_class"])):
        groups.setdefault(transition, []).append(i)
    rng = random.Random(seed)
    for members in groups.values():
        rng.shuffle(members)
    wanted = len(data) if rows is None else int(rows)
    if wanted < 1:
        raise ValueError(f"rows={rows!r}: pre-pruning needs at least one row.")
    quota = {t: 0 for t in groups}
    taken = 0
    while taken < min(wanted, len(data)):
        for t, members in groups.items():
            if quota[t] < len(members) and taken < wanted:
                quota[t] += 1
                taken += 1
    chosen = [i for t, members in groups.items() for i in members[: quota[t]]]
    sampler = TransitionBatchSampler(
        [transition for t in groups for transition in [t] * quota[t]], batch_size, shuffle=False
    )
    return [[data[chosen[j]] for j in batch] for batch in sampler.batches()]


class Selection:
    """What the gradient engine needs of a bottleneck (names, entry shapes, entries), without allocating one."""

    def __init__(
        self, shapes: Mapping[str, Sequence[int]], indices: Optional[Mapping[str, Optional[torch.Tensor]]] = None
    ):
        self.names = list(shapes)
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self.indices = {n: (indices or {}).get(n) for n in self.names}

    def entry_shape(self, name: str) -> torch.Size:
        idx = self.indices[name]
        return self.shapes[name] if idx is None else torch.Size([idx.numel()])

    def entries(self, name: str, full: torch.Tensor) -> torch.Tensor:
        idx = self.indices[name]
        return full if idx is None else full.reshape(-1).index_select(0, idx)


class ImportanceEngine(GradientEngine):
    """The gradient engine with hooks that add `scale * gradient` (or its absolute value) into one float32
    accumulator per selected parameter, instead of copying it into per-kind buffers: the only full-size memory of
    pre-pruning is the accumulator (plus each parameter's own `.grad`, freed by the hook as it arrives)."""

    def __init__(self, model: nn.Module, selection: Selection) -> None:
        super().__init__(model, selection)
        self.accumulators = {
            name: self.new_accumulator(name, selection.entry_shape(name), p.device) for name, p in self.params.items()
        }
        self._scale, self._absolute = 0.0, False

    def new_accumulator(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """A zero float32 accumulator shaped like the entries; a subclass may hand out a view into a bigger buffer
        (the distributed engine pads it for reduce-scatter without a copy)."""
        return torch.zeros(shape, dtype=torch.float32, device=device)

    def _hook(self, name: str):
        accumulator = self.accumulators[name]

        def gather(param: torch.Tensor) -> None:
            grad = self.bottleneck.entries(name, param.grad)
            if self._absolute:
                grad = grad.abs_()  # the gradient is ours: it is freed right below
            accumulator.add_(grad.reshape(accumulator.shape), alpha=self._scale)
            param.grad = None

        return gather

    def accumulate(self, batch: Mapping[str, torch.Tensor], kind: str, scale: float, absolute: bool = False) -> None:
        """accumulator += scale * gradient of the batch's mean loss of `kind` (factual - alternative for 'diff')."""
        self._scale, self._absolute = float(scale), absolute
        with self.passes(batch) as backward:
            backward(kind, [], last=True)


def batch_label(rows: Sequence[Mapping[str, Any]], feature_classes: Sequence[str], kind: str) -> float:
    """+1 / -1 for the class a batch's gradient points to (its alternative class for kind='alternative', else its
    factual class); 0 for identity transitions (factual class == alternative class)."""
    first = rows[0]
    if first["factual_class"] == first["alternative_class"]:
        return 0.0
    column = "alternative_class" if kind == "alternative" else "factual_class"
    return {feature_classes[0]: 1.0, feature_classes[1]: -1.0}.get(first[column], 0.0)


def importance_weights(
    batches: Sequence[Sequence[Mapping[str, Any]]],
    kind: str,
    aggregate: str = "mean",
    feature_classes: Optional[Sequence[str]] = None,
) -> tuple[list[float], float]:
    """(weight of each batch, sum of |weights|) for `importance`: computed over ALL batches, so processes that each
    read a share of them scale their gradients exactly as one process reading them all."""
    if kind not in GRADIENT_KINDS:
        raise ValueError(f"kind={kind!r} is not a gradient kind; choose one of {list(GRADIENT_KINDS)}.")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate={aggregate!r} is not known; choose one of {list(AGGREGATES)}.")
    weights = [float(len(rows)) for rows in batches]
    if aggregate == "label":
        if feature_classes is None:
            raise ValueError("aggregate='label' needs the feature classes.")
        weights = [w * batch_label(rows, feature_classes, kind) for w, rows in zip(weights, batches)]
    total = sum(abs(w) for w in weights)
    if total == 0:
        raise ValueError("Pre-pruning found no usable rows (aggregate='label' needs rows of a feature transition).")
    return weights, total


@torch.no_grad()
def accumulate_batches(
    engine: ImportanceEngine,
    batches: Sequence[Sequence[Mapping[str, Any]]],
    weights: Sequence[float],
    total: float,
    collator: Any,
    kind: str,
    aggregate: str = "mean",
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Add weight/total * gradient of batch i into the engine's accumulators, for the batches i % world_size == rank
    (all of them in one process): the per-process sums add up to `importance`'s single sum."""
    for i, (rows, weight) in enumerate(zip(batches, weights)):
        if weight and i % world_size == rank:
            engine.accumulate(collator(list(rows)), kind, weight / total, absolute=aggregate == "abs")


@torch.no_grad()
def importance(
    base_model: nn.Module,
    selection: Selection,
    batches: Sequence[Sequence[Mapping[str, Any]]],
    collator: Any,
    kind: str,
    aggregate: str = "mean",
    feature_classes: Optional[Sequence[str]] = None,
) -> dict[str, torch.Tensor]:
    """Importance of every selected entry (float32 accumulators shaped like the entries):

    - 'mean': |mean over rows of the gradient| (batches weighted by their row counts), the default;
    - 'label': |mean over rows of label * gradient| (label +-1 by the class the gradient points to, identity rows 0):
      the difference of the two classes' mean gradients, so parts common to both directions cancel;
    - 'abs': mean over rows of |batch gradient| (each batch's gradient taken whole, then its absolute value).
    """
    weights, total = importance_weights(batches, kind, aggregate, feature_classes)
    engine = ImportanceEngine(base_model, selection)
    accumulate_batches(engine, batches, weights, total, collator, kind, aggregate)
    scores = engine.accumulators
    for s in scores.values():
        s.abs_()
    return scores


def _rebuilt(
    model: Union[GradiendModel, nn.Module],
    base: nn.Module,
    config: GradiendConfig,
    indices: Mapping[str, Optional[torch.Tensor]],
    inplace: bool,
) -> GradiendModel:
    """A GradiendModel over `base` covering `indices` (in base model order); in place: swapped into `model`.

    When parameters were dropped (nothing of them kept), `target_parameters` becomes the exact kept names, so loaders
    that select by the config's patterns (PEFT) find the same parameters as the adapter file.
    """
    order = [n for n, _ in base.named_parameters() if n in indices]
    kept = {n: indices[n] for n in order if indices[n] is not None}
    selected = select_parameters(base, config.target_parameters, config.exclude_parameters)
    if selected != order:
        steps = [*config.pruning[:-1], {**config.pruning[-1], "target_parameters_before": config.target_parameters}]
        config = config.with_updates(target_parameters=[f"^{re.escape(n)}$" for n in order], pruning=steps)
    new = GradiendModel(base, config, parameter_names=order, indices=kept)
    if isinstance(model, GradiendModel):
        return model.take_bottleneck(new) if inplace else new.keep_base_flags_of(model)
    return new


def _record(config: GradiendConfig, record: dict[str, Any], **changes: Any) -> GradiendConfig:
    return config.with_updates(pruning=[*(config.pruning or []), record], **changes)


def pre_prune(
    model: Union[GradiendModel, nn.Module],
    dataset: Any,
    tokenizer: Any = None,
    keep: Optional[Keep] = None,
    *,
    threshold: Optional[float] = None,
    rows: Optional[int] = 32,
    batch_size: int = 8,
    kind: Optional[str] = None,
    aggregate: str = "mean",
    seed: int = 0,
    config: Optional[GradiendConfig] = None,
    collator: Any = None,
    inplace: bool = False,
) -> GradiendModel:
    """Keep the entries of the selected base weights with the largest |mean gradient| and build the adapter over them.

    model: a GradiendModel (its selection, or its kept entries if already pruned), or a plain base model together with
        `config=`: then no dense bottleneck is ever allocated (the way to go for big models).
    keep: a fraction (0 < keep <= 1) or a count (int >= 1) of entries; or `threshold=` (keep importance >= it).
    rows / batch_size / seed: `rows` rows stratified by transition (see importance_batches), in single-transition
        batches of `batch_size`.
    kind: the gradient read ('factual', 'alternative', 'diff'); default: the config's source.
    aggregate: 'mean' (default: |mean gradient|), 'label' or 'abs' (see `importance`).
    inplace: swap the pruned bottleneck into the given GradiendModel (else a new GradiendModel over the same base).

    The new bottleneck is freshly initialised at the pruned size (config.init_seed); the config records the pruning in
    `pruning`. Memory beyond the base model: one float32 accumulator per selected entry, plus the int64 indices kept.

    Several processes: when torch.distributed is available and initialised with a world size N > 1 (e.g. under
    `accelerate launch --num_processes N`, or in GradiendTrainer, whose training arguments set the group up), every
    process must call this with the same arguments; it then reads only batches i % N == rank, the importance is summed
    by reduce-scatter so each process keeps just its 1/N slice of it (the raw per-process accumulator is freed
    parameter by parameter as it is reduced), and the exact global top-k is found with small collectives
    (gradiend_hf.distributed_pruning). Every process selects the same entries as a single process reading all rows
    would (up to float rounding of the importance, summed in another order) and builds the adapter over them as
    GradiendModel does under torch.distributed; the record gains "processes": N.
    """
    from . import distributed_pruning
    from .data import GradiendDataCollator

    if isinstance(model, GradiendModel):
        if config is not None:
            raise ValueError("config= is for a plain base model; a GradiendModel brings its own gradiend_config.")
        base, config = model.get_base_model(), model.gradiend_config
        bottleneck = model.bottleneck  # the whole selection, also when this process holds a slice of the bottleneck
        selection = Selection(bottleneck.shapes, {n: bottleneck.selected_indices(n) for n in bottleneck.names})
    else:
        if config is None:
            raise ValueError("Pre-pruning a plain base model needs config= (a GradiendConfig).")
        base = model
        config = config.with_updates(objective=resolve_objective(base, config.objective))
        names = select_parameters(base, config.target_parameters, config.exclude_parameters)
        selection = Selection({n: p.shape for n, p in parameter_dict(base, names).items()})
    kind = kind or config.source
    if collator is None:
        if tokenizer is None:
            raise ValueError("Pre-pruning tokenizes rows: pass the base model's tokenizer (or collator=).")
        collator = GradiendDataCollator(tokenizer, resolve_objective(base, config.objective), config.feature_classes)
    tokenizer = tokenizer if tokenizer is not None else getattr(collator, "tokenizer", None)
    batches = importance_batches(
        dataset, config.feature_classes, rows=rows, batch_size=batch_size, seed=seed, tokenizer=tokenizer
    )
    processes = distributed_pruning.process_count()
    was_training = base.training
    base.eval()  # no dropout in the gradients, as in training
    try:
        if processes > 1:  # this process's share of the batches; it keeps only its slice of the summed importance
            shards = distributed_pruning.sharded_importance(
                base, selection, batches, collator, kind, aggregate, config.feature_classes
            )
        else:
            scores = importance(base, selection, batches, collator, kind, aggregate, config.feature_classes)
    finally:
        base.train(was_training)
    if processes > 1:
        positions, info = distributed_pruning.select_top_sharded(shards, keep, threshold=threshold, release=True)
        del shards
    else:
        positions, info = select_top(scores, keep, threshold=threshold, release=True)  # indices replace accumulators
        del scores
    indices = {n: compose(selection.indices[n], positions[n]) for n in selection.names if n in positions}
    record = {
        "method": "pre", "keep": keep, "threshold": threshold, "rows": sum(len(b) for b in batches),
        "batches": len(batches), "batch_size": batch_size, "kind": kind, "aggregate": aggregate, "seed": seed,
        "kept": info["kept"], "total": info["total"], "cutoff": info["cutoff"],
    }
    if processes > 1:
        record["processes"] = processes
    config = _record(config, record, encoder_bias=None)  # a fresh adapter: nothing trained is carried over
    return _rebuilt(model, base, config, indices, inplace)


# --- post-pruning ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def post_prune_scores(model: GradiendModel, by: str = "decoder") -> dict[str, torch.Tensor]:
    """Per-entry scores (float32, flat over the bottleneck's entries): 'decoder' sum_k |W_d[k]|, 'encoder' sum_k
    |W_e[k]|, 'decoder_bias' |b_d|, 'decoder_sum' |sum_k W_d[k] + b_d| (the decoder's output at h = 1)."""
    if by not in POST_CRITERIA:
        raise ValueError(f"by={by!r} is not a post-pruning criterion; choose one of {list(POST_CRITERIA)}.")
    b = model.bottleneck
    if by in ("decoder_bias", "decoder_sum") and not b.has_decoder_bias:
        raise ValueError(f"by={by!r} needs a decoder bias; this adapter has none (decoder_bias=False).")
    scores = {}
    for name in b.names:
        d = b.latent_dim
        if by == "decoder":
            s = b.decoder(name).detach().reshape(d, -1).float().abs().sum(0)
        elif by == "encoder":
            s = b.encoder(name).detach().reshape(d, -1).float().abs().sum(0)
        elif by == "decoder_bias":
            s = b.offset(name).detach().reshape(-1).float().abs()
        else:
            s = (
                b.decoder(name).detach().reshape(d, -1).float().sum(0) + b.offset(name).detach().reshape(-1).float()
            ).abs()
        scores[name] = s.contiguous()
    return scores


@torch.no_grad()
def post_prune(
    model: GradiendModel,
    keep: Optional[Keep] = None,
    *,
    by: str = "decoder",
    threshold: Optional[float] = None,
    inplace: bool = False,
) -> GradiendModel:
    """Keep the top-k entries of a trained adapter by `by` (see post_prune_scores); the kept encoder/decoder values and
    the encoder bias are copied exactly, indices composed with any earlier pruning (base coordinates)."""
    model.require_whole("post-pruning")
    b = model.bottleneck
    scores = post_prune_scores(model, by)
    positions, info = select_top(scores, keep, threshold=threshold)
    del scores
    old = {
        n: (b.encoder(n).detach(), b.decoder(n).detach(), b.offset(n).detach() if b.has_decoder_bias else None)
        for n in b.names
    }
    encoder_bias = b.encoder_bias.detach().clone()
    indices = {n: compose(b.indices[n], positions[n]) for n in b.names if n in positions}
    record = {"method": "post", "keep": keep, "threshold": threshold, "by": by, "kept": info["kept"],
              "total": info["total"], "cutoff": info["cutoff"]}
    config = _record(model.saved_config(), record)
    new = _rebuilt(model, model.get_base_model(), config, indices, inplace)
    nb = new.bottleneck
    for name in nb.names:
        enc, dec, off = old[name]
        pos = positions[name]
        pick = (lambda t: t) if pos is None else (lambda t: t.reshape(t.shape[0], -1).index_select(1, pos.to(t.device)))
        nb.encoder(name).copy_(pick(enc).reshape(nb.encoder(name).shape))
        nb.decoder(name).copy_(pick(dec).reshape(nb.decoder(name).shape))
        if off is not None:
            nb.offset(name).copy_(pick(off.unsqueeze(0)).reshape(nb.offset(name).shape))
    nb.encoder_bias.copy_(encoder_bias)
    return new


# --- trainer hooks: honour GradiendConfig.pre_prune / post_prune ----------------------------------------------------
def maybe_pre_prune(
    model: GradiendModel, train_dataset: Any, collator: Any, batch_size: int, seed: int
) -> GradiendModel:
    """Pre-prune in place when the config asks for it and the model was not pre-pruned yet (the trainer calls this
    before it builds anything from the model's bottleneck)."""
    config = model.gradiend_config
    if config.pre_prune is None or config.pruned_by("pre"):
        return model
    if train_dataset is None:
        model.require_bottleneck()  # a placeholder bottleneck cannot train: the error names what to do
        return model
    return pre_prune(model, train_dataset, keep=config.pre_prune, rows=config.pre_prune_rows, batch_size=batch_size,
                     seed=seed, collator=collator, inplace=True)


def maybe_post_prune(model: GradiendModel) -> GradiendModel:
    """Post-prune in place when the config asks for it and the model was not post-pruned yet (end of training)."""
    config = model.gradiend_config
    if config.post_prune is None or config.pruned_by("post"):
        return model
    return post_prune(model, config.post_prune, by=config.post_prune_by, inplace=True)
