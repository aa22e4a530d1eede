"""GradiendTrainer keeps the transformers Trainer contract: every TrainingArguments flag works as it does with
transformers' Trainer or is refused at construction, naming the flag and what to do instead.

Oracles: gradients computed row by row by hand (under torch.autocast for bf16), hand-written optimizer steps, autograd's
gradient norm, token counts from tokenising the rows' texts, encoder values from the naive gradient of each row alone,
and the files the fake Hub received (tests/fakehub.py)."""

import json
import logging

import numpy as np
import pytest
import torch
from oracle import causal_text_ids, masked_text_ids, naive_gradients
from test_trainer import CLASSES, CONTEXTS, feature_rows, flat_bottleneck
from tiny import tiny_model, tokenizer_for
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PredictionOutput

from gradiend_hf import GradiendConfig, GradiendDataCollator, GradiendModel, get_gradiend_model
from gradiend_hf.base_passes import base_passes, checkpointable_layers
from gradiend_hf.trainer import GradiendTrainer, GradiendTrainingArguments

OBJECTIVE = {"bert": "masked_lm", "gpt2": "causal_lm", "llama": "causal_lm"}


def arguments(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "run"), disable_tqdm=True, seed=0, max_steps=1, learning_rate=1e-3,
                    per_device_train_batch_size=1, eval_strategy="no", save_strategy="no",
                    load_best_model_at_end=False, logging_steps=1)
    settings.update(overrides)
    return GradiendTrainingArguments(**settings)


def trainer_for(tmp_path, kind="gpt2", rows=None, eval_rows=None, config=None, **overrides):
    model = get_gradiend_model(tiny_model(kind), config or GradiendConfig(feature_classes=CLASSES, init_seed=1))
    callbacks = overrides.pop("callbacks", None)
    return GradiendTrainer(model=model, args=arguments(tmp_path, **overrides),
                           train_dataset=rows if rows is not None else feature_rows(CONTEXTS[:2]),
                           eval_dataset=eval_rows, processing_class=tokenizer_for(kind), callbacks=callbacks)


row_gradients = naive_gradients  # per row, optionally under autocast (oracle.py)


def flat(grads, names):
    return torch.cat([grads[n].reshape(-1) for n in names])


def relative(a, b):
    return float((a - b).norm() / b.norm())


def reference_adamw_step(model, grads_alternative, grads_factual, lr=1e-3):
    """The bottleneck after one hand-written AdamW step (source = alternative, target = diff, as by default), and
    the norm of its gradient (autograd over flat vectors)."""
    b = model.bottleneck
    names = b.names
    w_e = torch.cat([b.encoder(n).detach().reshape(-1) for n in names]).clone().requires_grad_()
    b_e = b.encoder_bias.detach().clone().requires_grad_()
    w_d = torch.cat([b.decoder(n).detach().reshape(-1) for n in names]).clone().requires_grad_()
    b_d = torch.cat([b.offset(n).detach().reshape(-1) for n in names]).clone().requires_grad_()
    s = flat(grads_alternative, names)
    t = flat(grads_factual, names) - s
    loss = ((w_d * torch.tanh(w_e @ s + b_e) + b_d - t) ** 2).mean()
    loss.backward()
    norm = float(torch.cat([p.grad.reshape(-1) for p in (w_e, b_e, w_d, b_d)]).norm())
    torch.optim.AdamW([w_e, b_e, w_d, b_d], lr=lr, weight_decay=0.01).step()
    return torch.cat([w_e.detach(), w_d.detach(), b_d.detach(), b_e.detach()]), norm


def bottleneck_vector(model):
    b = model.bottleneck
    parts = [b.encoder(n) for n in b.names] + [b.decoder(n) for n in b.names] + [b.offset(n) for n in b.names]
    return torch.cat([p.detach().reshape(-1) for p in parts] + [b.encoder_bias.detach()])


# --- refused at construction ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, named", [
    (dict(fp16=True, use_cpu=True), r"fp16=True: .*bf16=True"),
    (dict(bf16_full_eval=True, use_cpu=True), r"bf16_full_eval=True: .*dtype=torch.bfloat16"),
    (dict(fp16_full_eval=True), r"fp16_full_eval=True"),
    (dict(torch_compile=True), r"torch_compile=True .*Leave torch_compile"),
    (dict(torch_compile_mode="reduce-overhead"), r"torch_compile=True \(also implied by .*torch_compile_mode\)"),
    (dict(neftune_noise_alpha=5.0), r"neftune_noise_alpha=5.0: .*Leave it unset"),
    (dict(optim="galore_adamw"), r"optim='galore_adamw': .*adamw_torch_fused"),
    (dict(optim="lomo"), r"optim='lomo'"),
    (dict(label_smoothing_factor=0.1), r"label_smoothing_factor=0.1"),
    (dict(train_sampling_strategy="sequential"), r"train_sampling_strategy='sequential'"),
    (dict(use_liger_kernel=True), r"use_liger_kernel=True"),
    (dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}), r"use_reentrant"),
    (dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"offload": True}), r"'offload': True"),
])
def test_flags_that_cannot_work_are_refused_at_construction_naming_the_flag(tmp_path, flags, named):
    with pytest.raises(ValueError, match=named):
        trainer_for(tmp_path, **flags)


def test_trainer_arguments_without_a_place_in_gradiend_are_refused(tmp_path):
    model = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=CLASSES))
    with pytest.raises(ValueError, match="compute_loss_func=...: GRADIEND's loss is the bottleneck's"):
        GradiendTrainer(model=model, args=arguments(tmp_path), train_dataset=feature_rows(CONTEXTS[:2]),
                        processing_class=tokenizer_for("gpt2"), compute_loss_func=lambda *a, **k: 0)


def test_an_optimizer_whose_package_is_missing_is_refused_at_construction(tmp_path):
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="optim='adamw_bnb_8bit': .*bitsandbytes"):
        trainer_for(tmp_path, optim="adamw_bnb_8bit")


# --- mixed precision: autocast of the base's passes, the bottleneck float32 --------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_bf16_gathered_gradients_equal_a_naive_autocast_computation_and_differ_from_float32(kind):
    model = get_gradiend_model(tiny_model(kind), GradiendConfig(feature_classes=CLASSES))
    collator = GradiendDataCollator(tokenizer_for(kind), model.objective, CLASSES)
    row = feature_rows(CONTEXTS[:1])[:1]
    names = model.bottleneck.names
    with base_passes(model.get_base_model(), torch.bfloat16):
        mixed = flat(model.engine.compute(collator(row), ("alternative",))["alternative"], names).clone()
    plain = flat(model.engine.compute(collator(row), ("alternative",))["alternative"], names).clone()
    base, tokenizer = model.get_base_model(), tokenizer_for(kind)
    naive_mixed = flat(row_gradients(base, tokenizer, OBJECTIVE[kind], row, "alternative", names, torch.bfloat16),
                       names)
    naive_plain = flat(row_gradients(base, tokenizer, OBJECTIVE[kind], row, "alternative", names), names)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, naive_mixed, rtol=1e-5, atol=1e-7)  # what autocast computes ...
    torch.testing.assert_close(plain, naive_plain, rtol=1e-5, atol=1e-7)
    assert relative(mixed, naive_plain) > 1e-3  # ... which is not float32's gradient
    # the context ends with the step: afterwards the model runs in float32 again
    again = flat(model.engine.compute(collator(row), ("alternative",))["alternative"], names)
    assert torch.equal(again, plain)


@pytest.mark.parametrize("step", ["fused", "plain"])
def test_bf16_training_steps_on_autocast_gradients_and_keeps_the_bottleneck_float32(tmp_path, step):
    """One step with bf16=True (fused, and plain via a never-reached clipping norm) equals a hand-written AdamW step
    on gradients computed under torch.autocast(bfloat16); it differs from the float32 step."""
    row = feature_rows(CONTEXTS[:1])[:1]
    clip = 0.0 if step == "fused" else 1e9
    trainer = trainer_for(tmp_path, rows=row, bf16=True, use_cpu=True, max_grad_norm=clip)
    model = trainer.gradiend_model
    base, tokenizer, names = model.get_base_model(), tokenizer_for("gpt2"), model.bottleneck.names
    grads = {side: row_gradients(base, tokenizer, "causal_lm", row, side, names, torch.bfloat16)
             for side in ("alternative", "factual")}
    expected, _ = reference_adamw_step(model, grads["alternative"], grads["factual"])
    trainer.train()
    assert trainer.uses_fused_step() == (step == "fused")
    assert not trainer.accelerator.native_amp  # accelerate does not autocast the whole GradiendModel
    torch.testing.assert_close(bottleneck_vector(model), expected, rtol=1e-5, atol=1e-6)
    assert all(p.dtype == torch.float32 for p in model.bottleneck.parameters())
    assert all(v.dtype == torch.float32 for state in trainer.optimizer.state.values() for v in state.values()
               if torch.is_tensor(v) and v.is_floating_point())
    float32 = trainer_for(tmp_path / "f32", rows=row, max_grad_norm=clip)
    float32.train()
    assert not torch.allclose(bottleneck_vector(float32.gradiend_model), expected, rtol=1e-5, atol=1e-6)


# --- activation checkpointing of the base's layers ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_checkpointing_recomputes_the_base_layers_and_gives_the_same_gradients(kind):
    model = get_gradiend_model(tiny_model(kind), GradiendConfig(feature_classes=CLASSES))
    collator = GradiendDataCollator(tokenizer_for(kind), model.objective, CLASSES)
    batch = collator(feature_rows(CONTEXTS[:2])[:2])
    names = model.bottleneck.names
    base = model.get_base_model()
    layers = checkpointable_layers(base)
    assert len(layers) == 2
    model.engine.compute(batch, ("factual",))  # the first batch also decides whether rows are packed (extra passes)
    calls = []
    inner = [next(layer.children()) for layer in layers]
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in inner]
    plain = {k: flat(v, names).clone() for k, v in model.engine.compute(batch, ("factual", "alternative")).items()}
    plain_calls, calls[:] = len(calls), []
    with base_passes(base, layers=layers):
        kept = {k: flat(v, names).clone() for k, v in model.engine.compute(batch, ("factual", "alternative")).items()}
    for handle in handles:
        handle.remove()
    assert len(calls) >= 2 * plain_calls > 0  # each layer ran again in the backward pass(es)
    for side in plain:
        assert torch.equal(kept[side], plain[side])


def test_gradient_checkpointing_trains_exactly_like_without(tmp_path):
    runs = {}
    for name, flags in (("plain", {}), ("checkpointed", dict(gradient_checkpointing=True))):
        trainer = trainer_for(tmp_path / name, kind="llama", max_steps=2, per_device_train_batch_size=2, **flags)
        trainer.train()
        runs[name] = flat_bottleneck(trainer.gradiend_model)
        assert not hasattr(trainer.model, "activation_checkpointing_enable")  # only during train()
    assert trainer.checkpoint_layers and torch.equal(runs["checkpointed"], runs["plain"])


# --- optimizers ------------------------------------------------------------------------------------------------------
def test_another_optimizer_trains_through_the_plain_step_as_transformers_builds_it(tmp_path):
    """optim='sgd' with optim_args: one step equals theta - lr * (grad + weight_decay * theta) on autograd's gradient
    of the plain forward; the fused step (AdamW only) is off and says why."""
    rows = feature_rows(CONTEXTS[:1])[:1]
    trainer = trainer_for(tmp_path, rows=rows, optim="sgd", optim_args="momentum=0.5", learning_rate=1e-2)
    model = trainer.gradiend_model
    reference = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=CLASSES, init_seed=1))
    collator = GradiendDataCollator(tokenizer_for("gpt2"), reference.objective, CLASSES)
    reference(**collator(rows)).loss.backward()
    expected = [p.detach() - 1e-2 * (p.grad + 0.01 * p.detach()) for p in reference.bottleneck.parameters()]
    trainer.train()
    assert type(trainer.optimizer.optimizer) is torch.optim.SGD
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.5
    assert "optimizer SGD (not torch.optim.AdamW)" in trainer.fused_step_blocker()
    for got, want in zip(model.bottleneck.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-8)


def test_adafactor_is_built_over_the_bottleneck(tmp_path):
    from transformers.optimization import Adafactor

    trainer = trainer_for(tmp_path, optim="adafactor", max_steps=2)
    before = flat_bottleneck(trainer.gradiend_model).clone()
    trainer.train()
    assert type(trainer.optimizer.optimizer) is Adafactor
    params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert params == {id(p) for p in trainer.gradiend_model.bottleneck.parameters()}
    assert not torch.equal(flat_bottleneck(trainer.gradiend_model), before)


# --- logging: grad_norm, tokens seen; callbacks that watch the optimizer step ------------------------------------
def test_grad_norm_is_logged_on_both_steps_and_equals_autograds_norm(tmp_path):
    rows = feature_rows(CONTEXTS[:1])[:1]
    logged = {}
    for step, clip in (("fused", 0.0), ("plain", 1e9)):
        trainer = trainer_for(tmp_path / step, rows=rows, max_grad_norm=clip, max_steps=3)
        if step == "fused":
            model = trainer.gradiend_model
            base, tokenizer, names = model.get_base_model(), tokenizer_for("gpt2"), model.bottleneck.names
            grads = {side: row_gradients(base, tokenizer, "causal_lm", rows, side, names)
                     for side in ("alternative", "factual")}
            _, first_norm = reference_adamw_step(model, grads["alternative"], grads["factual"])
        trainer.train()
        logged[step] = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(logged["fused"]) == len(logged["plain"]) == 3
    assert logged["fused"][0] == pytest.approx(first_norm, rel=1e-5)
    assert logged["fused"] == pytest.approx(logged["plain"], rel=1e-4)
    assert all(norm > 0 for norm in logged["fused"])


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_num_input_tokens_seen_counts_the_tokens_the_base_model_reads(tmp_path, kind):
    """One epoch over every row once. A masked LM reads one input for both words (same length here), a causal LM the
    text before each word plus that word's tokens but its last."""
    rows = feature_rows(CONTEXTS[:2])
    tokenizer = tokenizer_for(kind)
    if kind == "bert":
        expected = sum(len(masked_text_ids(tokenizer, r["masked"], r["factual"])[0]) for r in rows)
    else:
        expected = sum(len(causal_text_ids(tokenizer, r["masked"], r[side])[0]) - 1
                       for r in rows for side in ("factual", "alternative"))
    trainer = trainer_for(tmp_path, kind=kind, rows=rows, max_steps=-1, num_train_epochs=1,
                          per_device_train_batch_size=2, include_num_input_tokens_seen="non_padding")
    trainer.train()
    assert trainer.state.num_input_tokens_seen == expected
    assert trainer.state.log_history[-2]["num_input_tokens_seen"] == expected


def test_a_callback_watching_the_optimizer_step_gets_the_plain_step_and_sees_the_gradients(tmp_path):
    class Watch(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.start = flat_bottleneck(model)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.bottleneck.parameters()]
            self.seen.append((all(g is not None and bool(g.abs().sum() > 0) for g in grads),
                              torch.equal(flat_bottleneck(model), self.start)))

    watch = Watch()
    trainer = trainer_for(tmp_path, max_steps=2, callbacks=[watch])
    assert "callback Watch implements on_pre_optimizer_step" in trainer.fused_step_blocker()
    trainer.train()
    assert watch.seen == [(True, True), (True, True)]  # gradients there, weights not yet updated


# --- predict() and evaluate() ----------------------------------------------------------------------------------------
def test_predict_returns_each_rows_own_h_its_label_and_metrics(tmp_path):
    rows = feature_rows(CONTEXTS[2:3])
    trainer = trainer_for(tmp_path)
    model = trainer.gradiend_model
    b, names = model.bottleneck, model.bottleneck.names
    base, tokenizer = model.get_base_model(), tokenizer_for("gpt2")
    w_e = torch.cat([b.encoder(n).detach().reshape(-1) for n in names])
    expected = np.array([float(torch.tanh(w_e @ flat(row_gradients(base, tokenizer, "causal_lm", [r], "alternative",
                                                                     names), names) + b.encoder_bias.detach()))
                         for r in rows])
    labels = np.array([1.0 if r["alternative_class"] == CLASSES[0] else -1.0 for r in rows])
    before = flat_bottleneck(model).clone()
    output = trainer.predict(rows)
    assert isinstance(output, PredictionOutput) and output.predictions.shape == (len(rows), 1)
    np.testing.assert_allclose(output.predictions[:, 0], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(output.label_ids, labels)
    assert output.metrics["test_correlation"] == pytest.approx(np.corrcoef(expected, labels)[0, 1], abs=1e-4)
    assert output.metrics["test_mean_h_female"] == pytest.approx(expected[labels == 1].mean(), abs=1e-5)
    assert torch.equal(flat_bottleneck(model), before)  # predict never flips the sign


def test_compute_metrics_receives_the_per_row_values_and_labels(tmp_path):
    received = []

    def compute_metrics(prediction):
        received.append(prediction)
        return {"agreement": float(np.mean(np.sign(prediction.predictions[:, 0]) == prediction.label_ids))}

    model = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=CLASSES))
    trainer = GradiendTrainer(model=model, args=arguments(tmp_path), train_dataset=feature_rows(CONTEXTS[:2]),
                              processing_class=tokenizer_for("gpt2"), compute_metrics=compute_metrics)
    rows = feature_rows(CONTEXTS[3:4])
    output = trainer.predict(rows)
    h, labels = received[0].predictions[:, 0], received[0].label_ids
    np.testing.assert_array_equal(h, output.predictions[:, 0])
    assert output.metrics["test_agreement"] == pytest.approx(float(np.mean(np.sign(h) == labels)))


def test_evaluate_with_a_dict_of_datasets_prefixes_each_one_as_transformers_does(tmp_path):
    sets = {"held": feature_rows(CONTEXTS[4:6]), "seen": feature_rows(CONTEXTS[:2])}
    trainer = trainer_for(tmp_path, eval_rows=sets, sign_normalisation=False)
    metrics = trainer.evaluate()
    for name, rows in sets.items():
        alone = trainer.evaluate(rows)
        assert metrics[f"eval_{name}_correlation"] == pytest.approx(alone["eval_correlation"], abs=1e-6)
        assert metrics[f"eval_{name}_rows"] == len(rows)
    assert trainer.evaluate("held")["eval_held_correlation"] == metrics["eval_held_correlation"]


def test_training_with_a_dict_of_eval_datasets_keeps_the_best_and_the_verdict_on_the_first(tmp_path):
    sets = {"held": feature_rows(CONTEXTS[4:6]), "seen": feature_rows(CONTEXTS[:2])}
    trainer = trainer_for(tmp_path, eval_rows=sets, max_steps=2, eval_strategy="steps", eval_steps=1,
                          save_strategy="steps", save_steps=1, load_best_model_at_end=True)
    assert trainer.args.metric_for_best_model == "eval_held_correlation"
    trainer.train()
    assert [record["step"] for record in trainer.convergence.history] == [1, 2]
    logged = [e for e in trainer.state.log_history if "eval_held_correlation" in e]
    assert [r["correlation"] for r in trainer.convergence.history] == [e["eval_held_correlation"] for e in logged]
    assert trainer.state.best_metric == max(e["eval_held_correlation"] for e in logged)


# --- plain TrainingArguments ----------------------------------------------------------------------------------------
def test_a_plain_training_arguments_is_converted_keeping_every_value(tmp_path, caplog):
    plain = TrainingArguments(output_dir=str(tmp_path / "run"), learning_rate=3e-4, max_steps=2, seed=5,
                              per_device_train_batch_size=2, per_device_eval_batch_size=3, eval_strategy="steps",
                              eval_steps=1, disable_tqdm=True, hub_token="secret", report_to="none")
    model = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=CLASSES))
    with caplog.at_level(logging.INFO, logger="gradiend_hf"):
        trainer = GradiendTrainer(model=model, args=plain, train_dataset=feature_rows(CONTEXTS[:2]),
                                  eval_dataset=feature_rows(CONTEXTS[4:5]), processing_class=tokenizer_for("gpt2"))
    args = trainer.args
    assert isinstance(args, GradiendTrainingArguments)
    for name, value in plain.to_dict().items():
        assert args.to_dict()[name] == value, name
    assert args.hub_token == "secret"
    assert (args.max_eval_rows, args.optimizer_state_dtype, args.convergence_correlation) == (None, "float32", 0.5)
    assert any("converted the TrainingArguments to GradiendTrainingArguments" in r.getMessage()
               for r in caplog.records)
    assert "max_grad_norm=1.0" in trainer.fused_step_blocker()  # transformers' value, kept
    trainer.train()
    assert "eval_correlation" in trainer.evaluate()


# --- saving and the Hub ---------------------------------------------------------------------------------------------
def test_save_model_writes_the_tokenizer_and_json_arguments_beside_the_adapter(tmp_path):
    trainer = trainer_for(tmp_path)
    trainer.train()
    folder = tmp_path / "final"
    trainer.save_model(str(folder))
    files = sorted(p.name for p in folder.iterdir())
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))], files
    assert json.loads((folder / "training_args.json").read_text())["learning_rate"] == 1e-3
    loaded = AutoTokenizer.from_pretrained(folder)
    text = "the nurse said that she was good"
    assert loaded(text)["input_ids"] == tokenizer_for("gpt2")(text)["input_ids"]
    reloaded = GradiendModel.from_pretrained(tiny_model("gpt2"), folder)
    assert torch.equal(flat_bottleneck(reloaded), flat_bottleneck(trainer.gradiend_model))


def test_push_to_hub_uploads_the_gradiend_card_and_no_pickle(tmp_path, hub):
    base = tiny_model("gpt2")
    base.config._name_or_path = "org/tiny-gpt2"
    model = get_gradiend_model(base, GradiendConfig(feature_classes=CLASSES))
    trainer = GradiendTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                       save_steps=2, push_to_hub=True, hub_model_id="user/gradiend-run", hub_strategy="checkpoint"),
        train_dataset=feature_rows(CONTEXTS[:2]), eval_dataset=feature_rows(CONTEXTS[4:5]),
        processing_class=tokenizer_for("gpt2"),
    )
    trainer.train()
    during = hub.uploads[0]
    assert during["repo_id"] == "user/gradiend-run" and "last-checkpoint/optimizer.safetensors" in during["files"]
    assert hub.names("upload_folder")[0]["commit_message"] == "Training in progress, step 2"
    trainer.push_to_hub(tags=["my-tag"], dataset="user/rows")
    folder = hub.folder("user/gradiend-run")
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))], names
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json", "training_args.json",
            "convergence.json", "trainer_state.json"} <= set(names)
    card = (folder / "README.md").read_text()
    assert "library_name: gradiend_hf" in card and "library_name: transformers" not in card
    assert "base_model: org/tiny-gpt2" in card and "fine-tuned version" not in card
    for tag in ("gradiend", "feature:female", "my-tag"):
        assert f"- {tag}" in card
    assert "- user/rows" in card and "## Training results" in card and "| best step | 2 |" in card
    json.loads((folder / "training_args.json").read_text())
    loaded = GradiendModel.from_pretrained(tiny_model("gpt2"), "user/gradiend-run")
    assert torch.equal(flat_bottleneck(loaded), flat_bottleneck(trainer.gradiend_model))
