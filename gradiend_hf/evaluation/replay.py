"""Evaluating many edits of the same model on the same batches with less compute than plain forward passes.

A decoder grid runs the same batches through the model once per candidate, and the candidates differ only in the
selected parameters. `GridForward` exploits that, exactly (the numbers are those of plain forward passes, up to float
rounding of the LM head's matrix product):

- Prefix replay: nothing below the first transformer layer that holds a selected parameter changes between candidates.
  The first pass over a batch (the base model, before any edit) records what that layer receives; every later pass
  replaces the layers below it by stubs that hand back the recording, so only the layers from there on (and the final
  norm and LM head) are computed. Found generically (the model's biggest ModuleList of one layer class); it falls
  back to a full forward whenever the selection touches anything below or outside those layers (embeddings, tied
  LM heads), a selected tensor is shared with a module outside them, or the layers are not called once each in order.
- Needed logits only: the LM head (for SmolLM2 a 49k-vocabulary product, ~20% of the compute) runs only on the
  positions that are scored (a forward pre-hook on the output embeddings selects them).
- Causal models: columns after the last scored position cannot influence it and are cut off.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from ..forward_mode import logits_at

DEFAULT_CACHE_BYTES = 2 * 1024**3  # recordings beyond this are not kept (those batches run in full)


def layer_stack(model: nn.Module) -> Optional[nn.ModuleList]:
    """The transformer layers: the ModuleList of one module class (at least two) holding the most parameters."""
    best, best_size = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    return best


def first_edited_layer(model: nn.Module, layers: Optional[nn.ModuleList], selected: Iterable[torch.Tensor]) -> int:
    """Index of the first layer holding a selected tensor, or 0 (no replay) when a selected tensor lives (also)
    anywhere else: embeddings, a tied LM head, a final norm, or shared across layers."""
    if layers is None:
        return 0
    selected = {id(p) for p in selected}
    if not selected:
        return 0
    owner: dict[int, set[int]] = {}  # parameter id -> layer indices using it (-1: outside the layers)
    inside = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    for module in model.modules():
        where = inside.get(id(module), -1)
        for p in module.parameters(recurse=False):
            if id(p) in selected:
                owner.setdefault(id(p), set()).add(where)
    if set(owner) != selected or any(-1 in where for where in owner.values()):
        return 0
    return min(min(where) for where in owner.values())


class GridForward:
    """Logits at chosen positions of fixed batches, for many edits of the selected parameters.

    `logits(key, inputs, positions)` returns the (N, vocab) logits at the True entries of the (batch, seq) mask
    `positions`, in row-major order (as `full_logits[positions]`). The first call per key must see the unedited model:
    it runs in full and records the input of the first edited layer; later calls with that key start there.
    Use as a context manager, or call close() to remove the hook (the model itself is never changed).
    """

    def __init__(
        self, model: nn.Module, selected: Iterable[torch.Tensor], cut: bool, cache_bytes: int = DEFAULT_CACHE_BYTES
    ):
        self.model = model
        self.cut = cut  # a row's columns after its last scored position cannot change it (layout_rules(...).cut)
        self.layers = layer_stack(model)
        self.start = first_edited_layer(model, self.layers, list(selected))
        self.cache_bytes = cache_bytes
        self.cached_bytes = 0
        self.records: dict[Any, Any] = {}
        self.plain: set[Any] = set()  # keys that run in full (recording failed or over budget)
        try:
            self.head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            self.head = None
        self.head = self.head if isinstance(self.head, nn.Module) else None
        self.gathers = True
        parameters = inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if "use_cache" in parameters else {}

    # --- public -------------------------------------------------------------------------------------------------
    @property
    def replays(self) -> bool:
        return self.start > 0

    def trim(
        self, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Where the model allows it (cut): drop the columns after the last scored position (they cannot change it)."""
        if not self.cut or not positions.any():
            return dict(inputs), positions
        width = int(positions.any(0).nonzero().max()) + 1
        shape = positions.shape
        cut = {
            k: v[:, :width] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == shape else v
            for k, v in inputs.items()
        }
        return cut, positions[:, :width]

    @torch.no_grad()
    def logits(self, key: Any, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        inputs, positions = self.trim(inputs, positions)
        if not self.replays or key in self.plain:
            return self._run(inputs, positions)
        if key not in self.records:
            return self._record(key, inputs, positions)
        stubs = list(self.layers[: self.start])
        recorded = self.records[key]
        own = [vars(layer).get("forward") for layer in stubs]  # e.g. accelerate's wrappers: put back afterwards
        for layer in stubs:
            layer.forward = lambda *args, **kwargs: recorded
        try:
            return self._run(inputs, positions)
        finally:
            for layer, forward in zip(stubs, own):
                if forward is None:
                    del layer.forward
                else:
                    layer.forward = forward

    # --- internals ----------------------------------------------------------------------------------------------
    def _run(self, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor, reset=lambda: None) -> torch.Tensor:
        def call(inputs):
            reset()  # forget what a failed attempt recorded
            return self.model(**inputs, **self.extra).logits

        logits, self.gathers = logits_at(call, self.head, dict(inputs), positions, self.gathers)
        return logits

    def _record(self, key: Any, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        calls: list[int] = []
        seen: dict[str, Any] = {}

        def pre(index):
            def hook(module, args, kwargs):
                calls.append(index)
                if index == self.start:
                    seen["input"] = args[0] if args else kwargs.get("hidden_states")
            return hook

        def post(module, args, kwargs, output):
            seen["output"] = output

        handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        handles.append(self.layers[self.start - 1].register_forward_hook(post, with_kwargs=True))
        try:
            logits = self._run(inputs, positions, reset=lambda: (calls.clear(), seen.clear()))
        finally:
            for handle in handles:
                handle.remove()
        output = seen.get("output")
        handed_over = output[0] if isinstance(output, tuple) and output else output
        size = handed_over.numel() * handed_over.element_size() if torch.is_tensor(handed_over) else 0
        ordered = calls == list(range(len(self.layers)))
        if ordered and size and handed_over is seen.get("input") and self.cached_bytes + size <= self.cache_bytes:
            self.records[key] = output
            self.cached_bytes += size
        else:
            self.plain.add(key)
        return logits
