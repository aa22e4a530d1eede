"""The gradient engine against naive per-row computations (oracle.py)."""

import pytest
import torch
from oracle import naive_gradients, row_nll
from tiny import CAUSAL, MASKED, rows, tiny_model, tokenizer_for

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model
from gradiend_hf.gradients import side_inputs
from gradiend_hf.objective import row_losses

CLASSES = ["female", "male"]


def wrap(kind, **config):
    model = tiny_model(kind)
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES, **config))
    collator = GradiendDataCollator(tokenizer_for(kind), gradiend.objective, CLASSES)
    return model, gradiend, collator


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_gradients_close(got: dict, expected: dict, tolerance: float = 1e-5) -> None:
    """Relative error of the whole gradient <= tolerance, and per tensor relative to the whole gradient's norm
    (some entries, such as attention key biases, have an exactly zero gradient up to rounding)."""
    names = list(expected)
    flat_got = torch.cat([got[n].reshape(-1) for n in names])
    flat_expected = torch.cat([expected[n].reshape(-1) for n in names])
    assert relative_error(flat_got, flat_expected) <= tolerance
    scale = float(flat_expected.norm())
    for n in names:
        assert float((got[n] - expected[n]).norm()) <= tolerance * scale, n


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "albert", "gpt2", "llama"])
@pytest.mark.parametrize("subset", ["single", "multi"])
def test_engine_gradients_equal_naive_per_row_backward(kind, subset):
    model, gradiend, collator = wrap(kind)
    data = rows()[:2] if subset == "single" else rows()
    tokenizer = tokenizer_for(kind)
    if subset == "multi":  # the data really holds words of several tokens
        assert any(len(tokenizer(" " + r["alternative"], add_special_tokens=False)["input_ids"]) > 1 for r in data)
    batch = collator(data)
    grads = gradiend.engine.compute(batch, ("factual", "alternative", "diff"))
    names = gradiend.bottleneck.names
    expected = {side: naive_gradients(model, tokenizer, gradiend.objective, data, side, names) for side in ("factual", "alternative")}
    for side in ("factual", "alternative"):
        assert_gradients_close(grads[side], expected[side])
    assert_gradients_close(grads["diff"], {n: expected["factual"][n] - expected["alternative"][n] for n in names})


@pytest.mark.parametrize("kinds", [("diff",), ("alternative", "diff"), ("factual", "diff"), ("alternative",)])
def test_every_gradient_plan_gives_the_same_gradients(kinds):
    _, gradiend, collator = wrap("gpt2")
    batch = collator(rows())
    reference = {k: {n: t.clone() for n, t in v.items()} for k, v in gradiend.engine.compute(batch, ("factual", "alternative", "diff")).items()}
    got = gradiend.engine.compute(batch, kinds)
    for kind in kinds:
        assert_gradients_close(got[kind], reference[kind])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_differentiated_loss_is_minus_log_p_of_the_word(kind):
    """The loss on the collated (padded, shifted) batch equals -log p(target | context) computed by hand."""
    model, gradiend, collator = wrap(kind)
    data = rows()
    batch = collator(data)
    with torch.no_grad():
        for side in ("factual", "alternative"):
            logits = model(**side_inputs(batch, side)).logits
            got = row_losses(logits, batch[f"{side}_labels"])
            expected = torch.stack([row_nll(model, tokenizer_for(kind), gradiend.objective, r["masked"], r[side]) for r in data])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_causal_labels_sit_on_the_position_that_predicts_the_word():
    """Off-by-one guard: the label of the first word token sits on the last context token, not on the word."""
    _, gradiend, collator = wrap("gpt2")
    tokenizer = tokenizer_for("gpt2")
    batch = collator([dict(masked="the nurse said that [MASK] was", factual="he", alternative="she", factual_class="male", alternative_class="female")])
    context = tokenizer("the nurse said that")["input_ids"]
    he = tokenizer(" he", add_special_tokens=False)["input_ids"]
    assert len(he) == 1
    assert batch["factual_input_ids"][0].tolist() == context  # the word itself is not an input
    labels = batch["factual_labels"][0].tolist()
    assert labels[len(context) - 1] == he[0]
    assert all(l == -100 for i, l in enumerate(labels) if i != len(context) - 1)


def test_masked_lm_shares_one_forward_when_words_have_equal_length(monkeypatch):
    _, gradiend, collator = wrap("bert")
    batch = collator(rows()[:2])
    calls = []
    original = gradiend.engine._forward
    monkeypatch.setattr(gradiend.engine, "_forward", lambda inputs: calls.append(1) or original(inputs))
    gradiend.engine.compute(batch, ("alternative", "diff"))
    assert len(calls) == 1
    calls.clear()
    gradiend.engine.compute(collator(rows()), ("alternative", "diff"))  # 'zyxwv' has more pieces than 'she'
    assert len(calls) == 2


def test_hooks_free_the_base_gradients_and_restore_flags():
    model, gradiend, collator = wrap("llama")
    gradiend.engine.compute(collator(rows()), ("alternative", "diff"))
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters() if getattr(p, "_post_accumulate_grad_hooks", None))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "distilbert"])
@pytest.mark.parametrize("source", ["alternative", "factual", "diff"])
def test_jvp_row_encodings_equal_per_row_backward_encodings(kind, source):
    # identity activation: compare the linear read-outs themselves (tanh would hide errors where it saturates)
    _, gradiend, collator = wrap(kind, source=source, encoder_activation="identity")
    data = rows()
    rows_h = gradiend.encode_rows(collator(data))
    single = torch.stack([gradiend.encode(collator([r])) for r in data])
    assert rows_h.shape == (len(data), 1)
    torch.testing.assert_close(rows_h, single, rtol=1e-4, atol=1e-6)


def test_jvp_handles_several_latent_units():
    _, gradiend, collator = wrap("gpt2", latent_dim=3)
    data = rows()
    rows_h = gradiend.encode_rows(collator(data))
    single = torch.stack([gradiend.encode(collator([r])) for r in data])
    assert rows_h.shape == (4, 3)
    torch.testing.assert_close(rows_h, single, rtol=1e-4, atol=1e-7)


def test_nan_in_the_base_model_raises_a_clear_error():
    model, gradiend, collator = wrap("gpt2")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "ln_f" in n).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="not finite"):
        gradiend(**collator(rows()))
