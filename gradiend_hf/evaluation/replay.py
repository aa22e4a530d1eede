"""Evaluating many edits of the same model on the same batches with less compute than plain forward passes.

A decoder grid runs the same batches through the model once per candidate, and the candidates differ only in the
selected parameters. `GridForward` exploits that, exactly (the numbers are those of plain forward passes, up to float
rounding of the LM head's matrix product):

- Prefix replay: nothing below the first transformer layer that holds a selected parameter changes between candidates.
  The first pass over a batch (the base model, before any edit) records what that layer receives; every later pass
  replaces the layers below it by stubs that hand back the recording, so only the layers from there on (and the final
  norm and LM head) are computed. Found generically (the model's biggest ModuleList of one layer class). What else
  the selection may touch without stopping the replay (`replay_plan`):
  - modules that run after the layers (final norm, LM head, a head tied to the input embeddings): they are computed
    for real in every pass; with no layer selected, only the last layer and what follows run;
  - rows of the input embedding matrix (a pruned adapter keeps a few token rows): a batch that looks none of the
    edited rows up has the base's embedding output, so it replays; a batch that looks one up runs in full.
  Everything is checked on the recording pass (layers called once each in order, the recorded output handed over
  unchanged, the input embedding looked up once with the input ids before the first layer, the other selected
  modules only after the last layer); a batch failing a check runs in full, so the numbers never change. Dense
  embeddings (every row edited), anything else below the layers (position embeddings, their norm) or a selected
  tensor shared with such a module: full forwards.
- Needed logits only: the LM head (for SmolLM2 a 49k-vocabulary product, ~20% of the compute) runs only on the
  positions that are scored (a forward pre-hook on the output embeddings selects them).
- Causal models: columns after the last scored position cannot influence it and are cut off.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

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


@dataclass
class ReplayPlan:
    """What the candidates of a grid share with the base pass.

    start: the first layer that runs in every pass (0: no replay, every pass runs in full);
    rows: the input-embedding rows the edits change (a batch looking one up runs in full), None if none are selected;
    embedding: the input embedding module when its weight is selected;
    after: modules outside the layers that use a selected tensor; the recording pass checks they run after them."""

    start: int = 0
    rows: Optional[torch.Tensor] = None
    embedding: Optional[nn.Module] = None
    after: list[nn.Module] = field(default_factory=list)


def input_embedding(model: nn.Module) -> Optional[nn.Module]:
    try:
        module = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return module if isinstance(module, nn.Embedding) else None


def edited_rows(weight: torch.Tensor, indices: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The rows of an embedding matrix holding edited entries (flat `indices`), or None when every row is edited."""
    if indices is None:
        return None
    rows = torch.unique(indices.to(torch.long) // weight.shape[1])
    return None if len(rows) >= weight.shape[0] else rows


def replay_plan(
    model: nn.Module,
    layers: Optional[nn.ModuleList],
    selected: Sequence[torch.Tensor],
    edited: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> ReplayPlan:
    """Where the passes of a grid over edits of `selected` (with `edited[i]` the flat indices of the entries of
    `selected[i]` the edits change, None: all) can start. No replay (start 0) when a selected tensor is in layer 0,
    in a module below the layers other than the input embedding, or in the input embedding with every row edited."""
    if layers is None or not selected:
        return ReplayPlan()
    edited = list(edited) if edited is not None else [None] * len(selected)
    inside = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    embedding = input_embedding(model)
    owners: dict[int, list[nn.Module]] = {id(p): [] for p in selected}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in owners:
                owners[id(p)].append(module)
    used: set[int] = set()
    plan = ReplayPlan()
    for tensor, indices in zip(selected, edited):
        if not owners[id(tensor)]:
            return ReplayPlan()
        for module in owners[id(tensor)]:
            if id(module) in inside:
                used.add(inside[id(module)])
            elif module is embedding:
                rows = edited_rows(tensor, indices)
                if rows is None:
                    return ReplayPlan()
                plan.embedding, plan.rows = module, rows
            elif all(module is not seen for seen in plan.after):
                plan.after.append(module)
    # nothing in the layers selected: only the last layer and what follows run (its recorded input is checked)
    plan.start = min(used) if used else len(layers) - 1
    return plan if plan.start > 0 else ReplayPlan()


class GridForward:
    """Logits at chosen positions of fixed batches, for many edits of the selected parameters.

    `logits(key, inputs, positions)` returns the (N, vocab) logits at the True entries of the (batch, seq) mask
    `positions`, in row-major order (as `full_logits[positions]`). The first call per key must see the unedited model:
    it runs in full and records the input of the first edited layer; later calls with that key start there.
    Use as a context manager, or call close() to remove the hook (the model itself is never changed).
    """

    def __init__(
        self,
        model: nn.Module,
        selected: Iterable[torch.Tensor],
        cut: bool,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        edited: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ):
        self.model = model
        self.cut = cut  # a row's columns after its last scored position cannot change it (layout_rules(...).cut)
        self.layers = layer_stack(model)
        self.plan = replay_plan(model, self.layers, list(selected), edited)
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
    def start(self) -> int:
        """The first layer every pass computes (0: every pass runs in full)."""
        return self.plan.start

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

    def _looks_up_edited_rows(self, inputs: Mapping[str, torch.Tensor]) -> bool:
        if self.plan.rows is None:
            return False
        ids = inputs.get("input_ids")
        return not torch.is_tensor(ids) or bool(torch.isin(ids, self.plan.rows.to(ids.device)).any())

    def _record(self, key: Any, inputs: Mapping[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        if self._looks_up_edited_rows(inputs):  # its embedding output differs between candidates
            self.plain.add(key)
            return self._run(inputs, positions)
        calls: list[Any] = []  # layer indices, "embedding" and "after" in call order
        seen: dict[str, Any] = {}

        def pre(index):
            def hook(module, args, kwargs):
                calls.append(index)
                if index == self.start:
                    seen["input"] = args[0] if args else kwargs.get("hidden_states")
            return hook

        def post(module, args, kwargs, output):
            seen["output"] = output

        def embedding_lookup(module, args, kwargs):
            calls.append("embedding")
            looked_up = args[0] if args else kwargs.get("input")
            seen["ids"] = torch.is_tensor(looked_up) and torch.equal(looked_up, inputs["input_ids"])

        handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        handles.append(self.layers[self.start - 1].register_forward_hook(post, with_kwargs=True))
        if self.plan.embedding is not None:
            handles.append(self.plan.embedding.register_forward_pre_hook(embedding_lookup, with_kwargs=True))
        handles += [m.register_forward_pre_hook(lambda *_: calls.append("after")) for m in self.plan.after]
        try:
            logits = self._run(inputs, positions, reset=lambda: (calls.clear(), seen.clear()))
        finally:
            for handle in handles:
                handle.remove()
        output = seen.get("output")
        handed_over = output[0] if isinstance(output, tuple) and output else output
        size = handed_over.numel() * handed_over.element_size() if torch.is_tensor(handed_over) else 0
        # the layers once each in order, the embedding (if selected) looked up once with the ids before them, the other
        # selected modules only after the last layer
        expected = (["embedding"] if self.plan.embedding is not None else []) + list(range(len(self.layers)))
        if "after" in calls[: len(expected)]:  # a selected module outside the layers runs before their end
            self.plan, self.cached_bytes = ReplayPlan(), 0
            self.records.clear()
            return logits
        ordered = [c for c in calls if c != "after"] == expected and seen.get("ids", True)
        if ordered and size and handed_over is seen.get("input") and self.cached_bytes + size <= self.cache_bytes:
            self.records[key] = output
            self.cached_bytes += size
        else:
            self.plain.add(key)
        return logits
