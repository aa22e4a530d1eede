"""The fused training step (closed-form bottleneck gradients, AdamW per tensor during the backward pass) against the
plain step: autograd over GradiendModel.forward's MSE, then torch.optim.AdamW.step()."""

import copy

import pytest
import torch
from tiny import rows, tiny_model, tokenizer_for

from gradiend_hf import GradiendConfig, GradiendDataCollator, GradiendModel, get_gradiend_model
from gradiend_hf.fused import fused_step, supports

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
    optimizer = optimizer_for(gradiend, **kwargs)
    losses = []
    for batch in batches:
        loss = gradiend(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, optimizer


def fused_steps(gradiend, batches, **kwargs):
    optimizer = optimizer_for(gradiend, **kwargs)
    return [float(fused_step(gradiend, batch, optimizer)) for batch in batches], optimizer


def assert_same_training(config, kind="gpt2", steps=3, **optimizer_kwargs):
    plain, collator = setup(kind, **config)
    fused = copy.deepcopy(plain)
    data = rows()
    batches = [collator(data[i % len(data): i % len(data) + 2] or data[:2]) for i in range(steps)]
    plain_losses, plain_optimizer = plain_steps(plain, batches, **optimizer_kwargs)
    fused_losses, fused_optimizer = fused_steps(fused, batches, **optimizer_kwargs)
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(plain_losses), rtol=1e-5, atol=1e-12)
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
                                           ("factual", "alternative"), ("alternative", "factual"), ("factual", "factual")])
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
