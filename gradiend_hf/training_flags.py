"""The transformers `TrainingArguments` contract of GradiendTrainer: which flags it honours and which it refuses.

A flag a transformers user sets either works as it does with `Trainer`, or GradiendTrainer refuses it when it is
constructed, naming the flag, why it cannot apply to GRADIEND, and what to do instead. Nothing is silently ignored.
GRADIEND trains a small bottleneck on gradients it reads from a frozen base model in eval mode, so flags about how the
*base model* is fine-tuned (its loss, its embeddings, its compilation) either map onto the base's passes
(base_passes.py: `bf16`, `gradient_checkpointing`) or have nothing to act on.

Also here: turning a plain `TrainingArguments` into `GradiendTrainingArguments` (trl's convention for its configs).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch
from torch import nn
from transformers import TrainingArguments

from .base_passes import CHECKPOINT_KWARGS, checkpointable_layers

logger = logging.getLogger("gradiend_hf")

# optim values whose optimizer is built from the model's layers (projected gradients, layer-wise updates, a backward
# pass fused with the update) rather than from a list of tensors: GRADIEND's trainable tensors are the bottleneck's.
LAYER_OPTIMIZERS = ("galore", "apollo", "lomo", "adalomo")
ADAMW = ("adamw_torch", "adamw_torch_fused")


def convert_arguments(args: TrainingArguments, cls: type) -> TrainingArguments:
    """`args` as an instance of `cls` (a TrainingArguments subclass): every value the user's object holds is kept,
    the fields `cls` adds get their defaults. The defaults `cls` changes do not apply: the user chose a plain
    TrainingArguments, whose values these are. Logged, since e.g. max_grad_norm=1.0 (transformers' default) then
    takes the plain step."""
    if isinstance(args, cls):
        return args
    values = args.to_dict()  # enums as their values; tokens are masked in it, so they are taken from the object
    for name in list(values):
        if name.endswith("_token"):
            values[name] = getattr(args, name)
    fields = cls.__dataclass_fields__
    foreign = sorted(name for name in values if name not in fields)
    if foreign:  # another library's TrainingArguments subclass (trl's SFTConfig ...): its own fields mean nothing here
        logger.warning("GradiendTrainer: the %s fields %s are not GRADIEND training arguments and are not used.",
                       type(args).__name__, foreign)
    converted = cls(**{name: value for name, value in values.items() if name in fields and fields[name].init})
    added = sorted(set(cls.__dataclass_fields__) - set(type(args).__dataclass_fields__))
    logger.info(
        "GradiendTrainer: converted the %s to %s, keeping its values (learning_rate=%s, max_grad_norm=%s, "
        "eval_strategy=%s, ...); GRADIEND's own fields take their defaults (%s).",
        type(args).__name__, cls.__name__, converted.learning_rate, converted.max_grad_norm,
        converted.eval_strategy.value if hasattr(converted.eval_strategy, "value") else converted.eval_strategy,
        ", ".join(added),
    )
    return converted


def autocast_dtype(args: TrainingArguments) -> Optional[torch.dtype]:
    """The dtype the base's passes autocast to: bfloat16 for bf16=True (or accelerate's mixed_precision='bf16'), else
    None. fp16 and fp8 are refused by `problems`."""
    return torch.bfloat16 if getattr(args, "mixed_precision", "no") == "bf16" or args.bf16 else None


def precision_problems(args: TrainingArguments, device: torch.device) -> list[str]:
    """Mixed-precision flags GRADIEND cannot honour."""
    problems = []
    if args.fp16 or getattr(args, "mixed_precision", "no") == "fp16":
        where = (" On the CPU accelerate does not even autocast to float16, so the flag would do nothing at all."
                 if device.type == "cpu" else "")
        problems.append(
            "fp16=True: float16 autocast needs loss scaling to keep small gradients from underflowing to zero, and "
            "the base gradients GRADIEND gathers (the bottleneck's training data) cannot be unscaled by the Trainer's "
            f"grad scaler.{where} Use bf16=True (the base's passes autocast to bfloat16, no scaling needed; on the CPU "
            "with use_cpu=True), or train in float32."
        )
    if getattr(args, "mixed_precision", "no") == "fp8":
        problems.append("mixed_precision='fp8' (accelerate): GRADIEND supports bf16=True or float32 for the base's "
                        "passes; launch without fp8.")
    for flag in ("bf16_full_eval", "fp16_full_eval"):
        if getattr(args, flag):
            problems.append(
                f"{flag}=True: it casts the whole model for evaluation, which would cast the bottleneck too, and "
                "GRADIEND's evaluate() computes its own per-row encodings. Load the base model in that dtype "
                "(from_pretrained(..., dtype=torch.bfloat16)) to evaluate in it, or leave the flag off."
            )
    return problems


def optimizer_problems(args: TrainingArguments) -> list[str]:
    optim = getattr(args.optim, "value", args.optim)
    if any(optim == name or optim.startswith(f"{name}_") for name in LAYER_OPTIMIZERS):
        return [
            f"optim={optim!r}: this optimizer is built from the model's layers (projected or layer-wise updates, or "
            "an update fused into the model's backward pass), but GRADIEND trains the bottleneck's parameter-shaped "
            "tensors on gradients it gathers itself. Use an optimizer over a list of tensors: 'adamw_torch_fused' "
            "(default; the fused step), 'adamw_torch', 'adafactor', 'sgd', 'adagrad', 'rmsprop', bitsandbytes' ..."
        ]
    return []


def checkpointing_problems(args: TrainingArguments, base: nn.Module) -> list[str]:
    """activation_checkpointing (gradient_checkpointing) settings that base_passes cannot apply to this base."""
    if not args.activation_checkpointing:
        return []
    problems = []
    kwargs = dict(args.activation_checkpointing_kwargs or {})
    unknown = sorted(set(kwargs) - set(CHECKPOINT_KWARGS) - {"offload"})
    if unknown:
        problems.append(
            f"activation_checkpointing_kwargs {unknown}: GRADIEND checkpoints the base's layers with "
            f"torch.utils.checkpoint and understands {list(CHECKPOINT_KWARGS)}; remove the others."
        )
    if kwargs.get("use_reentrant"):
        problems.append(
            "activation_checkpointing_kwargs={'use_reentrant': True}: the reentrant variant computes no gradient for a "
            "layer whose inputs do not require one (they do not when the embeddings are not selected), so some "
            "selected weights would read 0. Leave use_reentrant out (GRADIEND uses use_reentrant=False)."
        )
    if kwargs.get("offload"):
        problems.append(
            "activation_checkpointing_kwargs={'offload': True}: GRADIEND's checkpointing keeps the recomputed layers' "
            "inputs where the base is; leave offload out."
        )
    if not checkpointable_layers(base):
        problems.append(
            f"gradient_checkpointing=True: {type(base).__name__} has no layers transformers can checkpoint "
            "(GradientCheckpointingLayer); leave the flag off."
        )
    return problems


def problems(args: TrainingArguments, base: nn.Module, trainer_kwargs: Mapping[str, Any]) -> list[str]:
    """Every flag (and Trainer argument) of `args`/`trainer_kwargs` GradiendTrainer cannot honour, as messages that
    name it, say why and what to do instead. Empty when everything set works as with transformers' Trainer."""
    device = next(iter(base.parameters())).device
    found = precision_problems(args, device) + optimizer_problems(args) + checkpointing_problems(args, base)
    if args.torch_compile:
        found.append(
            "torch_compile=True (also implied by torch_compile_backend or torch_compile_mode): GRADIEND's step gathers "
            "the base's gradients through per-parameter hooks and backward passes inside the model's forward (and "
            "the fused step updates the bottleneck inside the backward pass), which torch.compile cannot capture. "
            "Leave torch_compile (and torch_compile_backend/torch_compile_mode) unset."
        )
    if args.neftune_noise_alpha is not None:
        found.append(
            f"neftune_noise_alpha={args.neftune_noise_alpha}: NEFTune adds noise to the input embeddings of a model "
            "being fine-tuned; GRADIEND's base is not fine-tuned, and noisy embeddings would only add noise to the "
            "gradients the bottleneck learns from. Leave it unset (None)."
        )
    if args.label_smoothing_factor:
        found.append(
            f"label_smoothing_factor={args.label_smoothing_factor}: GRADIEND's loss is the reconstruction error of "
            "gradients, which has no labels to smooth (the base's loss is the exact -log P of the feature word). "
            "Leave it 0."
        )
    if args.use_liger_kernel:
        found.append(
            "use_liger_kernel=True: Liger replaces the base's layers and its LM loss with fused kernels for "
            "fine-tuning; GRADIEND differentiates the base's own layers and computes the loss from logits at the "
            "feature positions. Leave it False."
        )
    sampling = getattr(args.train_sampling_strategy, "value", args.train_sampling_strategy)
    if sampling != "random":
        found.append(
            f"train_sampling_strategy={sampling!r}: GRADIEND batches rows of one transition (class A -> B) and "
            "alternates the two directions, shuffled per epoch with the seed (sampling.py); leave it 'random'."
        )
    for name, why in (
        ("compute_loss_func", "GRADIEND's loss is the bottleneck's reconstruction error (GradiendModel.forward)"),
        ("preprocess_logits_for_metrics", "GRADIEND's evaluation computes per-row encoder values, not logits; pass "
                                          "compute_metrics, which receives them as EvalPrediction.predictions"),
    ):
        if trainer_kwargs.get(name) is not None:
            found.append(f"{name}=...: {why}. Leave it out.")
    return found
