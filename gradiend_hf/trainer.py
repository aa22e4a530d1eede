"""GradiendTrainer: a transformers.Trainer that trains only the bottleneck, on gradients gathered from the base."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    EvalPrediction,
    PredictionOutput,
    SaveStrategy,
    rotate_checkpoints,
)

from . import fused, sharding, training_flags
from .atomic import recover_folder, recover_folders, staged_folder, write_file_atomically, write_text_atomically
from .base_passes import base_passes, checkpoint_options, checkpointable_layers
from .checkpointing import (
    OPTIMIZER_JSON,
    OPTIMIZER_TENSORS,
    SHARDED_STATE,
    load_scheduler_state,
    save_scheduler_state,
    TRAINER_STATE,
    checkpoint_problem,
    has_optimizer_state,
    last_complete_checkpoint,
    load_optimizer_state,
    load_scaler_state,
    pickled_files,
    save_optimizer_state,
    save_scaler_state,
)
from .config import CONFIG_NAME
from .data import GradiendDataCollator
from .evaluation.encoder import encode_dataset, encoder_metrics, row_labels
from .gradients import shares_input
from .lengths import check_rows, collator_for
from .model import GradiendModel
from .pruning import maybe_post_prune, maybe_pre_prune
from .trainer_hub import CONVERGENCE_FILE, SavingAndHub

logger = logging.getLogger("gradiend_hf")
OPTIMIZER_STATE_DTYPES = ("float32", "bfloat16")


@dataclass
class GradiendTrainingArguments(TrainingArguments):
    """`TrainingArguments` for [`GradiendTrainer`]: every transformers argument works as usual; the ones below are
    added, and some defaults are changed for GRADIEND (the trl `SFTConfig` convention). Only the bottleneck trains.

    Args:
        > What a batch and a step mean here

        per_device_train_batch_size (`int`, defaults to `4`, transformers: `8`):
            Data rows behind one gradient. All rows of a batch share one transition (class A -> B), as in the paper.
        gradient_accumulation_steps (`int`, defaults to `1`):
            Gradients per optimizer step (1, as in the paper).
        per_device_eval_batch_size (`int`, defaults to `16`, transformers: `8`):
            Rows per forward-mode encoding pass during evaluation.

        > Optimisation of the bottleneck (AdamW)

        learning_rate (`float`, defaults to `1e-5`, transformers: `5e-5`):
            AdamW step size. Use about 1e-4 for decoder-only models with pre-pruning: much larger steps saturate tanh
            for both classes and the run collapses (it is then stopped, see `convergence_*`).
        weight_decay (`float`, defaults to `0.01`, transformers: `0.0`):
            AdamW weight decay.
        max_grad_norm (`float`, defaults to `0.0`, transformers: `1.0`):
            Gradient clipping; 0 = none, as in the paper (and required for the fused step).
        lr_scheduler_type (`str`, defaults to `"constant"`, transformers: `"linear"`):
            GRADIEND trains at a constant rate.
        optimizer_state_dtype (`str`, defaults to `"float32"`, added):
            AdamW moments of the bottleneck: `"float32"`, or `"bfloat16"` with stochastic rounding (8 instead of 16
            bytes per selected weight; needs the fused step).

        > Evaluation, checkpoints and convergence

        eval_strategy (`str`, defaults to `"steps"`, transformers: `"no"`) and eval_steps (defaults to `50`):
            Evaluate the encoder (correlation of h with the class labels) every 50 steps.
        save_steps (`int`, defaults to `50`, transformers: `500`):
            Checkpoint (adapter files plus optimizer state, safetensors and JSON only) every 50 steps.
        logging_steps (`int`, defaults to `10`, transformers: `500`):
            Log every 10 steps.
        load_best_model_at_end (`bool`, defaults to `True`), metric_for_best_model (defaults to `"correlation"`),
        greater_is_better (defaults to `True`):
            Reload the checkpoint with the best encoder correlation at the end.
        max_eval_rows (`int`, *optional*, added):
            Evaluate on at most this many rows (the first ones) to bound evaluation time.
        convergence_correlation (`float`, defaults to `0.5`, added):
            |correlation| a run needs at its best step to count as converged.
        convergence_mean (`float`, defaults to `0.5`, added):
            |mean h| both classes need at the best step, with opposite signs.
        fail_if_not_converged (`bool`, defaults to `False`, added):
            Raise at the end of training when the run did not converge (else warn and record why).
        early_stopping_patience (`int`, *optional*, added):
            Stop at the first evaluation at which the run has converged (the `convergence_*` tests hold at its best
            evaluation) and the last that many evaluations have not raised the best |correlation| by more than
            `early_stopping_threshold` (the names of transformers' EarlyStoppingCallback; None: train all
            `max_steps`). The encoder is then final; the best checkpoint is loaded at the end as always.
        early_stopping_threshold (`float`, defaults to `0.001`, added):
            The rise of the best |correlation| that counts as an improvement.
        sign_normalisation (`bool`, defaults to `True`, added):
            After each evaluation negate the bottleneck (and the optimizer's first moments) when the correlation is
            negative, so the first feature class reads +1. The flip is an exact symmetry of the model and of AdamW.

        > Data handling

        remove_unused_columns (`bool`, defaults to `False`, transformers: `True`):
            The rows' text and label columns are not model inputs; the collator needs them.
        ddp_find_unused_parameters (`bool`, defaults to `False`, transformers: `None`):
            Every bottleneck tensor is used in every step, so DDP need not search for unused ones.

        > Several processes (`accelerate launch --num_processes N`, torchrun)

        shard_bottleneck (`bool`, defaults to `True`, added):
            Each process holds 1/N of every selected parameter's entries of W_e, W_d, b_d, their AdamW moments and the
            source gradient (sharding.py). A step trains on one batch of `per_device_train_batch_size x N` rows of
            one transition, split over the processes; each base gradient is reduce-scattered as it arrives. It equals
            one process with that batch size (up to the order of float sums) and takes the fused step, so it refuses
            what the fused step cannot do (clipping, gradient accumulation, other optimizers). `False`: DDP
            replicas of the whole bottleneck, each process on its own batches (the plain step).

        > The base model's passes (base_passes.py); the bottleneck always stays float32

        bf16 (`bool`, defaults to `False`):
            The base's forward passes run under bfloat16 autocast (backward outside it), on the fused and the plain
            step alike; the bottleneck, its arithmetic and its optimizer state stay float32. On the CPU it needs
            `use_cpu=True` (a transformers rule). `fp16`, `bf16_full_eval` and `fp16_full_eval` are refused.
        gradient_checkpointing (`bool`, defaults to `False`):
            Recompute the base's layers in the backward pass instead of keeping their activations (same gradients).
            `gradient_checkpointing_kwargs` may hold `every_n_layers` and torch.utils.checkpoint's own options.

        > Optimizers

        optim (`str`, defaults to transformers' `"adamw_torch_fused"`):
            Any optimizer transformers builds from a list of tensors works (`"adamw_torch"`, `"adafactor"`, `"sgd"`,
            `"adagrad"`, `"rmsprop"`, bitsandbytes' ...), as do `optimizers=` and `optimizer_cls_and_kwargs=`; GaLore,
            APOLLO and LOMO (built from a model's layers) are refused. Weight decay applies to every bottleneck tensor.

        > Steps, logging and callbacks

        Training takes the fused step (fused.py) whenever one process takes one unclipped torch AdamW step per
        gradient and no callback watches the optimizer step: about 16 bytes per selected weight less than autograd over
        the bottleneck, same numbers (a sharded run of several processes takes it too). Otherwise (another optimizer,
        `max_grad_norm`, `gradient_accumulation_steps`, DDP replicas (`shard_bottleneck=False`), a callback with
        `on_pre_optimizer_step`/`on_optimizer_step`) it takes the plain step, where the bottleneck's `.grad` exists
        as with any Trainer; the reason is logged once. The fused step updates the
        bottleneck during the backward pass, so it has no `.grad` and nothing left to do when `optimizer.step()` runs:
        callbacks that need the gradients before the update get the plain step for that reason. `grad_norm` is logged
        on both steps (closed form on the fused one); `include_num_input_tokens_seen` counts the tokens of every
        distinct input the base model reads (a masked LM reads one input for both sides, a causal LM two).

        > Saving and the Hub

        `save_model` writes the adapter, the tokenizer (`processing_class`), the GRADIEND card (README.md) and
        training_args.json (transformers pickles them into training_args.bin; nothing here is a pickle).
        `push_to_hub=True` / `trainer.push_to_hub()` upload exactly those files (plus convergence.json and
        trainer_state.json at the end), with the GRADIEND card: base model, tags, datasets, training results.
        Uploads are blocking (transformers pushes in the background).
    """

    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the bottleneck."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Gradient clipping of the bottleneck (0 = none, as in the paper)."}
    )
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Scheduler; GRADIEND needs none."})
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate."})
    eval_steps: Optional[float] = field(default=50, metadata={"help": "Evaluate every N steps."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    metric_for_best_model: Optional[str] = field(default="correlation", metadata={"help": "Best-checkpoint metric."})
    greater_is_better: Optional[bool] = field(default=True, metadata={"help": "Higher metric is better."})
    load_best_model_at_end: bool = field(default=True, metadata={"help": "Reload the best checkpoint at the end."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Rows behind one gradient."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Rows per forward-mode encoding pass."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the row columns."})
    ddp_find_unused_parameters: Optional[bool] = field(
        default=False,
        metadata={"help": "Multi-process: every bottleneck tensor is used in every step, so DDP need not search."},
    )
    convergence_correlation: float = field(default=0.5, metadata={"help": "Converged: |correlation| at least this."})
    convergence_mean: float = field(default=0.5, metadata={"help": "Converged: both class means |h| at least this."})
    fail_if_not_converged: bool = field(default=False, metadata={"help": "Raise when training did not converge."})
    early_stopping_patience: Optional[int] = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement once converged."}
    )
    early_stopping_threshold: float = field(default=0.001, metadata={"help": "Rise of |correlation| that counts."})
    sign_normalisation: bool = field(default=True, metadata={"help": "Keep the first class reading +1."})
    max_eval_rows: Optional[int] = field(default=None, metadata={"help": "Cap on evaluation rows."})
    shard_bottleneck: bool = field(
        default=True,
        metadata={"help": "Several processes: each holds 1/N of the bottleneck and its optimizer state (sharding.py); "
                  "False: DDP replicas of all of it."},
    )
    optimizer_state_dtype: str = field(
        default="float32",
        metadata={
            "help": "AdamW moments of the bottleneck: 'float32', or 'bfloat16' (stochastically rounded; 8 instead of "
            "16 bytes per selected weight; needs the fused step)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be at least 1 evaluation (or None: no early stopping), "
                             f"got {self.early_stopping_patience}.")
        if self.optimizer_state_dtype not in OPTIMIZER_STATE_DTYPES:
            raise ValueError(
                f"optimizer_state_dtype={self.optimizer_state_dtype!r} is not supported; choose one of "
                f"{list(OPTIMIZER_STATE_DTYPES)}."
            )


def share_path(path: Optional[Path], rank: int) -> Path:
    """The path the main process (rank 0) holds, on every process."""
    import torch.distributed as dist

    box = [str(path) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


class ShardedRun(torch.nn.Module):
    """The GradiendModel of a sharded run where accelerate would put DDP: a plain container (see _wrap_model)."""

    def __init__(self, module: GradiendModel) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any):
        return self.module(*args, **kwargs)


def flip_sign(model: GradiendModel, optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Negate encoder and decoder weights and the AdamW first moments that go with them (b_d stays)."""
    b = model.bottleneck
    flipped = [b.encoder_bias, *b.encoder_weight.values(), *b.decoder_weight.values()]
    b.flip_sign()
    if optimizer is not None:
        with torch.no_grad():
            for p in flipped:
                moment = optimizer.state.get(p, {}).get("exp_avg")
                if moment is not None:
                    moment.neg_()


def primary_eval_name(names: list[str], metric_for_best_model: Optional[str]) -> str:
    """Of several eval datasets (a dict), the one that decides: the one `metric_for_best_model` names
    ("eval_<name>_correlation" or "<name>_correlation"), else the first. Its evaluation normalises the encoder's
    sign and feeds the convergence verdict."""
    metric = (metric_for_best_model or "").removeprefix("eval_")
    named = [name for name in names if metric.startswith(f"{name}_")]
    return max(named, key=len) if named else names[0]


def best_metric_for(args: TrainingArguments, primary: str) -> TrainingArguments:
    """With a dict of eval datasets, metrics are named eval_<name>_...: a metric_for_best_model naming no dataset
    (GRADIEND's default "correlation") would be missing from them, so it is read from the primary dataset."""
    metric = args.metric_for_best_model
    if metric is None or metric.removeprefix("eval_").startswith(f"{primary}_"):
        return args
    renamed = f"eval_{primary}_{metric.removeprefix('eval_')}"
    logger.info("metric_for_best_model=%r with several eval datasets: using %r (the eval dataset %r decides).",
                metric, renamed, primary)
    return dataclasses.replace(args, metric_for_best_model=renamed)


# Both classes' mean h this far out on the same side: tanh is saturated for every row (its slope ~0), so the encoder
# reads nothing and its gradient has vanished. Seen with a learning rate too high for the number of selected weights.
COLLAPSED_MEAN = 0.9
COLLAPSED_EVALUATIONS = 2  # consecutive evaluations before a run is stopped as collapsed


def collapsed(record: dict, feature_classes: list[str]) -> bool:
    means = [record.get(f"mean_h_{c}") for c in feature_classes]
    return None not in means and means[0] * means[1] > 0 and min(abs(m) for m in means) >= COLLAPSED_MEAN


def finite(value: Any) -> bool:
    """A real number that is not NaN or inf (NaN fails no `<` test, so every threshold check must ask this first)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


class ConvergenceCallback(TrainerCallback, ExportableState):
    """Tracks the best evaluation and decides at the end whether the run converged (kept in trainer_state.json).

    Stops a run early whose encoder collapsed (COLLAPSED_EVALUATIONS evaluations in a row with both classes saturated on
    the same side): it does not recover, and the seed search (seeds.train_seeds) can move on to the next seed.
    """

    def __init__(self, feature_classes: list[str], best: Optional[dict] = None, history: Optional[list] = None,
                 metric_prefix: str = "eval_") -> None:
        self.feature_classes = list(feature_classes)
        self.best = best
        self.history = history or []
        # the evaluation it follows: "eval_" for one eval dataset, "eval_<name>_" for the one of a dict that decides
        # (see GradiendTrainer.primary_eval_name)
        self.metric_prefix = metric_prefix

    def state(self) -> dict:
        return {
            "args": {"feature_classes": self.feature_classes, "best": self.best, "history": self.history},
            "attributes": {},
        }

    def restore(self, saved: Mapping[str, Any]) -> None:
        """Take over the best evaluation and the history kept in a checkpoint's trainer_state.json (`state()`), so
        that the verdict after a resume covers the whole run, not only the evaluations since the resume."""
        kept = saved.get("args", {})
        classes = kept.get("feature_classes")
        if classes is not None and list(classes) != self.feature_classes:
            raise ValueError(
                f"The checkpoint was trained for the feature classes {list(classes)}, this run has "
                f"{self.feature_classes}: resume it with the GradiendConfig it was started with."
            )
        self.best = kept.get("best")
        self.history = list(kept.get("history") or [])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        prefix = self.metric_prefix
        if not metrics or f"{prefix}correlation" not in metrics:
            return
        record = {"step": state.global_step,
                  **{k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}}
        self.history.append(record)
        # a NaN correlation (constant or non-finite h) is never the best: it would fail no later comparison
        if finite(record["correlation"]) and (
            self.best is None or abs(record["correlation"]) > abs(self.best["correlation"])
        ):
            self.best = record
        if self.collapsed_steps() or self.settled(args):
            control.should_training_stop = True
        state.stateful_callbacks[type(self).__name__] = self.state()

    def settled(self, args: GradiendTrainingArguments) -> bool:
        """Converged, and the last `early_stopping_patience` evaluations did not raise the best |correlation| by more
        than `early_stopping_threshold` (read from the history, so a resumed run decides alike)."""
        patience = getattr(args, "early_stopping_patience", None)
        if patience is None or not self.verdict(args)["converged"]:
            return False
        best, stale = -math.inf, 0
        for record in self.history:
            value = abs(record["correlation"]) if finite(record["correlation"]) else -math.inf
            stale = 0 if value > best + args.early_stopping_threshold else stale + 1
            best = max(best, value)
        return stale >= patience

    def collapsed_steps(self) -> list[int]:
        """Steps of the last evaluations if they all show a collapsed encoder (see COLLAPSED_MEAN), else []."""
        last = self.history[-COLLAPSED_EVALUATIONS:]
        if len(last) == COLLAPSED_EVALUATIONS and all(collapsed(r, self.feature_classes) for r in last):
            return [r["step"] for r in last]
        return []

    def verdict(self, args: GradiendTrainingArguments) -> dict:
        """Converged: |corr| >= threshold, both class means |h| >= threshold with opposite signs, best step > 0.
        Every test asks for the good case, so a NaN (which fails every comparison) counts as not converged."""
        best = self.best or {}
        first, second = (best.get(f"mean_h_{c}") for c in self.feature_classes)
        reasons = [] if self.history else ["no evaluation ran (give the trainer an eval_dataset)"]
        if self.history and self.best is None:
            reasons.append("no evaluation gave a finite correlation (h was NaN/inf or the same for every row)")
        correlation = best.get("correlation", 0.0)
        if not (finite(correlation) and abs(correlation) >= args.convergence_correlation):
            reasons.append(f"|correlation| {abs(correlation):.3f} < {args.convergence_correlation}")
        if first is None or second is None:
            reasons.append("a feature class is missing from the evaluation rows")
        elif not (finite(first) and finite(second) and min(abs(first), abs(second)) >= args.convergence_mean
                  and first * second < 0):
            reasons.append(
                f"class means {first:.3f} / {second:.3f} are not both beyond +-{args.convergence_mean} "
                "with opposite signs"
            )
        if best.get("step", 0) <= 0:
            reasons.append("the best evaluation is the untrained initialisation (step 0)")
        steps = self.collapsed_steps()
        if steps:
            reasons.append(f"the encoder collapsed (h saturated on the same side for both classes at steps "
                           f"{', '.join(map(str, steps))}; training stopped there): lower the learning rate")
        return {"converged": not reasons, "reasons": reasons, "best": best, "evaluations": len(self.history)}


class GradiendTrainer(SavingAndHub, Trainer):
    """Trains a GradiendModel's bottleneck; each step computes the base gradients of one batch of rows.

    Only the bottleneck is optimised; checkpoints hold the adapter format plus optimizer state as safetensors/JSON;
    `evaluate()` logs the correlation of per-row encodings (forward-mode, no backward per row), `predict()` returns
    them per row with the rows' labels.

    The transformers contract (training_flags.py): every TrainingArguments flag works as with transformers' Trainer
    or is refused here, at construction, naming it and the alternative. A plain `TrainingArguments` is converted to
    GradiendTrainingArguments (its values kept, GRADIEND's added fields at their defaults).

    Faults: a checkpoint is written whole into a staging folder and renamed to checkpoint-N last, so a kill or a full
    disk leaves no half checkpoint; `train(resume_from_checkpoint=True)` resumes from the last complete one (naming
    the incomplete ones it skips) and restores the convergence history with it; resuming never unpickles anything
    (scaler.pt, rng_state.pth, training_args.bin ... are ignored with a warning). Training stops with a
    FloatingPointError naming the step at the first NaN/inf loss, gradient or encoder value, before it is applied,
    and no checkpoint ever holds NaN/inf.
    """

    def __init__(
        self,
        model: GradiendModel,
        args: Optional[TrainingArguments] = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        data_collator: Optional[GradiendDataCollator] = None,
        callbacks: Optional[list[TrainerCallback]] = None,
        **kwargs: Any,
    ) -> None:
        from .schema import prepare_rows

        if not isinstance(model, GradiendModel):
            raise TypeError(
                "GradiendTrainer trains a GradiendModel (get_gradiend_model(base, config)), "
                f"got {type(model).__name__}."
            )
        if processing_class is None and data_collator is None:
            raise ValueError("Pass the base model's tokenizer as processing_class= (it tokenizes the rows).")
        if args is None:
            args = GradiendTrainingArguments(output_dir="gradiend_output")
        elif not isinstance(args, TrainingArguments):
            raise TypeError(f"args must be GradiendTrainingArguments or TrainingArguments, not {type(args).__name__}.")
        args = training_flags.convert_arguments(args, GradiendTrainingArguments)
        refused = training_flags.problems(args, model.get_base_model(), kwargs)
        if refused:
            raise ValueError("GradiendTrainer cannot honour these training arguments:\n- " + "\n- ".join(refused))
        classes = model.gradiend_config.feature_classes
        if train_dataset is not None:
            train_dataset = prepare_rows(train_dataset, classes, seed=args.seed, tokenizer=processing_class)
        primary = None
        if isinstance(eval_dataset, Mapping):
            eval_dataset = {name: prepare_rows(rows, classes, seed=args.seed, tokenizer=processing_class)
                            for name, rows in eval_dataset.items()}
            primary = primary_eval_name(list(eval_dataset), args.metric_for_best_model)
            args = best_metric_for(args, primary)
        elif eval_dataset is not None:
            eval_dataset = prepare_rows(eval_dataset, classes, seed=args.seed, tokenizer=processing_class)
        # the default collator knows the base's position limit; every row is collated once now, so an over-long row
        # is refused by its index before any work (pre-pruning, training) instead of hours into training
        data_collator = data_collator or collator_for(model.get_base_model(), processing_class, model.objective,
                                                      classes)
        for rows in [train_dataset, *(eval_dataset.values() if isinstance(eval_dataset, Mapping) else [eval_dataset])]:
            if rows is not None:
                check_rows(rows, data_collator)
        model = maybe_pre_prune(model, train_dataset, data_collator, args.per_device_train_batch_size, args.seed)
        self.convergence = ConvergenceCallback(classes, metric_prefix=f"eval_{primary}_" if primary else "eval_")
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=[self.convergence, *(callbacks or [])],
            **kwargs,
        )
        self.model_accepts_loss_kwargs = False  # so the Trainer averages accumulated gradients itself
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.args.world_size != launched:
            raise RuntimeError(
                f"Launched as {launched} processes, but the training arguments set up {self.args.world_size}: every "
                "process would train alone on all the data and write the same checkpoints. Without a GPU, pass "
                "use_cpu=True to the training arguments (or export ACCELERATE_USE_CPU=true) to train on the CPU."
            )
        self.sharded = self.accelerator.num_processes > 1 and self.args.shard_bottleneck
        self.refuse_other_sharding()
        self.optimizer_class()  # an optimizer that cannot be built (a missing package) fails here, not at train()
        if self.args.optimizer_state_dtype != "float32" and self.static_step_blockers():
            raise ValueError(
                f"optimizer_state_dtype={self.args.optimizer_state_dtype!r} needs the fused step, which this run "
                f"cannot take: {self.static_step_blockers()[0]}. Use optimizer_state_dtype='float32', or one process "
                "with gradient_accumulation_steps=1, max_grad_norm=0 and optim='adamw_torch_fused'/'adamw_torch'."
            )
        if self.sharded:
            blockers = self.static_step_blockers()
            if blockers:
                raise ValueError(
                    f"With {self.accelerator.num_processes} processes the bottleneck is sharded, which trains with the "
                    f"fused step; this run cannot take it: {blockers[0]}. Remove that setting, or pass "
                    "shard_bottleneck=False (DDP replicas of the whole bottleneck on every process)."
                )
            if self.gradiend_model.gradiend_config.post_prune is not None:
                raise ValueError(
                    "post_prune ranks the whole adapter's entries, which no process of a sharded run holds: train "
                    "without it and post-prune the saved adapter in one process (gradiend_hf.pruning.post_prune("
                    "GradiendModel.from_pretrained(base, folder), keep)), or pass shard_bottleneck=False."
                )
            self.gradiend_model.shard()  # a model built before the processes were set up holds all of it until now
        elif self.accelerator.num_processes > 1:
            self.gradiend_model.unshard()
        self.precision = training_flags.autocast_dtype(self.args)
        every, self.checkpoint_kwargs = checkpoint_options(self.args.activation_checkpointing_kwargs)
        base = self.gradiend_model.get_base_model()
        self.checkpoint_layers = checkpointable_layers(base, every) if self.args.activation_checkpointing else []
        self._fused_grad_norm: Optional[float] = None
        self._announced_step: Optional[str] = None

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        """accelerate's mixed precision off: it would autocast the whole GradiendModel.forward (the bottleneck too).
        bf16 autocasts the base's passes only (base_passes.py), on the fused and the plain step alike."""
        built = super()._build_accelerator_args(**kwargs)
        built["mixed_precision"] = "no"
        return built

    @property
    def gradiend_model(self) -> GradiendModel:
        model = self.accelerator.unwrap_model(self.model)
        return model.module if isinstance(model, ShardedRun) else model

    def refuse_other_sharding(self) -> None:
        """FSDP and DeepSpeed would shard or replicate the GradiendModel their own way (and break its gradient hooks):
        GRADIEND shards its bottleneck itself when several processes train."""
        state = self.accelerator.state
        for plugin, name in (("fsdp_plugin", "FSDP"), ("deepspeed_plugin", "DeepSpeed")):
            if getattr(state, plugin, None) is not None:
                raise ValueError(
                    f"GradiendTrainer does not run under {name}: with several processes it shards the bottleneck "
                    "itself (shard_bottleneck=True: each process holds 1/N of it). Launch with plain `accelerate "
                    "launch --num_processes N` (or torchrun) and an accelerate config without FSDP/DeepSpeed."
                )

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        """A sharded run is not wrapped in DDP (its processes hold different slices): accelerate prepares only the
        optimizer when the model comes back wrapped, so it comes back in a plain container."""
        if self.sharded and training:
            return model if isinstance(model, ShardedRun) else ShardedRun(model)
        return super()._wrap_model(model, training, dataloader)

    # --- data ------------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        """Batches of one transition each, alternating directions, reshuffled per epoch (see sampling.py); seeded with
        `data_seed` if set, else `seed` (as transformers' sampler)."""
        from .sampling import ProcessBatches, TransitionBatchSampler

        if self.train_dataset is None:
            raise ValueError("GradiendTrainer needs a train_dataset to train.")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        processes = self.accelerator.num_processes
        # sharded: every process reads the same batches of N x per_device rows and computes its share of their rows
        size = self._train_batch_size * (processes if self.sharded else 1)
        sampler = TransitionBatchSampler.from_dataset(self.train_dataset, batch_size=size, seed=seed)
        if processes > 1 and not self.sharded:
            sampler = ProcessBatches(sampler, processes, self.accelerator.process_index)
        workers = self.args.dataloader_num_workers
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory and self.args.device.type != "cpu",  # pinning is for GPUs
            persistent_workers=self.args.dataloader_persistent_workers if workers else False,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers else None,
        )
        if processes > 1:  # already this process's share: accelerate must only move the batches to the device
            return prepare_data_loader(loader, self.accelerator.device, num_processes=1, process_index=0,
                                       put_on_device=self.accelerator.device_placement)
        return self.accelerator.prepare(loader)

    def _track_num_input_tokens(self, inputs: Mapping[str, Any]) -> None:
        """`include_num_input_tokens_seen`: the tokens of every distinct input the base model reads in a step (one
        input for both sides of a masked LM, the factual and the alternative input of a causal LM); 'non_padding'
        counts attended tokens only."""
        mode = self.args.include_num_input_tokens_seen
        if mode == "no":
            return
        sides = ("factual",) if shares_input(inputs) else ("factual", "alternative")
        key = "attention_mask" if mode == "non_padding" else "input_ids"
        count = sum(int(inputs[f"{side}_{key}"].sum() if key == "attention_mask" else inputs[f"{side}_{key}"].numel())
                    for side in sides)
        if self.sharded:  # every process reads the whole batch
            self.state.num_input_tokens_seen += count
            return
        tokens = torch.as_tensor(count, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens).sum().item())

    # --- training ------------------------------------------------------------------------------------------------
    def optimizer_class(self) -> type:
        """The class of the optimizer this run uses (or will build)."""
        if self.optimizer is not None:
            return type(getattr(self.optimizer, "optimizer", self.optimizer))  # accelerate wraps it
        if self.optimizer_cls_and_kwargs is not None:
            return self.optimizer_cls_and_kwargs[0]
        try:
            return self.get_optimizer_cls_and_kwargs(self.args, None)[0]
        except (ImportError, ValueError) as error:
            raise ValueError(f"optim={getattr(self.args.optim, 'value', self.args.optim)!r}: {error}") from error

    def static_step_blockers(self) -> list[str]:
        """What keeps this run from the fused step whatever the callbacks (fused.py serves one process taking one
        unclipped torch AdamW step per gradient)."""
        config = self.gradiend_model.gradiend_config
        optimizer = self.optimizer_class()
        reasons = {
            f"{self.accelerator.num_processes} processes with shard_bottleneck=False (DDP all-reduces whole "
            "gradients)": self.accelerator.num_processes != 1 and not self.args.shard_bottleneck,
            f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}": (
                self.args.gradient_accumulation_steps != 1
            ),
            f"max_grad_norm={self.args.max_grad_norm} (clipping needs the whole gradient)": (
                bool(self.args.max_grad_norm)
            ),
            f"optimizer {optimizer.__name__} (not torch.optim.AdamW)": optimizer is not torch.optim.AdamW,
            f"source={config.source!r} with target={config.target!r} (needs a third backward pass)": (
                not fused.supports(config.source, config.target)
            ),
        }
        return [reason for reason, blocks in reasons.items() if blocks]

    def fused_step_blocker(self) -> Optional[str]:
        """Why this run cannot take the fused step (fused.py: no stored target or bottleneck gradients), or None: a
        static reason (static_step_blockers), or a callback that watches the optimizer step (on the fused step the
        update happens during the backward pass, before on_pre_optimizer_step, and leaves no .grad to look at)."""
        static = self.static_step_blockers()
        if static:
            return static[0]
        for callback in self.callback_handler.callbacks:
            for event in ("on_pre_optimizer_step", "on_optimizer_step"):
                if getattr(type(callback), event, None) is not getattr(TrainerCallback, event):
                    return f"callback {type(callback).__name__} implements {event} (it sees the bottleneck's .grad)"
        return None

    def uses_fused_step(self) -> bool:
        return self.fused_step_blocker() is None

    @contextlib.contextmanager
    def base_passes(self) -> Iterator[None]:
        """The base's passes of a step: bf16 autocast and activation checkpointing as the arguments ask
        (base_passes.py); the bottleneck is never inside the autocast region."""
        with base_passes(self.gradiend_model.get_base_model(), self.precision, self.checkpoint_layers,
                         self.checkpoint_kwargs):
            yield

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One step, fused or plain. Stops training at the first NaN/inf loss, gradient or encoder value, before the
        optimizer applies it, so no later checkpoint can hold it (a diverged run never looks converged)."""
        blocker = self.fused_step_blocker()
        if blocker != self._announced_step:
            self._announced_step = blocker
            if blocker is None:
                logger.info("GRADIEND takes the fused step.")
            else:
                logger.info("GRADIEND takes the plain step (autograd over the bottleneck): %s.", blocker)
        if blocker is not None and self.sharded:
            raise ValueError(f"A sharded run trains with the fused step only, and {blocker}. Remove it, or pass "
                             "shard_bottleneck=False (DDP replicas).")
        with self.base_passes():
            if blocker is not None:
                return self.plain_step(model, inputs, num_items_in_batch, blocker)
            return self.fused_training_step(model, inputs)

    def plain_step(self, model, inputs, num_items_in_batch, blocker: str) -> torch.Tensor:
        if self.args.optimizer_state_dtype != "float32":
            raise ValueError(
                f"optimizer_state_dtype={self.args.optimizer_state_dtype!r} needs the fused step, which this run "
                f"cannot take: {blocker}. Use optimizer_state_dtype='float32', or one process with "
                "gradient_accumulation_steps=1, max_grad_norm=0 and the default AdamW."
            )
        try:  # the base model's losses are checked while the gradients are gathered (gradients.py)
            loss = super().training_step(model, inputs, num_items_in_batch)
        except FloatingPointError as error:
            raise FloatingPointError(self.stopped_message(str(error))) from error
        problem = self.nonfinite_problem(loss)  # before the Trainer's optimizer.step() applies the gradients
        if problem is not None:
            raise FloatingPointError(self.stopped_message(problem))
        return loss

    def fused_training_step(self, model, inputs) -> torch.Tensor:
        model.train()
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        if getattr(self, "_adamw_steps", None) is None or self._adamw_steps.optimizer is not optimizer:
            dtype = getattr(torch, self.args.optimizer_state_dtype)
            self._adamw_steps = fused.AdamWSteps(optimizer, dtype, seed=self.args.seed)
        try:  # the fused step checks as it goes (fused.py) and raises before it applies a non-finite update
            step = sharding.sharded_training_step if self.sharded else fused.fused_training_step
            result = step(self.gradiend_model, self._prepare_inputs(inputs), optimizer, self._adamw_steps)
        except FloatingPointError as error:
            raise FloatingPointError(self.stopped_message(str(error))) from error
        self._fused_grad_norm = result.grad_norm
        steps = self.args.torch_empty_cache_steps
        if steps is not None and self.state.global_step % steps == 0:
            from accelerate.utils.memory import clear_device_cache

            clear_device_cache()
        return result.loss.to(self.args.device)

    def _get_grad_norm(self, model, grad_norm=None):
        """The gradient norm to log: on the fused step its closed form (there is no .grad), else transformers'."""
        if self._fused_grad_norm is not None:
            norm, self._fused_grad_norm = self._fused_grad_norm, None
            return norm
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def nonfinite_problem(self, loss: torch.Tensor) -> Optional[str]:
        """What is NaN/inf after the plain step's backward pass (the loss or a bottleneck gradient), or None."""
        if not bool(torch.isfinite(loss.detach()).all()):
            return f"the loss is {float(loss.detach().float().mean())}"
        for name, param in self.gradiend_model.bottleneck.named_parameters():
            if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                return f"the gradient of the bottleneck tensor {name} is not finite"
        return None

    def nonfinite_tensors(self) -> list[str]:
        """Names of bottleneck tensors holding NaN/inf (e.g. after an AdamW step overflowed)."""
        return [n for n, p in self.gradiend_model.bottleneck.named_parameters() if not bool(torch.isfinite(p).all())]

    def stopped_message(self, problem: str) -> str:
        """The error for a NaN/inf met in the step being taken, naming it (global_step counts the finished ones)."""
        return (
            f"GRADIEND training stopped at step {self.state.global_step + 1}: {problem.rstrip('.')}. Nothing of this "
            "step is saved, and no checkpoint holds NaN/inf. The run diverged: lower the learning rate, or look for "
            "NaN/inf in this step's data rows (their loss in the base model)."
        )

    def require_finite_bottleneck(self, step: int) -> None:
        """Raise (naming `step`) when a bottleneck tensor holds NaN/inf: before every checkpoint and after training,
        for what the step checks cannot see (an AdamW update that overflowed, a callback writing the weights)."""
        bad = self.nonfinite_tensors()
        if bad:
            raise FloatingPointError(
                f"GRADIEND training stopped at step {step}: the bottleneck tensors {bad[:3]}"
                f"{' ...' if len(bad) > 3 else ''} hold NaN/inf after this step's update, so nothing is saved from "
                "it (earlier checkpoints are finite). The run diverged: lower the learning rate."
            )

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The optimizer `optim` names (or `optimizer_cls_and_kwargs`), over the bottleneck tensors only (the base is
        never optimised), with weight decay on all of them. torch's AdamW runs fused where its tensors allow."""
        if self.optimizer is None:
            params = [p for p in self.gradiend_model.bottleneck.parameters() if p.requires_grad]
            if self.optimizer_cls_and_kwargs is not None:
                cls, kwargs = self.optimizer_cls_and_kwargs
            else:
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, None)
            kwargs = dict(kwargs)
            if kwargs.get("fused") and not all(p.device.type in ("cpu", "cuda") for p in params):
                kwargs["fused"] = False  # the same update, by the foreach kernel
            self.optimizer = cls([{"params": params, "weight_decay": self.args.weight_decay}], **kwargs)
        return self.optimizer

    # --- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Per-row encodings of the evaluation rows; logs correlation, ternary accuracy and class means of h (and what
        `compute_metrics` returns for EvalPrediction(predictions=h, label_ids=labels)).

        A dict of datasets (given here or to the trainer) is evaluated per dataset, its metrics prefixed
        `eval_<name>_`, as transformers does; a string names one of the trainer's. The sign of the encoder is
        normalised on the first dataset evaluated only: the one `metric_for_best_model` names, else the first."""
        override = eval_dataset is not None
        data = eval_dataset if override else self.eval_dataset
        if isinstance(data, str):
            if not isinstance(self.eval_dataset, Mapping) or data not in self.eval_dataset:
                known = list(self.eval_dataset) if isinstance(self.eval_dataset, Mapping) else []
                raise ValueError(f"evaluate({data!r}): the trainer has no eval dataset named so (it has {known}).")
            return self.evaluate_rows(self.eval_dataset[data], f"{metric_key_prefix}_{data}", normalise=True)
        if data is None:
            raise ValueError("evaluate() needs an eval_dataset (rows of both classes, ideally held out).")
        if isinstance(data, Mapping):
            names = list(data)
            first = primary_eval_name(names, self.args.metric_for_best_model)
            metrics: dict[str, float] = {}
            for name in [first, *(n for n in names if n != first)]:
                metrics.update(self.evaluate_rows(data[name], f"{metric_key_prefix}_{name}", normalise=name == first,
                                                  prepare=override))
            return metrics
        return self.evaluate_rows(data, metric_key_prefix, normalise=True, prepare=override)

    def evaluate_rows(self, dataset: Any, prefix: str, normalise: bool, prepare: bool = False) -> dict[str, float]:
        """evaluate() on one dataset: metrics under `prefix`, sign normalisation only if `normalise`."""
        model = self.gradiend_model
        classes = model.gradiend_config.feature_classes
        if prepare:
            dataset = self.prepared(dataset)
        if self.args.max_eval_rows is not None:
            dataset = dataset.select(range(min(self.args.max_eval_rows, len(dataset))))
        with self.optimizer_in_eval_mode():
            frame = self.encoded(dataset, f"at step {self.state.global_step}")
        metrics = encoder_metrics(frame, classes, model.gradiend_config.source)
        if (normalise and self.args.sign_normalisation and model.gradiend_config.latent_dim == 1
                and metrics["correlation"] < 0):
            flip_sign(model, self.optimizer)
            frame["h"] = -frame["h"]
            metrics = encoder_metrics(frame, classes, model.gradiend_config.source)
            metrics["sign_flipped"] = 1.0
        metrics.update(self.user_metrics(frame))
        metrics = {f"{prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def predict(self, test_dataset: Any, ignore_keys=None, metric_key_prefix: str = "test") -> PredictionOutput:
        """Per-row encoder values: `predictions` (rows x latent_dim) is h of each row's own gradient (as evaluation
        computes it, forward-mode), `label_ids` the row's label (+1 first class, -1 second, 0 identity/neutral rows;
        with source='alternative' the alternative's class), `metrics` those of evaluate() under `test_`. The model is
        not changed (no sign normalisation)."""
        model = self.gradiend_model
        config = model.gradiend_config
        frame = self.encoded(self.prepared(test_dataset), "in predict()")
        columns = ["h", *(f"h_{k}" for k in range(1, config.latent_dim))]
        predictions = frame[columns].to_numpy(dtype=np.float32)
        labels = row_labels(frame, config.feature_classes, config.source)
        metrics = {**encoder_metrics(frame, config.feature_classes, config.source), **self.user_metrics(frame)}
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics)
        return PredictionOutput(predictions=predictions, label_ids=labels, metrics=metrics)

    def prepared(self, data: Any) -> Any:
        """User rows as the validated GRADIEND dataset (schema.prepare_rows)."""
        from .schema import prepare_rows

        return prepare_rows(data, self.gradiend_model.gradiend_config.feature_classes, seed=self.args.seed,
                            tokenizer=self.processing_class)

    def encoded(self, dataset: Any, when: str):
        """The rows with their encoder value h (evaluation.encoder.encode_dataset); NaN/inf h is an error."""
        frame = encode_dataset(self.gradiend_model, list(dataset), self.data_collator,
                               self.args.per_device_eval_batch_size, progress=not self.args.disable_tqdm)
        bad = int((~np.isfinite(frame["h"].to_numpy(dtype=float))).sum())
        if bad:
            raise FloatingPointError(
                f"The encoder value h of {bad} of {len(frame)} evaluation rows is NaN/inf ({when}): the bottleneck "
                "diverged, or these rows' loss in the base model is not finite. Lower the learning rate or check the "
                "evaluation rows."
            )
        return frame

    def user_metrics(self, frame) -> dict[str, float]:
        """What `compute_metrics` returns for EvalPrediction(predictions=h per row, label_ids=+1/-1/0 per row)."""
        if self.compute_metrics is None:
            return {}
        config = self.gradiend_model.gradiend_config
        columns = ["h", *(f"h_{k}" for k in range(1, config.latent_dim))]
        prediction = EvalPrediction(predictions=frame[columns].to_numpy(dtype=np.float32),
                                    label_ids=row_labels(frame, config.feature_classes, config.source))
        return dict(self.compute_metrics(prediction))

    @contextlib.contextmanager
    def optimizer_in_eval_mode(self) -> Iterator[None]:
        """Optimizers with train()/eval() modes (schedule-free) evaluate at their evaluation point, as transformers
        does."""
        optimizer = self.optimizer
        switch = optimizer is not None and callable(getattr(optimizer, "eval", None))
        if switch:
            optimizer.eval()
        try:
            yield
        finally:
            if switch and callable(getattr(optimizer, "train", None)):
                optimizer.train()

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        """transformers' train(), except: `resume_from_checkpoint=True` resumes from the last *complete* checkpoint
        (incomplete ones are logged and skipped), the convergence history is restored with it, and the verdict is
        written to convergence.json."""
        with self.checkpointing_requested():
            output = super().train(self.resolve_resume(resume_from_checkpoint), *args, **kwargs)
        self.require_finite_bottleneck(self.state.global_step)
        maybe_post_prune(self.gradiend_model)
        verdict = self.convergence.verdict(self.args)
        self.state.stateful_callbacks[type(self.convergence).__name__] = self.convergence.state()
        if self.args.should_save:
            write_text_atomically(os.path.join(self.args.output_dir, CONVERGENCE_FILE), json.dumps(verdict, indent=2))
            self.save_state()
        if not verdict["converged"]:
            message = "GRADIEND training did not converge: " + "; ".join(verdict["reasons"])
            if self.args.fail_if_not_converged:
                raise RuntimeError(message + ". Try another seed, more steps, a different learning rate or more data.")
            logger.warning(message)
        self.verdict = verdict
        return output

    @contextlib.contextmanager
    def checkpointing_requested(self) -> Iterator[None]:
        """transformers' train() asks the model to enable activation checkpointing (`activation_checkpointing_enable`),
        which a GradiendModel lacks: its base must stay in eval mode, where transformers' layers do not checkpoint.
        The trainer checkpoints the base's layers per step instead (base_passes); during train() the model answers
        that call by confirming it."""
        model = self.model
        answer = self.args.activation_checkpointing and not hasattr(model, "activation_checkpointing_enable")
        if answer:
            model.activation_checkpointing_enable = lambda *args, **kwargs: logger.info(
                "Activation checkpointing of %d base layers per training step.", len(self.checkpoint_layers))
        try:
            yield
        finally:
            if answer:
                del model.activation_checkpointing_enable

    def resolve_resume(self, resume_from_checkpoint: Union[str, bool, None]) -> Optional[str]:
        """The checkpoint folder to resume from, after repairing what killed saves left in the output folder.

        True: the complete checkpoint with the highest step (transformers would take the highest step even when that
        folder is half written); a path: that checkpoint, which must be complete; None/False: no resume."""
        if self.args.should_save:
            recover_folder(self.args.output_dir)
            recover_folders(self.args.output_dir)
            if isinstance(resume_from_checkpoint, (str, os.PathLike)):
                recover_folder(resume_from_checkpoint)
        self.accelerator.wait_for_everyone()
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            path, skipped = last_complete_checkpoint(self.args.output_dir)
            for incomplete, problem in skipped:
                logger.warning("Not resuming from the incomplete checkpoint %s: %s.", incomplete, problem)
            if path is None:
                found = f" (incomplete: {'; '.join(f'{p}: {why}' for p, why in skipped)})" if skipped else ""
                raise ValueError(
                    f"resume_from_checkpoint=True found no complete checkpoint in {self.args.output_dir}{found}. "
                    "Train without resume_from_checkpoint to start afresh."
                )
            logger.info("Resuming from %s, the last complete checkpoint.", path)
            return path
        path = os.fspath(resume_from_checkpoint)
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ValueError(
                f"Cannot resume from {path}: {problem}. Pass resume_from_checkpoint=True to resume from the last "
                f"complete checkpoint in {self.args.output_dir}."
            )
        return path

    # --- checkpoints: adapter format + safetensors/JSON optimizer state, never pickle ---------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """What transformers' Trainer saves, written whole into a staging folder that becomes checkpoint-N only at
        the end (atomic.staged_folder): a kill or a full disk while saving leaves no checkpoint-N, so a resume never
        meets half a checkpoint. A bottleneck holding NaN/inf is never saved (training stops instead)."""
        step = self.state.global_step
        self.require_finite_bottleneck(step)
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        output_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        saving_best = self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        if saving_best and self.state.best_global_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if best == output_dir or os.path.isdir(best):  # output_dir exists once the block below has ended
                self.state.best_model_checkpoint = best
        if self.sharded:
            self._save_sharded_checkpoint(output_dir)
        elif self.args.should_save:
            with staged_folder(output_dir, last=(CONFIG_NAME, TRAINER_STATE)) as staging:
                self.write_model_files(staging)
                if not self.args.save_only_model:
                    self._save_optimizer_and_scheduler(str(staging))
                    self._save_scaler(str(staging))
                    self._save_rng_state(str(staging))
                self.write_trainer_state(staging)
        if self.args.push_to_hub:
            self._push_from_checkpoint(output_dir)
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _save_sharded_checkpoint(self, output_dir: str) -> None:
        """_save_checkpoint of a sharded run: every process writes its slices of the bottleneck and of the optimizer
        state (sharded_io, torch.distributed.checkpoint) and takes part in the adapter's export; the main process
        writes the rest and moves the staging folder into place once all have finished."""
        from .sharded_io import save_sharded_checkpoint

        with self.staged_on_all(output_dir, last=(CONFIG_NAME, TRAINER_STATE)) as staging:
            self.write_model_files(staging)
            if not self.args.save_only_model:
                optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
                save_sharded_checkpoint(self.gradiend_model, optimizer, staging / SHARDED_STATE,
                                        steps=getattr(self, "_adamw_steps", None))  # with bf16 moments' generators
                if self.args.should_save:
                    save_scheduler_state(self.lr_scheduler, staging)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                self.write_trainer_state(staging)

    def write_trainer_state(self, staging: Path) -> None:
        """The callbacks' exportable state into the trainer state, then trainer_state.json: a checkpoint's last file
        (see checkpoint_problem)."""
        for callback in [*self.callback_handler.callbacks, self.control]:
            if isinstance(callback, ExportableState):
                name, saved = type(callback).__name__, callback.state()
                kept = self.state.stateful_callbacks.get(name)
                if isinstance(kept, list):
                    kept.append(saved)
                else:
                    self.state.stateful_callbacks[name] = saved
        self.state.save_to_json(str(staging / TRAINER_STATE))

    @contextlib.contextmanager
    def staged_on_all(self, directory: str, last: tuple[str, ...]) -> Iterator[Path]:
        """atomic.staged_folder for a save every process writes into: the main process stages (and moves the folder
        into place at the end), the others learn the staging folder's path; all wait until it is in place."""
        if self.args.should_save:
            with staged_folder(directory, last=last) as staging:
                share_path(staging, self.args.process_index)
                yield staging
                self.accelerator.wait_for_everyone()
        else:
            yield share_path(None, self.args.process_index)
            self.accelerator.wait_for_everyone()
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """transformers' save_model; in a sharded run every process takes part (the adapter is gathered one
        parameter at a time and written by the main process)."""
        if not self.sharded:
            return super().save_model(output_dir, _internal_call)
        with self.staged_on_all(output_dir or self.args.output_dir, last=(CONFIG_NAME,)) as staging:
            self.write_model_files(staging)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def save_state(self) -> None:
        """trainer_state.json of the output folder, written atomically."""
        if self.is_world_process_zero():
            path = os.path.join(self.args.output_dir, TRAINER_STATE)
            write_file_atomically(path, lambda tmp: self.state.save_to_json(str(tmp)))

    def _load_callback_state(self) -> None:
        """Restore the convergence history and best evaluation from the resumed checkpoint, always: transformers does
        so only with restore_callback_states_from_checkpoint=True, and then into a new callback object, while the
        verdict is made by self.convergence."""
        saved = self.state.stateful_callbacks.get(type(self.convergence).__name__)
        super()._load_callback_state()
        self.convergence = next(
            (cb for cb in self.callback_handler.callbacks if isinstance(cb, ConvergenceCallback)), self.convergence
        )
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        if saved:
            self.convergence.restore(saved)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """save_model(): the files of write_model_files, swapped into `output_dir` atomically (atomic.staged_folder;
        a run folder keeps its checkpoints)."""
        if self.args.should_save:
            with staged_folder(output_dir or self.args.output_dir, last=(CONFIG_NAME,)) as staging:
                self.write_model_files(staging)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        ignored = pickled_files(resume_from_checkpoint)
        if ignored:
            logger.warning(
                "Ignoring %s in %s: only pickle reads these files, and a GRADIEND checkpoint never unpickles anything "
                "(its state is in safetensors and JSON files). Delete them to silence this warning.",
                ", ".join(ignored), resume_from_checkpoint,
            )
        self.load_adapter_of(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info(
            "Loading the best GRADIEND checkpoint %s (correlation %s)",
            self.state.best_model_checkpoint,
            self.state.best_metric,
        )
        self.load_adapter_of(self.state.best_model_checkpoint)

    def load_adapter_of(self, checkpoint: str) -> None:
        """The bottleneck of a checkpoint. A sharded run reads only its own slices (sharded_state/, safetensors read
        slice by slice): every process reading the whole adapter file would hold the whole bottleneck at once."""
        if self.sharded and (Path(checkpoint) / SHARDED_STATE).is_dir():
            from .sharded_io import load_sharded_checkpoint

            load_sharded_checkpoint(self.gradiend_model, None, Path(checkpoint) / SHARDED_STATE)
        else:
            self.gradiend_model.load_adapter_weights(checkpoint)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.args.should_save:
            save_optimizer_state(self.optimizer, self.lr_scheduler, output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        if checkpoint is None:
            return
        if self.sharded:
            from .sharded_io import load_sharded_checkpoint

            if not (Path(checkpoint) / SHARDED_STATE).is_dir():
                raise ValueError(f"{checkpoint} holds no {SHARDED_STATE}/ (the slices of a sharded run), so this "
                                 "sharded run cannot resume from it; resume it with shard_bottleneck=False, or start "
                                 "a new run from its adapter (GradiendModel.from_pretrained).")
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
            self._adamw_steps = fused.AdamWSteps(optimizer, getattr(torch, self.args.optimizer_state_dtype),
                                                 seed=self.args.seed)  # its rounding generators continue too
            load_sharded_checkpoint(self.gradiend_model, optimizer, Path(checkpoint) / SHARDED_STATE,
                                    steps=self._adamw_steps)
            load_scheduler_state(self.lr_scheduler, checkpoint)
            return
        if not has_optimizer_state(checkpoint):  # resuming with a fresh AdamW would silently train differently
            raise ValueError(
                f"{checkpoint} holds no optimizer state ({OPTIMIZER_TENSORS}, {OPTIMIZER_JSON}), so training cannot "
                "resume from it; load its adapter with GradiendModel.from_pretrained and start a new run instead."
            )
        load_optimizer_state(self.optimizer, self.lr_scheduler, checkpoint)

    def _save_scaler(self, output_dir: str) -> None:
        """The mixed-precision grad scaler as scaler.json (transformers pickles it into scaler.pt)."""
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            save_scaler_state(scaler, output_dir)

    def _load_scaler(self, checkpoint: Optional[str]) -> None:
        """scaler.json if this run has a grad scaler; a scaler.pt is never read (see _load_from_checkpoint)."""
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is not None and scaler is not None and not load_scaler_state(scaler, checkpoint):
            logger.warning("%s holds no scaler.json: the grad scaler starts afresh.", checkpoint)

    def _save_rng_state(self, output_dir: str) -> None:
        """Nothing to save: the base runs in eval mode and the sampler is seeded per epoch."""

    def _load_rng_state(self, checkpoint: Optional[str]) -> None:
        """See _save_rng_state."""
