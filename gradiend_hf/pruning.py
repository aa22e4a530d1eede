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

import re
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .config import POST_PRUNE_CRITERIA, GradiendConfig
from .importance import (
    AGGREGATES,
    ImportanceEngine,
    Selection,
    accumulate_batches,
    batch_label,
    importance,
    importance_batches,
    importance_weights,
)
from .model import GradiendModel
from .objective import resolve_objective
from .selection import parameter_dict, select_parameters
from .sharding import distributed_world
from .topk import Keep, chunks, keep_count, kth_largest, score_problem, select_top

POST_CRITERIA = POST_PRUNE_CRITERIA

__all__ = [  # the importance and top-k functions live in importance.py and topk.py; here for one import
    "AGGREGATES",
    "POST_CRITERIA",
    "ImportanceEngine",
    "Selection",
    "batch_label",
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


def compose(old: Optional[torch.Tensor], positions: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Base-coordinate indices of kept positions within a (possibly already pruned) entry set."""
    if positions is None:
        return old
    if old is None:
        return positions
    return old.index_select(0, positions.to(old.device))


# --- pre-pruning ----------------------------------------------------------------------------------------------------
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
    processes = distributed_world()
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
