"""The parameter-shaped encoder/decoder: one tensor per selected base parameter, never one giant vector.

encode(s) = act(sum_p <W_e[p], s[p]> + b_e)        W_e[p]: (latent, *entries of p)
decode(h)[p] = act_d(sum_k h_k W_d[p][k] + b_d[p])  W_d[p]: (latent, *entries of p), b_d[p]: entries of p

"Entries of p" are all of p (dense) or the flat indices kept after pruning; indices are in base-parameter
coordinates so differently pruned adapters stay comparable.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

ACTIVATIONS = {"tanh": torch.tanh, "identity": lambda x: x, "sigmoid": torch.sigmoid}
FeatureValue = Union[float, Sequence[float], torch.Tensor]


def latent_vector(
    value: FeatureValue, latent_dim: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A feature value as a latent vector: a float is broadcast to every latent unit."""
    h = torch.as_tensor(value, dtype=dtype, device=device)
    if h.dim() == 0:
        h = h.expand(latent_dim)
    if h.shape != (latent_dim,):
        raise ValueError(
            f"A feature value for latent_dim={latent_dim} needs {latent_dim} numbers, got {tuple(h.shape)}."
        )
    return h


def decoded(weight: torch.Tensor, bias: Optional[torch.Tensor], h: torch.Tensor, activation: str,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """act_d(h . W_d[p] + b_d[p]) for one parameter's entries: the one decoder arithmetic of the package (training's
    reconstruction, merges, temporary edits, decoder grids and the PEFT layer all compute it here, so their weights
    agree bit for bit). `weight` is (latent_dim, *entry shape). With `out` (float32, no autograd) it is computed in
    that buffer, so edits of big models need no temporaries."""
    h = h.to(weight.device)
    if out is None:
        value = weight[0] * h[0] if weight.shape[0] == 1 else torch.tensordot(h, weight, dims=([0], [0]))
        value = value + bias if bias is not None else value
        return ACTIVATIONS[activation](value)
    if weight.shape[0] == 1:
        torch.mul(weight[0], h[0], out=out)
    else:
        out.copy_(torch.tensordot(h, weight, dims=([0], [0])))
    if bias is not None:
        out.add_(bias)
    if activation != "identity":
        getattr(out, f"{activation}_")()  # tanh_ / sigmoid_: in place
    return out


def edit_update(weight: torch.Tensor, bias: Optional[torch.Tensor], h: torch.Tensor, activation: str,
                learning_rate: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """lr * act_d(h . W_d[p] + b_d[p]) in float32 (into `out` when given): what an edit adds to a parameter's
    entries."""
    weight = weight.detach().float()
    bias = None if bias is None else bias.detach().float()
    if out is None:
        out = torch.empty(weight.shape[1:], dtype=torch.float32, device=weight.device)
    return decoded(weight, bias, h.detach().float(), activation, out=out).mul_(learning_rate)


def _key(name: str) -> str:
    # ParameterDict keys may not contain '.', parameter names always do.
    return name.replace(".", "/")


class Bottleneck(nn.Module):
    """Encoder and decoder tensors keyed by the base parameter names they belong to."""

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        latent_dim: int = 1,
        encoder_activation: str = "tanh",
        decoder_activation: str = "identity",
        decoder_bias: bool = True,
        indices: Optional[Mapping[str, torch.Tensor]] = None,
        seed: int = 0,
        device: Optional[Union[str, torch.device, Mapping[str, torch.device]]] = None,
    ) -> None:
        super().__init__()
        self.names = list(shapes)
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self.latent_dim = latent_dim
        self.encoder_activation = encoder_activation
        self.decoder_activation = decoder_activation
        self.has_decoder_bias = decoder_bias
        self.indices: dict[str, Optional[torch.Tensor]] = {n: None for n in self.names}
        for name, idx in (indices or {}).items():
            self.indices[name] = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        self.encoder_weight = nn.ParameterDict()
        self.decoder_weight = nn.ParameterDict()
        self.decoder_bias = nn.ParameterDict()
        self.encoder_bias = nn.Parameter(torch.zeros(latent_dim))
        self._initialise(seed, device)

    # --- construction ----------------------------------------------------------------------------------------
    def entry_shape(self, name: str) -> torch.Size:
        idx = self.indices[name]
        return self.shapes[name] if idx is None else torch.Size([idx.numel()])

    @property
    def num_entries(self) -> int:
        """n: the number of base-model weights the bottleneck reads and writes."""
        return sum(self.entry_shape(n).numel() for n in self.names)

    @property
    def allocated(self) -> bool:
        """False for a placeholder on the meta device (shapes only, no memory): see GradiendModel.awaits_pre_pruning."""
        return not self.encoder_bias.is_meta

    def _initialise(self, seed: int, device) -> None:
        """nn.Linear-style encoder (uniform +-1/sqrt(n)); decoder weight and bias uniform in +-max|W_e|.

        device="meta" makes a placeholder that holds shapes only (nothing allocated, nothing initialised)."""
        if device is not None and not isinstance(device, Mapping) and torch.device(device).type == "meta":
            self.encoder_bias = nn.Parameter(torch.empty(self.latent_dim, device="meta"))
            for name in self.names:
                shape = (self.latent_dim, *self.entry_shape(name))
                self.encoder_weight[_key(name)] = nn.Parameter(torch.empty(shape, device="meta"))
                self.decoder_weight[_key(name)] = nn.Parameter(torch.empty(shape, device="meta"))
                if self.has_decoder_bias:
                    self.decoder_bias[_key(name)] = nn.Parameter(torch.empty(shape[1:], device="meta"))
            return
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(max(self.num_entries, 1))
        d = self.latent_dim
        for name in self.names:
            where = device.get(name) if isinstance(device, Mapping) else device
            shape = (d, *self.entry_shape(name))
            enc = torch.empty(shape).uniform_(-bound, bound, generator=generator)
            self.encoder_weight[_key(name)] = nn.Parameter(enc.to(where))
            if self.indices[name] is not None:
                self.indices[name] = self.indices[name].to(where)
        self.encoder_bias.data.uniform_(-bound, bound, generator=generator)
        max_enc = max(float(p.detach().abs().max()) for p in self.encoder_weight.values())
        for name in self.names:
            enc = self.encoder_weight[_key(name)]
            dec = torch.empty(enc.shape).uniform_(-max_enc, max_enc, generator=generator)
            self.decoder_weight[_key(name)] = nn.Parameter(dec.to(enc.device))
            if self.has_decoder_bias:
                bias = torch.empty(enc.shape[1:]).uniform_(-max_enc, max_enc, generator=generator)
                self.decoder_bias[_key(name)] = nn.Parameter(bias.to(enc.device))

    # --- tensor access by base parameter name ----------------------------------------------------------------
    def encoder(self, name: str) -> nn.Parameter:
        return self.encoder_weight[_key(name)]

    def decoder(self, name: str) -> nn.Parameter:
        return self.decoder_weight[_key(name)]

    def offset(self, name: str) -> Optional[nn.Parameter]:
        return self.decoder_bias[_key(name)] if self.has_decoder_bias else None

    def entries(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """The entries of a parameter-shaped tensor (gradient or weight) that this bottleneck covers."""
        idx = self.indices[name]
        return full if idx is None else full.reshape(-1).index_select(0, idx)

    def to_full(self, name: str, entries: torch.Tensor) -> torch.Tensor:
        """Inverse of `entries`: a parameter-shaped tensor, zero outside the kept entries."""
        idx = self.indices[name]
        if idx is None:
            return entries
        full = torch.zeros(self.shapes[name].numel(), dtype=entries.dtype, device=entries.device)
        return full.index_copy(0, idx, entries).reshape(self.shapes[name])

    def selected_indices(self, name: str) -> Optional[torch.Tensor]:
        """The flat base positions of parameter `name` the whole bottleneck covers (None: all of them)."""
        return self.indices[name]

    @torch.no_grad()
    def set_whole(self, name: str, kind: str, value: torch.Tensor) -> None:
        """Set one parameter's 'encoder', 'decoder' or 'offset' tensor from its whole value (a loaded adapter)."""
        {"encoder": self.encoder, "decoder": self.decoder, "offset": self.offset}[kind](name).copy_(value)

    def gradient_entries(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """The entries of a base gradient this bottleneck trains on (a sharded bottleneck exchanges them between
        processes: sharding.py)."""
        return self.entries(name, grad)

    @property
    def processes(self) -> int:
        """How many processes share this bottleneck, each holding a slice of it (1: this one holds all of it)."""
        return 1

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums over the processes that share this bottleneck: none here (a sharded bottleneck all-reduces)."""
        return tensor

    # --- the auto-encoder --------------------------------------------------------------------------------------
    def encode_linear(self, source: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """sum_p <W_e[p], s[p]> + b_e, before the activation; shape (latent_dim,)."""
        total = self.encoder_bias
        for name in self.names:
            weight = self.encoder(name)
            s = source[name].to(weight.dtype)
            # each product where its weight lives (a device-mapped base spreads them), summed where b_e lives
            total = total + (weight.reshape(self.latent_dim, -1) @ s.reshape(-1).to(weight.device)).to(total.device)
        return total

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.encoder_activation](pre)

    def encode(self, source: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.activate(self.encode_linear(source))

    def latent(self, value: FeatureValue) -> torch.Tensor:
        """A feature value as a latent vector: a float is broadcast to every latent unit."""
        return latent_vector(value, self.latent_dim, self.encoder_bias.device, self.encoder_bias.dtype)

    def decode_one(self, name: str, h: torch.Tensor) -> torch.Tensor:
        return decoded(self.decoder(name), self.offset(name), h, self.decoder_activation)

    @torch.no_grad()
    def write_entries(
        self, name: str, param: torch.Tensor, base: torch.Tensor, delta: Optional[torch.Tensor] = None
    ) -> None:
        """Set the kept entries of base parameter `param` to base + delta in place (scatter for pruned adapters).

        Merge, temporary edits and grids all write through here, so they produce bit-identical weights."""
        p = param.data
        idx = self.indices[name]
        if idx is None and p.dtype == torch.float32 and delta is not None:
            torch.add(base.reshape(p.shape), delta.reshape(p.shape), out=p)
            return
        values = base.float() + delta if delta is not None else base
        if idx is None:
            p.copy_(values.reshape(p.shape))
        else:
            p.view(-1).index_copy_(0, idx, values.to(p.dtype))

    def edit_delta(self, name: str, feature_factor: FeatureValue, learning_rate: float,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """lr * dec(ff) for one parameter, on its kept entries, in float32 (into `out` when given: edits of big models
        reuse one scratch buffer instead of allocating several temporaries per parameter)."""
        return edit_update(self.decoder(name), self.offset(name), self.latent(feature_factor), self.decoder_activation,
                           learning_rate, out=out)

    def decode(self, h: FeatureValue) -> dict[str, torch.Tensor]:
        """The per-parameter update for a feature value (entries only; see `to_full`)."""
        h = self.latent(h) if not isinstance(h, torch.Tensor) or h.dim() == 0 else h
        return {name: self.decode_one(name, h) for name in self.names}

    def reconstruction_loss(self, h: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean squared error between dec(h) and the target gradient over all n entries."""
        total = h.new_zeros(())
        for name in self.names:
            out = self.decode_one(name, h)
            total = total + (out - target[name].to(out.dtype)).pow(2).sum().to(total.device)
        return total / self.num_entries

    @torch.no_grad()
    def flip_sign(self) -> None:
        """Negate encoder and decoder so the other class reads +1; encode/decode of -h are unchanged."""
        self.encoder_bias.neg_()
        for name in self.names:
            self.encoder(name).neg_()
            self.decoder(name).neg_()
