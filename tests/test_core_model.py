"""GradiendModel: selection, the auto-encoder, editing (merge / context / unload), config, save and load."""

import json
import math

import pytest
import torch
from tiny import CAUSAL, MASKED, rows, tiny_model, tokenizer_for

from gradiend_hf import Edit, GradiendConfig, GradiendDataCollator, GradiendModel, get_gradiend_model
from gradiend_hf.serialization import WEIGHTS_NAME

CLASSES = ["female", "male"]


def wrap(kind="gpt2", **config):
    model = tiny_model(kind)
    return model, get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES, **config))


def state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


# --- selection -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MASKED + CAUSAL)
def test_default_selection_is_the_backbone_without_head_or_tied_weights(kind):
    model, gradiend = wrap(kind)
    head = {p.data_ptr() for p in model.get_output_embeddings().parameters()}
    prefix = model.base_model_prefix + "."
    expected = [n for n, p in model.named_parameters() if n.startswith(prefix) and p.data_ptr() not in head]
    assert gradiend.bottleneck.names == expected
    assert gradiend.num_entries == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert gradiend.objective == ("masked_lm" if kind in MASKED else "causal_lm")


def test_patterns_select_and_exclude_and_bad_patterns_explain():
    _, gradiend = wrap("llama", target_parameters=[r"layers\.1\."], exclude_parameters=["norm"])
    assert gradiend.bottleneck.names and all(".layers.1." in n and "norm" not in n for n in gradiend.bottleneck.names)
    with pytest.raises(ValueError, match="No base parameter matches"):
        wrap("llama", target_parameters=["no_such_module"])


def test_base_is_frozen_and_stays_in_eval_mode_when_training():
    model, gradiend = wrap("bert")
    gradiend.train()
    assert not model.training and gradiend.bottleneck.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in gradiend.bottleneck.parameters())
    assert ({id(p) for p in gradiend.parameters() if p.requires_grad}
            == {id(p) for p in gradiend.bottleneck.parameters()})


# --- the auto-encoder ------------------------------------------------------------------------------------------
def test_initialisation_follows_the_paper():
    _, gradiend = wrap("gpt2")
    b = gradiend.bottleneck
    bound = 1 / math.sqrt(b.num_entries)
    enc = torch.cat([b.encoder(n).reshape(-1) for n in b.names])
    dec = torch.cat([b.decoder(n).reshape(-1) for n in b.names] + [b.offset(n).reshape(-1) for n in b.names])
    assert enc.abs().max() <= bound and enc.abs().max() > 0.9 * bound
    assert dec.abs().max() <= enc.abs().max() and dec.abs().max() > 0.9 * enc.abs().max()
    assert enc.mean().abs() < 0.05 * bound


def test_forward_loss_is_the_mse_of_a_naive_flat_autoencoder():
    """Oracle: concatenate source/target into flat vectors and compute tanh(w.s+b), W_d h + b_d, MSE by hand."""
    _, gradiend = wrap("gpt2")
    batch = GradiendDataCollator(tokenizer_for("gpt2"), "causal_lm", CLASSES)(rows())
    out = gradiend(**batch)
    grads = gradiend.engine.compute(batch, ("alternative", "diff"))
    b = gradiend.bottleneck
    flat = lambda d: torch.cat([d[n].reshape(-1) for n in b.names])
    s, t = flat(grads["alternative"]), flat(grads["diff"])
    w_e = torch.cat([b.encoder(n).detach().reshape(-1) for n in b.names])
    w_d = torch.cat([b.decoder(n).detach().reshape(-1) for n in b.names])
    b_d = torch.cat([b.offset(n).detach().reshape(-1) for n in b.names])
    h = torch.tanh(w_e @ s + b.encoder_bias.detach()[0])
    expected = ((w_d * h + b_d - t) ** 2).mean()
    torch.testing.assert_close(out.encoded, h.reshape(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-12)


def test_flipping_the_sign_keeps_the_reconstruction_and_negates_h():
    _, gradiend = wrap("gpt2")
    batch = GradiendDataCollator(tokenizer_for("gpt2"), "causal_lm", CLASSES)(rows())
    before = gradiend(**batch)
    gradiend.bottleneck.flip_sign()
    after = gradiend(**batch)
    torch.testing.assert_close(after.encoded, -before.encoded)
    torch.testing.assert_close(after.loss, before.loss)


# --- editing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_merge_applies_exactly_lr_times_decoder_on_selected_parameters_only(kind):
    model, gradiend = wrap(kind, target_parameters=[r"(layer|layers|\.h)\.0\."])
    original = state(model)
    b = gradiend.bottleneck
    ff, lr = -0.7, 0.05
    expected = {n: original[n] + lr * (b.decoder(n).detach()[0] * ff + b.offset(n).detach()) for n in b.names}
    merged = gradiend.merge_and_unload(feature_factor=ff, learning_rate=lr)
    assert merged is model
    after = merged.state_dict()
    for name, value in after.items():
        if name in expected:
            assert torch.equal(value, expected[name]), name
        else:
            assert torch.equal(value, original[name]), name
    assert type(merged).__name__ == type(model).__name__ and not hasattr(merged, "bottleneck")


def test_temporary_edit_matches_merge_and_restores_bit_exactly():
    model, gradiend = wrap("llama")
    batch = GradiendDataCollator(tokenizer_for("llama"), "causal_lm", CLASSES)(rows())
    inputs = {"input_ids": batch["factual_input_ids"], "attention_mask": batch["factual_attention_mask"]}
    original = state(model)
    with torch.no_grad():
        base_logits = model(**inputs).logits
        with gradiend.apply_edit(Edit(feature_factor=1.0, learning_rate=0.5)):
            edited_logits = model(**inputs).logits
        assert all(torch.equal(v, original[n]) for n, v in model.state_dict().items())
        assert torch.equal(model(**inputs).logits, base_logits)
        merged = gradiend.merge_and_unload(Edit(feature_factor=1.0, learning_rate=0.5))
        assert torch.equal(merged(**inputs).logits, edited_logits)
    assert not torch.equal(edited_logits, base_logits)


def test_editor_tries_many_edits_without_drift():
    model, gradiend = wrap("gpt2")
    original = state(model)
    editor = gradiend.editor()
    for lr in (1e-3, 1.0, 100.0, -5.0):
        editor.apply(1.0, lr)
    editor.apply(0.0, 0.0)
    assert all(torch.equal(v, original[n]) for n, v in model.state_dict().items())
    editor.restore()
    assert all(torch.equal(v, original[n]) for n, v in model.state_dict().items())


def test_unload_returns_the_untouched_base_and_releases_it():
    model = tiny_model("bert")
    original = state(model)
    model.train()  # the user's flags are restored on unload
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES))
    base = gradiend.unload()
    assert base is model and base.training
    assert all(p.requires_grad for p in base.parameters())
    assert all(torch.equal(v, original[n]) for n, v in base.state_dict().items())
    with pytest.raises(RuntimeError, match="unloaded"):
        gradiend.merge_and_unload(feature_factor=1.0, learning_rate=1.0)


def test_merge_without_an_edit_uses_the_stored_one_or_explains():
    _, gradiend = wrap("gpt2")
    with pytest.raises(ValueError, match="No edit given"):
        gradiend.merge_and_unload()
    model, gradiend = wrap("gpt2", feature_factor=1.0, learning_rate=0.1)
    original = state(model)
    name = gradiend.bottleneck.names[0]
    expected = original[name] + 0.1 * (gradiend.bottleneck.decoder(name).detach()[0]
                                       + gradiend.bottleneck.offset(name).detach())
    assert torch.equal(gradiend.merge_and_unload().state_dict()[name], expected)


# --- config ----------------------------------------------------------------------------------------------------
def test_config_json_round_trip_and_validation():
    config = GradiendConfig(feature_classes=["singular", "plural"], source="diff", target_parameters=r"layers\.3\.")
    again = GradiendConfig.from_dict(json.loads(config.to_json_string()))
    assert again == config and again.target_parameters == [r"layers\.3\."]
    assert json.loads(config.to_json_string())["peft_type"] == "GRADIEND"
    for bad, message in [
        (dict(feature_classes=["a"]), "ordered pair"),
        (dict(feature_classes=["a", "a"]), "two different"),
        (dict(feature_classes=["a", "b"], source="grad"), "source='grad' is not allowed"),
        (dict(feature_classes=["a", "b"], objective="seq2seq"), "objective"),
        (dict(feature_classes=["a", "b"], latent_dim=0), "latent_dim"),
        (dict(feature_classes=["a", "b"], feature_factor=1.0), "both"),
        (dict(), "needs feature_classes"),
    ]:
        with pytest.raises(ValueError, match=message):
            GradiendConfig(**bad)
    with pytest.raises(ValueError, match="Unknown GradiendConfig keys"):
        GradiendConfig.from_dict({**config.to_dict(), "lerning_rate": 1})


# --- save / load -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_save_load_round_trip_is_exact(tmp_path, kind):
    model, gradiend = wrap(kind)
    with torch.no_grad():
        gradiend.bottleneck.encoder_bias.fill_(0.123456789)
    batch = GradiendDataCollator(tokenizer_for(kind), gradiend.objective, CLASSES)(rows())
    h, h_rows, dec = gradiend.encode(batch), gradiend.encode_rows(batch), gradiend.decode(0.5)
    gradiend.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                        WEIGHTS_NAME]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    loaded = GradiendModel.from_pretrained(tiny_model(kind), tmp_path / "adapter")
    assert torch.equal(loaded.encode(batch), h)
    assert torch.equal(loaded.encode_rows(batch), h_rows)
    assert all(torch.equal(v, dec[n]) for n, v in loaded.decode(0.5).items())
    assert loaded.gradiend_config.to_dict() == gradiend.saved_config().to_dict()
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: gradiend_hf" in card and "female" in card


def test_adapter_keys_follow_peft_layout(tmp_path):
    from safetensors.torch import load_file

    _, gradiend = wrap("llama", target_parameters=[r"layers\.0\.mlp\.up_proj"])
    gradiend.save_pretrained(tmp_path)
    assert sorted(load_file(tmp_path / WEIGHTS_NAME)) == [
        "base_model.model.model.layers.0.mlp.up_proj.gradiend_decoder.weight",
        "base_model.model.model.layers.0.mlp.up_proj.gradiend_encoder.weight",
        "base_model.model.model.layers.0.mlp.up_proj.gradiend_offset.weight",
    ]


def test_saving_over_an_existing_adapter_replaces_it(tmp_path):
    _, first = wrap("gpt2", init_seed=1)
    _, second = wrap("gpt2", init_seed=2)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "a")
    loaded = GradiendModel.from_pretrained(tiny_model("gpt2"), tmp_path / "a")
    name = second.bottleneck.names[0]
    assert torch.equal(loaded.bottleneck.encoder(name), second.bottleneck.encoder(name))


def test_loading_onto_the_wrong_base_fails_clearly(tmp_path):
    _, gradiend = wrap("gpt2")
    gradiend.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="has no parameter"):
        GradiendModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    with pytest.raises(ValueError, match="same size"):
        GradiendModel.from_pretrained(tiny_model("gpt2", hidden=32), tmp_path / "a")


def test_damaged_or_missing_files_fail_clearly(tmp_path):
    _, gradiend = wrap("gpt2")
    gradiend.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged or incomplete"):
        GradiendModel.from_pretrained(tiny_model("gpt2"), tmp_path / "a")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        GradiendModel.from_pretrained(tiny_model("gpt2"), tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text("{not json")
    (tmp_path / "b" / WEIGHTS_NAME).write_bytes(data)
    with pytest.raises(ValueError, match="not valid JSON"):
        GradiendModel.from_pretrained(tiny_model("gpt2"), tmp_path / "b")


def test_an_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    _, first = wrap("gpt2", init_seed=1)
    _, second = wrap("gpt2", init_seed=2)
    first.save_pretrained(tmp_path / "a")
    import gradiend_hf.model as model_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_module, "save_tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path / "a")
    loaded = GradiendModel.from_pretrained(tiny_model("gpt2"), tmp_path / "a")
    name = first.bottleneck.names[0]
    assert torch.equal(loaded.bottleneck.encoder(name), first.bottleneck.encoder(name))
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_models_no_objective_can_score_are_refused_before_any_work_naming_why():
    """XLNet (a 'causal LM' that attends both ways), Nystromformer (fixed input length) and encoder-decoder models."""
    from transformers import (NystromformerConfig, NystromformerForMaskedLM, T5Config, T5ForConditionalGeneration,
                              XLNetConfig, XLNetLMHeadModel)

    models = {
        "attends both ways": XLNetLMHeadModel(XLNetConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, d_inner=16)),
        "one fixed length": NystromformerForMaskedLM(NystromformerConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)),
        "encoder-decoder": T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, num_layers=1, num_heads=2,
                                                               d_ff=16, d_kv=8)),
    }
    for reason, model in models.items():
        with pytest.raises(ValueError, match=reason):
            get_gradiend_model(model, GradiendConfig(feature_classes=["female", "male"]))
