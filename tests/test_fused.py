"""The fused training step (closed-form bottleneck gradients, AdamW per tensor during the backward pass) against the
plain step: autograd over GradiendModel.forward's MSE, then torch.optim.AdamW.step()."""

import copy
import math

import pytest
import torch
from tiny import rows, tiny_model, tokenizer_for

from gradiend_hf import GradiendConfig, GradiendDataCollator, GradiendModel, get_gradiend_model
from gradiend_hf.fused import fused_step, fused_training_step, supports

CLASSES = ["female", "male"]


def setup(kind="gpt2", **config):
    model = tiny_model(kind)
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES, **config))
    collator = GradiendDataCollator(tokenizer_for(kind), gradiend.objective, CLASSES)
    return gradiend, collator


def optimizer_for(gradiend, **kwargs):
    params = list(gradiend.bottleneck.parameters())
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, fused=True, **kwargs)


def plain_steps(gradiend, batches, **kwargs):
    """Autograd's steps; also the norm of each step's bottleneck gradient (what clip_grad_norm_ measures)."""
    optimizer = optimizer_for(gradiend, **kwargs)
    losses, norms = [], []
    for batch in batches:
        loss = gradiend(**batch).loss
        loss.backward()
        norms.append(float(torch.cat([p.grad.reshape(-1) for p in gradiend.bottleneck.parameters()]).norm()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, optimizer, norms


def fused_steps(gradiend, batches, **kwargs):
    optimizer = optimizer_for(gradiend, **kwargs)
    results = [fused_training_step(gradiend, batch, optimizer) for batch in batches]
    return [float(r.loss) for r in results], optimizer, [r.grad_norm for r in results]


def assert_same_training(config, kind="gpt2", steps=3, **optimizer_kwargs):
    plain, collator = setup(kind, **config)
    fused = copy.deepcopy(plain)
    data = rows()
    batches = [collator(data[i % len(data): i % len(data) + 2] or data[:2]) for i in range(steps)]
    plain_losses, plain_optimizer, plain_norms = plain_steps(plain, batches, **optimizer_kwargs)
    fused_losses, fused_optimizer, fused_norms = fused_steps(fused, batches, **optimizer_kwargs)
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(plain_losses), rtol=1e-5, atol=1e-12)
    # the fused step's closed-form gradient norm is autograd's
    torch.testing.assert_close(torch.tensor(fused_norms), torch.tensor(plain_norms), rtol=1e-5, atol=1e-12)
    for (name, want), (_, got) in zip(plain.bottleneck.named_parameters(), fused.bottleneck.named_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    plain_state = plain_optimizer.state_dict()["state"]
    fused_state = fused_optimizer.state_dict()["state"]
    assert plain_state.keys() == fused_state.keys()
    for key in plain_state:
        for field, value in plain_state[key].items():
            torch.testing.assert_close(fused_state[key][field], value, rtol=1e-4, atol=1e-9)
    return plain, fused


@pytest.mark.parametrize("source,target", [("alternative", "diff"), ("factual", "diff"), ("diff", "diff"),
                                           ("factual", "alternative"), ("alternative", "factual"),
                                           ("factual", "factual")])
def test_fused_step_equals_the_plain_step_for_every_streamable_source_and_target(source, target):
    assert_same_training({"source": source, "target": target})


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("activations", [("tanh", "identity"), ("identity", "tanh"), ("sigmoid", "tanh")])
def test_fused_step_equals_the_plain_step_for_each_activation(kind, activations):
    encoder, decoder = activations
    assert_same_training({"encoder_activation": encoder, "decoder_activation": decoder}, kind=kind)


def test_fused_step_with_two_latent_units_no_decoder_bias_and_amsgrad():
    assert_same_training({"latent_dim": 2, "decoder_bias": False}, amsgrad=True)


def test_fused_step_on_a_pruned_adapter_equals_the_plain_step():
    plain, collator = setup("gpt2")
    names = plain.bottleneck.names
    indices = {n: torch.arange(0, plain.selected_parameters()[n].numel(), 3) for n in names}
    base = plain.unload()
    gradiend = GradiendModel(base, GradiendConfig(feature_classes=CLASSES), parameter_names=names, indices=indices)
    fused = copy.deepcopy(gradiend)
    batches = [collator(rows()[:2]), collator(rows()[2:4])]
    plain_steps(gradiend, batches)
    fused_steps(fused, batches)
    for (name, want), (_, got) in zip(gradiend.bottleneck.named_parameters(), fused.bottleneck.named_parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)


def test_diff_source_with_a_side_target_needs_the_plain_step():
    assert not supports("diff", "factual")
    assert supports("alternative", "diff")
    gradiend, collator = setup(source="diff", target="factual")
    with pytest.raises(ValueError, match="plain step"):
        fused_step(gradiend, collator(rows()[:2]), optimizer_for(gradiend))


def test_fused_step_leaves_no_gradient_behind_and_keeps_the_base_unchanged():
    gradiend, collator = setup("bert")
    before = {n: p.detach().clone() for n, p in gradiend.base_model.named_parameters()}
    fused_step(gradiend, collator(rows()[:2]), optimizer_for(gradiend))
    for name, p in gradiend.base_model.named_parameters():
        assert p.grad is None and not p.requires_grad
        assert torch.equal(p, before[name]), name
    assert all(p.grad is None for p in gradiend.bottleneck.parameters())
    assert set(gradiend.engine.buffers) == {"source"}  # the target gradient was never stored


def test_stochastic_bfloat16_rounding_picks_a_neighbour_and_is_unbiased():
    from gradiend_hf.fused import to_bfloat16_stochastic

    x = torch.tensor([1.0 + 2 ** -10, -3.0 - 3 * 2 ** -9, 1e-20 * (1 + 2 ** -9)], dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    samples = torch.stack([to_bfloat16_stochastic(x, generator).float() for _ in range(4000)])
    for i, value in enumerate(x.double().tolist()):  # x lies between two neighbouring bfloat16 values (8-bit mantissa)
        spacing = 2.0 ** (math.frexp(abs(value))[1] - 8)
        below = math.copysign(math.floor(abs(value) / spacing) * spacing, value)
        above = math.copysign(abs(below) + spacing, value)
        assert set(samples[:, i].tolist()) <= {float(below), float(above)}
        share_above = float((samples[:, i] == above).float().mean())
        assert share_above == pytest.approx((value - below) / (above - below), abs=0.03)
    assert torch.allclose(samples.double().mean(0), x.double(), rtol=1e-4)


def test_bfloat16_moments_train_like_float32_moments_with_half_the_state():
    from gradiend_hf.fused import AdamWSteps

    reference, collator = setup("bert")
    narrow = copy.deepcopy(reference)
    batches = [collator(rows()[i:i + 2]) for i in (0, 2, 0, 2, 0, 2)]
    fused_steps(reference, batches)
    optimizer = optimizer_for(narrow)
    step = AdamWSteps(optimizer, torch.bfloat16, torch.Generator().manual_seed(0))
    for batch in batches:
        fused_step(narrow, batch, optimizer, step)
    for state in optimizer.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.bottleneck.parameters()])
    start = flat(setup("bert")[0])
    moved_reference, moved_narrow = flat(reference) - start, flat(narrow) - start
    assert float((moved_narrow - moved_reference).norm() / moved_reference.norm()) < 0.02


def test_bfloat16_moments_need_the_fused_step(tmp_path):
    from gradiend_hf.trainer import GradiendTrainer, GradiendTrainingArguments

    with pytest.raises(ValueError, match="not supported"):
        GradiendTrainingArguments(output_dir=str(tmp_path), optimizer_state_dtype="float16")
    gradiend, _ = setup("bert")
    with pytest.raises(ValueError, match=r"optimizer_state_dtype='bfloat16' needs the fused step.*max_grad_norm=1.0"):
        GradiendTrainer(  # refused when the trainer is built, not when training starts
            model=gradiend,
            args=GradiendTrainingArguments(output_dir=str(tmp_path), max_steps=1, optimizer_state_dtype="bfloat16",
                                           max_grad_norm=1.0, eval_strategy="no", save_strategy="no",
                                           load_best_model_at_end=False),
            train_dataset=rows(), processing_class=tokenizer_for("bert"),
        )


def test_resumed_bfloat16_moments_stay_bfloat16(tmp_path):
    from gradiend_hf.checkpointing import load_optimizer_state, save_optimizer_state
    from gradiend_hf.fused import AdamWSteps

    gradiend, collator = setup("bert")
    optimizer = optimizer_for(gradiend)
    fused_step(gradiend, collator(rows()[:2]), optimizer, AdamWSteps(optimizer, torch.bfloat16))
    save_optimizer_state(optimizer, None, tmp_path)
    resumed = optimizer_for(gradiend)
    load_optimizer_state(resumed, None, tmp_path)  # torch casts the moments to the parameters' float32
    step = AdamWSteps(resumed, torch.bfloat16)
    weight = gradiend.bottleneck.encoder_bias
    saved = optimizer.state[weight]["exp_avg_sq"].clone()
    assert torch.equal(step._state(weight)["exp_avg_sq"], saved)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in (step._state(p) for p in gradiend.bottleneck.parameters()))


def test_an_infinite_encoder_input_stops_the_fused_step_before_any_update():
    """tanh(inf) = 1 is finite, so the check must look at the encoder's input, not at h: an inf there (from a source
    gradient entry or an encoder weight) would turn AdamW's moments and then the weights into NaN."""
    gradiend, collator = setup("gpt2")
    with torch.no_grad():
        gradiend.bottleneck.encoder_bias.fill_(float("inf"))
    before = [p.detach().clone() for p in gradiend.bottleneck.parameters()]
    optimizer = optimizer_for(gradiend)
    with pytest.raises(FloatingPointError, match=r"encoder input is \[inf\]"):
        fused_step(gradiend, collator(rows()[:2]), optimizer)
    for want, got in zip(before, gradiend.bottleneck.parameters()):
        assert torch.equal(got, want)  # nothing moved
    assert not optimizer.state  # and AdamW took no step


def test_a_nan_decoder_weight_stops_the_fused_step_before_it_reaches_an_update():
    gradiend, collator = setup("gpt2")
    b = gradiend.bottleneck
    poisoned = b.names[-1]
    with torch.no_grad():
        b.decoder(poisoned).view(-1)[0] = float("nan")
    encoder_before = [b.encoder(n).detach().clone() for n in b.names] + [b.encoder_bias.detach().clone()]
    with pytest.raises(FloatingPointError, match=f"reconstruction error of {poisoned} is nan"):
        fused_step(gradiend, collator(rows()[:2]), optimizer_for(gradiend))
    for want, got in zip(encoder_before, [b.encoder(n) for n in b.names] + [b.encoder_bias]):
        assert torch.equal(got, want)  # the encoder steps after the decoder: untouched
    assert all(bool(torch.isfinite(p).all()) for p in b.parameters() if p is not b.decoder(poisoned))


def test_bfloat16_rounding_draws_with_a_generator_on_each_tensors_own_device(monkeypatch):
    """torch.randint draws on the moments' device and needs a generator there: on a GPU a CPU generator fails. One
    generator per device, made on that device (recorded here, as this machine has no GPU), seeded with the seed."""
    from gradiend_hf.fused import AdamWSteps, to_bfloat16_stochastic

    gradiend, _ = setup("bert")
    steps = AdamWSteps(optimizer_for(gradiend), torch.bfloat16, seed=7)
    made = []

    class Recording:
        def __init__(self, device="cpu"):
            self.device = torch.device(device)
            made.append(self.device)

        def manual_seed(self, seed):
            self.seed = seed
            return self

    with monkeypatch.context() as patch:
        patch.setattr(torch, "Generator", Recording)
        first = steps.generator_for(torch.device("cuda", 1))
        again = steps.generator_for(torch.device("cuda", 1))
        other = steps.generator_for(torch.device("cuda", 0))
    assert made == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert first is again and (first.seed, other.seed) == (7, 7)
    with pytest.raises(ValueError, match="generator is on cpu, the values on meta"):
        to_bfloat16_stochastic(torch.zeros(3, device="meta"), torch.Generator().manual_seed(0))


def test_the_trainers_bfloat16_moments_draw_on_the_cpu_what_the_cpu_generator_drew_before(tmp_path):
    """Per-device generators change nothing on the CPU: the trainer's bfloat16 run equals fused steps rounding with
    torch.Generator().manual_seed(seed), the generator it used to pass."""
    from gradiend_hf.fused import AdamWSteps
    from gradiend_hf.trainer import GradiendTrainer, GradiendTrainingArguments

    gradiend, collator = setup("bert")
    reference = copy.deepcopy(gradiend)
    trainer = GradiendTrainer(
        model=gradiend,
        args=GradiendTrainingArguments(output_dir=str(tmp_path), max_steps=3, optimizer_state_dtype="bfloat16",
                                       learning_rate=1e-2, per_device_train_batch_size=2, eval_strategy="no",
                                       save_strategy="no", load_best_model_at_end=False, seed=3, disable_tqdm=True),
        train_dataset=rows() + rows(factual_first=False), processing_class=tokenizer_for("bert"),
    )
    batches = [batch for _, batch in zip(range(3), trainer.get_train_dataloader())]
    trainer.train()
    optimizer = torch.optim.AdamW(list(reference.bottleneck.parameters()), lr=1e-2, weight_decay=0.01, fused=True)
    step = AdamWSteps(optimizer, torch.bfloat16, torch.Generator().manual_seed(3))
    for batch in batches:
        fused_step(reference, batch, optimizer, step)
    for (name, want), got in zip(reference.bottleneck.named_parameters(), gradiend.bottleneck.parameters()):
        assert torch.equal(got, want), name
    moments = lambda opt: [s["exp_avg_sq"] for s in opt.state.values()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(moments(trainer.optimizer), moments(optimizer)))
