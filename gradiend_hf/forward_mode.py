"""Pieces of the forward-mode pass behind per-row encodings (GradientEngine.row_directional_derivatives).

A forward-mode pass costs about three forward passes per token (primal, input tangent, weight tangent), so its time is
the number of tokens it runs. Two things cut that number without changing any result:

- Packing: the rows' real tokens are packed back to back into a few lanes (no padding), each row in its own block of
  a block-diagonal attention mask (block-causal for causal LMs), its position ids starting at 0, as if it ran alone.
  Needs a model that takes `position_ids` and a ready 4D attention mask (transformers' masking utilities pass such a
  mask through unchanged, without the model's windows): where and for which batches that is exact is decided in
  layout.py; elsewhere the batch runs padded or row by row.
- Causal LMs: tokens after a row's last scored position cannot change its loss and are left out (layout.py says where
  that holds).

The LM head (the vocabulary projection) runs only at the scored positions (logits_at, shared with the decoder grid).

Linear layers whose weight carries no dense tangent run under a LinearRule (linear_rules): PyTorch's forward-mode rule
would multiply the input by a materialised zero tangent (a wasted matrix product per layer), and a pruned adapter's
weight tangent (W_e, zero outside the kept entries) is applied as a sparse matrix instead of a dense one.
"""

from __future__ import annotations

import contextlib
import heapq
import inspect
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map_only

from .objective import IGNORE_INDEX

# Lanes are at most this many tokens wide (or the longest row): attention work grows with the square of a lane's width,
# the rest with its tokens only. Measured (BERT-base / SmolLM2, 32 rows of 3-15 tokens): 128 as fast as any narrower
# width with the same tokens; one lane of 436 tokens 18% slower than lanes of 110.
LANE_TOKENS = 128
MASK_KINDS = {"sdpa": "bool", "eager": "additive"}  # attention implementations whose 4D mask format is known


def kept_tokens(attention_mask: torch.Tensor, labels: list[torch.Tensor], causal: bool) -> torch.Tensor:
    """(rows, columns) bool: the tokens a row's loss depends on. Its real tokens (attention_mask), and for a causal LM
    only those up to its last scored position (later ones cannot change the loss)."""
    keep = attention_mask.bool()
    if causal:
        scored = torch.stack([l != IGNORE_INDEX for l in labels]).any(0)
        columns = torch.arange(1, keep.shape[1] + 1, device=keep.device)
        last = (scored.long() * columns).amax(dim=1, keepdim=True)
        keep = keep & (columns <= last)
    return keep


@dataclass
class Packed:
    """Rows packed into lanes: model inputs (lanes x width), labels per side and the row of each token (-1: filler)."""

    inputs: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    rows: torch.Tensor


def lane_assignment(counts: list[int], capacity: int = LANE_TOKENS) -> list[list[int]]:
    """Rows (whole) into lanes: for a lane count, each row (longest first) goes into the emptiest lane; the lane count
    taken is the one with the fewest padded tokens (lanes x fullest lane), lanes no wider than `capacity` unless a row
    is, narrower lanes on a tie. Rows longer on average than `capacity` get a lane each."""
    if not counts:
        return []
    order = sorted(range(len(counts)), key=lambda r: -counts[r])
    best_key, best = None, []
    fewest = min(len(counts), max(1, -(-sum(counts) // capacity)))
    for n_lanes in range(fewest, len(counts) + 1):
        lanes: list[list[int]] = [[] for _ in range(n_lanes)]
        heap = [(0, k) for k in range(n_lanes)]
        for row in order:
            fill, k = heapq.heappop(heap)
            lanes[k].append(row)
            heapq.heappush(heap, (fill + counts[row], k))
        width = max(fill for fill, _ in heap)
        key = (n_lanes * width, width)
        if best_key is None or key < best_key:
            best_key, best = key, lanes
        if width == counts[order[0]]:  # lanes cannot get narrower than the longest row
            break
    return best


def pack_rows(
    input_ids: torch.Tensor,
    keep: torch.Tensor,
    labels: Mapping[str, torch.Tensor],
    causal: bool,
    mask_kind: str,
    dtype: torch.dtype,
    capacity: int = LANE_TOKENS,
    one_lane: bool = False,
) -> Packed:
    """Pack the kept tokens of each row into lanes (see the module docstring; `one_lane`: all rows into one). Lane
    filler is a block of its own, so no query row of the attention is fully masked."""
    counts = keep.sum(dim=1).tolist()
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    flat_ids = input_ids[keep]
    flat_labels = {side: l[keep] for side, l in labels.items()}
    lanes = [list(range(len(counts)))] if one_lane else lane_assignment(counts, capacity)
    width = max(sum(counts[r] for r in lane) for lane in lanes)
    n_lanes, device = len(lanes), input_ids.device
    source = torch.full((n_lanes, width), -1, dtype=torch.long)  # index into the flat tokens, -1 = filler
    rows = torch.full((n_lanes, width), -1, dtype=torch.long)
    positions = torch.zeros((n_lanes, width), dtype=torch.long)
    for k, lane in enumerate(lanes):
        at = 0
        for r in lane:
            source[k, at:at + counts[r]] = torch.arange(starts[r], starts[r] + counts[r])
            rows[k, at:at + counts[r]] = r
            positions[k, at:at + counts[r]] = torch.arange(counts[r])
            at += counts[r]
        positions[k, at:] = torch.arange(width - at)
    source, rows, positions = source.to(device), rows.to(device), positions.to(device)
    real = source >= 0
    index = source.clamp_min(0)
    ids = torch.where(real, flat_ids[index], torch.zeros_like(index))
    packed_labels = {
        side: torch.where(real, l[index], torch.full_like(index, IGNORE_INDEX)) for side, l in flat_labels.items()
    }
    block = torch.where(real, rows, torch.full_like(rows, len(counts)))  # filler: one block per lane
    allowed = block.unsqueeze(2) == block.unsqueeze(1)
    if causal:
        allowed = allowed & torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = allowed.unsqueeze(1)
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return Packed({"input_ids": ids, "position_ids": positions, "attention_mask": mask}, packed_labels, rows)


def _primal(tensor: torch.Tensor) -> torch.Tensor:
    primal, tangent = forward_ad.unpack_dual(tensor)
    return tensor if tangent is None else primal


class NoGradStopsTangents(TorchFunctionMode):
    """Inside the model's own torch.no_grad blocks, operations take the primals of dual tensors.

    A backward pass gives no gradient through code run under no_grad; forward-mode AD would still carry tangents
    through it. RoFormer, for one, computes its sinusoidal position table (a parameter, selected by default) under
    no_grad: its gradient is zero, its tangent would not be. With this mode active (and grad mode on for the pass
    itself), a forward-mode derivative equals the backward gradient's directional derivative."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            args, kwargs = tree_map_only(torch.Tensor, _primal, (args, kwargs))
        return func(*args, **kwargs)


def mask_kind(model: nn.Module) -> Optional[str]:
    """The 4D mask format the model's attention takes, or None if rows cannot be packed for it (no `position_ids`
    argument, or an attention implementation whose mask format is unknown here)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if "position_ids" not in parameters or "attention_mask" not in parameters:
        return None
    return MASK_KINDS.get(getattr(getattr(model, "config", None), "_attn_implementation", None))


# A pruned adapter's weight tangent (W_e, zero outside the kept entries) multiplies as a sparse matrix below this share
# of kept entries: CSR x dense costs 0.1 / 0.25 / 0.5 / 1.0 of the dense product at 1 / 5 / 10 / 20% (one CPU thread,
# 576x1536 and 768x3072 weights).
SPARSE_TANGENT_DENSITY = 0.1


def linear_kind(module: nn.Module) -> Optional[str]:
    """'linear' for nn.Linear (x W^T + b), 'conv1d' for transformers' Conv1D (GPT-2: x W + b), else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    return None


class LinearRule:
    """How a linear layer whose weight is not a dual tensor of the forward-mode pass computes: its output, and the
    tangent x_t W^T (+ b_t) plus, for a pruned adapter's weight, x S^T with S the sparse weight tangent (out x in
    CSR)."""

    def __init__(self, module: nn.Module, kind: str, sparse: Optional[torch.Tensor]) -> None:
        self.module, self.kind, self.sparse = module, kind, sparse

    def product(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.module.weight
        if self.kind == "linear":
            return torch.nn.functional.linear(x, weight)
        return (x.reshape(-1, x.shape[-1]) @ weight).view(*x.shape[:-1], weight.shape[1])

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.kind == "linear":
            return torch.nn.functional.linear(x, self.module.weight, bias)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(bias, flat, self.module.weight) if bias is not None else flat @ self.module.weight
        return out.view(*x.shape[:-1], self.module.weight.shape[1])

    def tangent(self, x: torch.Tensor, x_t: Optional[torch.Tensor], bias_t: Optional[torch.Tensor]) -> torch.Tensor:
        parts = []
        if x_t is not None:
            parts.append(self.product(x_t))
        if self.sparse is not None:
            flat = x.reshape(-1, x.shape[-1])
            parts.append(torch.mm(self.sparse, flat.t()).t().reshape(*x.shape[:-1], self.sparse.shape[0]))
        if bias_t is not None:
            parts.append(bias_t.expand(*x.shape[:-1], bias_t.shape[-1]))
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out


class _RuledLinear(torch.autograd.Function):
    """A linear layer under a LinearRule. PyTorch's own forward-mode rule for linear/addmm multiplies the input by a
    zero tensor materialised for a weight without tangent (one more matrix product per layer plus a weight-sized fill),
    and needs a dense tangent for a pruned weight. The weight goes in inside the rule (a plain object), so no tangent is
    made for it; the bias goes in as a tensor (it may be selected)."""

    @staticmethod
    def forward(x, bias, anchor, rule):
        return rule.forward(x, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.rule = inputs[3]
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, x_t, bias_t, anchor_t, _):
        (x,) = ctx.saved_tensors
        return ctx.rule.tangent(x, x_t, bias_t)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("Only for forward-mode passes (GradientEngine.row_directional_derivatives).")


@contextlib.contextmanager
def linear_rules(
    model: nn.Module, duals: set[int], sparse: Mapping[int, torch.Tensor], anchor: Optional[torch.Tensor] = None
) -> Iterator[None]:
    """While inside: every linear layer of `model` whose weight is not a dense dual tensor of the pass (`duals`: ids of
    the parameters passed with tangents) runs under a LinearRule, with the sparse tangent `sparse[id(weight)]` if given
    (exact; only the forward-mode work differs). `anchor`: a dual scalar of the pass, handed to layers with a sparse
    tangent so that their tangent rule runs even when nothing before them carries a tangent. Puts the modules' own
    forwards back after."""
    patched = []
    try:
        for module in model.modules():
            kind = linear_kind(module)
            if kind is None or id(module.weight) in duals:
                continue
            rule = LinearRule(module, kind, sparse.get(id(module.weight)))
            patched.append((module, vars(module).get("forward")))
            start = anchor if rule.sparse is not None else None
            module.forward = lambda x, module=module, rule=rule, start=start: _RuledLinear.apply(
                x, module.bias, start, rule
            )
        yield
    finally:
        for module, forward in patched:
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def sparse_weight_tangent(entries: torch.Tensor, index: torch.Tensor, shape: torch.Size, kind: str) -> torch.Tensor:
    """The tangent of a pruned weight (values `entries` at flat `index`, zero elsewhere) as an (out x in) CSR matrix:
    the weight itself for nn.Linear (out x in), its transpose for Conv1D (in x out)."""
    rows, columns = index // shape[1], index % shape[1]
    if kind == "conv1d":
        rows, columns = columns, rows
        shape = torch.Size([shape[1], shape[0]])
    coo = torch.sparse_coo_tensor(torch.stack([rows, columns]), entries, shape, check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return coo.coalesce().to_sparse_csr()


def logits_at(
    call: Callable[[dict], torch.Tensor],
    head: Optional[nn.Module],
    inputs: dict,
    positions: torch.Tensor,
    gathers: bool = True,
) -> tuple[torch.Tensor, bool]:
    """(N, vocab) logits at the True entries of `positions` (row-major, as full_logits[positions]): a forward pre-hook
    hands the LM head only those hidden states. Also returns whether that worked: a model that does something
    shape-bound after its head, or calls its head more than once, gets the full head (then a selection), and callers
    should not try again."""
    gathered = []

    def gather(module, args):
        if args and torch.is_tensor(args[0]) and args[0].is_floating_point() and args[0].shape[:2] == positions.shape:
            if gathered:
                raise RuntimeError("The LM head ran twice in one forward pass: not only on the last states.")
            gathered.append(True)
            return (args[0][positions].unsqueeze(0),) + tuple(args[1:])
        return None

    logits = None
    if gathers and head is not None:
        handle = head.register_forward_pre_hook(gather)
        try:
            logits = call(inputs)
        except Exception:
            gathers = False
        finally:
            handle.remove()
    if logits is None:
        logits = call(inputs)
    count = int(positions.sum())
    if logits.shape[:2] == positions.shape:
        return logits[positions], gathers
    if logits.dim() == 3 and logits.shape[:2] == (1, count):
        return logits[0], gathers
    raise RuntimeError(
        f"Unexpected logits shape {tuple(logits.shape)} for positions of shape {tuple(positions.shape)}."
    )
