"""The fused training step: the bottleneck's gradients in closed form, applied by AdamW tensor by tensor as they arise.

The plain step (GradiendModel.forward + backward + optimizer.step) keeps, for n selected weights, the source and the
target gradient (2 x 4n bytes) and autograd's gradients of W_e, W_d and b_d (3 x 4n bytes) until the optimizer runs.
Here the target gradient is never stored: while the target's backward pass hands over the gradient of one base
parameter p, the decoder residual of p is formed, its share of dL/dh is accumulated, and W_d[p], b_d[p] take their
AdamW step at once. W_e[p] steps after the pass, when dL/dh is complete. Only the source gradient stays (4n bytes),
which saves 16 of the plain step's bytes per selected weight and two full passes over memory.

The math (r = residual, act_d' its activation's derivative, N = number of entries):
    L = sum_p |act_d(W_d[p]^T h + b_d[p]) - t[p]|^2 / N
    dz[p] = 2/N * r[p] * act_d'(z[p]);  dL/dW_d[p] = h (x) dz[p];  dL/db_d[p] = dz[p];  dL/dh = sum_p W_d[p] dz[p]
    dL/dpre = dL/dh * act_e'(pre);      dL/dW_e[p] = dL/dpre (x) s[p];  dL/db_e = dL/dpre
The updates are torch's own fused AdamW kernel on the optimizer's own state, so checkpoints, resuming and the sign
flip work as with the plain step. The gradient's L2 norm (logged as grad_norm) follows in closed form from values the
step has anyway: |h (x) dz|^2 = |h|^2 |dz|^2 for W_d, |dL/dpre|^2 |s[p]|^2 for W_e. It applies when one process
takes one AdamW step per gradient without clipping (the Trainer falls back to the plain step otherwise: DDP must
all-reduce whole gradients before any update, other optimizers and clipping need the whole gradient).

Non-finite values stop the step before they reach a weight (FloatingPointError): the encoder's pre-activation is
checked before anything is updated (it is NaN/inf whenever a source gradient entry or an encoder weight is), each
parameter's reconstruction error before its decoder step (NaN/inf whenever a target entry or a decoder weight is),
and dL/dh before the encoder step. The check of the error is free: its sum of squares is the loss anyway. A stop in
the middle of the decoder leaves the decoder tensors of the parameters before it updated (all finite); the trainer
stops there, and every checkpoint predates the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch.optim.adamw import adamw

from .bottleneck import ACTIVATIONS, Bottleneck
from .gradients import copy_into

SIDES = ("factual", "alternative")


def target_pass(source: str, target: str) -> Optional[tuple[str, str]]:
    """The one backward pass whose gradient g gives the target as it arrives: (side, rule) with t = g ('gradient'),
    s - g ('source_minus'), g - s ('minus_source'), or None when t = s needs no pass. Raises for combinations that
    would need a third pass (the plain step handles them)."""
    if target == source:
        return None
    if target in SIDES and source in SIDES:
        return (target, "gradient")
    if target == "diff" and source == "factual":
        return ("alternative", "source_minus")
    if target == "diff" and source == "alternative":
        return ("factual", "minus_source")
    raise ValueError(f"source={source!r}, target={target!r} cannot stream its target; use the plain step.")


def supports(source: str, target: str) -> bool:
    try:
        target_pass(source, target)
        return True
    except ValueError:
        return False


def derivative(activation: str, output: torch.Tensor) -> Optional[torch.Tensor]:
    """act'(x) from act(x) for the bottleneck's activations; None for identity (derivative 1)."""
    if activation == "identity":
        return None
    if activation == "tanh":
        return 1 - output * output
    if activation == "sigmoid":
        return output * (1 - output)
    raise ValueError(f"No closed-form derivative for activation {activation!r}.")


def to_bfloat16_stochastic(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 -> bfloat16 rounded up or down with probability proportional to the distance (unbiased), so that AdamW's
    small per-step changes of its moments (0.1% for beta2 = 0.999) survive on average instead of always rounding
    away. The random bits are drawn on the values' device, so `generator` must live there (AdamWSteps.generator_for)."""
    if torch.device(generator.device) != values.device:
        raise ValueError(
            f"The rounding generator is on {generator.device}, the values on {values.device}: torch.randint draws on "
            "the values' device and needs a generator of that device (AdamWSteps.generator_for(device))."
        )
    bits = values.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    return (bits + noise).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)  # exact: low 16 bits are zero


class AdamWSteps:
    """AdamW steps of single tensors with the optimizer's hyperparameters and state (created as torch.optim.AdamW
    creates it), by torch's own kernel: identical to what optimizer.step() would do with these gradients.

    With `state_dtype=torch.bfloat16` the two moments are stored in bfloat16 (8 instead of 16 bytes per weight); each
    step widens one tensor's moments to float32, runs the same kernel, and stores them back stochastically rounded.
    The rounding draws its random bits on each tensor's own device, from one generator per device seeded with `seed`
    (a bottleneck follows its base parameters, so on a device-mapped base its tensors sit on several GPUs); a
    `generator` given is used for its own device (on the CPU: the same numbers as before generators were per device).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, state_dtype: torch.dtype = torch.float32,
                 generator: Optional[torch.Generator] = None, seed: int = 0) -> None:
        self.optimizer = optimizer
        self.groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self.state_dtype = state_dtype
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}
        # for tensors every process holds whole (a sharded bottleneck's b_e): the same draws on every process, so
        # their moments stay equal (the per-device generators have drawn for slices of different sizes)
        self.replicated_generators: dict[torch.device, torch.Generator] = {}
        if generator is not None:
            self.generators[torch.device(generator.device)] = generator

    def generator_for(self, device: torch.device, replicated: bool = False) -> torch.Generator:
        """The rounding generator of `device` (created on first use, seeded with `seed`); `replicated`: the one for
        tensors every process holds whole."""
        device = torch.device(device)
        generators = self.replicated_generators if replicated else self.generators
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return generators[device]

    def _state(self, param: torch.Tensor) -> dict:
        state = self.optimizer.state[param]
        moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if self.groups[id(param)]["amsgrad"] else [])
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=param.device)
            for key in moments:
                state[key] = torch.zeros_like(param, dtype=self.state_dtype, memory_format=torch.preserve_format)
        for key in moments:  # e.g. a resumed checkpoint: Optimizer.load_state_dict casts moments to the parameter dtype
            if state[key].dtype != self.state_dtype:
                state[key] = state[key].to(self.state_dtype)
        return state

    def __call__(self, params: list[torch.Tensor], grads: list[torch.Tensor], replicated: bool = False) -> None:
        group = self.groups[id(params[0])]
        states = [self._state(p) for p in params]
        moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
        narrow = self.state_dtype != torch.float32
        wide = [{key: s[key].float() if narrow else s[key] for key in moments} for s in states]
        fused = bool(group.get("fused"))
        with torch.no_grad():
            adamw(
                [p.data for p in params], grads,
                [w["exp_avg"] for w in wide], [w["exp_avg_sq"] for w in wide],
                [w["max_exp_avg_sq"] for w in wide] if group["amsgrad"] else [],
                [s["step"] for s in states],
                fused=fused, foreach=None if fused else group.get("foreach"), amsgrad=group["amsgrad"],
                beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
            )
            if narrow:
                for s, w in zip(states, wide):
                    for key in moments:
                        s[key].copy_(to_bfloat16_stochastic(w[key], self.generator_for(w[key].device, replicated)))


class DecoderStreamer:
    """The action of the target's backward pass: turns each arriving gradient into the target entries of its
    parameter, steps W_d[p] and b_d[p], and accumulates the loss, dL/dh (with the decoder as it was) and the squared
    norm of the decoder's gradients (closed form: |h (x) dz|^2 = |h|^2 |dz|^2, |dL/db_d[p]|^2 = |dz|^2)."""

    def __init__(self, bottleneck: Bottleneck, h: torch.Tensor, source: Mapping[str, torch.Tensor], rule: str,
                 step: AdamWSteps) -> None:
        self.b, self.h, self.source, self.rule, self.step = bottleneck, h, source, rule, step
        self.scale = 2.0 / bottleneck.num_entries
        self.loss = 0.0  # sum of squared residuals
        self.grad_h = torch.zeros(bottleneck.latent_dim, dtype=torch.float32)
        self.h_squares = float(h.double().pow(2).sum())
        self.grad_squares = 0.0  # |dL/dW_d|^2 + |dL/db_d|^2 so far
        self.problem: Optional[str] = None  # the first non-finite reconstruction error: no decoder steps after it

    def target(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """-(t[p]) ready to add to the decoder output (the sign saves one temporary)."""
        if self.rule == "gradient":
            return grad.neg()
        if self.rule == "source_minus":  # t = s - g
            return grad - self.source[name]
        if self.rule == "minus_source":  # t = g - s
            return self.source[name] - grad
        return self.source[name].neg()  # t = s

    def __call__(self, name: str, grad: torch.Tensor) -> None:
        if self.problem is not None:  # the pass runs on (a sharded step's ranks exchange every gradient), unapplied
            return
        b = self.b
        weight, bias = b.decoder(name), b.offset(name)
        residual = self.target(name, grad).to(weight.dtype).reshape(weight.shape[1:])  # -t
        out = torch.tensordot(self.h.to(weight.dtype), weight.detach(), dims=([0], [0]))
        if bias is not None:
            out.add_(bias.detach())
        slope = None
        if b.decoder_activation != "identity":
            out = ACTIVATIONS[b.decoder_activation](out)
            slope = derivative(b.decoder_activation, out)
        residual.add_(out)  # act(z) - t
        del out
        squares = float(torch.dot(residual.reshape(-1), residual.reshape(-1)))
        if not math.isfinite(squares):  # before W_d[p] moves: a NaN/inf here would enter the weights
            self.problem = (f"the reconstruction error of {name} is {squares} (its target gradient or decoder weights "
                            "hold NaN/inf, or the error overflowed)")
            return
        self.loss += squares
        dz = residual.mul_(self.scale)
        if slope is not None:
            dz.mul_(slope)
            dz_squares = float(torch.dot(dz.reshape(-1), dz.reshape(-1)))
        else:  # dz = scale * residual: its squared norm is already known
            dz_squares = self.scale * self.scale * squares
        self.grad_squares += dz_squares * (self.h_squares + (bias is not None))
        self.grad_h += torch.tensordot(weight.detach(), dz, dims=dz.dim()).to(self.grad_h.dtype).cpu()
        grad_weight = self.h.to(weight.dtype).to(dz.device).view(-1, *[1] * dz.dim()) * dz
        if bias is None:
            self.step([weight], [grad_weight])
        else:
            self.step([weight, bias], [grad_weight, dz])


@dataclass(frozen=True)
class FusedStep:
    """What one fused step reports: the reconstruction loss (as the plain step's forward computes it) and the L2 norm
    of the bottleneck's gradient that AdamW applied (what autograd's .grad tensors would hold on the plain step; the
    Trainer logs it as grad_norm)."""

    loss: torch.Tensor
    grad_norm: float


def fused_step(model, batch: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               step: Optional[AdamWSteps] = None) -> torch.Tensor:
    """One GRADIEND training step on one batch (one transition) with the bottleneck updated in place by `optimizer`
    (a torch AdamW over the bottleneck; `step` to keep its moments in bfloat16). Returns the reconstruction loss (as
    the plain step's forward would); `fused_training_step` also returns the gradient norm."""
    return fused_training_step(model, batch, optimizer, step).loss


@torch.no_grad()
def fused_training_step(model, batch: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        step: Optional[AdamWSteps] = None) -> FusedStep:
    """`fused_step` with its report (FusedStep). The gradient norm is in closed form, from values the step computes
    anyway: |dL/dW_e[p]|^2 = |dL/dpre|^2 |s[p]|^2, |dL/db_e|^2 = |dL/dpre|^2, and the decoder's share from
    DecoderStreamer; no gradient tensor is kept for it."""
    config = model.gradiend_config
    b: Bottleneck = model.bottleneck
    engine = model.engine
    step = step or AdamWSteps(optimizer)
    source = engine.buffer("source")
    plan = target_pass(config.source, config.target)
    with engine.passes(batch) as backward:
        backward(config.source, [copy_into(source)], last=plan is None)  # 'diff' is one pass (BackwardPasses)
        pre = b.encode_linear(source).detach()
        if not bool(torch.isfinite(pre).all()):  # tanh(inf) = 1 would hide an inf gradient entry, so test pre, not h
            raise FloatingPointError(
                f"the encoder input is {pre.tolist()} (the gathered source gradients or the encoder weights hold "
                "NaN/inf)"
            )
        h = b.activate(pre)
        streamer = DecoderStreamer(b, h, source, plan[1] if plan else "source", step)
        if plan is None:
            for name in b.names:
                streamer(name, source[name])
        else:
            backward(plan[0], [streamer], last=True)
    # a sharded bottleneck's ranks each hold a share of dL/dh; all of them stop if any found a non-finite error
    failed = b.reduce_sum(torch.tensor([float(streamer.problem is not None)]))
    if streamer.problem is not None or bool(failed[0] > 0):
        raise FloatingPointError(streamer.problem or "a reconstruction error on another process is not finite")
    grad_h = b.reduce_sum(streamer.grad_h)
    if not bool(torch.isfinite(grad_h).all()):
        raise FloatingPointError(f"dL/dh is {grad_h.tolist()}")
    grad_pre = grad_h.to(pre.device)
    slope = derivative(b.encoder_activation, h)
    if slope is not None:
        grad_pre = grad_pre * slope
    source_squares = 0.0
    for name in b.names:
        weight = b.encoder(name)
        entries = source[name].to(weight.dtype).reshape(weight.shape[1:])
        source_squares += float(torch.dot(entries.reshape(-1), entries.reshape(-1)))
        step([weight], [grad_pre.to(weight.dtype).to(weight.device).view(-1, *[1] * entries.dim()) * entries])
    step([b.encoder_bias], [grad_pre.to(b.encoder_bias.dtype)], replicated=b.processes > 1)
    pre_squares = float(grad_pre.double().pow(2).sum())
    loss, grad_squares, source_squares = b.reduce_sum(
        torch.tensor([streamer.loss, streamer.grad_squares, source_squares], dtype=torch.float64)).tolist()
    grad_norm = math.sqrt(grad_squares + pre_squares * (source_squares + 1.0))
    return FusedStep(torch.tensor(loss / b.num_entries, dtype=torch.float32), grad_norm)
