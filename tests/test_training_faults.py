"""GradiendTrainer under faults: a kill -9 or a full disk while a checkpoint is written, incomplete checkpoints, a
resume (its convergence verdict), NaN/inf in a step, an absurd learning rate, and pickle files in a checkpoint.

Oracles: an uninterrupted run of the same steps (resuming must land on its weights and its verdict), the files on
disk (safetensors read back and checked for NaN/inf), and hand-written metric records for the verdict."""

import errno
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import CLASSES, CONTEXTS, args, feature_rows, flat_bottleneck
from tiny import tiny_model, tokenizer_for
from transformers.trainer_callback import TrainerState

from gradiend_hf import GradiendConfig, get_gradiend_model
from gradiend_hf.checkpointing import checkpoint_problem
from gradiend_hf.trainer import ConvergenceCallback, GradiendTrainer, GradiendTrainingArguments

TESTS = Path(__file__).resolve().parent


def make_trainer(out: Path, max_steps: int, evaluate: bool = False, callbacks=None, **overrides) -> GradiendTrainer:
    """Tiny GPT-2, two rows per step, a checkpoint every 2 steps (with evaluate: evaluations and checkpoints every
    3 steps, the best checkpoint kept)."""
    model = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=CLASSES))
    schedule = (dict(eval_steps=3, save_steps=3) if evaluate else
                dict(save_steps=2, eval_strategy="no", load_best_model_at_end=False))
    settings = dict(output_dir=str(out), max_steps=max_steps, learning_rate=1e-3, per_device_train_batch_size=2,
                    **schedule)
    settings.update(overrides)
    return GradiendTrainer(
        model=model, args=args(out, **settings),
        train_dataset=feature_rows(CONTEXTS[:4]),
        eval_dataset=feature_rows(CONTEXTS[4:6]) if evaluate else None,
        processing_class=tokenizer_for("gpt2"), callbacks=callbacks,
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The bottleneck after 6 uninterrupted steps: what every interrupted-and-resumed run must end with."""
    trainer = make_trainer(tmp_path_factory.mktemp("straight") / "run", 6)
    trainer.train()
    return flat_bottleneck(trainer.gradiend_model)


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- 2. checkpoints appear only when complete; resume takes the last complete one -----------------------------------
def test_a_full_disk_while_checkpointing_leaves_no_checkpoint_and_resume_continues_exactly(tmp_path, monkeypatch,
                                                                                          straight):
    real = TrainerState.save_to_json

    def disk_full(self, path):
        if "checkpoint-4" in str(path):
            Path(path).write_text('{"global_st')
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, path)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(TrainerState, "save_to_json", disk_full)
        with pytest.raises(OSError, match="No space"):
            make_trainer(run, 6).train()
    assert listing(run) == ["checkpoint-2"]  # no checkpoint-4, and no staging folder left behind
    resumed = make_trainer(run, 6)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    torch.testing.assert_close(flat_bottleneck(resumed.gradiend_model), straight, rtol=1e-5, atol=1e-9)
    assert all(checkpoint_problem(run / f"checkpoint-{n}") is None for n in (2, 4, 6))


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from transformers.trainer_callback import TrainerState
from test_training_faults import make_trainer

real = TrainerState.save_to_json
def killed(self, path):
    if "checkpoint-4" in str(path):
        Path(path).write_text('{{"global_st')  # half of trainer_state.json, then kill -9
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, path)
TrainerState.save_to_json = killed
make_trainer(Path(sys.argv[1]), 6).train()
"""


def test_a_kill_while_checkpointing_leaves_no_checkpoint_and_resume_continues_exactly(tmp_path, straight):
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN.format(tests=str(TESTS)), str(run)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    visible = [name for name in listing(run) if not name.startswith(".")]
    assert visible == ["checkpoint-2"]  # the half-written checkpoint-4 is invisible
    assert len(listing(run)) == 2  # ... in a staging folder (of a dead process)
    resumed = make_trainer(run, 6)
    resumed.train(resume_from_checkpoint=True)
    torch.testing.assert_close(flat_bottleneck(resumed.gradiend_model), straight, rtol=1e-5, atol=1e-9)
    assert [name for name in listing(run) if name.startswith(".")] == []  # the staging folder was deleted


def test_resume_skips_incomplete_checkpoints_names_them_and_refuses_them_when_asked_for(tmp_path, caplog, straight):
    run = tmp_path / "run"
    make_trainer(run, 4).train()
    # incomplete folders as older versions, a rotation killed mid-delete or save_only_model leave them
    (run / "checkpoint-4" / "trainer_state.json").unlink()
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-6")
    for name in ("optimizer.safetensors", "optimizer.json"):
        (run / "checkpoint-6" / name).unlink()
    with pytest.raises(ValueError, match=r"checkpoint-4: trainer_state.json missing \(an interrupted save\)"):
        make_trainer(run, 6).train(resume_from_checkpoint=str(run / "checkpoint-4"))
    with pytest.raises(ValueError, match="save_only_model=True"):
        make_trainer(run, 6).train(resume_from_checkpoint=str(run / "checkpoint-6"))

    resumed = make_trainer(run, 6)
    with caplog.at_level(logging.INFO, logger="gradiend_hf"):
        resumed.train(resume_from_checkpoint=True)
    skipped = [r.getMessage() for r in caplog.records if "Not resuming from the incomplete" in r.getMessage()]
    assert len(skipped) == 2 and "checkpoint-6" in skipped[0] and "checkpoint-4" in skipped[1]
    assert any(r.getMessage().endswith("checkpoint-2, the last complete checkpoint.") for r in caplog.records)
    torch.testing.assert_close(flat_bottleneck(resumed.gradiend_model), straight, rtol=1e-5, atol=1e-9)
    assert all(checkpoint_problem(run / f"checkpoint-{n}") is None for n in (2, 4, 6))  # rewritten whole


def test_the_adapter_saved_into_the_run_folder_keeps_the_checkpoints_beside_it(tmp_path):
    """trainer.save_model() writes into output_dir, where the checkpoints are: an atomic save must not replace that
    folder (and thereby delete them), but swap only its own files."""
    run = tmp_path / "run"
    trainer = make_trainer(run, 4)
    trainer.train()
    before = listing(run)
    trainer.save_model()
    trainer.save_model()  # an overwrite too
    saved = {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json",
             "training_args.json"}  # the adapter, its card, the tokenizer and the arguments as JSON
    assert listing(run) == sorted(set(before) | saved)
    assert all(checkpoint_problem(run / f"checkpoint-{n}") is None for n in (2, 4))
    reloaded = make_trainer(tmp_path / "unused", 1).gradiend_model
    reloaded.load_adapter_weights(run)
    assert torch.equal(flat_bottleneck(reloaded), flat_bottleneck(trainer.gradiend_model))


def test_resume_without_a_complete_checkpoint_is_a_clear_error(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(ValueError, match="no complete checkpoint in .*checkpoint-2: adapter_config.json"):
        make_trainer(run, 2).train(resume_from_checkpoint=True)


# --- 3. the convergence history is part of the checkpoint -----------------------------------------------------------
def test_the_verdict_after_a_resume_covers_the_whole_run(tmp_path, monkeypatch):
    straight = make_trainer(tmp_path / "straight", 12, evaluate=True)
    straight.train()
    first = make_trainer(tmp_path / "run", 6, evaluate=True)
    first.train()
    assert [r["step"] for r in first.convergence.history] == [3, 6]
    shutil.copytree(tmp_path / "run", tmp_path / "worse")

    resumed = make_trainer(tmp_path / "run", 12, evaluate=True)
    resumed.train(resume_from_checkpoint=True)
    assert [r["step"] for r in resumed.convergence.history] == [3, 6, 9, 12]
    assert resumed.convergence.history[:2] == first.convergence.history
    assert resumed.verdict["evaluations"] == straight.verdict["evaluations"] == 4
    assert resumed.verdict["best"]["step"] == straight.verdict["best"]["step"]
    assert resumed.verdict["best"]["correlation"] == pytest.approx(straight.verdict["best"]["correlation"], rel=1e-4)
    saved = json.loads((tmp_path / "run" / "convergence.json").read_text())
    assert saved["evaluations"] == 4 and saved["best"]["step"] == straight.verdict["best"]["step"]

    # after the resume every evaluation is worse: the best (and the kept model) is from before the interruption
    import gradiend_hf.trainer as trainer_module

    real = trainer_module.encoder_metrics
    monkeypatch.setattr(trainer_module, "encoder_metrics",
                        lambda *a, **k: {**(m := real(*a, **k)), "correlation": m["correlation"] * 1e-3})
    worse = make_trainer(tmp_path / "worse", 12, evaluate=True)
    worse.train(resume_from_checkpoint=True)
    assert worse.verdict["evaluations"] == 4
    assert worse.verdict["best"] == first.verdict["best"] and worse.verdict["best"]["step"] in (3, 6)
    assert worse.state.best_model_checkpoint.endswith(f"checkpoint-{worse.verdict['best']['step']}")


def test_the_convergence_state_refuses_a_checkpoint_of_other_feature_classes():
    callback = ConvergenceCallback(CLASSES)
    callback.restore(ConvergenceCallback(CLASSES, best={"step": 3}, history=[{"step": 3}]).state())
    assert callback.best == {"step": 3} and callback.history == [{"step": 3}]
    with pytest.raises(ValueError, match="feature classes"):
        callback.restore(ConvergenceCallback(["young", "old"]).state())


# --- 4. NaN/inf stop training at their step; no checkpoint holds them; NaN never converges ---------------------------
def assert_finite_checkpoints(run: Path) -> list[int]:
    steps = []
    for folder in sorted(run.glob("checkpoint-*")):
        for name in ("adapter_model.safetensors", "optimizer.safetensors"):
            for key, tensor in load_file(folder / name).items():
                assert torch.isfinite(tensor).all(), (folder.name, name, key)
        steps.append(int(folder.name.split("-")[1]))
    return sorted(steps)


@pytest.mark.parametrize("step_kind", ["fused", "plain"])
def test_a_nan_in_a_step_stops_training_there_before_the_update_and_before_any_checkpoint(tmp_path, step_kind):
    run = tmp_path / "run"
    trainer = make_trainer(run, 6, save_steps=1, max_grad_norm=0.0 if step_kind == "fused" else 1e9)
    embeddings = trainer.gradiend_model.get_base_model().get_input_embeddings()
    embeddings.register_forward_hook(  # the base model's loss of step 3 is NaN (as a broken data row would make it)
        lambda module, inputs, output: output * float("nan") if trainer.state.global_step == 2 else output
    )
    with pytest.raises(FloatingPointError, match="stopped at step 3: .*not finite"):
        trainer.train()
    assert trainer.uses_fused_step() == (step_kind == "fused")
    assert assert_finite_checkpoints(run) == [1, 2]
    # the NaN step was not applied: the model is the one of checkpoint-2
    saved = load_file(run / "checkpoint-2" / "adapter_model.safetensors")
    reloaded = make_trainer(tmp_path / "unused", 1).gradiend_model
    reloaded.load_adapter_weights(run / "checkpoint-2")
    assert len(saved) and torch.equal(flat_bottleneck(trainer.gradiend_model), flat_bottleneck(reloaded))


@pytest.mark.parametrize("step_kind", ["fused", "plain"])
def test_an_absurd_learning_rate_stops_training_before_a_non_finite_checkpoint(tmp_path, step_kind):
    run = tmp_path / "run"
    trainer = make_trainer(run, 6, save_steps=1, learning_rate=1e30,
                           max_grad_norm=0.0 if step_kind == "fused" else 1e9)
    with pytest.raises(FloatingPointError, match="stopped at step [2-6]: "):
        trainer.train()
    steps = assert_finite_checkpoints(run)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 6


def test_a_bottleneck_holding_nan_is_never_saved(tmp_path):
    """NaN that reaches the weights by another way than a step (here a callback) stops training at the save."""
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    trainer.gradiend_model.bottleneck.encoder_bias.fill_(float("nan"))

    run = tmp_path / "run"
    trainer = make_trainer(run, 4, save_steps=1, callbacks=[Poison()])
    with pytest.raises(FloatingPointError, match=r"stopped at step 2: the bottleneck tensors \['encoder_bias'\]"):
        trainer.train()
    assert assert_finite_checkpoints(run) == [1] and listing(run) == ["checkpoint-1"]


def test_evaluation_refuses_non_finite_encoder_values(tmp_path):
    trainer = make_trainer(tmp_path / "run", 1, evaluate=True)
    with torch.no_grad():
        trainer.gradiend_model.bottleneck.encoder_bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="evaluation rows is NaN/inf"):
        trainer.evaluate()


def evaluations(records):
    callback = ConvergenceCallback(CLASSES)
    from transformers import TrainerControl

    state, control = TrainerState(), TrainerControl()
    for step, (correlation, first, second) in enumerate(records, start=1):
        state.global_step = 3 * step
        callback.on_evaluate(None, state, control, metrics={
            "eval_correlation": correlation, f"eval_mean_h_{CLASSES[0]}": first, f"eval_mean_h_{CLASSES[1]}": second})
    return callback, callback.verdict(GradiendTrainingArguments(output_dir="unused"))


def test_a_nan_evaluation_never_converges_and_is_never_the_best():
    nan = float("nan")
    _, verdict = evaluations([(nan, nan, nan)])
    assert not verdict["converged"] and any("finite correlation" in r for r in verdict["reasons"])
    good = (0.9, 0.8, -0.8)
    _, verdict = evaluations([good, (nan, nan, nan)])
    assert verdict["converged"] and verdict["best"]["step"] == 3
    _, verdict = evaluations([(nan, nan, nan), good])
    assert verdict["converged"] and verdict["best"]["step"] == 6
    _, verdict = evaluations([(0.9, nan, -0.8)])  # NaN class mean: not converged either
    assert not verdict["converged"] and any("class means" in r for r in verdict["reasons"])


# --- 5. resuming never unpickles anything ----------------------------------------------------------------------------
class Payload:
    """Unpickling this creates the file `marker`: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_files_in_a_checkpoint_are_never_unpickled(tmp_path, monkeypatch, caplog, straight):
    run = tmp_path / "run"
    make_trainer(run, 2).train()
    marker = tmp_path / "unpickled"
    strays = ["scaler.pt", "rng_state.pth", "training_args.bin", "optimizer.pt", "scheduler.pt"]
    for name in strays:
        (run / "checkpoint-2" / name).write_bytes(pickle.dumps(Payload(marker)))

    def refuse(*args, **kwargs):
        raise AssertionError("resuming unpickled a file")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    resumed = make_trainer(run, 6)
    with caplog.at_level(logging.WARNING, logger="gradiend_hf"):
        resumed.train(resume_from_checkpoint=True)
    assert not marker.exists()
    warning = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Ignoring"))
    assert all(name in warning for name in strays) and "never unpickles" in warning
    torch.testing.assert_close(flat_bottleneck(resumed.gradiend_model), straight, rtol=1e-5, atol=1e-9)
    for folder in run.glob("checkpoint-*"):  # and writes none
        assert not [f for f in os.listdir(folder) if f.endswith((".pt", ".pth", ".bin", ".pkl"))] or folder.name == (
            "checkpoint-2")


def test_a_grad_scaler_is_checkpointed_as_json(tmp_path):
    trainer = make_trainer(tmp_path / "run", 1)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    trainer._save_scaler(str(tmp_path))
    assert os.listdir(tmp_path) == ["scaler.json"] or "scaler.json" in os.listdir(tmp_path)
    saved = trainer.accelerator.scaler.state_dict()
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    trainer._load_scaler(str(tmp_path))
    assert trainer.accelerator.scaler.state_dict() == saved
