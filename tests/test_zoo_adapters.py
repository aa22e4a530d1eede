"""The zoo (zoo_models.py), saved and loaded: every architecture's DEFAULT parameter selection as a GRADIEND adapter
with a stored edit, through GradiendModel and the three PEFT routes, against a merge computed by hand.

Per architecture, once: the tiny base is saved to a folder and reloaded from it (so adapter_config.json names a
resolvable base_model_name_or_path), wrapped with GradiendConfig(feature_classes, feature_factor, learning_rate) (no
target_parameters: the default selection), its decoder tensors drawn large enough for the edit to show, and saved.
The oracle: a fresh base from the folder whose selected parameters are set to theta + lr * (W_d * ff + b_d) here (from
the tensors as they were before saving), then one plain forward on a padded batch of two texts. Every check below
asserts the edit moves the logits far beyond the tolerance, so a route that drops the edit fails.

- save/load: GradiendModel.from_pretrained(fresh base, dir) holds the same tensors (names in order, W_e, W_d, b_d, b_e)
  and the stored edit; apply_edit (unmerged) and merge_and_unload (merged) give the oracle's logits and weights.
- (a) peft.PeftModel.from_pretrained(fresh base, dir): unmerged logits, disable_adapter() gives the base, merged.
- (b) AutoModelFor{CausalLM,MaskedLM}.from_pretrained(dir): the base class named in the config, GRADIEND layers,
  unmerged logits, merged (merge_and_unload_gradiend).
- (c) fresh base .load_adapter(dir): no missing/unexpected keys, unmerged logits, disable_adapters() gives the base
  (when the installed transformers/peft pair allows managing adapters), merged.
Merged weights must equal the oracle's on the selected parameters and the fresh base's everywhere else.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
from transformers import logging as hf_logging
from zoo_models import SPECS, build, tokenizer_of

import gradiend_hf  # noqa: F401  (registers GRADIEND with PEFT)
from gradiend_hf import GradiendConfig, GradiendModel
from gradiend_hf.compatibility import adapter_api_blocker
from gradiend_hf.peft_integration import GradiendLayer, merge_and_unload_gradiend
from peft import PeftModel

CLASSES = ["female", "male"]
EDIT = dict(feature_factor=-1.0, learning_rate=0.3)
TEXTS = ["the nurse said that she was in her room and the doctor went home", "he said it was bad"]
AUTO = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM}
VISIBLE = 1e-2  # the edit must move some logit by more than this (the tolerance below is ~1e-5 of the logits)


def auto(name):
    return AUTO[SPECS[name][0]]


class Saved:
    """One architecture's saved base and adapter, and the oracle computed from them."""

    def __init__(self, root, name):
        self.name = name
        self.base_dir, self.adapter_dir = root / name / "base", root / name / "adapter"
        build(name).save_pretrained(self.base_dir)
        self.inputs = tokenizer_of(name)(TEXTS, return_tensors="pt", padding=True)
        base = self.fresh()
        gradiend = GradiendModel(base, GradiendConfig(feature_classes=CLASSES, **EDIT))  # the default selection
        b = gradiend.bottleneck
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n in b.names:
                b.decoder(n).copy_(torch.randn(b.decoder(n).shape, generator=generator) * 0.1)
                b.offset(n).copy_(torch.randn(b.offset(n).shape, generator=generator) * 0.1)
            b.encoder_bias.fill_(0.25)
        self.names = list(b.names)
        self.tensors = {n: (b.encoder(n).detach().clone(), b.decoder(n).detach().clone(), b.offset(n).detach().clone())
                        for n in self.names}
        self.encoder_bias = b.encoder_bias.detach().clone()
        gradiend.save_pretrained(self.adapter_dir)
        config = json.loads((self.adapter_dir / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(self.base_dir)  # route (b) loads the base from there

        plain = self.fresh()
        self.plain_params = {n: p.detach().clone() for n, p in plain.named_parameters()}
        self.plain_logits = self.logits(plain)
        ff, lr = EDIT["feature_factor"], EDIT["learning_rate"]
        self.expected = {n: self.plain_params[n] + lr * (self.tensors[n][1][0] * ff + self.tensors[n][2])
                         for n in self.names}
        params = dict(plain.named_parameters())
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(self.expected[n])
        self.edited_logits = self.logits(plain)
        assert torch.isfinite(self.plain_logits).all() and torch.isfinite(self.edited_logits).all()
        assert (self.edited_logits - self.plain_logits).abs().max() > VISIBLE  # the edit shows: checks can fail

    def fresh(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return auto(self.name).from_pretrained(self.base_dir).eval()

    @torch.no_grad()
    def logits(self, model):
        return model(**self.inputs).logits

    def assert_edited(self, model):
        expected = self.edited_logits
        got = self.logits(model)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))

    def assert_plain(self, model):
        expected = self.plain_logits
        torch.testing.assert_close(self.logits(model), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))

    def assert_merged_weights(self, model):
        """The selected parameters hold theta + lr * dec(ff); every other parameter is the fresh base's."""
        params = dict(model.named_parameters())
        assert set(params) == set(self.plain_params)
        for n, p in params.items():
            want = self.expected[n] if n in self.expected else self.plain_params[n]
            torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """name -> Saved, built on first use and shared by the tests of that architecture."""
    root, cache = tmp_path_factory.mktemp("zoo_adapters"), {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load reports (tied weights, unused buffers) are not under test

    def get(name):
        if name not in cache:
            cache[name] = Saved(root, name)
        return cache[name]

    yield get
    hf_logging.set_verbosity(verbosity)


NAMES = list(SPECS)


@pytest.mark.parametrize("name", NAMES)
def test_zoo_save_and_load_reproduce_the_adapter_and_the_hand_merged_model(zoo, name):
    saved = zoo(name)
    loaded = GradiendModel.from_pretrained(saved.fresh(), saved.adapter_dir)
    b = loaded.bottleneck
    assert list(b.names) == saved.names
    for n in saved.names:
        encoder, decoder, offset = saved.tensors[n]
        assert torch.equal(b.encoder(n).detach(), encoder), n
        assert torch.equal(b.decoder(n).detach(), decoder), n
        assert torch.equal(b.offset(n).detach(), offset), n
        assert b.indices[n] is None
    assert torch.equal(b.encoder_bias.detach(), saved.encoder_bias)
    config = loaded.gradiend_config
    assert (config.feature_factor, config.learning_rate) == (EDIT["feature_factor"], EDIT["learning_rate"])
    assert config.target_parameters is None
    with loaded.apply_edit():  # the stored edit, unmerged
        saved.assert_edited(loaded.get_base_model())
    saved.assert_plain(loaded.get_base_model())  # reverted
    merged = loaded.merge_and_unload()  # the stored edit, merged
    saved.assert_merged_weights(merged)
    saved.assert_edited(merged)


@pytest.mark.parametrize("name", NAMES)
def test_zoo_a_peft_model_from_pretrained_unmerged_and_merged(zoo, name):
    saved = zoo(name)
    model = PeftModel.from_pretrained(saved.fresh(), saved.adapter_dir)
    assert any(isinstance(m, GradiendLayer) for m in model.modules())
    saved.assert_edited(model)
    with model.disable_adapter():
        saved.assert_plain(model)
    saved.assert_edited(model)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == SPECS[name][1]
    assert not any(isinstance(m, GradiendLayer) for m in merged.modules())
    saved.assert_merged_weights(merged)
    saved.assert_edited(merged)


@pytest.mark.parametrize("name", NAMES)
def test_zoo_b_auto_model_from_the_adapter_folder_unmerged_and_merged(zoo, name):
    saved = zoo(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto(name).from_pretrained(saved.adapter_dir).eval()
    assert type(model).__name__ == SPECS[name][1]
    assert any(isinstance(m, GradiendLayer) for m in model.modules())
    saved.assert_edited(model)
    merged = merge_and_unload_gradiend(model)
    assert not any(isinstance(m, GradiendLayer) for m in merged.modules())
    saved.assert_merged_weights(merged)
    saved.assert_edited(merged)


@pytest.mark.parametrize("name", NAMES)
def test_zoo_c_load_adapter_unmerged_and_merged(zoo, name):
    saved = zoo(name)
    model = saved.fresh()
    info = model.load_adapter(saved.adapter_dir)
    if info is not None:
        assert not info.missing_keys and not info.unexpected_keys and not info.mismatched_keys
    assert any(isinstance(m, GradiendLayer) for m in model.modules())
    saved.assert_edited(model)
    if adapter_api_blocker() is None:  # transformers manages adapters only with a peft it accepts
        model.disable_adapters()
        saved.assert_plain(model)
        model.enable_adapters()
        saved.assert_edited(model)
    merged = merge_and_unload_gradiend(model)
    assert not any(isinstance(m, GradiendLayer) for m in merged.modules())
    saved.assert_merged_weights(merged)
    saved.assert_edited(merged)
