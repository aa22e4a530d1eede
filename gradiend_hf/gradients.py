"""Gradient engine: factual/alternative gradients of the selected base parameters, gathered by hooks.

Each selected parameter gets a post-accumulate-grad hook that copies (the kept entries of) its gradient into a
preallocated buffer and frees `p.grad` at once, so a gradient never lives twice in memory. Per-row encoder values
come from forward-mode AD along W_e instead of one backward pass per row (or, for a model with an operation that has
no forward-mode rule, from one backward pass per row after all). Every pass computes each row as if it ran alone:
how rows share a pass (packed, padded, row by row) is decided per batch from the model's configuration (layout.py).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .bottleneck import Bottleneck
from .forward_mode import (
    SPARSE_TANGENT_DENSITY,
    NoGradStopsTangents,
    kept_tokens,
    linear_kind,
    linear_rules,
    logits_at,
    mask_kind,
    pack_rows,
    sparse_weight_tangent,
)
from .layout import fits, layout_rules
from .objective import AUXILIARY_MASK_ID, CAUSAL_LM, IGNORE_INDEX, resolve_objective, row_losses, scored_row_losses

SIDES = ("factual", "alternative")
MODEL_INPUTS = ("input_ids", "attention_mask")
logger = logging.getLogger(__name__)


def side_inputs(batch: Mapping[str, torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    return {key: batch[f"{side}_{key}"] for key in MODEL_INPUTS}


def shares_input(batch: Mapping[str, torch.Tensor]) -> bool:
    """True when factual and alternative rows read the same tokens (one forward pass serves both)."""
    return all(torch.equal(batch[f"factual_{k}"], batch[f"alternative_{k}"]) for k in MODEL_INPUTS)


def check_finite(losses: torch.Tensor, what: str) -> None:
    if not torch.isfinite(losses).all():
        raise FloatingPointError(
            f"The base model's {what} loss is not finite ({losses.detach().cpu().tolist()}): NaN/inf gradients would "
            "poison the bottleneck. Check the model's dtype (fp16 overflows; use float32 or bfloat16) and the data."
        )


def embedding_padding_rows(model: nn.Module, params: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Selected embedding weights whose `padding_idx` row is excluded from gradients by nn.Embedding's backward, keyed
    by the embedding's own name of the weight (a tied LM head registers the same tensor under another name)."""
    selected = {id(p) for p in params.values()}
    rows = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Embedding) and module.padding_idx is not None and id(module.weight) in selected:
            rows[f"{name}.weight" if name else "weight"] = module.padding_idx
    return rows


def parameter_aliases(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """Every name under which each selected tensor is registered (one, unless tied: e.g. an LM head sharing the input
    embeddings' weight)."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    params = dict(model.named_parameters())
    return {name: by_tensor[id(params[name])] for name in names}


def linear_weights(model: nn.Module, aliases: Mapping[str, list[str]]) -> dict[str, str]:
    """Selected tensors that are the weight of one linear layer and nothing else: name -> forward_mode.linear_kind."""
    kinds = {f"{name}.weight" if name else "weight": linear_kind(m) for name, m in model.named_modules()}
    return {name: kinds[name] for name, names in aliases.items() if len(names) == 1 and kinds.get(name)}


def is_causal(model: nn.Module) -> bool:
    try:
        return resolve_objective(model) == CAUSAL_LM
    except ValueError:  # a model class of unknown kind: nothing is cut
        return False


def forward_parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def output_head(model: nn.Module) -> Optional[nn.Module]:
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


def check_no_auxiliary_mask(inputs: Mapping[str, torch.Tensor]) -> None:
    """Auxiliary-objective inputs hold an id the base vocabulary lacks: say so instead of an index error."""
    if bool((inputs["input_ids"] == AUXILIARY_MASK_ID).any()):
        raise ValueError(
            "These inputs were collated for objective='auxiliary_mlm' (they hold the added mask token), but no "
            "auxiliary head is attached to this gradient computation. Wrap the base with get_gradiend_model(base, "
            "config, auxiliary_head=head); pre-pruning does not support the auxiliary objective yet (use "
            "target_parameters)."
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
    """Backward passes over the side losses of one batch. Sides reading the same tokens share one forward pass, whose
    graph is kept until the pass marked `last`; side 'diff' is one pass over mean factual - mean alternative loss.
    The forward passes compute only what the losses depend on, as the forward-mode pass does (GradientEngine.
    _pass_losses): the LM head at scored positions, causal inputs cut after the last scored token, rows packed where
    that is exact (layout.py)."""

    def __init__(self, engine: "GradientEngine", batch: Mapping[str, torch.Tensor]) -> None:
        self.engine, self.batch = engine, batch
        self.shared = shares_input(batch)
        self.losses: dict[str, torch.Tensor] = {}

    def _losses(self, side: str) -> torch.Tensor:
        if side not in self.losses:
            sides = SIDES if self.shared else (side,)
            engine = self.engine
            engine._check_packing(self.batch, sides)
            self.losses.update(engine._side_losses(engine._forward, self.batch, sides))
        check_finite(self.losses[side], side)
        return self.losses[side]

    def __call__(self, side: str, actions: list[Action], last: bool) -> None:
        if side == "diff":
            loss = self._losses("factual").mean() - self._losses("alternative").mean()
        else:
            loss = self._losses(side).mean()
        self.engine._backward(loss, actions, retain=self.shared and not last)
        if last:
            self.losses = {}


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
        self.aliases = parameter_aliases(model, bottleneck.names)
        self.linear_weights = linear_weights(model, self.aliases)
        # every pass (gradients and forward-mode encodings): the LM head only at scored positions (not for the
        # auxiliary head's own classifier), causal inputs cut after the last scored position, rows packed or padded
        # where that is exact for this model (layout.py)
        self.head = output_head(model) if auxiliary_head is None else None
        self.gathers = True
        self.causal = auxiliary_head is None and is_causal(model)
        self.mask_kind = mask_kind(model)
        self.rules = layout_rules(model, is_causal(model), self.mask_kind)
        self.cuts = self.causal and self.rules.cut
        # packing: False where the rules forbid it; else None until _packing_agrees has vetoed it or not
        self.packing: Optional[bool] = None if self.head is not None and self.rules.pack_limit != 0 else False
        if self.rules.why:
            logger.debug("Row packing for %s: %s.", type(model).__name__, self.rules.why)
        self.forward_mode: Optional[bool] = None  # False once forward-mode AD failed (encode_rows falls back)
        self.dtype = next(model.parameters()).dtype
        self.extra = {"use_cache": False} if "use_cache" in forward_parameters(self.objective_module) else {}
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}
        self._actions: list[Action] = []
        self._delivered: set[str] = set()

    # --- plumbing ----------------------------------------------------------------------------------------------
    def buffer(self, kind: str) -> dict[str, torch.Tensor]:
        """A float32 buffer per selected parameter, allocated once and reused by every step (no page faults per
        step)."""
        if kind not in self.buffers:
            self.buffers[kind] = {
                name: torch.empty(self.bottleneck.entry_shape(name), dtype=torch.float32, device=p.device)
                for name, p in self.params.items()
            }
        return self.buffers[kind]

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def gather(param: torch.Tensor) -> None:
            grad = self.bottleneck.gradient_entries(name, param.grad)
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
                handles.append(p.register_post_accumulate_grad_hook(lambda _, name=name: self._delivered.add(name)))
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
        return logits_of(self.objective_module(**inputs, **self.extra))

    def _backward(self, loss: torch.Tensor, actions: list[Action], retain: bool) -> None:
        """One backward pass whose gradients go to `actions`. A selected parameter the pass gives no gradient (not
        used, or used under torch.no_grad as RoFormer's sinusoidal position table) gets zeros, never stale values."""
        self._actions, self._delivered = actions, set()
        try:
            if loss.requires_grad:
                loss.backward(retain_graph=retain)
            for name in self.params.keys() - self._delivered:
                p = self.params[name]
                zero = torch.zeros(self.bottleneck.entry_shape(name), dtype=p.dtype, device=p.device)
                for action in actions:
                    action(name, zero)
        finally:
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
            plan = [("diff", [copy_into(self.buffer("diff"))])]
        else:
            factual_actions = [copy_into(self.buffer(k)) for k in ("factual", "diff") if k in wanted]
            alternative_actions = [copy_into(self.buffer("alternative"))] if "alternative" in wanted else []
            if "diff" in wanted:
                alternative_actions.append(subtract_from(self.buffer("diff")))
            plan = [
                (side, actions)
                for side, actions in (("factual", factual_actions), ("alternative", alternative_actions))
                if actions
            ]
        with self.passes(batch) as backward:
            for i, (side, actions) in enumerate(plan):
                backward(side, actions, last=i == len(plan) - 1)
        return {kind: self.buffers[kind] for kind in kinds}

    # --- per-row encodings by forward-mode AD ----------------------------------------------------------------------
    def row_directional_derivatives(
        self,
        batch: Mapping[str, torch.Tensor],
        source: str,
        tangents: Mapping[str, torch.Tensor],
        sparse_tangents: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """<grad of row i's source loss, tangent> for every row i, by one forward-mode pass (torch.autograd.forward_ad).

        `tangents`: parameter-shaped; `sparse_tangents`: for weights of linear layers (names in `linear_weights`), the
        tangent as an (out x in) CSR matrix (forward_mode.sparse_weight_tangent), for pruned adapters.

        The source loss of a row is its factual or alternative -log P(word), or their difference for 'diff'. Each row is
        computed as if alone, but the pass runs only the tokens the losses depend on (forward_mode.py, layout.py): rows
        packed into lanes without padding where that is exact, causal inputs cut after the last scored position, and
        the LM head only at the scored positions (primal and tangent; a selected tied embedding gets the head's
        tangent). Raises what PyTorch raises for an operation without a forward-mode rule (encode_rows falls back).
        """
        sides = SIDES if source == "diff" else (source,)
        primals, tangents, tie = self._dual_parameters(tangents)
        self._check_packing(batch, sides)
        duals = {id(self.params[name]) for name in tangents if name in self.params}
        sparse = {id(self.params[name]): value for name, value in (sparse_tangents or {}).items()}

        def source_losses(params: dict[str, torch.Tensor]) -> torch.Tensor:
            named = {self.prefix + name: value for name, value in params.items()}
            call = lambda inputs: logits_of(functional_call(
                self.objective_module, named, args=(), kwargs={**inputs, **self.extra}, strict=False, tie_weights=tie))
            losses = self._side_losses(call, batch, sides)
            return losses["factual"] - losses["alternative"] if source == "diff" else losses[source]

        # CPU flash/efficient SDPA kernels have no forward-mode derivative; the math kernel does.
        # Forward mode by torch.autograd.forward_ad (not torch.func.jvp, whose wrappers reject sparse CSR products).
        # Grad mode stays on (nothing in the pass requires grad, so no graph is built) so that the model's own no_grad
        # blocks can be told apart: there tangents stop, as gradients do (forward_mode.NoGradStopsTangents).
        with sdpa_kernel([SDPBackend.MATH]), torch.enable_grad(), forward_ad.dual_level():
            dual = {name: forward_ad.make_dual(primals[name], tangents[name]) for name in primals}
            anchor = forward_ad.make_dual(torch.zeros(()), torch.zeros(()))  # lets a sparse tangent start the pass
            with linear_rules(self.objective_module, duals, sparse, anchor), NoGradStopsTangents():
                losses, derivatives = forward_ad.unpack_dual(source_losses(dual))
        losses = losses.detach()
        if derivatives is None:  # nothing selected reaches the losses
            derivatives = torch.zeros_like(losses)
        check_finite(losses, source)
        return derivatives.detach()

    def _dual_parameters(self, tangents: Mapping[str, torch.Tensor]):
        """(primals, tangents, tie_weights) for functional_call. A tensor registered under several names (an LM head
        tied to the input embeddings) gets its tangent under every name, each use with its own: an nn.Embedding with a
        `padding_idx` never gives that row a gradient (so its tangent row is zero there), the head does."""
        primals, duals = {}, {}
        for name, tangent in tangents.items():
            primal = self.params[name].detach()
            tangent = tangent.to(primal.dtype)
            for alias in self.aliases[name]:
                primals[alias] = primal
                duals[alias] = tangent
                if alias in self.padding_rows:
                    duals[alias] = tangent.clone()
                    duals[alias][self.padding_rows[alias]] = 0
        tie = all(len(self.aliases[name]) == 1 for name in tangents)  # else every alias is passed explicitly
        return primals, duals, tie

    # --- the passes over a batch: packed, padded or row by row (layout.py) ---------------------------------------
    def _side_losses(self, call, batch: Mapping[str, torch.Tensor], sides: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Per-row losses of `sides`; sides reading the same tokens share one forward pass."""
        if len(sides) == 2 and shares_input(batch):
            passes = [(sides, side_inputs(batch, sides[0]))]
        else:
            passes = [((side,), side_inputs(batch, side)) for side in sides]
        losses = {}
        for group, inputs in passes:
            if not self.prefix:
                check_no_auxiliary_mask(inputs)
            labels = {side: batch[f"{side}_labels"] for side in group}
            losses.update(self._pass_losses(call, inputs, labels))
        return losses

    def _per_token(self, inputs: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> bool:
        """Labels per token for the model's own LM head (else: the auxiliary objective, one label per row)."""
        return self.head is not None and all(l.shape == inputs["input_ids"].shape for l in labels.values())

    def _kept(self, inputs: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(rows, columns) bool: the tokens the rows' losses depend on (forward_mode.kept_tokens)."""
        if not self._per_token(inputs, labels):
            return inputs["attention_mask"].bool()
        return kept_tokens(inputs["attention_mask"], list(labels.values()), self.cuts)

    def _layout(self, keep: torch.Tensor, per_token: bool) -> str:
        """'packed', 'padded' or 'rows' for this pass (layout.LayoutRules.layout), from its rows' kept lengths."""
        lengths = keep.sum(dim=1)
        columns = torch.arange(keep.shape[1], device=keep.device)
        right_padded = bool((keep == (columns < lengths.unsqueeze(1))).all())
        return self.rules.layout(lengths, right_padded, may_pack=per_token and bool(self.packing))

    def _pass_losses(
        self,
        call,
        inputs: dict[str, torch.Tensor],
        labels: dict[str, torch.Tensor],
        layout: Optional[str] = None,
        one_lane: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Per-row losses of one input for each side in `labels`, from the tokens they depend on only, in `layout`
        (default: the one this model and batch allow, see _layout)."""
        n_rows = inputs["input_ids"].shape[0]
        per_token = self._per_token(inputs, labels)
        keep = self._kept(inputs, labels)
        layout = layout or self._layout(keep, per_token)
        if layout == "rows":
            return self._row_group_losses(call, inputs, labels, keep, per_token)
        if not per_token:
            logits = call(inputs)  # the auxiliary objective: its own small head, one label per row
            return {side: row_losses(logits, l) for side, l in labels.items()}
        if layout == "packed":
            packed = pack_rows(
                inputs["input_ids"], keep, labels, self.causal, self.mask_kind, self.dtype, one_lane=one_lane
            )
            inputs, labels, rows = packed.inputs, packed.labels, packed.rows
        else:  # the padded batch, cut after the last column any row needs
            width = max(int(keep.any(0).nonzero().max()) + 1, 1) if keep.any() else 1
            inputs = {k: v[:, :width] for k, v in inputs.items()}
            labels = {side: l[:, :width] for side, l in labels.items()}
            rows = torch.arange(n_rows, device=keep.device).unsqueeze(1).expand(n_rows, width)
        positions = torch.stack([l != IGNORE_INDEX for l in labels.values()]).any(0)
        logits = self._logits_at(call, inputs, positions)
        return {side: scored_row_losses(logits, l[positions], rows[positions], n_rows) for side, l in labels.items()}

    def _row_group_losses(
        self, call, inputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], keep: torch.Tensor,
        per_token: bool,
    ) -> dict[str, torch.Tensor]:
        """The plain computation: the rows of each kept length in one pass of their kept tokens only (no padding)."""
        lengths = keep.sum(dim=1)
        order, parts = [], {side: [] for side in labels}
        for length in sorted(set(lengths.tolist())):
            members = (lengths == length).nonzero().flatten()
            if length == 0:  # nothing kept (no scored token): the row adds no loss
                losses = {side: torch.zeros(len(members), device=keep.device) for side in labels}
            else:
                shape = (len(members), length)
                ids = inputs["input_ids"][members][keep[members]].view(shape)
                mask = inputs["attention_mask"]
                ones = torch.ones(shape, dtype=mask.dtype, device=mask.device)
                group_inputs = {"input_ids": ids, "attention_mask": ones}
                group_labels = {side: l[members][keep[members]].view(shape) if per_token else l[members]
                                for side, l in labels.items()}
                losses = self._pass_losses(call, group_inputs, group_labels, layout="padded")
            order.append(members)
            for side in labels:
                parts[side].append(losses[side])
        inverse = torch.argsort(torch.cat(order))
        return {side: torch.cat(parts[side])[inverse] for side in labels}

    def _check_packing(self, batch: Mapping[str, torch.Tensor], sides: tuple[str, ...]) -> None:
        """Before the first packed pass: veto packing for a model that ignores the packed inputs (_packing_agrees)."""
        if self.packing is None:
            self.packing = self._packing_agrees(batch, sides[0])

    @torch.no_grad()
    def _packing_agrees(self, batch: Mapping[str, torch.Tensor], side: str) -> Optional[bool]:
        """A guard on top of the rules (layout.py), never a licence: packing was allowed from the model's family and
        configuration; this checks once that different rows packed into one lane give the losses of the rows alone,
        which fails for a model whose forward was wrapped to drop the 4D mask or the position ids. True/False, or None
        (undecided) if the batch lacks two different rows short enough to pack: identical rows attending to each other
        average identical values, so they could not show a mask that is ignored."""
        inputs, labels = side_inputs(batch, side), batch[f"{side}_labels"]
        if not self._per_token(inputs, {side: labels}):
            return False
        keep = self._kept(inputs, {side: labels})
        lengths = keep.sum(dim=1).tolist()
        distinct: list[int] = []
        for i in range(labels.shape[0]):
            if len(distinct) < 4 and 0 < lengths[i] and fits(self.rules.pack_limit, lengths[i]) and not any(
                torch.equal(inputs["input_ids"][i][keep[i]], inputs["input_ids"][j][keep[j]]) for j in distinct
            ):
                distinct.append(i)
        if len(distinct) < 2:
            return None
        inputs = {k: v[distinct] for k, v in inputs.items()}
        labels = {side: labels[distinct]}
        call = lambda inputs: logits_of(self.objective_module(**inputs, **self.extra))  # a check, not a gradient pass
        try:
            with sdpa_kernel([SDPBackend.MATH]):
                alone = self._pass_losses(call, inputs, labels, layout="rows")[side]
                packed = self._pass_losses(call, inputs, labels, layout="packed", one_lane=True)[side]
        except Exception:  # the model does not take these inputs
            return False
        # rounding only: a row seeing another row differs by far more
        tolerance = max(1e-5, 10 * torch.finfo(self.dtype).eps)
        return bool(torch.allclose(packed, alone, rtol=tolerance, atol=tolerance))

    def _logits_at(self, call, inputs: dict[str, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        logits, self.gathers = logits_at(call, self.head, inputs, positions, self.gathers)
        return logits


def encode_rows(engine: GradientEngine, batch: Mapping[str, torch.Tensor], source: str) -> torch.Tensor:
    """Per-row encoder values h_i (rows x latent) of a batch, each as if its gradient were taken alone.

    By forward-mode AD (row_directional_derivatives). A model with an operation PyTorch has no forward-mode rule for
    (Bloom's BloomGelu, a custom autograd.Function without `jvp`) gets one backward pass per row instead: chosen on the
    first failure, kept for the model (engine.forward_mode = False) and logged once. The same numbers, slower."""
    if engine.forward_mode is False:
        return backward_rows(engine, batch, source)
    try:
        rows = forward_mode_rows(engine, batch, source)
    except (NotImplementedError, RuntimeError) as error:
        rows = backward_rows(engine, batch, source)  # if the rows fail here too, that error is the real one
        engine.forward_mode = False
        logger.warning(
            "Per-row encodings of %s fall back to one backward pass per row (slower, same values): forward-mode "
            "AD failed with %s: %s", type(engine.model).__name__, type(error).__name__, str(error).splitlines()[0]
        )
        return rows
    engine.forward_mode = True
    return rows


def forward_mode_rows(engine: GradientEngine, batch: Mapping[str, torch.Tensor], source: str) -> torch.Tensor:
    """encode_rows by forward-mode AD: one pass per latent unit along the encoder weights W_e[k].

    A pruned adapter's encoder on a linear layer's weight with few kept entries goes in as a sparse tangent (only
    x S^T for the kept entries), not as a dense weight-sized tangent that is mostly zeros."""
    bottleneck = engine.bottleneck
    columns = []
    for k in range(bottleneck.latent_dim):
        dense, sparse = {}, {}
        for name in bottleneck.names:
            entries, index = bottleneck.encoder(name)[k].detach(), bottleneck.indices[name]
            kind = engine.linear_weights.get(name)
            if index is not None and kind and index.numel() <= SPARSE_TANGENT_DENSITY * bottleneck.shapes[name].numel():
                dtype = engine.params[name].dtype
                sparse[name] = sparse_weight_tangent(entries.to(dtype), index, bottleneck.shapes[name], kind)
            else:
                dense[name] = bottleneck.to_full(name, entries)
        columns.append(engine.row_directional_derivatives(batch, source, dense, sparse))
    partial = bottleneck.reduce_sum(torch.stack(columns, dim=1))  # a sharded encoder's slices sum over processes
    pre = partial + bottleneck.encoder_bias.detach().to(columns[0].device)
    return bottleneck.activate(pre)


def backward_rows(engine: GradientEngine, batch: Mapping[str, torch.Tensor], source: str) -> torch.Tensor:
    """encode_rows by one backward pass per row: h of each row's own gradient (the engine's ordinary gradients)."""
    n_rows = batch[f"{SIDES[0]}_input_ids"].shape[0]
    out = []
    for i in range(n_rows):
        row = {k: v[i:i + 1] if torch.is_tensor(v) and v.dim() and v.shape[0] == n_rows else v
               for k, v in batch.items()}
        out.append(engine.bottleneck.encode(engine.compute(row, (source,))[source]).detach())
    return torch.stack(out)
