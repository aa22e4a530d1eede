"""A saved GRADIEND adapter loads through PEFT and transformers after `import gradiend_hf`.

(a) PeftModel.from_pretrained(base, dir)   (b) AutoModelFor*.from_pretrained(dir)   (c) base.load_adapter(dir)

Oracle: GradiendModel.from_pretrained(fresh_base, dir).merge_and_unload() with the stored edit. Every path must give
the same logits bit for bit (fp32): unmerged, merged through PEFT, and for tied weights. These tests touch PEFT and
transformers internals (the registry dicts, the key layout, the loaders), so a release that changes them fails here.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model, tokenizer_for
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import gradiend_hf  # noqa: F401  (the import registers GRADIEND with PEFT)
from gradiend_hf import GradiendConfig, GradiendModel
from gradiend_hf.compatibility import adapter_api_blocker, explain_adapter_api_blocker
from gradiend_hf.config import GradiendType
from gradiend_hf.peft_integration import (
    GradiendLayer,
    GradiendPeftConfig,
    GradiendTuner,
    is_registered,
    merge_and_unload_gradiend,
    register,
    set_gradiend_edit,
)
from gradiend_hf.serialization import WEIGHTS_NAME
from peft import PeftModel
from peft import mapping as peft_mapping

CLASSES = ["female", "male"]
EDIT = dict(feature_factor=1.0, learning_rate=0.3)
TEXTS = ["the nurse said that she was in her room", "he said the results were bad"]
KINDS = ["bert", "gpt2", "llama"]


def auto(kind):
    return AutoModelForMaskedLM if kind == "bert" else AutoModelForCausalLM


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny bases saved to disk, so adapter_config.json can name a resolvable base_model_name_or_path."""
    root = tmp_path_factory.mktemp("bases")
    for kind in KINDS:
        tiny_model(kind).save_pretrained(root / kind)
    return root


def fresh(bases, kind):
    return auto(kind).from_pretrained(bases / kind).eval()


def save_adapter(bases, kind, path, indices=None, **config):
    base = fresh(bases, kind)
    fields = {**EDIT, **config}
    GradiendModel(base, GradiendConfig(feature_classes=CLASSES, **fields), indices=indices).save_pretrained(path)
    return path


def inputs(kind):
    return tokenizer_for(kind)(TEXTS, return_tensors="pt", padding=True)


@torch.no_grad()
def logits(model, kind):
    return model(**inputs(kind)).logits


def reference(bases, kind, path, **edit):
    """The oracle: GradiendModel's own merge of the (stored or given) edit."""
    return logits(GradiendModel.from_pretrained(fresh(bases, kind), path).merge_and_unload(**edit), kind)


def load_a(bases, kind, path, **kwargs):
    return PeftModel.from_pretrained(fresh(bases, kind), path, **kwargs)


def load_b(bases, kind, path):
    return auto(kind).from_pretrained(path)


def load_c(bases, kind, path):
    model = fresh(bases, kind)
    info = model.load_adapter(path)
    assert not info.missing_keys and not info.unexpected_keys and not info.mismatched_keys
    return model


LOADERS = {"a": load_a, "b": load_b, "c": load_c}
ADAPTER_API_BLOCKER = adapter_api_blocker()


def require_adapter_api():
    """transformers' adapter API loads with the installed peft but refuses to manage adapters (disable, save, ...) when
    it asks for a newer peft (compatibility.py): then skip; the refusal's message is
    test_an_old_peft_is_refused_naming_*."""
    if ADAPTER_API_BLOCKER is not None:
        pytest.skip(ADAPTER_API_BLOCKER)


# --- registration ------------------------------------------------------------------------------------------------
def test_import_registers_gradiend_and_registering_again_is_harmless():
    assert is_registered()
    before = (
        peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING["GRADIEND"],
        peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING["GRADIEND"],
        peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING["GRADIEND"],
    )
    assert before == (GradiendPeftConfig, GradiendTuner, "gradiend_")
    register()
    register()
    import gradiend_hf.peft_integration  # noqa: F401  (a second import is a no-op)

    assert is_registered()
    assert sum(1 for k in peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING if k == "GRADIEND") == 1


def test_peft_official_registry_is_closed_to_new_names():
    """Why register() writes the mapping dicts itself. If this starts passing, PEFT opened its registry."""
    from peft.utils import register_peft_method

    with pytest.raises(ValueError, match="Unknown PEFT type GRADIEND"):
        register_peft_method(name="gradiend", config_cls=GradiendPeftConfig, model_cls=GradiendTuner)


def test_without_registration_every_path_fails_with_a_key_error(bases, tmp_path, monkeypatch):
    """Documents the need for `import gradiend_hf` first: PEFT has no plugin discovery."""
    path = save_adapter(bases, "gpt2", tmp_path / "adapter")
    for table in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING"):
        monkeypatch.delitem(getattr(peft_mapping, table), GradiendType.GRADIEND)
    for loader in LOADERS.values():
        with pytest.raises(KeyError, match="GRADIEND"):
            loader(bases, "gpt2", path)


# --- (a), (b), (c): exact logits ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_peft_model_from_pretrained_gives_the_edited_model(bases, tmp_path, kind):
    path = save_adapter(bases, kind, tmp_path / "adapter")
    expected, base_logits = reference(bases, kind, path), logits(fresh(bases, kind), kind)
    assert (expected - base_logits).abs().max() > 1e-3  # the edit does something
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_a(bases, kind, path)
    assert not [w for w in caught if "adapter keys" in str(w.message) or "gradiend" in str(w.message).lower()]
    assert torch.equal(logits(model, kind), expected)
    with model.disable_adapter():
        assert torch.equal(logits(model, kind), base_logits)
    assert torch.equal(logits(model, kind), expected)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == type(fresh(bases, kind)).__name__
    assert not any(isinstance(m, GradiendLayer) for m in merged.modules())
    assert torch.equal(logits(merged, kind), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_b_auto_model_from_the_adapter_folder_gives_the_edited_model(bases, tmp_path, kind):
    path = save_adapter(bases, kind, tmp_path / "adapter")
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(bases / kind)
    expected = reference(bases, kind, path)
    model = load_b(bases, kind, path)
    assert any(isinstance(m, GradiendLayer) for m in model.modules())
    assert torch.equal(logits(model, kind), expected)
    merged = merge_and_unload_gradiend(model)
    assert not any(isinstance(m, GradiendLayer) for m in merged.modules())
    assert torch.equal(logits(merged, kind), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_c_load_adapter_gives_the_edited_model_and_can_be_disabled(bases, tmp_path, kind):
    path = save_adapter(bases, kind, tmp_path / "adapter")
    expected, base_logits = reference(bases, kind, path), logits(fresh(bases, kind), kind)
    model = load_c(bases, kind, path)
    assert torch.equal(logits(model, kind), expected)
    require_adapter_api()  # disable/enable_adapters
    model.disable_adapters()
    assert torch.equal(logits(model, kind), base_logits)
    model.enable_adapters()
    assert torch.equal(logits(model, kind), expected)


# --- tied weights ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, patterns",
    [("gpt2", [r"transformer\.wte\.", r"\.h\.0\.mlp"]), ("bert", [r"word_embeddings", r"embeddings\.LayerNorm"])],
)
@pytest.mark.parametrize("path_name", ["a", "b", "c"])
def test_an_edited_embedding_also_moves_the_tied_lm_head(bases, tmp_path, kind, patterns, path_name):
    path = save_adapter(bases, kind, tmp_path / "adapter", target_parameters=patterns)
    expected = reference(bases, kind, path)
    model = LOADERS[path_name](bases, kind, path)
    base = model.get_base_model() if path_name == "a" else model
    head = base.get_output_embeddings()
    assert isinstance(head, GradiendLayer) and not head.gradiend_decoder  # follows the embedding's delta
    assert torch.equal(logits(model, kind), expected)
    if path_name == "a":
        merged = model.merge_and_unload()
        assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
        assert torch.equal(logits(merged, kind), expected)  # applied once, not twice


# --- edits: stored, chosen at load time, none ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        dict(latent_dim=2, feature_factor=[1.0, -0.5], learning_rate=0.2),
        dict(decoder_activation="tanh", feature_factor=-1.0, learning_rate=0.5),
        dict(decoder_bias=False, feature_factor=0.7, learning_rate=0.4),
    ],
)
def test_decoder_variants_match_gradiend_model(bases, tmp_path, config):
    path = save_adapter(bases, "llama", tmp_path / "adapter", **config)
    expected = reference(bases, "llama", path)
    assert torch.equal(logits(load_a(bases, "llama", path), "llama"), expected)
    assert torch.equal(logits(load_c(bases, "llama", path), "llama"), expected)


def test_an_adapter_without_stored_edit_loads_as_the_base_and_an_edit_can_be_chosen(bases, tmp_path):
    path = save_adapter(bases, "gpt2", tmp_path / "adapter", feature_factor=None, learning_rate=None)
    base_logits = logits(fresh(bases, "gpt2"), "gpt2")
    chosen = dict(feature_factor=-1.0, learning_rate=0.4)
    expected = reference(bases, "gpt2", path, **chosen)

    with pytest.warns(UserWarning, match="no stored edit"):
        model = load_a(bases, "gpt2", path)
    assert torch.equal(logits(model, "gpt2"), base_logits)
    with pytest.raises(ValueError, match="no stored edit"):
        model.merge_and_unload()
    set_gradiend_edit(model, **chosen)
    assert torch.equal(logits(model, "gpt2"), expected)
    assert model.peft_config["default"].feature_factor == -1.0  # a later save keeps the chosen edit

    chosen_at_load = load_a(bases, "gpt2", path, **chosen)  # PeftModel.from_pretrained(..., feature_factor=..., ...)
    assert torch.equal(logits(chosen_at_load, "gpt2"), expected)

    config = GradiendConfig.from_file(path / "adapter_config.json").with_updates(**chosen)
    model_c = fresh(bases, "gpt2")
    model_c.load_adapter(path, peft_config=config)  # (c) with an explicit config
    assert torch.equal(logits(model_c, "gpt2"), expected)

    with pytest.warns(UserWarning, match="no stored edit"):
        model_b = load_b(bases, "gpt2", path)
    assert torch.equal(logits(model_b, "gpt2"), base_logits)
    set_gradiend_edit(model_b, **chosen)
    assert torch.equal(logits(model_b, "gpt2"), expected)


def test_merge_and_unmerge_in_place(bases, tmp_path):
    path = save_adapter(bases, "llama", tmp_path / "adapter")
    expected = reference(bases, "llama", path)
    model = load_a(bases, "llama", path)
    original = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if "gradiend_" not in n}
    model.merge_adapter()
    assert torch.equal(logits(model, "llama"), expected)
    model.unmerge_adapter()  # p -= delta: exact up to rounding, as for LoRA
    restored = dict(model.get_base_model().named_parameters())
    for name, value in original.items():
        torch.testing.assert_close(restored[name], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, "llama"), expected, rtol=0, atol=1e-5)


def test_a_second_adapter_loads_beside_the_first_and_can_be_switched_to(bases, tmp_path):
    first = save_adapter(bases, "llama", tmp_path / "first")
    second = save_adapter(bases, "llama", tmp_path / "second", init_seed=7, feature_factor=-1.0, learning_rate=0.5)
    expected_first, expected_second = reference(bases, "llama", first), reference(bases, "llama", second)
    model = load_a(bases, "llama", first)
    model.load_adapter(second, adapter_name="second")
    assert torch.equal(logits(model, "llama"), expected_first)
    model.set_adapter("second")
    assert torch.equal(logits(model, "llama"), expected_second)
    model.set_adapter("default")
    assert torch.equal(logits(model, "llama"), expected_first)


# --- save through PEFT, pruned adapters --------------------------------------------------------------------------
def test_saving_through_peft_writes_the_same_adapter(bases, tmp_path):
    path = save_adapter(bases, "gpt2", tmp_path / "adapter")
    model = load_a(bases, "gpt2", path)
    model.save_pretrained(tmp_path / "again", save_embedding_layers=False)
    original, again = load_file(path / WEIGHTS_NAME), load_file(tmp_path / "again" / WEIGHTS_NAME)
    assert sorted(again) == sorted(original)
    assert all(torch.equal(again[k], original[k]) for k in original)
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "GRADIEND" and saved["feature_factor"] == EDIT["feature_factor"]
    reloaded = GradiendModel.from_pretrained(fresh(bases, "gpt2"), tmp_path / "again")
    assert torch.equal(logits(reloaded.merge_and_unload(), "gpt2"), reference(bases, "gpt2", path))


def pruned_indices(bases):
    from gradiend_hf.selection import select_parameters

    base = fresh(bases, "llama")
    params = dict(base.named_parameters())
    names = select_parameters(base, [r"layers\.0\."])
    generator = torch.Generator().manual_seed(0)
    keep = {n: torch.randperm(params[n].numel(), generator=generator)[: params[n].numel() // 3] for n in names[:4]}
    return {n: idx.sort().values for n, idx in keep.items()}


def save_pruned(bases, path):
    return save_adapter(bases, "llama", path, indices=pruned_indices(bases), target_parameters=[r"layers\.0\."])


def test_a_pruned_adapter_loads_through_peft_model(bases, tmp_path):
    path = save_pruned(bases, tmp_path / "adapter")
    assert any(".gradiend_index." in k for k in load_file(path / WEIGHTS_NAME))
    expected = reference(bases, "llama", path)
    model = load_a(bases, "llama", path)
    assert torch.equal(logits(model, "llama"), expected)
    model.save_pretrained(tmp_path / "again", save_embedding_layers=False)
    original, again = load_file(path / WEIGHTS_NAME), load_file(tmp_path / "again" / WEIGHTS_NAME)
    assert sorted(again) == sorted(original) and all(torch.equal(again[k], original[k]) for k in original)
    assert torch.equal(logits(model.merge_and_unload(), "llama"), expected)


@pytest.mark.parametrize("path_name", ["b", "c"])
def test_a_pruned_adapter_loads_through_transformers_loaders(bases, tmp_path, path_name):
    """transformers sizes the adapter tensors from the config before reading the file: the config records the pruned
    sizes (kept_entries), so the layers fit the file and the unmerged model equals GradiendModel's merge."""
    path = save_pruned(bases, tmp_path / "adapter")
    kept = json.loads((path / "adapter_config.json").read_text())["kept_entries"]
    assert kept == {n: int(i.numel()) for n, i in pruned_indices(bases).items()}
    model = LOADERS[path_name](bases, "llama", path)
    assert torch.equal(logits(model, "llama"), reference(bases, "llama", path))


def test_pruned_sizes_that_differ_from_the_file_are_refused_by_every_loader(bases, tmp_path):
    path = save_pruned(bases, tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    name = next(iter(config["kept_entries"]))
    config["kept_entries"][name] += 1
    (path / "adapter_config.json").write_text(json.dumps(config))
    for loader in (lambda: GradiendModel.from_pretrained(fresh(bases, "llama"), path),
                   lambda: LOADERS["a"](bases, "llama", path)):
        with pytest.raises(ValueError, match="the pruned sizes differ"):
            loader()
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' own report, as loud
        LOADERS["c"](bases, "llama", path)


def test_the_low_level_peft_api_injects_from_the_file_and_so_also_loads_pruned_adapters(bases, tmp_path):
    """inject_adapter_in_model(config, model, state_dict=...) sizes the layers from the tensors (pruned included)."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    path = save_pruned(bases, tmp_path / "adapter")
    tensors = load_file(path / WEIGHTS_NAME)
    config = GradiendConfig.from_file(path / "adapter_config.json")
    model = inject_adapter_in_model(config, fresh(bases, "llama"), state_dict=tensors)
    result = set_peft_model_state_dict(model, tensors)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "gradiend_" in k]
    assert torch.equal(logits(model, "llama"), reference(bases, "llama", path))


# --- dtypes, low memory loading, saving through transformers --------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_precision_bases_and_low_cpu_mem_usage_match_gradiend_model(bases, tmp_path, dtype):
    """Every base is loaded as route (b) loads it, with from_pretrained(dtype=...): that keeps the rotary inv_freq
    buffer in float32, while base.to(bfloat16) would round it too (a different model, logits off by ~1e-3)."""
    path = save_adapter(bases, "llama", tmp_path / "adapter")
    base = lambda: AutoModelForCausalLM.from_pretrained(bases / "llama", dtype=dtype).eval()
    expected = logits(GradiendModel.from_pretrained(base(), path).merge_and_unload(), "llama")
    model_a = PeftModel.from_pretrained(base(), path, low_cpu_mem_usage=True)
    model_b = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model_c = base()
    model_c.load_adapter(path, low_cpu_mem_usage=True)
    for model in (model_a, model_b, model_c):
        adapter_dtypes = {p.dtype for n, p in model.named_parameters() if "gradiend_" in n}
        assert adapter_dtypes == {torch.float32}  # the decoder keeps full precision; only p + delta is cast
        assert torch.equal(logits(model, "llama"), expected)


def test_transformers_save_pretrained_writes_the_same_adapter(bases, tmp_path):
    require_adapter_api()
    path = save_adapter(bases, "gpt2", tmp_path / "adapter")
    model = load_c(bases, "gpt2", path)
    model.save_pretrained(tmp_path / "again")
    original, again = load_file(path / WEIGHTS_NAME), load_file(tmp_path / "again" / WEIGHTS_NAME)
    assert sorted(again) == sorted(original) and all(torch.equal(again[k], original[k]) for k in original)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["peft_type"] == "GRADIEND"


# --- wrong bases and unsupported layouts fail clearly -----------------------------------------------------------------
def test_an_adapter_for_another_architecture_is_refused_by_every_route_before_loading(bases, tmp_path):
    """The config lists the parameters the adapter covers; a base that lacks them is refused at injection."""
    path = save_adapter(bases, "gpt2", tmp_path / "adapter")
    with pytest.raises(ValueError, match="this base model lacks"):
        PeftModel.from_pretrained(fresh(bases, "llama"), path)
    with pytest.raises(ValueError, match="this base model lacks"):
        fresh(bases, "llama").load_adapter(path)


def test_a_deeper_models_adapter_never_applies_part_of_its_edit(bases, tmp_path):
    """A two-layer adapter on a one-layer base of the same family: every route refuses instead of editing layer 0."""
    deep = tiny_model("llama")
    assert deep.config.num_hidden_layers == 2

    def shallow():
        settings = {k: v for k, v in deep.config.to_dict().items() if k != "layer_types"}
        return type(deep)(type(deep.config).from_dict({**settings, "num_hidden_layers": 1})).eval()

    GradiendModel(deep, GradiendConfig(feature_classes=CLASSES, **EDIT)).save_pretrained(tmp_path / "deep")
    for load in (lambda: PeftModel.from_pretrained(shallow(), tmp_path / "deep"),
                 lambda: shallow().load_adapter(tmp_path / "deep"),
                 lambda: GradiendModel.from_pretrained(shallow(), tmp_path / "deep")):
        with pytest.raises(ValueError, match="lacks|has no parameter"):
            load()


def test_an_adapter_saved_without_a_parameter_list_never_runs_as_a_silent_base(bases, tmp_path):
    """Adapters written before `parameters` existed are selected by pattern: the missing tensors are still caught."""
    path = save_adapter(bases, "gpt2", tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    del config["parameters"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="missing adapter keys"):
        model = PeftModel.from_pretrained(fresh(bases, "llama"), path)
    with pytest.raises(RuntimeError, match="never loaded"):
        logits(model, "llama")
    model = fresh(bases, "llama")
    info = model.load_adapter(path)
    assert info.missing_keys
    with pytest.raises(RuntimeError, match="never loaded"):
        logits(model, "llama")


def test_an_adapter_for_another_model_size_is_refused_at_load(bases, tmp_path):
    path = save_adapter(bases, "gpt2", tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="does not fit this base model"):
        PeftModel.from_pretrained(tiny_model("gpt2", hidden=32), path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        tiny_model("gpt2", hidden=32).load_adapter(path)


def test_an_incomplete_adapter_file_is_refused_by_every_loader_with_the_same_reason(bases, tmp_path):
    """One validator (serialization.entry_problems) behind GradiendModel's loader and PEFT's layer loading."""
    from safetensors.torch import save_file

    path = save_adapter(bases, "llama", tmp_path / "adapter")
    tensors = load_file(str(path / WEIGHTS_NAME))
    dropped = next(k for k in tensors if ".gradiend_offset." in k)
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"\['offset'\] tensor\(s\) of .* are missing"):
        GradiendModel.from_pretrained(fresh(bases, "llama"), path)
    with pytest.raises(RuntimeError, match=r"\['offset'\] tensor\(s\) of .* are missing"):
        PeftModel.from_pretrained(fresh(bases, "llama"), path)


def test_adapter_keys_parse_the_same_in_every_form_the_loaders_hand_over():
    from gradiend_hf.serialization import adapter_key, group_adapter_tensors

    t = torch.zeros(1)
    file_form = {adapter_key("model.layers.0.mlp.up_proj.weight", "decoder"): t, adapter_key("scale", "encoder"): t}
    assert list(file_form) == ["base_model.model.model.layers.0.mlp.up_proj.gradiend_decoder.weight",
                               "base_model.model.gradiend_encoder.scale"]
    bare = {k.removeprefix("base_model.model."): v for k, v in file_form.items()}
    named = {"model.layers.0.mlp.up_proj.gradiend_decoder.default.weight": t, "gradiend_encoder.default.scale": t}
    expected = {"model.layers.0.mlp.up_proj.weight": {"decoder": t}, "scale": {"encoder": t}}
    for form in (file_form, bare, named):
        assert group_adapter_tensors(form) == expected
    with pytest.raises(ValueError, match="not one of the GRADIEND kinds"):
        group_adapter_tensors({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": t})


def _tiny_masked(kind):
    """Architectures whose edits PEFT's whole-module wrapping used to miss or refuse (large init so edits show)."""
    from tiny import wordpiece_tokenizer
    from transformers import ConvBertConfig, ConvBertForMaskedLM, DebertaV2Config, DebertaV2ForMaskedLM

    torch.manual_seed(0)
    size = dict(vocab_size=len(wordpiece_tokenizer()), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=24, max_position_embeddings=64, initializer_range=0.1)
    if kind == "convbert":  # SeparableConv1D owns a bias and holds two convolutions with their own weights
        return ConvBertForMaskedLM(ConvBertConfig(embedding_size=16, **size)).eval()
    # DeBERTa-v2 reads rel_embeddings.weight directly instead of calling the embedding module
    return DebertaV2ForMaskedLM(DebertaV2Config(relative_attention=True, position_buckets=8, max_relative_positions=16,
                                                pos_att_type=["p2c", "c2p"], **size)).eval()


@pytest.mark.parametrize("kind", ["convbert", "deberta-v2"])
def test_nested_and_directly_read_parameters_carry_the_edit_through_peft(tmp_path, kind):
    """Route (a), unmerged and merged, equals GradiendModel's merge for the default selection: nested edited modules
    are wrapped inside each other, and a parameter read as `module.weight` is read through the edit."""
    from tiny import wordpiece_tokenizer

    path = tmp_path / "adapter"
    GradiendModel(_tiny_masked(kind), GradiendConfig(feature_classes=CLASSES, **EDIT)).save_pretrained(path)
    ids = wordpiece_tokenizer()(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = _tiny_masked(kind)(**ids).logits
        expected = GradiendModel.from_pretrained(_tiny_masked(kind), path).merge_and_unload()(**ids).logits
        assert not torch.allclose(plain, expected, atol=1e-4)  # the edit shows in the logits
        model = PeftModel.from_pretrained(_tiny_masked(kind), path)
        assert torch.equal(model(**ids).logits, expected)
        assert torch.equal(model.merge_and_unload()(**ids).logits, expected)


def test_a_nested_adapter_loads_through_transformers_loaders_and_state_dict_round_trips(tmp_path):
    """transformers' loaders (b)/(c) match file keys against state_dict() and resolve them by attribute: the tensors of
    a layer nested inside another edited module are named by their clean path (as in the file), so they load, the
    unmerged model equals GradiendModel's merge, and state_dict() loads back into a fresh PeftModel unchanged."""
    from tiny import wordpiece_tokenizer

    path = tmp_path / "adapter"
    GradiendModel(_tiny_masked("convbert"), GradiendConfig(feature_classes=CLASSES, **EDIT)).save_pretrained(path)
    ids = wordpiece_tokenizer()(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = GradiendModel.from_pretrained(_tiny_masked("convbert"), path).merge_and_unload()(**ids).logits
        model = _tiny_masked("convbert")
        model.load_adapter(path)
        keys = [k for k in model.state_dict() if ".gradiend_" in k]
        nested = [k for k in keys if k.endswith("key_conv_attn_layer.depthwise.gradiend_decoder.default.weight")]
        assert nested and not any("base_layer" in k for k in keys)
        assert torch.equal(model(**ids).logits, expected)
        peft_model = PeftModel.from_pretrained(_tiny_masked("convbert"), path)
        peft_model.save_pretrained(tmp_path / "again")  # PEFT's own writer keeps the nested tensors, as the file has
        assert load_file(tmp_path / "again" / "adapter_model.safetensors").keys() == load_file(
            path / "adapter_model.safetensors").keys()
        state = {k: v.clone() for k, v in peft_model.state_dict().items()}
        for v in peft_model.state_dict().values():
            v.zero_() if v.is_floating_point() else None
        peft_model.load_state_dict(state)
        assert torch.equal(peft_model(**ids).logits, expected)


# --- transformers asking for a newer peft than installed --------------------------------------------------------------
def test_an_old_peft_is_refused_naming_both_versions_and_the_fix(bases, tmp_path, monkeypatch):
    """transformers >= 5.24 wants peft >= 0.22 to manage adapters: the refusal names both installed versions and the
    ways out. On the tested lock the versions fit, so a newer minimum is simulated. Loading itself and route (a) still
    work."""
    import importlib.metadata

    import transformers
    import transformers.integrations.peft as integration

    path = save_adapter(bases, "gpt2", tmp_path / "adapter")
    if ADAPTER_API_BLOCKER is None:
        monkeypatch.setattr(integration, "MIN_PEFT_VERSION", "99.0")
        monkeypatch.setattr(integration, "check_peft_version", integration.check_peft_version)  # restored after
        explain_adapter_api_blocker()
    minimum, peft_version = integration.MIN_PEFT_VERSION, importlib.metadata.version("peft")
    expected = reference(bases, "gpt2", path)
    model = load_c(bases, "gpt2", path)
    assert torch.equal(logits(model, "gpt2"), expected)
    for refused in (model.disable_adapters, lambda: model.save_pretrained(tmp_path / "again")):
        with pytest.raises(ValueError) as error:
            refused()
        message = str(error.value)
        assert f"transformers {transformers.__version__}" in message and f"peft {peft_version} is installed" in message
        assert f"peft >= {minimum}" in message and "transformers<5.24" in message
        assert "GradiendModel.from_pretrained" in message and "PeftModel.from_pretrained" in message
    assert torch.equal(logits(load_b(bases, "gpt2", path), "gpt2"), expected)
    assert torch.equal(logits(load_a(bases, "gpt2", path).merge_and_unload(), "gpt2"), expected)
