"""GradiendTrainer on tiny models: learns a learnable feature, equals a hand-written step, resumes exactly."""

import itertools
import json
import os
import random

import pytest
import torch
from oracle import naive_gradients
from tiny import rows, tiny_model, tokenizer_for

from gradiend_hf import GradiendConfig, GradiendModel, get_gradiend_model
from gradiend_hf.trainer import GradiendTrainer, GradiendTrainingArguments

CLASSES = ["female", "male"]
CONTEXTS = [
    "the nurse said that [MASK] was in the room",
    "[MASK] said the results were good",
    "the doctor said that [MASK] went home",
    "and then [MASK] went home",
    "they said [MASK] was good",
    "the results were bad and [MASK] went home",
    "it was good that [MASK] said it",
    "the nurse and [MASK] went in",
]
WORDS = {"female": ["she", "her"], "male": ["he", "his"]}


def feature_rows(contexts, seed=0):
    """Two classes of target words in the same contexts: a feature the encoder can learn."""
    rng = random.Random(seed)
    out = []
    for context, (fc, ac) in itertools.product(contexts, [("female", "male"), ("male", "female")]):
        for i in range(2):
            out.append(dict(masked=context, factual=WORDS[fc][i], alternative=WORDS[ac][i], factual_class=fc,
                            alternative_class=ac))
    rng.shuffle(out)
    return out


def args(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path / "run"), disable_tqdm=True, seed=0, eval_steps=50, save_steps=50,
                logging_steps=50)
    base.update(overrides)
    return GradiendTrainingArguments(**base)


def flat_bottleneck(model: GradiendModel) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.bottleneck.parameters()])


def test_training_learns_a_learnable_feature_and_the_first_class_reads_positive(tmp_path):
    model = get_gradiend_model(tiny_model("bert"), GradiendConfig(feature_classes=CLASSES, init_seed=1))
    trainer = GradiendTrainer(
        model=model,
        args=args(tmp_path, learning_rate=1e-2, max_steps=100, eval_steps=25, save_steps=25,
                  per_device_train_batch_size=2),
        train_dataset=feature_rows(CONTEXTS[:5]),
        eval_dataset=feature_rows(CONTEXTS[5:], seed=1),
        processing_class=tokenizer_for("bert"),
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_correlation"] >= 0.9, metrics
    assert metrics["eval_mean_h_female"] > 0.5 and metrics["eval_mean_h_male"] < -0.5
    verdict = json.loads((tmp_path / "run" / "convergence.json").read_text())
    assert verdict["converged"] and verdict["best"]["step"] > 0
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["ConvergenceCallback"]["args"]["best"]["correlation"] >= 0.9
    # the saved model is a loadable adapter that reproduces the encodings
    trainer.save_model(str(tmp_path / "final"))
    loaded = GradiendModel.from_pretrained(tiny_model("bert"), tmp_path / "final")
    batch = trainer.data_collator(feature_rows(CONTEXTS[5:], seed=1)[:4])
    assert torch.equal(loaded.encode_rows(batch), model.encode_rows(batch))


def test_checkpoints_hold_the_adapter_and_no_pickle(tmp_path):
    model = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=CLASSES))
    GradiendTrainer(
        model=model, args=args(tmp_path, max_steps=4, save_steps=2, eval_steps=2),
        train_dataset=feature_rows(CONTEXTS[:4]), eval_dataset=feature_rows(CONTEXTS[4:]),
        processing_class=tokenizer_for("gpt2"),
    ).train()
    files = sorted(os.listdir(tmp_path / "run" / "checkpoint-2"))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "optimizer.json",
            "trainer_state.json"} <= set(files)
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pth", ".pkl"))], files


def test_one_training_step_equals_a_hand_written_reference_step(tmp_path):
    """Naive gradients (oracle.py), the MSE on flat vectors, one torch AdamW step: same bottleneck afterwards."""
    data = [r for r in feature_rows(CONTEXTS) if r["factual_class"] == "female"][:3]
    base = tiny_model("gpt2")
    model = get_gradiend_model(base, GradiendConfig(feature_classes=CLASSES))
    b = model.bottleneck
    names = b.names
    w_e = torch.cat([b.encoder(n).detach().reshape(-1) for n in names]).clone().requires_grad_()
    b_e = b.encoder_bias.detach().clone().requires_grad_()
    w_d = torch.cat([b.decoder(n).detach().reshape(-1) for n in names]).clone().requires_grad_()
    b_d = torch.cat([b.offset(n).detach().reshape(-1) for n in names]).clone().requires_grad_()
    tok = tokenizer_for("gpt2")
    grads = {side: naive_gradients(tiny_model("gpt2"), tok, "causal_lm", data, side, names)
             for side in ("factual", "alternative")}
    s = torch.cat([grads["alternative"][n].reshape(-1) for n in names])
    t = torch.cat([(grads["factual"][n] - grads["alternative"][n]).reshape(-1) for n in names])
    h = torch.tanh(w_e @ s + b_e)
    loss = ((w_d * h + b_d - t) ** 2).mean()
    optimizer = torch.optim.AdamW([w_e, b_e, w_d, b_d], lr=1e-3, weight_decay=0.01)
    loss.backward()
    optimizer.step()

    GradiendTrainer(
        model=model,
        args=args(tmp_path, max_steps=1, learning_rate=1e-3, per_device_train_batch_size=3, eval_strategy="no",
                  save_strategy="no", load_best_model_at_end=False),
        train_dataset=data,
        processing_class=tok,
    ).train()
    expected = {"encoder": w_e, "decoder": w_d, "offset": b_d}
    got = {
        "encoder": torch.cat([b.encoder(n).detach().reshape(-1) for n in names]),
        "decoder": torch.cat([b.decoder(n).detach().reshape(-1) for n in names]),
        "offset": torch.cat([b.offset(n).detach().reshape(-1) for n in names]),
    }
    # AdamW's first step is lr * g / (|g| + eps): entries with |g| near eps amplify rounding, so compare at 1e-3 of lr
    for kind in expected:
        torch.testing.assert_close(got[kind], expected[kind].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.encoder_bias.detach(), b_e.detach(), rtol=1e-5, atol=1e-6)


def test_resume_from_a_checkpoint_equals_uninterrupted_training(tmp_path):
    def trainer(out, max_steps, **kw):
        model = get_gradiend_model(tiny_model("llama"), GradiendConfig(feature_classes=CLASSES))
        return GradiendTrainer(
            model=model,
            args=args(tmp_path, output_dir=str(tmp_path / out), max_steps=max_steps, learning_rate=1e-3, save_steps=3,
                      eval_steps=3, per_device_train_batch_size=2, load_best_model_at_end=False, **kw),
            train_dataset=feature_rows(CONTEXTS[:4]),
            eval_dataset=feature_rows(CONTEXTS[4:6]),
            processing_class=tokenizer_for("llama"),
        )

    straight = trainer("straight", 12)
    straight.train()
    first = trainer("resumed", 6)
    first.train()
    second = trainer("resumed", 12)
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-6"))
    torch.testing.assert_close(flat_bottleneck(second.gradiend_model), flat_bottleneck(straight.gradiend_model),
                               rtol=1e-5, atol=1e-9)
    assert not torch.equal(flat_bottleneck(first.gradiend_model), flat_bottleneck(straight.gradiend_model))


def test_gradient_accumulation_averages_gradient_rows(tmp_path):
    """Two gradient rows per step equal one step on the mean of their two losses (hand-computed via two models)."""
    data = feature_rows(CONTEXTS[:2])
    model = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=CLASSES))
    trainer = GradiendTrainer(
        model=model, args=args(tmp_path, max_steps=1, gradient_accumulation_steps=2, per_device_train_batch_size=2,
                               eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
                               learning_rate=1e-3),
        train_dataset=data, processing_class=tokenizer_for("gpt2"),
    )
    batches = list(itertools.islice(iter(trainer.get_train_dataloader()), 2))
    reference = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=CLASSES))
    for batch in batches:  # backward before the next forward: the engine reuses its gradient buffers
        (reference(**batch).loss / 2).backward()
    optimizer = torch.optim.AdamW(list(reference.bottleneck.parameters()), lr=1e-3, weight_decay=0.01)
    optimizer.step()
    trainer.train()
    torch.testing.assert_close(flat_bottleneck(model), flat_bottleneck(reference), rtol=1e-5, atol=1e-9)


def test_failing_loudly_when_not_converged(tmp_path):
    model = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=CLASSES))
    trainer = GradiendTrainer(
        model=model,
        args=args(tmp_path, max_steps=2, eval_steps=1, save_steps=1, learning_rate=1e-9, fail_if_not_converged=True),
        train_dataset=feature_rows(CONTEXTS[:2]), eval_dataset=feature_rows(CONTEXTS[2:4]),
        processing_class=tokenizer_for("gpt2"),
    )
    with pytest.raises(RuntimeError, match="did not converge"):
        trainer.train()
    assert not json.loads((tmp_path / "run" / "convergence.json").read_text())["converged"]


@pytest.mark.parametrize("means, stops", [
    ([(-0.99, -1.0), (-1.0, -0.97)], True),     # both classes saturated at -1, twice: collapsed
    ([(0.95, 0.99), (1.0, 0.93)], True),        # ... or at +1
    ([(-0.99, -1.0)], False),                    # once is not yet a collapse
    ([(-0.99, -1.0), (0.99, -0.98)], False),    # recovered: opposite signs
    ([(-0.99, -1.0), (-0.99, -0.6)], False),    # one class not saturated: tanh still has a slope there
])
def test_a_collapsed_encoder_stops_the_run_and_is_named_in_the_verdict(means, stops):
    """The rule by hand: COLLAPSED_EVALUATIONS evaluations in a row with both class means >= COLLAPSED_MEAN in size on
    the same side stop training; the verdict says so (and why: the learning rate)."""
    from transformers import TrainerControl, TrainerState

    from gradiend_hf.trainer import COLLAPSED_EVALUATIONS, COLLAPSED_MEAN, ConvergenceCallback

    assert (COLLAPSED_EVALUATIONS, COLLAPSED_MEAN) == (2, 0.9)
    callback, state, control = ConvergenceCallback(CLASSES), TrainerState(), TrainerControl()
    for step, (first, second) in enumerate(means, start=1):
        state.global_step = 50 * step
        callback.on_evaluate(None, state, control, metrics={"eval_correlation": 0.1, f"eval_mean_h_{CLASSES[0]}": first,
                                                            f"eval_mean_h_{CLASSES[1]}": second})
    assert control.should_training_stop is stops
    reasons = callback.verdict(GradiendTrainingArguments(output_dir="unused"))["reasons"]
    assert any("collapsed" in r and "lower the learning rate" in r for r in reasons) is stops


def test_bad_data_is_refused_with_a_clear_error(tmp_path):
    model = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=CLASSES))
    bad = [dict(r) for r in rows()]
    bad[1]["factual_class"] = "female-ish"
    with pytest.raises(ValueError, match="female-ish"):
        GradiendTrainer(model=model, args=args(tmp_path), train_dataset=bad, processing_class=tokenizer_for("gpt2"))
    with pytest.raises(ValueError, match="masked"):
        GradiendTrainer(model=model, args=args(tmp_path), train_dataset=[{"text": "x"}],
                        processing_class=tokenizer_for("gpt2"))


def test_train_seeds_stops_once_enough_converged_and_keeps_the_best(tmp_path):
    from gradiend_hf.seeds import train_seeds

    base = tiny_model("bert")
    common = dict(train_dataset=feature_rows(CONTEXTS[:5]), eval_dataset=feature_rows(CONTEXTS[5:], seed=1),
                  processing_class=tokenizer_for("bert"), config=GradiendConfig(feature_classes=CLASSES))
    quick = train_seeds(base, args=args(tmp_path / "a", learning_rate=1e-2, max_steps=100, eval_steps=25, save_steps=25,
                                        per_device_train_batch_size=2), seeds=(0, 1, 2), enough=1, **common)
    assert quick.report["seeds_tried"] == 1 and quick.report["chosen_converged"]
    report = json.loads((tmp_path / "a" / "run" / "seed_report.json").read_text())
    assert report == quick.report
    assert (tmp_path / "a" / "run" / "best" / "adapter_model.safetensors").is_file()

    # none converges (learning rate ~0): all seeds are tried and the best |correlation| is kept, flagged
    slow = train_seeds(base, args=args(tmp_path / "b", learning_rate=1e-12, max_steps=2, eval_steps=1, save_steps=1),
                       seeds=(0, 1, 2), enough=1, **common)
    entries = slow.report["seeds"]
    assert len(entries) == 3 and not slow.report["chosen_converged"]
    assert slow.seed == max(entries, key=lambda e: abs(e["correlation"]))["seed"]


def test_the_trainer_takes_the_fused_step_and_it_trains_like_the_plain_step(tmp_path):
    """Clipping needs whole gradients, so a (never reached) clipping norm forces the plain step: same weights."""
    results = {}
    for name, clip in (("fused", 0.0), ("plain", 1e9)):
        model = get_gradiend_model(tiny_model("bert"), GradiendConfig(feature_classes=CLASSES, init_seed=1))
        trainer = GradiendTrainer(
            model=model,
            args=args(tmp_path / name, learning_rate=1e-2, max_steps=6, per_device_train_batch_size=2,
                      eval_strategy="no", save_strategy="no", load_best_model_at_end=False, max_grad_norm=clip),
            train_dataset=feature_rows(CONTEXTS[:5]),
            processing_class=tokenizer_for("bert"),
        )
        trainer.train()
        assert trainer.uses_fused_step() == (name == "fused")
        results[name] = (flat_bottleneck(model), trainer.state.log_history[-1]["train_loss"])
    torch.testing.assert_close(results["fused"][0], results["plain"][0], rtol=1e-4, atol=1e-6)
    assert results["fused"][1] == pytest.approx(results["plain"][1], rel=1e-4)


def test_early_stopping_ends_training_at_the_first_converged_stale_evaluation(tmp_path):
    """The rule of test_early_stopping.py, wired through Trainer: with a threshold no rise can beat, every evaluation is
    stale, so training stops at the first evaluation at which the run has converged (the learnable-feature run above
    takes all 100 steps without early stopping)."""
    model = get_gradiend_model(tiny_model("bert"), GradiendConfig(feature_classes=CLASSES, init_seed=1))
    trainer = GradiendTrainer(
        model=model,
        args=args(tmp_path, learning_rate=1e-2, max_steps=100, eval_steps=25, save_steps=25,
                  per_device_train_batch_size=2, early_stopping_patience=1, early_stopping_threshold=10.0),
        train_dataset=feature_rows(CONTEXTS[:5]), eval_dataset=feature_rows(CONTEXTS[5:], seed=1),
        processing_class=tokenizer_for("bert"),
    )
    trainer.train()
    history = trainer.convergence.history
    met = [r["step"] for r in history
           if abs(r["correlation"]) >= 0.5 and r["mean_h_female"] * r["mean_h_male"] < 0
           and min(abs(r["mean_h_female"]), abs(r["mean_h_male"])) >= 0.5]
    assert met and trainer.state.global_step == met[0] < 100
    assert trainer.verdict["converged"]
