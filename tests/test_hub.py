"""Model cards and Hub pushes: the Hub calls are recorded into a fake hub folder (no network) and loaded back.

The recorder replaces `HfApi.create_repo` / `create_branch` / `upload_folder` (what `GradiendModel.push_to_hub` and
`push_merged` call) and `huggingface_hub.hf_hub_download` (what `serialization.resolve_adapter_files` calls for a repo
id). Files live in `<fake hub>/<user>/<repo>/<revision>/`; a new branch starts from main, as on the Hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import EntryNotFoundError
from tiny import rows, tiny_model, tokenizer_for
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from gradiend_hf import Edit, GradiendConfig, GradiendDataCollator, GradiendModel, get_gradiend_model
from gradiend_hf.cards import NOT_EVALUATED, adapter_card, merged_card
from gradiend_hf.hub import push_merged
from gradiend_hf.serialization import WEIGHTS_NAME

CLASSES = ["female", "male"]
ADAPTER_FILES = {"adapter_config.json", WEIGHTS_NAME, "README.md"}
EVALUATION = {
    "goal": "balance",
    "feature_factor": -0.25,
    "learning_rate": 0.0125,
    "lms": 0.8123,
    "base_lms": 0.8456,
    "perplexity": 41.7,
    "base_perplexity": 40.2,
    "probabilities": {"female": 0.4321, "male": 0.4012},
    "base_probabilities": {"female": 0.1234, "male": 0.6543},
    "encoder_correlation": 0.9312,
    "training_rows": 12345,
    "training_data": "English Wikipedia sentences with gendered names, masked",
}
FIGURES = ["0.8123", "0.8456", "41.7", "40.2", "0.4321", "0.4012", "0.1234", "0.6543", "0.9312", "12,345"]




def wrap(kind="gpt2", seed=0, **config):
    model = tiny_model(kind)
    gradiend = get_gradiend_model(
        model, GradiendConfig(feature_classes=CLASSES, base_model_name_or_path=f"tiny/{kind}", init_seed=seed, **config)
    )
    with torch.no_grad():
        gradiend.bottleneck.encoder_bias.fill_(0.0123 * (seed + 1))
    return model, gradiend


def outputs(gradiend, kind):
    batch = GradiendDataCollator(tokenizer_for(kind), gradiend.objective, CLASSES)(rows())
    return gradiend.encode(batch), gradiend.encode_rows(batch), gradiend.decode(0.5), gradiend.decode(-1.0)


def assert_same_outputs(a, b):
    for x, y in zip(a, b):
        if isinstance(x, dict):
            assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)
        else:
            assert torch.equal(x, y)


# --- pushing an adapter -----------------------------------------------------------------------------------------
def test_push_to_hub_uploads_exactly_the_adapter_files_and_card(hub, tmp_path):
    _, gradiend = wrap("gpt2")
    commit = gradiend.push_to_hub("user/gradiend-gpt2", private=True, token="hf_secret")

    create = hub.names("create_repo")
    assert [c["repo_id"] for c in create] == ["user/gradiend-gpt2"]
    assert create[0]["exist_ok"] is True and create[0]["private"] is True and create[0]["token"] == "hf_secret"
    assert not hub.names("create_branch")
    (upload,) = hub.uploads
    assert upload["repo_id"] == "user/gradiend-gpt2" and upload["revision"] is None
    assert set(upload["files"]) == ADAPTER_FILES
    assert hub.names("upload_folder")[0]["token"] == "hf_secret"
    assert "female vs male" in hub.names("upload_folder")[0]["commit_message"]
    assert commit.oid and commit.commit_url.startswith("https://huggingface.co/user/gradiend-gpt2/commit/")

    # The uploaded files are byte for byte what save_pretrained writes (with the repo id in the card).
    gradiend.save_pretrained(tmp_path / "local", repo_id="user/gradiend-gpt2")
    for name in ADAPTER_FILES:
        assert upload["files"][name] == (tmp_path / "local" / name).read_bytes(), name
    card = upload["files"]["README.md"].decode()
    assert 'GradiendModel.from_pretrained(base, "user/gradiend-gpt2")' in card
    assert ModelCard(card).data.library_name == "gradiend_hf"


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_saved_and_pushed_adapters_load_back_to_identical_outputs(hub, tmp_path, kind):
    _, gradiend = wrap(kind)
    expected = outputs(gradiend, kind)
    gradiend.save_pretrained(tmp_path / "saved")
    gradiend.push_to_hub("user/repo")
    assert not Path("user/repo").exists()  # the repo id cannot be mistaken for a local folder

    saved = GradiendModel.from_pretrained(tiny_model(kind), tmp_path / "saved")
    assert not hub.names("hf_hub_download")
    pushed = GradiendModel.from_pretrained(tiny_model(kind), "user/repo", token="hf_secret", cache_dir=hub.cache)
    downloads = hub.names("hf_hub_download")
    assert sorted(d["filename"] for d in downloads) == ["adapter_config.json", WEIGHTS_NAME]
    assert all(d["repo_id"] == "user/repo" and d["revision"] is None for d in downloads)
    assert all(d["token"] == "hf_secret" and d["cache_dir"] == hub.cache for d in downloads)

    assert_same_outputs(outputs(saved, kind), expected)
    assert_same_outputs(outputs(pushed, kind), expected)
    assert pushed.gradiend_config.to_dict() == saved.gradiend_config.to_dict() == gradiend.saved_config().to_dict()


def test_a_revision_is_pushed_to_its_branch_and_loaded_from_it(hub):
    _, first = wrap("gpt2", seed=1)
    _, second = wrap("gpt2", seed=2)
    first.push_to_hub("user/repo")
    second.push_to_hub("user/repo", revision="v2", commit_message="second seed")
    assert [b["branch"] for b in hub.names("create_branch")] == ["v2"]
    assert [(u["repo_id"], u["revision"]) for u in hub.uploads] == [("user/repo", None), ("user/repo", "v2")]
    assert hub.names("upload_folder")[1]["commit_message"] == "second seed"

    main = GradiendModel.from_pretrained(tiny_model("gpt2"), "user/repo")
    v2 = GradiendModel.from_pretrained(tiny_model("gpt2"), "user/repo", revision="v2")
    assert {d["revision"] for d in hub.names("hf_hub_download")} == {None, "v2"}
    assert_same_outputs(outputs(main, "gpt2"), outputs(first, "gpt2"))
    assert_same_outputs(outputs(v2, "gpt2"), outputs(second, "gpt2"))
    with pytest.raises(EntryNotFoundError):
        GradiendModel.from_pretrained(tiny_model("gpt2"), "user/repo", revision="no-such-branch")


# --- pushing a merged model -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, auto, with_tokenizer",
                         [("gpt2", AutoModelForCausalLM, True), ("bert", AutoModelForMaskedLM, False)])
def test_push_merged_uploads_a_plain_transformers_model_with_our_card(hub, tmp_path, kind, auto, with_tokenizer):
    _, gradiend = wrap(kind)
    config = gradiend.gradiend_config
    judged = {"selected_in": "neutral contexts", "base_context_abs_log_ratio": 0.76, "context_abs_log_ratio": 0.5}
    edit = Edit(feature_factor=-0.25, learning_rate=0.0125, goal="balance", metrics=judged)
    merged = gradiend.merge_and_unload(edit)
    tokenizer = tokenizer_for(kind) if with_tokenizer else None
    push_merged(merged, "user/merged", config, tokenizer, edit=edit, token="hf_secret")

    merged.save_pretrained(tmp_path / "model-files")
    expected = {p.name for p in (tmp_path / "model-files").iterdir()} | {"README.md"}
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp_path / "tokenizer-files")
        expected |= {p.name for p in (tmp_path / "tokenizer-files").iterdir()}
    assert {"config.json", "model.safetensors"} <= expected
    (upload,) = hub.uploads
    assert upload["repo_id"] == "user/merged" and set(upload["files"]) == expected
    assert hub.names("create_repo")[0]["repo_id"] == "user/merged"

    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.base_model == f"tiny/{kind}"
    assert {"gradiend", "feature:female", "feature:male", "debiased"} <= set(card.data.tags)
    for metrics, tag in [({}, "edited"), ({**judged, "context_abs_log_ratio": 0.9}, "edited")]:  # no evidence / worse
        unjudged = Edit(feature_factor=-0.25, learning_rate=0.0125, goal="balance", metrics=metrics)
        assert tag in merged_card(config, edit=unjudged).data.tags
    assert f"{auto.__name__}.from_pretrained(\"user/merged\")" in card.text
    assert "feature_factor = -0.25, learning_rate = 0.0125" in card.text

    folder = hub.folder("user/merged")
    reloaded = auto.from_pretrained(folder).eval()
    assert type(reloaded) is type(merged)
    ids = tokenizer_for(kind)(["the nurse said that she was in her room"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**ids).logits, merged(**ids).logits)
    if tokenizer is not None:
        assert (AutoTokenizer.from_pretrained(folder)("the nurse said")["input_ids"]
                == tokenizer("the nurse said")["input_ids"])
    else:
        assert 'AutoTokenizer.from_pretrained("tiny/bert")' in card.text


def test_push_merged_refuses_an_unmerged_adapter(hub):
    _, gradiend = wrap("gpt2", feature_factor=1.0, learning_rate=0.1)
    with pytest.raises(TypeError, match="merge_and_unload"):
        push_merged(gradiend, "user/merged", gradiend.gradiend_config)
    assert not hub.calls


# --- cards ------------------------------------------------------------------------------------------------------
def evaluated_config(**changes):
    return GradiendConfig(
        feature_classes=CLASSES,
        base_model_name_or_path="HuggingFaceTB/SmolLM2-135M",
        objective="causal_lm",
        feature_factor=-0.25,
        learning_rate=0.0125,
        evaluation=dict(EVALUATION),
        **changes,
    )


def test_adapter_card_renders_every_field_when_evaluated():
    card = adapter_card(evaluated_config(), 1_234_567, repo_id="user/repo", license="mit")
    again = ModelCard(str(card))  # what the Hub parses from README.md
    assert again.data.library_name == "gradiend_hf"
    assert again.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert again.data.license == "mit"
    assert {"gradiend", "feature:female", "feature:male"} <= set(again.data.tags)
    text = card.text
    for figure in FIGURES + ["1,234,567", "-0.25", "0.0125", EVALUATION["training_data"]]:
        assert figure in text, figure
    assert "| language modelling score (LMS) | 0.8456 | 0.8123 | -0.0333 |" in text
    assert "| P(female) | 0.1234 | 0.4321 | +0.3087 |" in text
    assert 'balance "female" and "male"' in text
    assert '+1 for "female"' in text and '-1 for "male"' in text
    assert 'GradiendModel.from_pretrained(base, "user/repo")' in text and "AutoModelForCausalLM" in text
    assert NOT_EVALUATED not in text.lower() and "Not recorded" not in text and "{{" not in text


def test_merged_card_renders_every_field_when_evaluated():
    card = merged_card(evaluated_config(), repo_id="user/merged")
    again = ModelCard(str(card))
    assert again.data.library_name == "transformers"
    assert again.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert again.data.license == "apache-2.0" and again.data.pipeline_tag == "text-generation"
    assert {"gradiend", "feature:female", "feature:male", "debiased"} <= set(again.data.tags)
    text = card.text
    for figure in FIGURES + ["-0.25", "0.0125", EVALUATION["training_data"]]:
        assert figure in text, figure
    assert "theta + learning_rate * dec(feature_factor)" in text
    assert 'AutoModelForCausalLM.from_pretrained("user/merged")' in text and "gradiend_hf` is not needed" in text
    assert NOT_EVALUATED not in text.lower() and "Not recorded" not in text and "{{" not in text


def test_cards_say_not_evaluated_when_figures_are_missing():
    bare = GradiendConfig(feature_classes=CLASSES)
    card = adapter_card(bare, 10)
    assert ModelCard(str(card)).data.tags[0] == "gradiend"
    assert card.text.count(NOT_EVALUATED) >= 2 and "Not evaluated" in card.text and "Not recorded." in card.text
    assert "merge_and_unload(feature_factor=1.0, learning_rate=1e-3)" in card.text

    partial = GradiendConfig(feature_classes=CLASSES, feature_factor=1.0, learning_rate=0.5, evaluation={"lms": 0.75})
    text = adapter_card(partial, 10).text
    assert "| language modelling score (LMS) | not evaluated | 0.75 |  |" in text
    assert "| perplexity | not evaluated | not evaluated |  |" in text
    assert "| P(female) | not evaluated | not evaluated |  |" in text

    merged = merged_card(partial.with_updates(evaluation=None),
                         edit=Edit(feature_factor=1.0, learning_rate=0.5, goal="female"))
    assert "edited" in ModelCard(str(merged)).data.tags and "Not evaluated" in merged.text
    assert 'strengthen "female"' in merged.text
    with pytest.raises(ValueError, match="needs the merged edit"):
        merged_card(bare)


def test_explicit_card_fields_and_another_edit():
    config = evaluated_config()
    text = adapter_card(config, 10, training_data="my rows", encoder_correlation=0.5).text
    assert "my rows (12,345 rows)" in text and "0.5\n" in text and "0.9312" not in text
    # Figures measured for another edit are not shown for this one; edit-independent ones (base model) still are.
    other = merged_card(config, edit=Edit(feature_factor=1.0, learning_rate=0.5, goal="-male")).text
    assert 'weaken "male"' in other and "0.8123" not in other and "0.4321" not in other
    assert "| language modelling score (LMS) | 0.8456 | not evaluated |  |" in other and "0.9312" in other


def test_large_and_tiny_figures_stay_readable():
    config = evaluated_config().with_updates(
        evaluation={**EVALUATION, "base_perplexity": 9000.0, "perplexity": 12345.6})
    text = adapter_card(config, 10).text
    assert "| perplexity | 9000 | 12,346 | +3346 |" in text
    config = config.with_updates(evaluation={**EVALUATION, "probabilities": {"female": 1.234e-05, "male": 0.5}})
    assert "| P(female) | 0.1234 | 1.234e-05 | -0.1234 |" in adapter_card(config, 10).text


# --- pushing a folder given by the user: the allow-list ------------------------------------------------------------
def test_plan_push_keeps_only_the_files_of_an_adapter_or_a_model(tmp_path, hub):
    from gradiend_hf.hub import plan_push, push_planned

    _, gradiend = wrap("gpt2")
    adapter = tmp_path / "adapter"
    gradiend.save_pretrained(adapter)
    (tmp_path / "secret").write_text("hf_secret")
    (adapter / ".env").write_text("HF_TOKEN=hf_secret")
    (adapter / "token").symlink_to(tmp_path / "secret")
    (adapter / "checkpoint-5").mkdir()
    for name in ("optimizer.safetensors", "optimizer.json", "scheduler.json", "rng_state.pth", "notes.txt"):
        (adapter / name).write_text("x")
    plan = plan_push(adapter, "user/adapter")
    assert plan.kind == "adapter" and set(plan.files) == ADAPTER_FILES
    assert dict(plan.skipped) == {".env": "hidden", "token": "symlink out of the folder", "checkpoint-5/": "folder",
                                  **{n: "not part of an adapter" for n in ("notes.txt", "optimizer.json",
                                                                           "optimizer.safetensors", "rng_state.pth",
                                                                           "scheduler.json")}}

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "merges.txt", "optimizer.safetensors",
                 "pytorch_model.bin", "training_args.bin"):
        (model / name).write_text(name)
    (model / "vocab.json").symlink_to(model / "merges.txt")  # a symlink inside the folder is a file of it
    plan = plan_push(model)
    assert plan.kind == "model" and plan.files == (
        "config.json", "merges.txt", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "vocab.json")
    push_planned(plan, "user/model", private=None, token=None, revision=None, commit_message="m")
    (upload,) = hub.uploads
    assert set(upload["files"]) == set(plan.files) and upload["files"]["vocab.json"] == b"merges.txt"
    assert sorted(p.name for p in model.iterdir()) == sorted([*plan.files, "optimizer.safetensors",
                                                              "pytorch_model.bin", "training_args.bin"])

    (model / "model-00001-of-00002.safetensors").unlink()
    (model / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model folder without model.safetensors"):
        plan_push(model)
    with pytest.raises(ValueError, match="neither an adapter folder"):
        plan_push(tmp_path / "adapter" / "checkpoint-5")


def test_a_saved_folder_pushed_later_names_its_repo_and_no_local_base_path(hub, tmp_path):
    """A card saved without a repo id shows a placeholder; `gradiend-hf push` fills in the repo, and a base model
    loaded from a local folder never appears as the Hub `base_model` (it would leak a directory name)."""
    from gradiend_hf.cards import REPO_PLACEHOLDER, card_for_repo, hub_model_id
    from gradiend_hf.hub import plan_push, push_planned

    tiny_model("gpt2").save_pretrained(tmp_path / "local-base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "local-base")
    GradiendModel(base, GradiendConfig(feature_classes=["female", "male"])).save_pretrained(tmp_path / "adapter")
    saved = (tmp_path / "adapter" / "README.md").read_text()
    assert REPO_PLACEHOLDER in saved and ModelCard(saved).data.base_model is None  # local path: not in metadata
    push_planned(plan_push(tmp_path / "adapter"), "user/adapter", private=None, token=None, revision=None,
                 commit_message="up")
    (upload,) = hub.uploads
    card = upload["files"]["README.md"].decode()
    assert REPO_PLACEHOLDER not in card and 'from_pretrained(base, "user/adapter")' in card
    assert str(tmp_path) not in ModelCard(card).data.to_yaml()
    assert hub_model_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M" and hub_model_id("gpt2")
    assert hub_model_id("/abs/path") is None and hub_model_id("./rel") is None and hub_model_id(str(tmp_path)) is None
    stale = "---\nbase_model: /home/me/model\nbase_model_relation: adapter\n---\nload PATH_OR_REPO_ID\n"
    fixed = ModelCard(card_for_repo(stale, "org/x"))
    assert fixed.data.base_model is None and "load org/x" in fixed.text
