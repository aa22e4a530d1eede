"""Pieces of the forward-mode pass behind per-row encodings (GradientEngine.row_directional_derivatives).

A forward-mode pass costs about three forward passes per token (primal, input tangent, weight tangent), so its time is
the number of tokens it runs. Two things cut that number without changing any result:

- Packing: the rows' real tokens are packed back to back into a few lanes (no padding), each row in its own block of
  a block-diagonal attention mask (block-causal for causal LMs), its position ids starting at 0, as if it ran alone.
  Needs a model that takes `position_ids` and a ready 4D attention mask (transformers' masking utilities pass such a
  mask through unchanged); the engine checks once per model that packed rows give the padded rows' losses, else it
  runs the padded batch.
- Causal LMs: tokens after a row's last scored position cannot change its loss and are left out.

The LM head (the vocabulary projection) runs only at the scored positions (GradientEngine._logits_at).
"""

from __future__ import annotations

import contextlib
import heapq
import inspect
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

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
    is, narrower lanes on a tie."""
    if not counts:
        return []
    order = sorted(range(len(counts)), key=lambda r: -counts[r])
    best_key, best = None, []
    for n_lanes in range(max(1, -(-sum(counts) // capacity)), len(counts) + 1):
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
    packed_labels = {side: torch.where(real, l[index], torch.full_like(index, IGNORE_INDEX)) for side, l in flat_labels.items()}
    block = torch.where(real, rows, torch.full_like(rows, len(counts)))  # filler: one block per lane
    allowed = block.unsqueeze(2) == block.unsqueeze(1)
    if causal:
        allowed = allowed & torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = allowed.unsqueeze(1)
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return Packed({"input_ids": ids, "position_ids": positions, "attention_mask": mask}, packed_labels, rows)


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


class _ConstantWeightLinear(torch.autograd.Function):
    """A linear map whose weight and bias are constants of the forward-mode pass (not selected). PyTorch's own
    forward-mode rule for linear/addmm also multiplies the input by a zero tensor materialised for the weight's missing
    tangent: one more matrix product per layer plus a weight-sized fill. Here the tangent is just x_t W^T. The module
    goes in as a plain object, so no tangent (and no zero tensor) is made for its weight."""

    @staticmethod
    def forward(x, module):
        return module.linear_forward(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.module = inputs[1]

    @staticmethod
    def jvp(ctx, x_t, _):
        return ctx.module.linear_tangent(x_t)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("Only for forward-mode passes (GradientEngine.row_directional_derivatives).")


def _linear_rules(module: nn.Module):
    """(forward, tangent) of x for an nn.Linear or a transformers Conv1D (GPT-2: x @ W + b), else None."""
    if isinstance(module, nn.Linear):
        return (lambda x: torch.nn.functional.linear(x, module.weight, module.bias),
                lambda t: torch.nn.functional.linear(t, module.weight))
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        def forward(x):
            out = torch.addmm(module.bias, x.reshape(-1, x.shape[-1]), module.weight)
            return out.view(*x.shape[:-1], module.nf)
        return forward, lambda t: (t.reshape(-1, t.shape[-1]) @ module.weight).view(*t.shape[:-1], module.nf)
    return None


@contextlib.contextmanager
def constant_weight_linears(model: nn.Module, selected: set[int]) -> Iterator[None]:
    """While inside: every linear layer of `model` none of whose tensors is selected (ids) runs with
    _ConstantWeightLinear (exact; only the forward-mode work differs). Restores the modules' own forwards after."""
    patched = []
    try:
        for module in model.modules():
            rules = _linear_rules(module)
            if rules is None or any(id(p) in selected for p in module.parameters(recurse=False)):
                continue
            module.linear_forward, module.linear_tangent = rules
            patched.append((module, vars(module).get("forward")))
            module.forward = lambda x, module=module: _ConstantWeightLinear.apply(x, module)
        yield
    finally:
        for module, forward in patched:
            del module.linear_forward, module.linear_tangent
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def scored_row_losses(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """objective.row_losses from the logits at scored positions only: `logits` (N, vocab), `labels` (N,) and the row of
    each position (N,); positions a side does not score (label -100) add nothing."""
    valid = labels != IGNORE_INDEX
    token_nll = torch.nn.functional.cross_entropy(logits[valid].float(), labels[valid], reduction="none")
    per_row = torch.zeros(n_rows, dtype=token_nll.dtype, device=token_nll.device)
    return per_row.index_add(0, rows[valid], token_nll)
