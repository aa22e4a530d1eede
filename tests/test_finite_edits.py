"""Edits refuse NaN/inf: an edit whose weights would not be finite raises before it changes anything, on every path
that writes an edit (merge, temporary edits, the grid's editor, the PEFT layer's forward and merge)."""

import math

import pytest
import torch
from tiny import tiny_model

from gradiend_hf import GradiendConfig, GradiendModel
from gradiend_hf.edit import NonFiniteEdit
from gradiend_hf.peft_integration import set_gradiend_edit
from peft import PeftModel

CLASSES = ["female", "male"]
HUGE = dict(feature_factor=1e30, learning_rate=1e30)  # finite settings, float32 overflow in the product


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def unchanged(model, before):
    return all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def adapter(dtype=torch.float32):
    base = tiny_model("llama").to(dtype)
    return GradiendModel(base, GradiendConfig(feature_classes=CLASSES)), base


@pytest.mark.parametrize("settings, error", [(HUGE, NonFiniteEdit), (dict(feature_factor=math.inf, learning_rate=1.0),
                                                                    ValueError),
                                              (dict(feature_factor=1.0, learning_rate=math.nan), ValueError)])
def test_merge_refuses_a_non_finite_edit_and_keeps_the_model_whole(settings, error):
    model, base = adapter()
    before = snapshot(base)
    with pytest.raises(error, match="finite|NaN or infinite"):
        model.merge_and_unload(**settings)
    assert unchanged(base, before) and model.get_base_model() is base  # not unloaded, nothing written
    assert model.gradiend_config.feature_factor is None  # the refused edit was not recorded
    merged = model.merge_and_unload(feature_factor=1.0, learning_rate=1e-3)  # a sane edit still works
    assert not unchanged(merged, before)


def test_float16_overflow_is_caught_although_the_float32_delta_is_finite():
    model, base = adapter(torch.float16)
    before = snapshot(base)
    with pytest.raises(NonFiniteEdit, match="float16"):
        model.merge_and_unload(feature_factor=1.0, learning_rate=1e9)  # |delta| ~ 1e9 * |W_d| (~1e-2) > 65504
    assert unchanged(base, before)


def test_temporary_edits_and_the_grid_editor_restore_and_raise():
    model, base = adapter()
    before = snapshot(base)
    with pytest.raises(NonFiniteEdit):
        with model.apply_edit(**HUGE):
            pass
    assert unchanged(base, before)
    editor = model.editor()
    with pytest.raises(NonFiniteEdit):
        editor.apply(**HUGE)
    assert unchanged(base, before)
    editor.apply(1.0, 1e-3)
    assert not unchanged(base, before)
    editor.restore()
    assert unchanged(base, before)


def test_the_peft_layer_refuses_a_non_finite_edit_in_forward_and_merge(tmp_path):
    model, _ = adapter()
    model.save_pretrained(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter", feature_factor=1.0,
                                           learning_rate=1e-3)
    set_gradiend_edit(peft_model, **HUGE)
    before = snapshot(peft_model.get_base_model())
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(NonFiniteEdit):
        peft_model(input_ids=ids)
    with pytest.raises(NonFiniteEdit):
        peft_model.merge_and_unload()
    assert unchanged(peft_model.get_base_model(), before)
    with pytest.raises(ValueError, match="finite"):
        set_gradiend_edit(peft_model, feature_factor=math.inf, learning_rate=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_agrees_with_isfinite_everywhere(dtype):
    from gradiend_hf.edit import all_finite

    values = torch.randn(257).to(dtype)
    assert all_finite(values) and all_finite(values[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 128, 256):
            broken = values.clone()
            broken[where] = bad
            assert all_finite(broken) == bool(torch.isfinite(broken).all()) is False
