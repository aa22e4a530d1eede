"""Comparison of adapters against independent oracles: brute-force Python sets, numpy cosines, hand-computed shares."""

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import tiny_model

from gradiend_hf import GradiendConfig, GradiendModel
from gradiend_hf.comparison import (
    AdapterTensors,
    KeySet,
    adapter_tensors,
    decoder_cosine,
    feature_location,
    layer_of,
    module_type,
    overlap_matrix,
    seed_stability,
    top_k,
)
from gradiend_hf.plotting import plot_cosine, plot_feature_location, plot_overlap

CLASSES = ["a", "b"]


# --- oracles: plain Python / numpy over (name, flat index) -> value dictionaries -------------------------------------
def entries_of(model: GradiendModel, kind: str = "decoder", unit=0) -> dict[tuple[str, int], float]:
    """Every weight of a model's adapter as {(name, flat index): value}, built element by element."""
    out = {}
    b = model.bottleneck
    for name in b.names:
        if kind == "offset":
            values = b.offset(name).detach().reshape(-1).tolist()
        else:
            tensor = (b.decoder(name) if kind == "decoder" else b.encoder(name)).detach().reshape(b.latent_dim, -1)
            values = tensor.norm(dim=0).tolist() if unit == "norm" else tensor[unit].tolist()
        index = b.indices[name]
        keys = index.tolist() if index is not None else range(len(values))
        for key, value in zip(keys, values):
            out[(name, int(key))] = value
    return out


def brute_top_k(weights: dict[tuple[str, int], float], k: int) -> set[tuple[str, int]]:
    """Sort all keys by (-|value|, name, index) and take the first k: the documented tie-break."""
    ordered = sorted(weights, key=lambda key: (-abs(weights[key]), key[0], key[1]))
    return set(ordered[:k])


def numpy_cosine(a: dict, b: dict) -> float:
    keys = sorted(set(a) | set(b))
    va = np.array([a.get(key, 0.0) for key in keys], dtype=np.float64)
    vb = np.array([b.get(key, 0.0) for key in keys], dtype=np.float64)
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


def gpt2_adapter(seed=0, latent_dim=1, **config):
    return GradiendModel(tiny_model("gpt2"),
                         GradiendConfig(feature_classes=CLASSES, init_seed=seed, latent_dim=latent_dim, **config))


def set_decoder(model: GradiendModel, values: dict[str, float], default: float = 0.0) -> None:
    with torch.no_grad():
        for name in model.bottleneck.names:
            model.bottleneck.decoder(name).fill_(values.get(name, default))


# --- top-k ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 7, 100, 1000, 7616, 9000, 0.013, 0.0001, 1.0])
def test_top_k_is_the_exact_global_top_k_with_deterministic_ties(k):
    model = gpt2_adapter(seed=3)
    with torch.no_grad():  # few distinct magnitudes -> many ties across parameters, both signs
        for p in model.bottleneck.decoder_weight.values():
            p.copy_(torch.round(p * 1e2 * 3) / 3)
    weights = entries_of(model)
    count = min(k if isinstance(k, int) else max(1, math.floor(k * len(weights) + 0.5)), len(weights))  # half up
    assert len({abs(v) for v in weights.values()}) < 50  # really tied
    got = top_k(model, k)
    assert len(got) == count
    assert got.to_set() == brute_top_k(weights, count)


def test_top_k_by_encoder_offset_sum_and_latent_norm():
    model = gpt2_adapter(seed=1, latent_dim=3)
    dec, enc, off = entries_of(model, "decoder", 2), entries_of(model, "encoder", 0), entries_of(model, "offset")
    norm = entries_of(model, "decoder", "norm")
    assert top_k(model, 50, by="decoder", unit=2).to_set() == brute_top_k(dec, 50)
    assert top_k(model, 50, by="encoder").to_set() == brute_top_k(enc, 50)
    assert top_k(model, 50, by="decoder_bias").to_set() == brute_top_k(off, 50)
    assert top_k(model, 50, by="offset").to_set() == brute_top_k(off, 50)  # the file kind's name works too
    assert top_k(model, 50, unit="norm").to_set() == brute_top_k(norm, 50)
    summed = {key: dec[key] + off[key] for key in dec}
    assert top_k(model, 50, by="decoder_sum", unit=2).to_set() == brute_top_k(summed, 50)
    with pytest.raises(ValueError, match="unit"):
        top_k(model, 5, unit=3)
    with pytest.raises(ValueError, match="by must be"):
        top_k(model, 5, by="weights")
    with pytest.raises(ValueError, match="fractional"):
        top_k(model, 1.5)


def test_keyset_algebra_matches_python_sets():
    a = KeySet.of({"x": [5, 1, 1, 3], "y": [0]})
    b = KeySet.of({"x": [3, 4], "z": [7]})
    assert len(a) == 4 and ("x", 3) in a and ("x", 2) not in a and ("z", 7) not in a
    assert (a & b).to_set() == a.to_set() & b.to_set()
    assert (a | b).to_set() == a.to_set() | b.to_set()
    assert a.intersection_size(b) == 1


# --- overlap ----------------------------------------------------------------------------------------------------------
def hand_adapter(values: dict[str, list[float]], indices: dict[str, list[int]] = None) -> AdapterTensors:
    """An adapter made by hand: one latent unit; parameters with `indices` are pruned."""
    tensors = {}
    for name, vals in values.items():
        parts = {"decoder": torch.tensor([vals]), "encoder": torch.zeros(1, len(vals))}
        if indices and name in indices:
            parts["index"] = torch.tensor(indices[name])
        tensors[name] = parts
    return AdapterTensors(tensors, latent_dim=1)


def test_overlap_and_jaccard_of_known_top_k_sets():
    # top-3 sets by construction: A = {x0, x1, y4}, B = {x1, y4, y9} (B's y is pruned to 4 and 9), C = {z0, z1, z2}
    adapters = {
        "A": hand_adapter({"x": [9.0, -8.0, 0.1, 0.2], "y": [0.0, 0.0, 0.0, 0.0, 7.0, 0.3]}),
        "B": hand_adapter({"x": [0.1, 9.0, 0.0, 0.2], "y": [-8.0, 7.0]}, {"y": [4, 9]}),
        "C": hand_adapter({"z": [5.0, 5.0, 5.0, 1.0]}),
        "D": hand_adapter({"x": [1.0, 2.0, 3.0, 4.0]}),
    }
    expected = {"A": {("x", 0), ("x", 1), ("y", 4)}, "B": {("x", 1), ("y", 4), ("y", 9)},
                "C": {("z", 0), ("z", 1), ("z", 2)}, "D": {("x", 1), ("x", 2), ("x", 3)}}
    sets = {label: top_k(a, 3).to_set() for label, a in adapters.items()}
    assert sets == expected
    result = overlap_matrix(adapters, 3)
    for a, b in itertools.product(expected, repeat=2):
        inter = len(expected[a] & expected[b])
        assert result.overlap.loc[a, b] == pytest.approx(inter / min(len(expected[a]), len(expected[b])))
        assert result.jaccard.loc[a, b] == pytest.approx(inter / len(expected[a] | expected[b]))
        assert result.intersection.loc[a, b] == inter
    assert result.overlap.loc["A", "B"] == pytest.approx(2 / 3) and result.jaccard.loc["A", "B"] == pytest.approx(0.5)
    assert list(result.overlap.index) == list(adapters) and result.sizes.tolist() == [3, 3, 3, 3]


def test_overlap_with_unequal_sizes_uses_the_smaller_set():
    small = hand_adapter({"x": [9.0, 1.0]}, {"x": [10, 20]})  # only two entries: top-5 keeps both
    big = hand_adapter({"x": [0.0] * 10 + [5.0] + [0.0] * 9 + [4.0] + [3.0, 2.0, 1.5] + [0.0] * 5})
    result = overlap_matrix([small, big], 5)
    assert result.sizes.tolist() == [2, 5]
    assert result.overlap.loc["adapter 0", "adapter 1"] == 1.0
    assert result.jaccard.loc["adapter 0", "adapter 1"] == pytest.approx(2 / 5)


def test_overlap_matrix_on_models_matches_brute_force():
    models = {f"s{s}": gpt2_adapter(seed=s) for s in range(3)}
    sets = {label: brute_top_k(entries_of(m), 300) for label, m in models.items()}
    result = overlap_matrix(models, 300)
    for a, b in itertools.product(models, repeat=2):
        inter = len(sets[a] & sets[b])
        assert result.overlap.loc[a, b] == pytest.approx(inter / 300)
        assert result.jaccard.loc[a, b] == pytest.approx(inter / len(sets[a] | sets[b]))


# --- cosine -----------------------------------------------------------------------------------------------------------
def pruned_adapter(keep: dict[str, torch.Tensor], seed=5) -> GradiendModel:
    """A pruned adapter over some parameters of the tiny GPT-2, with its own random decoder values."""
    return GradiendModel(tiny_model("gpt2"), GradiendConfig(feature_classes=CLASSES, init_seed=seed),
                         parameter_names=list(keep), indices=keep)


def test_decoder_cosine_equals_numpy_on_the_union_of_entries():
    dense = [gpt2_adapter(seed=s) for s in range(2)]
    names = dense[0].bottleneck.names
    generator = torch.Generator().manual_seed(0)
    keep = {names[3]: torch.randperm(768, generator=generator)[:100],
            names[9]: torch.randperm(1024, generator=generator)[:300],
            names[5]: torch.arange(256)}  # unsorted indices; one parameter kept whole as an index list
    pruned = pruned_adapter(keep, seed=7)
    # a second pruned adapter overlapping the first in part
    keep2 = {names[3]: torch.randperm(768, generator=generator)[:400], names[11]: torch.arange(10)}
    pruned2 = pruned_adapter(keep2, seed=8)
    adapters = {"d0": dense[0], "d1": dense[1], "p": pruned, "p2": pruned2}
    frame = decoder_cosine(adapters)
    weights = {label: entries_of(m) for label, m in adapters.items()}
    for a, b in itertools.product(adapters, repeat=2):
        assert frame.loc[a, b] == pytest.approx(numpy_cosine(weights[a], weights[b]), abs=1e-6), (a, b)
    assert np.allclose(np.diag(frame.to_numpy()), 1.0)
    assert np.allclose(frame.to_numpy(), frame.to_numpy().T)


def test_cosine_of_encoders_and_zero_vectors():
    a, b = gpt2_adapter(seed=0), gpt2_adapter(seed=1)
    frame = decoder_cosine({"a": a, "b": b}, by="encoder")
    assert frame.loc["a", "b"] == pytest.approx(numpy_cosine(entries_of(a, "encoder"), entries_of(b, "encoder")),
                                                abs=1e-6)
    set_decoder(b, {})
    assert math.isnan(decoder_cosine({"a": a, "b": b}).loc["a", "b"])


# --- pruned vs dense, saved paths -------------------------------------------------------------------------------------
def test_pruned_and_dense_adapters_share_global_keys(tmp_path):
    dense = gpt2_adapter(seed=0)
    names = dense.bottleneck.names
    keep = {names[3]: torch.tensor([700, 5, 300, 42]), names[9]: torch.tensor([1, 1000, 17])}
    pruned = pruned_adapter(keep)
    with torch.no_grad():  # dense: large values exactly on the pruned entries (same values), small elsewhere
        for p in dense.bottleneck.decoder_weight.values():
            p.mul_(1e-3)
        for name, idx in keep.items():
            values = torch.arange(1, idx.numel() + 1, dtype=torch.float32) * (-1) ** torch.arange(idx.numel())
            pruned.bottleneck.decoder(name)[0].copy_(values)
            dense.bottleneck.decoder(name).view(1, -1)[0, idx] = values
    assert top_k(pruned, 7).to_set() == top_k(dense, 7).to_set() == {(n, int(i)) for n, idx in keep.items()
                                                                      for i in idx}
    assert overlap_matrix({"dense": dense, "pruned": pruned}, 7).overlap.loc["dense", "pruned"] == 1.0
    cos = decoder_cosine({"dense": dense, "pruned": pruned}).loc["dense", "pruned"]
    assert cos == pytest.approx(numpy_cosine(entries_of(dense), entries_of(pruned)), abs=1e-7) and 0.99 < cos < 1

    # saved adapters compare exactly like the model objects (no base model is loaded)
    dense.save_pretrained(tmp_path / "dense")
    pruned.save_pretrained(tmp_path / "pruned")
    paths = {"dense": tmp_path / "dense", "pruned": str(tmp_path / "pruned")}
    objects = {"dense": dense, "pruned": pruned}
    for k in (3, 7, 50):
        pd.testing.assert_frame_equal(overlap_matrix(paths, k).jaccard, overlap_matrix(objects, k).jaccard)
        assert top_k(paths["pruned"], k).to_set() == top_k(pruned, k).to_set()
    pd.testing.assert_frame_equal(decoder_cosine(paths), decoder_cosine(objects))
    for label in objects:
        pd.testing.assert_frame_equal(feature_location(paths[label]).table, feature_location(objects[label]).table)
    loaded = adapter_tensors(paths["pruned"], by="decoder")
    assert set(next(iter(loaded.tensors.values()))) == {"decoder", "index"}  # only what the view needs is kept
    assert feature_location(loaded).parameters["entries"].tolist() == [4, 3]


# --- where the feature lives ------------------------------------------------------------------------------------------
def test_feature_location_shares_match_a_hand_computation():
    model = gpt2_adapter()
    set_decoder(model, {
        "transformer.wpe.weight": 1.0,                    # 64 x 16 = 1024 entries, embeddings
        "transformer.h.0.attn.c_attn.weight": -2.0,       # 16 x 48 = 768, layer 0 attention
        "transformer.h.0.ln_2.bias": 0.5,                 # 16, layer 0 norm
        "transformer.h.1.mlp.c_proj.weight": -0.5,        # 64 x 16 = 1024, layer 1 mlp
        "transformer.ln_f.weight": 3.0,                   # 16, final norm
    })
    location = feature_location(model)  # |w| mass: 1024, 1536, 8, 512, 48; total 3128
    total = 1024 + 1536 + 8 + 512 + 48
    table = location.table
    assert list(table.index) == ["embeddings", "layer 0", "layer 1", "final norm"]
    assert list(table.columns) == ["attention", "mlp", "embeddings", "norm"]
    expected = pd.DataFrame(0.0, index=table.index, columns=table.columns)
    expected.loc["embeddings", "embeddings"] = 1024 / total
    expected.loc["layer 0", "attention"] = 1536 / total
    expected.loc["layer 0", "norm"] = 8 / total
    expected.loc["layer 1", "mlp"] = 512 / total
    expected.loc["final norm", "norm"] = 48 / total
    np.testing.assert_allclose(table.to_numpy(), expected.to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(location.by_layer["share"], [1024 / total, 1544 / total, 512 / total, 48 / total])
    np.testing.assert_allclose(location.by_module.loc[["attention", "mlp", "embeddings", "norm"], "share"],
                               [1536 / total, 512 / total, 1024 / total, 56 / total])
    assert location.by_layer["entries"].sum() == model.num_entries
    assert location.parameters["share"].sum() == pytest.approx(1.0)

    squared = feature_location(model, measure="squared")  # w^2 mass: 1024, 3072, 4, 256, 144
    total2 = 1024 + 3072 + 4 + 256 + 144
    assert squared.table.loc["layer 0", "attention"] == pytest.approx(3072 / total2)
    assert squared.by_module.loc["norm", "share"] == pytest.approx(148 / total2)


@pytest.mark.parametrize("name, layer, module", [
    ("transformer.h.3.attn.c_attn.weight", "layer 3", "attention"),
    ("transformer.h.3.mlp.c_proj.bias", "layer 3", "mlp"),
    ("transformer.h.11.ln_1.weight", "layer 11", "norm"),
    ("transformer.wte.weight", "embeddings", "embeddings"),
    ("transformer.ln_f.bias", "final norm", "norm"),
    ("model.layers.7.self_attn.o_proj.weight", "layer 7", "attention"),
    ("model.layers.7.mlp.gate_proj.weight", "layer 7", "mlp"),
    ("model.layers.7.post_attention_layernorm.weight", "layer 7", "norm"),
    ("model.embed_tokens.weight", "embeddings", "embeddings"),
    ("model.norm.weight", "final norm", "norm"),
    ("lm_head.weight", "head", "other"),
    ("bert.embeddings.LayerNorm.weight", "embeddings", "norm"),
    ("bert.encoder.layer.2.attention.output.dense.weight", "layer 2", "attention"),
    ("bert.encoder.layer.2.intermediate.dense.weight", "layer 2", "mlp"),
    ("bert.encoder.layer.2.output.dense.weight", "layer 2", "mlp"),
    ("bert.encoder.layer.2.output.LayerNorm.bias", "layer 2", "norm"),
    ("cls.predictions.transform.dense.weight", "head", "other"),
    ("distilbert.transformer.layer.1.ffn.lin1.weight", "layer 1", "mlp"),
    ("distilbert.transformer.layer.1.attention.q_lin.weight", "layer 1", "attention"),
    ("gpt_neox.layers.4.attention.query_key_value.weight", "layer 4", "attention"),
    ("model.blocks.2.fc1.weight", "layer 2", "mlp"),
])
def test_parameter_names_map_to_layers_and_module_types(name, layer, module):
    assert layer_of(name)[0] == layer and module_type(name) == module


# --- seed stability ---------------------------------------------------------------------------------------------------
def test_seed_stability_summarises_pairs_and_converged_seeds(tmp_path):
    models = {0: gpt2_adapter(seed=0), 1: gpt2_adapter(seed=1), 2: gpt2_adapter(seed=0)}  # 0 and 2 identical
    models[1].save_pretrained(tmp_path / "one")
    given = {0: models[0], 1: tmp_path / "one", 2: models[2]}
    stability = seed_stability(given, k=0.05, converged={0: True, 1: False, 2: True})
    assert json.loads(json.dumps(stability)) == stability  # JSON-ready, round-trips exactly
    cos = decoder_cosine({s: models[s] for s in models})
    ov = overlap_matrix({s: models[s] for s in models}, 0.05)
    pairs = {tuple(p["seeds"]): p for p in stability["pairs"]}
    assert set(pairs) == {(0, 1), (0, 2), (1, 2)}
    for (a, b), pair in pairs.items():
        assert pair["cosine"] == pytest.approx(cos.loc[str(a), str(b)])
        assert pair["overlap"] == pytest.approx(ov.overlap.loc[str(a), str(b)])
    assert pairs[(0, 2)]["overlap"] == 1.0 and pairs[(0, 2)]["cosine"] == pytest.approx(1.0)
    assert stability["all"]["pairs"] == 3
    assert stability["all"]["overlap_min"] == pytest.approx(min(p["overlap"] for p in pairs.values()))
    assert stability["all"]["cosine_mean"] == pytest.approx(np.mean([p["cosine"] for p in pairs.values()]))
    assert stability["converged_seeds"] == [0, 2]
    assert stability["converged"] == {"pairs": 1, "overlap_mean": 1.0, "overlap_min": 1.0, "jaccard_mean": 1.0,
                                      "jaccard_min": 1.0, "cosine_mean": pytest.approx(1.0),
                                      "cosine_min": pytest.approx(1.0)}
    assert stability["top_k_sizes"] == [381] * 3  # 5% of 7616 = 380.8, rounded half up

    single = seed_stability({4: models[0]}, converged=[4])
    assert single["all"] == {"pairs": 0, "overlap_mean": None, "overlap_min": None, "jaccard_mean": None,
                             "jaccard_min": None, "cosine_mean": None, "cosine_min": None}


def test_train_seeds_report_holds_the_stability_of_the_trained_seeds(tmp_path):
    from test_trainer import CONTEXTS, args, feature_rows
    from tiny import tokenizer_for

    from gradiend_hf.seeds import train_seeds

    search = train_seeds(tiny_model("bert"), GradiendConfig(feature_classes=["female", "male"]),
                         args(tmp_path, learning_rate=1e-12, max_steps=2, eval_steps=1, save_steps=1),
                         train_dataset=feature_rows(CONTEXTS[:5]), eval_dataset=feature_rows(CONTEXTS[5:], seed=1),
                         processing_class=tokenizer_for("bert"), seeds=(0, 1), enough=1)
    stability = search.report["stability"]
    run = tmp_path / "run"
    assert json.loads((run / "seed_report.json").read_text())["stability"] == stability
    assert stability["seeds"] == [0, 1] and stability["converged_seeds"] == [] and stability["all"]["pairs"] == 1
    # recomputed independently from the per-seed adapters saved in the run dirs
    cosine = decoder_cosine({s: run / f"seed-{s}" for s in (0, 1)}).loc["0", "1"]
    assert stability["pairs"][0]["cosine"] == pytest.approx(cosine)
    saved = adapter_tensors(run / f"seed-{search.seed}")
    chosen = adapter_tensors(search.model)
    for name in chosen.names:
        torch.testing.assert_close(saved.tensors[name]["decoder"], chosen.tensors[name]["decoder"])


# --- plots draw the numbers -------------------------------------------------------------------------------------------
def test_overlap_and_cosine_heatmaps_show_the_matrices(tmp_path):
    models = {f"seed {s}": gpt2_adapter(seed=s) for s in range(3)}
    models["copy"] = models["seed 0"]
    result = overlap_matrix(models, 0.05)
    figure = plot_overlap(result, tmp_path / "overlap.png")
    heat_axes = [axis for axis in figure.axes if axis.images]
    assert len(heat_axes) == 2 and (tmp_path / "overlap.png").stat().st_size > 10_000
    for axis, frame in zip(heat_axes, (result.overlap, result.jaccard)):
        np.testing.assert_array_equal(np.asarray(axis.images[0].get_array()), frame.to_numpy())
        assert [t.get_text() for t in axis.texts] == [f"{v:.2f}" for v in frame.to_numpy().ravel()]
        assert [t.get_text() for t in axis.get_yticklabels()] == list(frame.index)
    single = plot_overlap(result.jaccard)
    np.testing.assert_array_equal(np.asarray(single.axes[0].images[0].get_array()), result.jaccard.to_numpy())

    cosine = decoder_cosine(models)
    figure = plot_cosine(cosine, tmp_path / "cosine.png")
    np.testing.assert_array_equal(np.asarray(figure.axes[0].images[0].get_array()), cosine.to_numpy())
    assert figure.axes[0].images[0].get_clim() == (-1.0, 1.0)


def test_feature_location_plot_draws_the_table(tmp_path):
    model = gpt2_adapter()
    location = feature_location(model)
    figure = plot_feature_location(location, tmp_path / "location.png")
    assert (tmp_path / "location.png").stat().st_size > 10_000
    bars, heat = figure.axes[0], figure.axes[1]
    table = location.table
    widths = np.array([patch.get_width() for patch in bars.patches]).reshape(len(table.columns), len(table.index)).T
    np.testing.assert_allclose(widths, table.to_numpy())
    np.testing.assert_allclose(np.asarray(heat.images[0].get_array()), table.to_numpy())
    assert [t.get_text() for t in bars.get_yticklabels()] == list(table.index)
    assert heat.texts[0].get_text() == ("·" if table.iloc[0, 0] == 0 else f"{table.iloc[0, 0]:.1%}")
    figure = plot_feature_location(location.table)  # the bare table works too
    np.testing.assert_allclose(np.asarray(figure.axes[1].images[0].get_array()), table.to_numpy())
