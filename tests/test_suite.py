"""Suites of pairwise GRADIENDs on a tiny three-class data set: each pair equals a single seed search on its rows, the
base model comes out bit-identical, a finished pair is not retrained, and the comparisons equal direct computations."""

import json

import numpy as np
import pytest
import torch
from test_cli import class_probability_by_hand
from test_trainer import CONTEXTS, args
from tiny import tiny_model, tokenizer_for

from gradiend_hf import GradiendConfig, GradiendModel
from gradiend_hf.comparison import feature_location, overlap_matrix
from gradiend_hf.data import GradiendDataCollator
from gradiend_hf.schema import prepare_rows
from gradiend_hf.seeds import train_seeds
from gradiend_hf.serialization import read_adapter
from gradiend_hf.suite import Suite, suite_pairs, train_suite
from gradiend_hf.suite_comparison import compare_decoders, cross_encode, edit_probabilities
from gradiend_hf.suite_plots import plot_cross_encoding, plot_edit_probabilities, plot_layers
from gradiend_hf.trainer import GradiendTrainer

WORDS = {"female": ["she", "her"], "male": ["he", "his"], "group": ["they", "it"]}
PAIRS = [("female", "male"), ("female", "group"), ("male", "group")]


def three_class_rows(contexts):
    """Every context with every class's words; the alternatives are left out (each pair fills its own)."""
    return [dict(masked=c, factual=w, factual_class=k) for c in contexts for k, ws in WORDS.items() for w in ws]


def quick(tmp_path, name):
    return args(tmp_path / name, learning_rate=1e-2, max_steps=12, eval_steps=6, save_steps=6,
                per_device_train_batch_size=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One suite over all three pairs on one base, the base's state before and after, and the data."""
    tmp = tmp_path_factory.mktemp("suite")
    base, tokenizer = tiny_model("bert"), tokenizer_for("bert")
    base.train()  # a flag the suite must give back as it was
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    weights = {n: t.clone() for n, t in base.state_dict().items()}
    train, validation = three_class_rows(CONTEXTS[:5]), three_class_rows(CONTEXTS[5:])
    suite = train_suite(base, GradiendConfig(feature_classes=["a", "b"]), quick(tmp, "suite"), train, validation,
                        tokenizer, progress=False)
    return dict(tmp=tmp, base=base, tokenizer=tokenizer, flags=flags, weights=weights, suite=suite, train=train,
                validation=validation)


def test_every_pair_is_trained_in_its_own_folder_and_the_base_comes_out_unchanged(trained):
    suite, base = trained["suite"], trained["base"]
    assert suite.classes == ["female", "male", "group"] and suite.pairs == PAIRS
    for pair, result in suite.results.items():
        assert result.folder == trained["tmp"] / "suite" / "run" / f"{pair[0]}-{pair[1]}"
        assert json.loads((result.adapter / "adapter_config.json").read_text())["feature_classes"] == list(pair)
    after = base.state_dict()
    assert all(torch.equal(trained["weights"][n], after[n]) for n in trained["weights"])
    assert {n: p.requires_grad for n, p in base.named_parameters()} == trained["flags"] and base.training
    GradiendModel(base, GradiendConfig(feature_classes=["female", "male"]))  # the base is free to be wrapped again
    record = json.loads((trained["tmp"] / "suite" / "run" / "suite.json").read_text())
    assert [p["label"] for p in record["pairs"]] == ["female-male", "female-group", "male-group"]


def test_a_pair_of_the_suite_equals_a_single_seed_search_on_that_pairs_rows(trained, tmp_path):
    """The last pair was trained on a base that two adapters had wrapped before: a fresh base gives the same tensors."""
    pair = PAIRS[-1]
    tokenizer = trained["tokenizer"]
    train = prepare_rows(trained["train"], pair, seed=0, tokenizer=tokenizer, other_classes="identity")
    validation = prepare_rows(trained["validation"], pair, seed=0, tokenizer=tokenizer, other_classes="drop")
    assert set(train["factual_class"]) == {"female", "male", "group"}
    single = train_seeds(tiny_model("bert"), GradiendConfig(feature_classes=list(pair)), quick(tmp_path, "single"),
                         train, validation, tokenizer, seeds=(0,))
    _, expected = read_adapter(tmp_path / "single" / "run" / "best")
    _, got = read_adapter(trained["suite"].results[pair].adapter)
    assert expected.keys() == got.keys()
    for name in expected:
        for kind in expected[name]:
            assert torch.equal(expected[name][kind], got[name][kind]), (name, kind)
    assert trained["suite"].results[pair].correlation == single.report["seeds"][0]["correlation"]


def test_resume_reads_finished_pairs_back_instead_of_training_them(trained, monkeypatch):
    def refuse(self, *a, **k):
        raise AssertionError("a finished pair was trained again")

    monkeypatch.setattr(GradiendTrainer, "train", refuse)
    suite = trained["suite"]
    again = train_suite(trained["base"], GradiendConfig(feature_classes=["a", "b"]), quick(trained["tmp"], "suite"),
                        trained["train"], trained["validation"], trained["tokenizer"], resume=True, progress=False)
    assert {p: r.summary() for p, r in again.results.items()} == {p: r.summary() for p, r in suite.results.items()}
    assert Suite.read(suite.output_dir).pairs == suite.pairs


@pytest.mark.parametrize("pairs, message", [
    ([("female", "female")], "same class twice"),
    ([("female", "other")], r"names \['other'\], not a class of the data"),
    ([("female", "male"), ("male", "female")], "given twice"),
])
def test_bad_pairs_are_refused_naming_the_pair(pairs, message):
    with pytest.raises(ValueError, match=message):
        suite_pairs(["female", "male", "group"], pairs)


def test_cross_encoding_equals_encoding_each_pairs_rows_one_by_one(trained):
    suite, tokenizer = trained["suite"], trained["tokenizer"]
    test = three_class_rows(CONTEXTS[2:6])
    cross = cross_encode(suite, trained["base"], test, tokenizer, progress=False)
    assert list(cross.correlation.index) == list(cross.correlation.columns) == ["female-male", "female-group",
                                                                                 "male-group"]
    collate = GradiendDataCollator(tokenizer, "masked_lm")
    for encoder in PAIRS:
        model = GradiendModel.from_pretrained(tiny_model("bert"), suite.results[encoder].adapter)
        for data in PAIRS:
            rows = [dict(r) for r in prepare_rows(test, data, seed=0, tokenizer=tokenizer, other_classes="drop")]
            h = np.array([float(model.encode_rows(collate([row]))[0, 0]) for row in rows])
            labels = np.array([1.0 if r["alternative_class"] == data[0] else -1.0 for r in rows])
            label = f"{encoder[0]}-{encoder[1]}", f"{data[0]}-{data[1]}"
            assert cross.correlation.loc[label] == pytest.approx(np.corrcoef(h, labels)[0, 1], abs=1e-5)
            means = cross.means[(cross.means["encoder"] == label[0]) & (cross.means["data"] == label[1])]
            for cls, sign in zip(data, (1.0, -1.0)):
                got = means[means["class"] == cls].iloc[0]
                assert got["mean_h"] == pytest.approx(h[labels == sign].mean(), abs=1e-5)
                assert got["rows"] == (labels == sign).sum()


def test_decoder_comparison_is_the_comparison_modules_figures_per_pair(trained):
    suite = trained["suite"]
    compared = compare_decoders(suite, k=0.05)
    adapters = suite.adapters()
    direct = overlap_matrix(adapters, 0.05)
    assert compared.overlap.overlap.equals(direct.overlap)
    for label, folder in adapters.items():
        shares = feature_location(folder).by_layer["share"]
        assert compared.by_layer[label].loc[shares.index].to_numpy() == pytest.approx(shares.to_numpy())
        assert compared.by_layer[label].sum() == pytest.approx(1.0)


def test_edit_probabilities_equal_the_merged_models_probabilities_by_hand(trained, tmp_path):
    suite, tokenizer = trained["suite"], trained["tokenizer"]
    test = three_class_rows(CONTEXTS[5:7])
    probabilities = edit_probabilities(suite, trained["base"], test, tokenizer, feature_factors=(1.0,),
                                       learning_rate=0.5, progress=False)
    frame = probabilities.frame
    assert set(frame["pair"]) == {"female-male", "female-group", "male-group"}
    assert set(frame["edit"]) == {"base", "ff1 lr0.5"}
    pair = PAIRS[1]
    merged = GradiendModel.from_pretrained(tiny_model("bert"), suite.results[pair].adapter).merge_and_unload(
        feature_factor=1.0, learning_rate=0.5)
    for model, edit in ((tiny_model("bert"), "base"), (merged, "ff1 lr0.5")):
        table = probabilities.table("female-group", edit)
        for row_class in WORDS:
            contexts = [r["masked"] for r in test if r["factual_class"] == row_class]
            for cls, words in WORDS.items():
                expected = np.mean([class_probability_by_hand(model, tokenizer, c, words) for c in contexts])
                assert table.loc[row_class, cls] == pytest.approx(expected, rel=1e-4), (edit, row_class, cls)
    after = trained["base"].state_dict()
    assert all(torch.equal(trained["weights"][n], after[n]) for n in trained["weights"])

    # the heatmaps draw these tables
    cross = cross_encode(suite, trained["base"], test, tokenizer, progress=False)
    for figure, name in ((plot_cross_encoding(cross, tmp_path / "cross.png"), "cross.png"),
                         (plot_layers(compare_decoders(suite).by_layer, tmp_path / "layers.png"), "layers.png"),
                         (plot_edit_probabilities(probabilities, tmp_path / "edits.png"), "edits.png")):
        assert (tmp_path / name).stat().st_size > 1000 and figure.axes
