"""How the base model's passes run in a training step: mixed precision and activation checkpointing.

GRADIEND trains only the bottleneck; the base model only hands over its gradients. So the two memory/speed settings a
transformers user knows from `TrainingArguments` apply to the base's forward and backward passes, never to the
bottleneck, which keeps float32 weights, float32 arithmetic and float32 optimizer state (its update is small and must
not round away):

- `bf16=True`: the base's forward runs under `torch.autocast(dtype=torch.bfloat16)` and its backward outside, the
  recommended autocast pattern (backward ops run in the dtype their forward op used). The loss itself is taken from
  float32 logits (objective.scored_row_losses), as autocast would do for a cross-entropy. The gathered gradients are
  float32 tensors holding what autocast computes. The autocast region is entered by forward hooks on the base model,
  so everything outside its forward (the bottleneck, the fused step's updates, which run inside backward hooks)
  stays float32. accelerate's own autocast is switched off for the GradiendTrainer: it would wrap the whole
  GradiendModel.forward, bottleneck included.
- `gradient_checkpointing=True` (`activation_checkpointing`): transformers checkpoints its layers only in training
  mode, while GRADIEND's base stays in eval mode (no dropout in its gradients). So for the duration of a step each
  checkpointable layer (transformers' `GradientCheckpointingLayer`) is called through
  `torch.utils.checkpoint.checkpoint(use_reentrant=False)`: its activations are recomputed in the backward pass
  instead of being kept. In eval mode the recomputation is deterministic, so the gradients are the same bits as
  without checkpointing (tests/test_trainer_contract.py).

Both are entered per training step (`base_passes`) and removed after it, so evaluation (forward-mode encodings) and
everything outside the trainer see the plain model.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# The keyword arguments of activation_checkpointing_kwargs this module understands (transformers forwards any other
# key to torch.utils.checkpoint.checkpoint; these are the ones that function takes for itself).
CHECKPOINT_KWARGS = ("every_n_layers", "use_reentrant", "preserve_rng_state", "determinism_check", "debug",
                     "early_stop", "context_fn")


def device_type(module: nn.Module) -> str:
    """The device type autocast must name for this model (that of its first parameter)."""
    return next(iter(module.parameters())).device.type


@contextlib.contextmanager
def autocast_forward(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Inside the block, every forward call of `module` runs under torch.autocast(dtype); its backward passes and any
    code outside its forward do not."""
    kind = device_type(module)
    active: list[torch.autocast] = []

    def enter(_module: nn.Module, _args: Any) -> None:
        region = torch.autocast(device_type=kind, dtype=dtype)
        region.__enter__()
        active.append(region)

    def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
        if active:
            active.pop().__exit__(None, None, None)

    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while active:  # a forward that raised before its hook ran
            active.pop().__exit__(None, None, None)


def checkpointable_layers(module: nn.Module, every_n_layers: int = 1) -> list[nn.Module]:
    """The repeated blocks transformers marks as checkpointable (every `every_n_layers`-th, as transformers counts)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    return layers[::max(1, int(every_n_layers))]


def checkpoint_options(kwargs: Optional[Mapping[str, Any]]) -> tuple[int, dict[str, Any]]:
    """(every_n_layers, keyword arguments for torch.utils.checkpoint.checkpoint) from activation_checkpointing_kwargs;
    the caller has refused what cannot work (see training_flags.checkpointing_problem)."""
    options = dict(kwargs or {})
    every = int(options.pop("every_n_layers", 1))
    options.pop("use_reentrant", None)  # always False: see checkpointing_problem
    return every, options


@contextlib.contextmanager
def checkpointed(layers: list[nn.Module], options: Mapping[str, Any]) -> Iterator[None]:
    """Inside the block, each layer's forward goes through torch.utils.checkpoint (non-reentrant): its activations
    are recomputed during the backward pass instead of being stored."""
    wrapped: list[nn.Module] = []

    def through_checkpoint(forward: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            return checkpoint(functools.partial(forward, **kwargs), *args, use_reentrant=False, **options)

        return call

    try:
        for layer in layers:
            layer.forward = through_checkpoint(layer.forward)  # an instance attribute over the class's forward
            wrapped.append(layer)
        yield
    finally:
        for layer in wrapped:
            del layer.forward


@contextlib.contextmanager
def base_passes(
    base: nn.Module,
    dtype: Optional[torch.dtype] = None,
    layers: Optional[list[nn.Module]] = None,
    options: Optional[Mapping[str, Any]] = None,
) -> Iterator[None]:
    """The base model's passes of one training step: under autocast(`dtype`) if given, with `layers` checkpointed if
    given. Without either, nothing changes."""
    with contextlib.ExitStack() as stack:
        if layers:
            stack.enter_context(checkpointed(layers, options or {}))
        if dtype is not None:
            stack.enter_context(autocast_forward(base, dtype))
        yield
