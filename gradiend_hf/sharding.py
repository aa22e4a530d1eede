"""The bottleneck sharded over processes: each rank holds 1/N of every selected parameter's entries.

W_e[p], W_d[p], b_d[p] (and so their AdamW moments) exist on a rank only for its contiguous slice of p's selected
entries (shards.shard_bounds, the layout of DTensor's Shard); b_e (latent_dim numbers) is replicated. A training
step splits the rows of one batch (one transition) over the ranks: each rank's base gradient of its rows, weighted by
its share of the rows, is reduce-scattered as it arrives (torch.distributed.reduce_scatter_single), so each rank
receives its slice of the whole batch's gradient; the encoder's partial dot products and dL/dh are all-reduced
(latent_dim floats each); decoder residuals and AdamW updates stay local. Outside a training step (evaluation,
encode) every rank reads the same rows, so its slice of its own gradient is already the slice it needs and only the
partial dot products are summed.

Initialised from the same seed, a sharded bottleneck holds exactly the slices of the one-process bottleneck: the
tensors are drawn in the same order, one parameter at a time, and each rank keeps its slice.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .bottleneck import Bottleneck, _key
from .shards import shard_bounds, shard_chunk

ORDER_CHECK = 1  # one extra float per slice that tells whether the ranks exchanged the same parameter


def distributed_world(group: Optional[dist.ProcessGroup] = None) -> int:
    """The number of processes of `group` (default: the whole world) that share work such as a sharded bottleneck or
    pre-pruning (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


class ShardedBottleneck(Bottleneck):
    """A Bottleneck of which this rank holds one slice of every parameter's selected entries (see the module doc).

    `shapes` and `indices` describe the whole selection, as for Bottleneck; `indices` of this object (what `entries`,
    `to_full` and the gradient engine use) are the base-coordinate positions of this rank's slice, and `num_entries`
    counts the whole selection (the loss and the initialisation are those of the whole bottleneck)."""

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        latent_dim: int = 1,
        encoder_activation: str = "tanh",
        decoder_activation: str = "identity",
        decoder_bias: bool = True,
        indices: Optional[Mapping[str, Optional[torch.Tensor]]] = None,
        seed: int = 0,
        device=None,
        group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        if distributed_world() < 2:
            raise RuntimeError("A sharded bottleneck needs torch.distributed initialised with at least 2 processes.")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        full = {n: torch.Size(s) for n, s in shapes.items()}
        self.global_indices: dict[str, Optional[torch.Tensor]] = {n: None for n in full}
        for name, idx in (indices or {}).items():
            if idx is not None and name in full:
                self.global_indices[name] = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        self.global_counts = {n: (full[n].numel() if i is None else i.numel()) for n, i in self.global_indices.items()}
        self.bounds = {n: shard_bounds(c, self.rank, self.world_size) for n, c in self.global_counts.items()}
        self._row_weight: Optional[float] = None
        self._exchange: dict[torch.device, torch.Tensor] = {}  # reused reduce-scatter buffers (see exchange_buffers)
        # a pruned parameter's slice keeps its base positions; a dense one is the flat range bounds[name] (no index)
        local = {name: idx[slice(*self.bounds[name])].clone() for name, idx in self.global_indices.items()
                 if idx is not None}
        super().__init__(full, latent_dim, encoder_activation, decoder_activation, decoder_bias, local, seed, device)

    # --- sizes ------------------------------------------------------------------------------------------------------
    @property
    def num_entries(self) -> int:
        """n of the whole bottleneck (all ranks' slices)."""
        return sum(self.global_counts.values())

    def entry_shape(self, name: str) -> torch.Size:
        start, end = self.bounds[name]
        return torch.Size([end - start])

    def entries(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a parameter-shaped tensor (flat)."""
        idx = self.indices[name]
        if idx is None:
            return full.reshape(-1)[slice(*self.bounds[name])]
        return full.reshape(-1).index_select(0, idx)

    def to_full(self, name: str, entries: torch.Tensor) -> torch.Tensor:
        """A parameter-shaped tensor holding `entries` at this rank's slice, zero elsewhere."""
        if self.indices[name] is not None:
            return super().to_full(name, entries)
        full = torch.zeros(self.shapes[name].numel(), dtype=entries.dtype, device=entries.device)
        full[slice(*self.bounds[name])] = entries.reshape(-1)
        return full.reshape(self.shapes[name])

    @property
    def processes(self) -> int:
        return self.world_size

    @property
    def local_entries(self) -> int:
        """The entries this rank holds."""
        return sum(end - start for start, end in self.bounds.values())

    def _initialise(self, seed: int, device) -> None:
        """The one-process initialisation (Bottleneck._initialise), drawn parameter by parameter in the same order
        with the same generator; each rank keeps its slice, so no rank ever holds more than one whole parameter."""
        if device is not None and not isinstance(device, Mapping) and torch.device(device).type == "meta":
            raise ValueError("A sharded bottleneck is built at its final size; it has no meta placeholder.")
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(max(self.num_entries, 1))
        d = self.latent_dim
        where = {n: (device.get(n) if isinstance(device, Mapping) else device) for n in self.names}
        max_enc = 0.0
        for name in self.names:
            start, end = self.bounds[name]
            drawn = torch.empty(d, self.global_counts[name]).uniform_(-bound, bound, generator=generator)
            if drawn.numel():
                max_enc = max(max_enc, float(drawn.abs().max()))
            self.encoder_weight[_key(name)] = nn.Parameter(drawn[:, start:end].clone().to(where[name]))
            if self.indices[name] is not None:
                self.indices[name] = self.indices[name].to(where[name])
            del drawn
        self.encoder_bias.data.uniform_(-bound, bound, generator=generator)
        for name in self.names:
            start, end = self.bounds[name]
            target = self.encoder_weight[_key(name)].device
            drawn = torch.empty(d, self.global_counts[name]).uniform_(-max_enc, max_enc, generator=generator)
            self.decoder_weight[_key(name)] = nn.Parameter(drawn[:, start:end].clone().to(target))
            if self.has_decoder_bias:
                drawn = torch.empty(self.global_counts[name]).uniform_(-max_enc, max_enc, generator=generator)
                self.decoder_bias[_key(name)] = nn.Parameter(drawn[start:end].clone().to(target))
            del drawn

    # --- collectives ------------------------------------------------------------------------------------------------
    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks (in place; exchanged on the device of this rank's b_e, as NCCL needs)."""
        moved = tensor.to(self.encoder_bias.device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=self.group)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def encode_linear(self, source: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """b_e + the sum over ranks of each rank's partial sum_p <W_e[p], s[p]> (over its slices)."""
        partial = torch.zeros(self.latent_dim, dtype=self.encoder_bias.dtype, device=self.encoder_bias.device)
        for name in self.names:
            weight = self.encoder(name)
            s = source[name].to(weight.dtype)
            partial += (weight.detach().reshape(self.latent_dim, -1) @ s.reshape(-1).to(weight.device)).to(
                partial.device)
        return self.encoder_bias.detach() + self.reduce_sum(partial)

    def reconstruction_loss(self, h: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(
            "A sharded bottleneck trains with the fused step only (GradiendTrainer takes it): the plain step's "
            "autograd would need the whole bottleneck. Train with shard_bottleneck=False for DDP replicas."
        )

    @contextlib.contextmanager
    def split_rows(self, weight: float) -> Iterator[None]:
        """Inside: each rank's gradients are of its own rows, `weight` = its rows / all ranks' rows, and every
        gradient is reduce-scattered into this rank's slice of the whole batch's gradient as it arrives."""
        self._row_weight = float(weight)
        try:
            yield
        finally:
            self._row_weight = None

    def gradient_entries(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the batch's gradient of parameter `name` (see split_rows), float32."""
        if self._row_weight is None:  # every rank computed the same rows
            return self.entries(name, grad)
        idx = self.global_indices[name]
        count = self.global_counts[name]
        chunk = shard_chunk(count, self.world_size)
        selected = grad.reshape(-1) if idx is None else grad.reshape(-1).index_select(0, idx.to(grad.device))
        tag = float(self.names.index(name) + 1)
        slots, received = self.exchange_buffers(grad.device, chunk)
        slots.zero_()
        slots[:, chunk] = tag
        for rank in range(self.world_size):  # each rank's slice of the weighted gradient into its slot
            start, end = shard_bounds(count, rank, self.world_size)
            torch.mul(selected[start:end], self._row_weight, out=slots[rank, : end - start])
        dist.reduce_scatter_single(received, slots.view(-1), op=dist.ReduceOp.SUM, group=self.group)
        if float(received[chunk]) != tag * self.world_size:
            raise RuntimeError(
                f"The ranks exchanged the gradients of different parameters at {name} (their backward passes handed "
                "over the selected parameters in different orders), so the sharded step cannot sum them. Train with "
                "shard_bottleneck=False (DDP replicas), and report the model."
            )
        start, end = self.bounds[name]
        return received[: end - start]

    def exchange_buffers(self, device: torch.device, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(reduce-scatter input (world_size, chunk + 1), output (chunk + 1,)) as views of one float32 buffer per
        device, sized once for the largest parameter and reused by every exchange: per-parameter allocations of a few
        MB each step would leave the freed heap resident (glibc). A received slice is valid until the next exchange
        (the gradient engine's actions consume it at once)."""
        need = self.world_size * (chunk + ORDER_CHECK)
        buffer = self._exchange.get(device)
        if buffer is None or buffer.numel() < need + chunk + ORDER_CHECK:
            largest = max(shard_chunk(c, self.world_size) for c in self.global_counts.values()) + ORDER_CHECK
            buffer = torch.empty((self.world_size + 1) * largest, dtype=torch.float32, device=device)
            self._exchange[device] = buffer
        slots = buffer[:need].view(self.world_size, chunk + ORDER_CHECK)
        return slots, buffer[need : need + chunk + ORDER_CHECK]

    # --- whole tensors -------------------------------------------------------------------------------------------
    def gather(self, name: str, kind: str, dst: Optional[int] = None) -> Optional[torch.Tensor]:
        """The whole tensor of one parameter ('encoder', 'decoder' or 'offset'; shaped (latent, count) or (count,)),
        assembled from every rank's slice: on every rank, or on rank `dst` only (None elsewhere). One parameter at a
        time, so exports never hold the whole bottleneck."""
        local = {"encoder": self.encoder, "decoder": self.decoder, "offset": self.offset}[kind](name)
        return None if local is None else self.assemble(name, local.detach(), dst)

    def assemble(self, name: str, local: torch.Tensor, dst: Optional[int] = None) -> Optional[torch.Tensor]:
        """A whole tensor of parameter `name` from every rank's slice `local` (its last dimension runs over the
        slice): on every rank, or on rank `dst` only (None elsewhere)."""
        count = self.global_counts[name]
        chunk = shard_chunk(count, self.world_size)
        rows = local.shape[:-1]
        padded = torch.zeros(*rows, chunk, dtype=local.dtype, device=local.device)
        padded[..., : local.shape[-1]] = local
        if dst is None:
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded.contiguous(), group=self.group)
        else:
            parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == dst else None
            dist.gather(padded.contiguous(), parts, dst=dst, group=self.group)
            if self.rank != dst:
                return None
        return torch.cat(parts, dim=-1)[..., :count]

    def selected_indices(self, name: str) -> Optional[torch.Tensor]:
        return self.global_indices[name]

    def set_whole(self, name: str, kind: str, value: torch.Tensor) -> None:
        """Set this rank's slice of one parameter's tensor from its whole value (e.g. a loaded adapter)."""
        start, end = self.bounds[name]
        target = {"encoder": self.encoder, "decoder": self.decoder, "offset": self.offset}[kind](name)
        flat = value.reshape(*target.shape[:-1], -1) if kind != "offset" else value.reshape(-1)
        with torch.no_grad():
            target.copy_(flat[..., start:end])

    def unsharded(self) -> Bottleneck:
        """A one-process Bottleneck with the whole tensors on every rank (for DDP replicas, or edits in one process);
        its entry shapes are those a one-process bottleneck of this selection has."""
        whole = Bottleneck(self.shapes, self.latent_dim, self.encoder_activation, self.decoder_activation,
                           self.has_decoder_bias, {n: i for n, i in self.global_indices.items() if i is not None},
                           device="meta")
        with torch.no_grad():
            whole.encoder_bias = nn.Parameter(self.encoder_bias.detach().clone())
            for name in self.names:
                shape = (self.latent_dim, *whole.entry_shape(name))
                device = self.encoder(name).device
                whole.encoder_weight[_key(name)] = nn.Parameter(self.gather(name, "encoder").reshape(shape).to(device))
                whole.decoder_weight[_key(name)] = nn.Parameter(self.gather(name, "decoder").reshape(shape).to(device))
                if self.has_decoder_bias:
                    whole.decoder_bias[_key(name)] = nn.Parameter(self.gather(name, "offset").reshape(shape[1:]).to(
                        device))
                if whole.indices[name] is not None:
                    whole.indices[name] = whole.indices[name].to(device)
        return whole


def shard(bottleneck: Bottleneck, group: Optional[dist.ProcessGroup] = None) -> ShardedBottleneck:
    """The slices of a one-process bottleneck held on every rank (the same values), as a ShardedBottleneck."""
    sharded = ShardedBottleneck(
        bottleneck.shapes, bottleneck.latent_dim, bottleneck.encoder_activation, bottleneck.decoder_activation,
        bottleneck.has_decoder_bias, {n: i for n, i in bottleneck.indices.items() if i is not None},
        device={n: bottleneck.encoder(n).device for n in bottleneck.names}, group=group,
    )
    with torch.no_grad():
        sharded.encoder_bias.copy_(bottleneck.encoder_bias.detach())
        for name in bottleneck.names:
            sharded.set_whole(name, "encoder", bottleneck.encoder(name).detach())
            sharded.set_whole(name, "decoder", bottleneck.decoder(name).detach())
            if bottleneck.has_decoder_bias:
                sharded.set_whole(name, "offset", bottleneck.offset(name).detach())
    return sharded


def row_share(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, end) of the rows of a batch this rank computes (the shard layout; a rank may get none)."""
    return shard_bounds(rows, rank, world_size)


def batch_rows(batch: Mapping[str, torch.Tensor]) -> int:
    return int(batch["factual_input_ids"].shape[0])


def rows_of(batch: Mapping[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
    """Rows start:end of a collated batch (every tensor whose first dimension runs over the rows)."""
    rows = batch_rows(batch)
    return {k: v[start:end] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v for k, v in batch.items()}


def sharded_training_step(model, batch: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer, step=None):
    """fused.fused_training_step on a sharded bottleneck: this rank computes its share of the batch's rows
    (row_share), weighted by that share, and receives its slice of the whole batch's gradient. Every rank passes the
    same whole batch. A rank whose share is empty computes the first row with weight 0, so that it takes part in
    every exchange. Equal to the one-process fused step on the whole batch (up to the order of float sums)."""
    from .fused import fused_training_step

    bottleneck = model.bottleneck
    if not isinstance(bottleneck, ShardedBottleneck):
        raise TypeError("sharded_training_step needs a GradiendModel whose bottleneck is sharded (model.shard()).")
    rows = batch_rows(batch)
    start, end = row_share(rows, bottleneck.rank, bottleneck.world_size)
    part = rows_of(batch, start, end) if end > start else rows_of(batch, 0, 1)
    with bottleneck.split_rows((end - start) / rows):
        return fused_training_step(model, part, optimizer, step)
