"""PEFT conventions a user relies on: AutoPeftModel* load a saved GRADIEND adapter (auto_mapping, as PEFT writes it
for a config without task_type), get_peft_model refuses to create an untrainable GRADIEND adapter, GradiendModel has
PEFT's get_base_model()/disable_adapter(), and a base holding PEFT layers is refused with the way out."""

import json

import pytest
import torch
from test_peft_integration import CLASSES, EDIT, fresh, logits, reference, save_adapter
from tiny import tiny_model

import gradiend_hf  # noqa: F401  (registers GRADIEND with PEFT)
from gradiend_hf import GradiendConfig, GradiendModel
from peft import AutoPeftModel, AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    for kind in ("llama", "bert"):
        tiny_model(kind).save_pretrained(root / kind)
    return root


def test_the_saved_config_names_the_base_class_as_peft_does(bases, tmp_path):
    path = save_adapter(bases, "llama", tmp_path / "adapter")
    mapping = json.loads((path / "adapter_config.json").read_text())["auto_mapping"]
    assert mapping == {"base_model_class": "LlamaForCausalLM",
                       "parent_library": "transformers.models.llama.modeling_llama"}


@pytest.mark.parametrize("kind, auto", [("llama", AutoPeftModelForCausalLM), ("llama", AutoPeftModel),
                                        ("bert", AutoPeftModel)])
def test_auto_peft_models_load_the_adapter_and_its_base(bases, tmp_path, kind, auto):
    path = save_adapter(bases, kind, tmp_path / "adapter")
    model = auto.from_pretrained(path).eval()
    assert isinstance(model, PeftModel)
    assert torch.equal(logits(model, kind), reference(bases, kind, path))


def test_get_peft_model_refuses_a_fresh_gradiend_config_and_points_to_get_gradiend_model():
    with pytest.raises(ValueError, match="get_gradiend_model"):
        get_peft_model(tiny_model("llama"), GradiendConfig(feature_classes=CLASSES))


def test_disable_adapter_runs_the_unedited_base_inside_apply_edit():
    base = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    model = GradiendModel(base, GradiendConfig(feature_classes=CLASSES))
    assert model.get_base_model() is base
    with torch.no_grad(), model.apply_edit(feature_factor=1.0, learning_rate=0.5):
        edited = base(input_ids=ids).logits
        assert not torch.equal(edited, plain)
        with model.disable_adapter():
            assert torch.equal(base(input_ids=ids).logits, plain)
        assert torch.equal(base(input_ids=ids).logits, edited)  # re-applied exactly
        with model.apply_edit(feature_factor=-1.0, learning_rate=0.5), model.disable_adapter():
            assert torch.equal(base(input_ids=ids).logits, plain)  # nested edits are all lifted
        assert torch.equal(base(input_ids=ids).logits, edited)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(base(input_ids=ids).logits, plain)
    assert torch.equal(base(input_ids=ids).logits, plain)


def test_a_base_with_peft_layers_is_refused_with_the_way_out(bases, tmp_path):
    path = save_adapter(bases, "llama", tmp_path / "adapter")
    lora = get_peft_model(fresh(bases, "llama"), LoraConfig(target_modules=["q_proj"], r=2))
    for make in (lambda: GradiendModel(lora, GradiendConfig(feature_classes=CLASSES, **EDIT)),
                 lambda: GradiendModel.from_pretrained(lora, path),
                 lambda: GradiendModel.from_pretrained(lora.get_base_model(), path)):
        with pytest.raises(ValueError, match=r"merge_and_unload\(\)"):
            make()
    plain = lora.merge_and_unload()  # the documented way out works
    GradiendModel.from_pretrained(plain, path)


def test_an_offloaded_base_is_refused_before_any_work_and_a_device_map_is_exposed():
    base = tiny_model("llama")
    base.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(torch.empty(24, 16, device="meta"))
    with pytest.raises(ValueError, match=r"offloaded .*model\.layers\.1\.mlp\.up_proj\.weight.*exclude_parameters"):
        GradiendModel(base, GradiendConfig(feature_classes=CLASSES))
    model = GradiendModel(base, GradiendConfig(feature_classes=CLASSES, exclude_parameters=[r"layers\.1\.mlp"]))
    assert not hasattr(model, "hf_device_map")  # as on a plain model: accelerate tests hasattr, then len()
    base.hf_device_map = {"model.embed_tokens": 0, "model.layers": "cpu"}
    assert model.hf_device_map == base.hf_device_map  # the Trainer sees it and leaves the placement alone
