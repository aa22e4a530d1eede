"""The zoo: GRADIEND on tiny random models of many transformers architectures (zoo_models.py), each against a naive
per-row oracle (one row at a time, tokenised from the whole text, plain autograd; nothing from the library).

Per architecture, on rows of different lengths (padding; rows longer than the 4-token attention windows):
- the engine's batch gradients (GradiendModel.gradients: source 'diff', target 'alternative') equal the mean of the
  rows' own gradients;
- the per-row encodings (encode_rows) equal <W_e, gradient of the row> + b_e;
- merge_and_unload writes theta + lr * (W_d * ff + b_d), computed here by hand.
Windowed causal models also run a batch of rows inside the window first (packed), so that nothing decided on short rows
carries over to long ones.
The same architectures are saved and loaded (GradiendModel and PEFT's three routes) in test_zoo_adapters.py, and
trained one step and evaluated on a decoder grid in test_zoo_training.py.
"""

from __future__ import annotations

import pytest
import torch
from oracle import row_nll
from zoo_models import SPECS, WINDOW, build, tokenizer_of

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model

CLASSES = ["female", "male"]
WINDOWED = ("qwen2", "qwen3", "gemma2", "gemma3", "mistral", "phi3", "starcoder2", "modernbert", "cohere2", "mixtral")


def row(masked: str, factual: str, alternative: str) -> dict:
    return dict(masked=masked, factual=factual, alternative=alternative, factual_class="female",
                alternative_class="male")


# different lengths, one row without left context, multi-token words ('zyxwv', 'qrstu' are unseen by the tokenizers)
LONG_ROWS = [
    row("[MASK] was good", "she", "he"),
    row("the nurse said that [MASK] was in her room", "she", "he"),
    row("the nurse and the doctor said that the results were good and that [MASK] went home", "she", "he"),
    row("the doctor said that [MASK] was in the room and it was bad", "qrstu", "he"),
    row("she said the results were good and [MASK] went home", "she", "zyxwv"),
]
SHORT_ROWS = {  # inside every window: causal inputs of 1-3 tokens, masked inputs of 3-4 ([CLS] ... [SEP])
    "causal": [row("[MASK] was good", "she", "he"), row("the [MASK] said", "she", "he"),
               row("the nurse [MASK] was", "he", "she")],
    "masked": [row("[MASK]", "she", "he"), row("[MASK] was", "she", "he"), row("the [MASK]", "he", "she")],
}


def oracle_row_gradients(model, tokenizer, objective, data, names) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Per row, per side: the gradient of -log P(word) over the selected parameters, one forward/backward each (a
    parameter the backward pass does not reach, such as RoFormer's no_grad position table, has gradient zero)."""
    params = dict(model.named_parameters())
    out = []
    for r in data:
        grads = {}
        for side in ("factual", "alternative"):
            for n in names:
                params[n].requires_grad_(True)
                params[n].grad = None
            row_nll(model, tokenizer, objective, r["masked"], r[side]).backward()
            grads[side] = {n: params[n].grad.detach().clone() if params[n].grad is not None
                           else torch.zeros_like(params[n]) for n in names}
            for n in names:
                params[n].requires_grad_(False)
                params[n].grad = None
        out.append(grads)
    return out


def flat(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in names])


def assert_gradient_close(got: dict, expected: dict, names: list[str], tolerance: float = 1e-5) -> None:
    got, expected = flat(got, names), flat(expected, names)
    assert float((got - expected).norm()) <= tolerance * float(expected.norm())


def check_rows(gradiend, model, tokenizer, data) -> None:
    """Batch gradients and per-row encodings of `data` against the oracle."""
    names, b = gradiend.bottleneck.names, gradiend.bottleneck
    batch = GradiendDataCollator(tokenizer, gradiend.objective, CLASSES)(data)
    per_row = oracle_row_gradients(model, tokenizer, gradiend.objective, data, names)
    diffs = [{n: g["factual"][n] - g["alternative"][n] for n in names} for g in per_row]
    mean = lambda grads: {n: sum(g[n] for g in grads) / len(grads) for n in names}

    source, target = gradiend.gradients(batch)  # source 'diff', target 'alternative'
    assert_gradient_close(source, mean(diffs), names)
    assert_gradient_close(target, mean([g["alternative"] for g in per_row]), names)

    got = gradiend.encode_rows(batch)[:, 0]
    expected = torch.stack([sum((b.encoder(n)[0] * d[n]).sum() for n in names) + b.encoder_bias[0]
                            for d in diffs]).detach()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))


def record_layouts(gradiend, monkeypatch) -> list[str]:
    """The layouts ('packed', 'padded', 'rows') the engine picks, in call order."""
    seen, choose = [], gradiend.engine._layout
    monkeypatch.setattr(gradiend.engine, "_layout", lambda *a: seen.append(choose(*a)) or seen[-1])
    return seen


@pytest.mark.parametrize("name", list(SPECS))
def test_zoo_gradients_encodings_and_merge_equal_the_naive_oracle(name, monkeypatch):
    model, tokenizer = build(name), tokenizer_of(name)
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES, source="diff", target="alternative",
                                                        encoder_activation="identity"))
    layouts = record_layouts(gradiend, monkeypatch)
    if name in WINDOWED:  # rows inside the window pack; that must not carry over to longer rows
        check_rows(gradiend, model, tokenizer, SHORT_ROWS[SPECS[name][0]])
        assert "packed" in layouts
        layouts.clear()
    check_rows(gradiend, model, tokenizer, LONG_ROWS)
    if name in WINDOWED:
        assert "packed" not in layouts  # rows longer than the window: a packed 4D mask would drop the window

    # the edit: theta + lr * (W_d * ff + b_d) by hand, with decoder tensors large enough to show
    b, ff, lr = gradiend.bottleneck, -1.0, 0.5
    with torch.no_grad():
        for n in b.names:
            b.decoder(n).normal_(0, 0.1)
            b.offset(n).normal_(0, 0.1)
    params = dict(model.named_parameters())
    expected = {n: params[n].detach().clone() + lr * (b.decoder(n)[0].detach() * ff + b.offset(n).detach())
                for n in b.names}
    ids = tokenizer("the nurse said that she was good", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    plain = gradiend.merge_and_unload(feature_factor=ff, learning_rate=lr)
    assert plain is model
    merged = dict(plain.named_parameters())
    for n in b.names:
        torch.testing.assert_close(merged[n].detach(), expected[n], rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, before)


def test_zoo_windows_are_shorter_than_the_long_rows():
    """The window cuts in the long rows (else the windowed models would not test windows)."""
    tokenizer = tokenizer_of("mistral")
    assert max(len(tokenizer(r["masked"].split("[MASK]")[0])["input_ids"]) for r in LONG_ROWS) > 2 * WINDOW
