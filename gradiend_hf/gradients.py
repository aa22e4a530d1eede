"""Gradient engine: factual/alternative gradients of the selected base parameters, gathered by hooks.

Each selected parameter gets a post-accumulate-grad hook that copies (the kept entries of) its gradient into a
preallocated buffer and frees `p.grad` at once, so a gradient never lives twice in memory. Per-row encoder values
come from forward-mode AD along W_e instead of one backward pass per row.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from .bottleneck import Bottleneck
from .objective import AUXILIARY_MASK_ID, row_losses

SIDES = ("factual", "alternative")
MODEL_INPUTS = ("input_ids", "attention_mask")


def side_inputs(batch: Mapping[str, torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    return {key: batch[f"{side}_{key}"] for key in MODEL_INPUTS}


def shares_input(batch: Mapping[str, torch.Tensor]) -> bool:
    """True when factual and alternative rows read the same tokens (one forward pass serves both)."""
    return all(torch.equal(batch[f"factual_{k}"], batch[f"alternative_{k}"]) for k in MODEL_INPUTS)


def side_row_losses(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], batch: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per-row losses of both sides; a shared input costs one forward pass."""
    if shares_input(batch):
        logits = forward(side_inputs(batch, "factual"))
        return {side: row_losses(logits, batch[f"{side}_labels"]) for side in SIDES}
    return {side: row_losses(forward(side_inputs(batch, side)), batch[f"{side}_labels"]) for side in SIDES}


def check_finite(losses: torch.Tensor, what: str) -> None:
    if not torch.isfinite(losses).all():
        raise FloatingPointError(
            f"The base model's {what} loss is not finite ({losses.detach().cpu().tolist()}): NaN/inf gradients would "
            "poison the bottleneck. Check the model's dtype (fp16 overflows; use float32 or bfloat16) and the data."
        )


def embedding_padding_rows(model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Selected embedding weights whose `padding_idx` row is excluded from gradients by nn.Embedding's backward."""
    by_tensor = {id(p): name for name, p in params.items()}
    rows = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None and id(module.weight) in by_tensor:
            rows[by_tensor[id(module.weight)]] = module.padding_idx
    return rows


def check_no_auxiliary_mask(inputs: Mapping[str, torch.Tensor]) -> None:
    """Auxiliary-objective inputs hold an id the base vocabulary lacks: say so instead of an index error."""
    if bool((inputs["input_ids"] == AUXILIARY_MASK_ID).any()):
        raise ValueError(
            "These inputs were collated for objective='auxiliary_mlm' (they hold the added mask token), but no auxiliary "
            "head is attached to this gradient computation. Wrap the base with get_gradiend_model(base, config, "
            "auxiliary_head=head); pre-pruning does not support the auxiliary objective yet (use target_parameters)."
        )


def logits_of(output) -> torch.Tensor:
    """A transformers output's `.logits`, or the tensor an objective module (aux_head.AuxiliaryObjective) returns."""
    return output if isinstance(output, torch.Tensor) else output.logits


Action = Callable[[str, torch.Tensor], None]  # (parameter name, its gradient entries) -> None, called as each arrives


def copy_into(buffer: dict[str, torch.Tensor]) -> Action:
    return lambda name, grad: buffer[name].copy_(grad)


def subtract_from(buffer: dict[str, torch.Tensor]) -> Action:
    return lambda name, grad: buffer[name].sub_(grad)


class BackwardPasses:
    """Backward passes over the side losses of one batch. A shared input's forward pass runs once and its graph is
    kept until the pass marked `last`; side 'diff' is one pass over mean factual - mean alternative loss."""

    def __init__(self, engine: "GradientEngine", batch: Mapping[str, torch.Tensor]) -> None:
        self.engine, self.batch = engine, batch
        self.shared = shares_input(batch)
        self.logits: Optional[torch.Tensor] = None

    def _losses(self, side: str) -> torch.Tensor:
        if self.shared:
            if self.logits is None:
                self.logits = self.engine._forward(side_inputs(self.batch, "factual"))
            logits = self.logits
        else:
            logits = self.engine._forward(side_inputs(self.batch, side))
        losses = row_losses(logits, self.batch[f"{side}_labels"])
        check_finite(losses, side)
        return losses

    def __call__(self, side: str, actions: list[Action], last: bool) -> None:
        if side == "diff":
            loss = self._losses("factual").mean() - self._losses("alternative").mean()
        else:
            loss = self._losses(side).mean()
        self.engine._backward(loss, actions, retain=self.shared and not last)
        if last:
            self.logits = None


class GradientEngine:
    """Computes source/target gradients of one collated batch (one transition) into reusable buffers.

    With an `auxiliary_head` (aux_head.py), the loss is the head's -log P(class | left + mask + right context) instead
    of the LM head's; gradients still flow into the selected base parameters only (the head is a frozen constant).
    """

    def __init__(self, model: nn.Module, bottleneck: Bottleneck, auxiliary_head: Optional[nn.Module] = None) -> None:
        self.model = model
        self.bottleneck = bottleneck
        self.objective_module, self.prefix = model, ""
        if auxiliary_head is not None:
            from .aux_head import AuxiliaryObjective

            self.objective_module, self.prefix = AuxiliaryObjective(model, auxiliary_head), "base."
        params = dict(model.named_parameters())
        self.params = {name: params[name] for name in bottleneck.names}
        self.padding_rows = embedding_padding_rows(model, self.params)
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}
        self._actions: list[Action] = []

    # --- plumbing ----------------------------------------------------------------------------------------------
    def _buffer(self, kind: str) -> dict[str, torch.Tensor]:
        """A float32 buffer per selected parameter, allocated once and reused by every step (no page faults per step)."""
        if kind not in self.buffers:
            self.buffers[kind] = {
                name: torch.empty(self.bottleneck.entry_shape(name), dtype=torch.float32, device=p.device)
                for name, p in self.params.items()
            }
        return self.buffers[kind]

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def gather(param: torch.Tensor) -> None:
            grad = self.bottleneck.entries(name, param.grad)
            for action in self._actions:
                action(name, grad)
            param.grad = None

        return gather

    @contextlib.contextmanager
    def _gathering(self) -> Iterator[None]:
        """Selected parameters require grad and carry hooks only while gradients are being gathered."""
        flags = {name: p.requires_grad for name, p in self.params.items()}
        handles = []
        try:
            for name, p in self.params.items():
                p.requires_grad_(True)
                p.grad = None
                handles.append(p.register_post_accumulate_grad_hook(self._hook(name)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for name, p in self.params.items():
                p.requires_grad_(flags[name])
                p.grad = None
            self._actions = []

    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.prefix:
            check_no_auxiliary_mask(inputs)
        return logits_of(self.objective_module(**inputs))

    def _backward(self, loss: torch.Tensor, actions: list[Action], retain: bool) -> None:
        self._actions = actions
        loss.backward(retain_graph=retain)
        self._actions = []

    @contextlib.contextmanager
    def passes(self, batch: Mapping[str, torch.Tensor]) -> Iterator["BackwardPasses"]:
        """`with engine.passes(batch) as backward: backward(side, actions, last)`: backward passes of one batch whose
        per-parameter gradients are handed to `actions` as they arrive (and freed right after)."""
        with self._gathering(), torch.enable_grad():
            yield BackwardPasses(self, batch)

    # --- public ------------------------------------------------------------------------------------------------
    def compute(self, batch: Mapping[str, torch.Tensor], kinds: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
        """Gradients of the batch loss (mean over rows of -log P(word)) for each kind in `kinds`.

        kinds are among 'factual', 'alternative', 'diff' (= factual - alternative). The returned tensors are the
        engine's buffers: they are overwritten by the next call.
        """
        wanted = set(kinds)
        if wanted == {"diff"}:
            plan = [("diff", [copy_into(self._buffer("diff"))])]
        else:
            factual_actions = [copy_into(self._buffer(k)) for k in ("factual", "diff") if k in wanted]
            alternative_actions = [copy_into(self._buffer("alternative"))] if "alternative" in wanted else []
            if "diff" in wanted:
                alternative_actions.append(subtract_from(self._buffer("diff")))
            plan = [(side, actions) for side, actions in (("factual", factual_actions), ("alternative", alternative_actions)) if actions]
        with self.passes(batch) as backward:
            for i, (side, actions) in enumerate(plan):
                backward(side, actions, last=i == len(plan) - 1)
        return {kind: self.buffers[kind] for kind in kinds}

    def row_directional_derivatives(
        self, batch: Mapping[str, torch.Tensor], source: str, tangents: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """<grad of row i's source loss, tangent> for every row i, by one forward-mode pass (torch.func.jvp).

        The source loss of a row is its factual or alternative -log P(word), or their difference for 'diff'.
        """
        names = list(tangents)
        primals = {name: self.params[name].detach() for name in names}
        tangents = {name: tangents[name].to(primals[name].dtype) for name in names}
        for name, row in self.padding_rows.items():
            if name in tangents:  # backward never gives the padding row a gradient; forward mode must agree
                tangents[name] = tangents[name].clone()
                tangents[name][row] = 0

        def source_losses(params: dict[str, torch.Tensor]) -> torch.Tensor:
            named = {self.prefix + name: value for name, value in params.items()}
            forward = lambda inputs: logits_of(functional_call(self.objective_module, named, args=(), kwargs=inputs, strict=False))
            losses = side_row_losses(forward, batch)
            if source == "diff":
                return losses["factual"] - losses["alternative"]
            return losses[source]

        # CPU flash/efficient SDPA kernels have no forward-mode derivative; the math kernel does.
        with sdpa_kernel([SDPBackend.MATH]), torch.no_grad():
            losses, derivatives = jvp(source_losses, (primals,), (tangents,))
        check_finite(losses, source)
        return derivatives


def encode_rows(engine: GradientEngine, batch: Mapping[str, torch.Tensor], source: str) -> torch.Tensor:
    """Per-row encoder values h_i (rows x latent) of a batch, each as if its gradient were taken alone."""
    bottleneck = engine.bottleneck
    columns = []
    for k in range(bottleneck.latent_dim):
        tangents = {n: bottleneck.to_full(n, bottleneck.encoder(n)[k].detach()) for n in bottleneck.names}
        columns.append(engine.row_directional_derivatives(batch, source, tangents))
    pre = torch.stack(columns, dim=1) + bottleneck.encoder_bias.detach().to(columns[0].device)
    return bottleneck.activate(pre)
