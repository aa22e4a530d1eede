"""GradiendTrainer on 2 CPU processes with the bottleneck sharded (the default; examples/train_multiprocess.py under
`accelerate launch`), against one process with the same global batch.

Oracle: one process with --batch-size 2 x 2 reads the same batches (the sampler draws batches of N x per-device rows
on every process), so its per-step losses, evaluations (incl. sign flips), checkpoints and final adapter must equal
the sharded run's up to the order of float sums. A run resumed from its step-2 checkpoint (torch.distributed.checkpoint
slices of the bottleneck and the optimizer state) must write the same step-4 checkpoint as the uninterrupted run.
"""

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_multiprocess import CONFIG, SCRIPT, free_port, run

STEPS, PER_PROCESS = 4, 2


def launch(out, *extra: str) -> None:
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--main_process_port",
         str(free_port()), str(SCRIPT), "--steps", str(STEPS), "--batch-size", str(PER_PROCESS), "--eval-steps", "2",
         "--out", str(out), *extra])


def record(folder, rank: int = 0) -> dict:
    return json.loads((folder / f"rank{rank}.json").read_text())


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(sharded two-process run, one-process run with the same global batch)."""
    two, one = tmp_path_factory.mktemp("sharded"), tmp_path_factory.mktemp("one")
    launch(two)
    run([sys.executable, str(SCRIPT), "--steps", str(STEPS), "--batch-size", str(2 * PER_PROCESS), "--eval-steps", "2",
         "--out", str(one)])
    return two, one


def test_a_sharded_run_trains_as_one_process_with_the_whole_batch(runs):
    two, one = runs
    first, second, alone = record(two, 0), record(two, 1), record(one)
    assert (first["world_size"], second["world_size"]) == (2, 2)
    # both processes read the one process's batches; each step's loss is the whole batch's
    assert first["row_ids"] == second["row_ids"] == alone["row_ids"]
    assert all(len(batch) == 2 * PER_PROCESS for batch in first["row_ids"])
    assert first["local_losses"] == pytest.approx(alone["local_losses"], rel=1e-5)
    assert first["local_losses"] == second["local_losses"]
    for got, want in zip(first["evaluations"], alone["evaluations"]):
        assert got["step"] == want["step"] and got.get("eval_sign_flipped") == want.get("eval_sign_flipped")
        assert got["eval_correlation"] == pytest.approx(want["eval_correlation"], rel=1e-4, abs=1e-6)
    assert len(first["evaluations"]) == 2 and first["evaluations"] == second["evaluations"]
    assert first["best_model_checkpoint"].endswith(alone["best_model_checkpoint"].rsplit("/", 1)[1])
    # the adapter, gathered one parameter at a time, is the one process's
    expected, got = adapter(one / "adapter"), adapter(two / "adapter")
    assert got.keys() == expected.keys()
    # AdamW steps each entry by about +-lr (1e-2) whatever its gradient's size, so entries with a gradient near 0 carry
    # the rounding of the float sums (it depends on the CPU's kernels); a wrong gradient moves entries by ~lr.
    # Each entry to 1e-3 x lr, the adapter as a whole to 1e-5 of its norm.
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    difference = torch.cat([(got[key] - expected[key]).reshape(-1) for key in expected])
    assert float(difference.norm()) <= 1e-5 * float(torch.cat([t.reshape(-1) for t in expected.values()]).norm())
    assert json.loads((two / "adapter" / "adapter_config.json").read_text())["encoder_bias"] == pytest.approx(
        json.loads((one / "adapter" / "adapter_config.json").read_text())["encoder_bias"], rel=1e-4)
    # each process held half of the bottleneck
    local = load_file(str(two / "rank0.safetensors"))
    held = sum(t.numel() for k, t in local.items() if k.startswith("bottleneck/encoder_weight"))
    whole = sum(t.numel() for k, t in expected.items() if "gradiend_encoder" in k)
    assert held <= whole // 2 + 64


def test_checkpoints_hold_the_slices_and_resume_exactly(runs, tmp_path):
    two, _ = runs
    assert sorted(p.name for p in (two / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (two / "run" / "checkpoint-2" / "sharded_state").is_dir()
    resumed = tmp_path / "resumed"
    (resumed / "run").mkdir(parents=True)
    shutil.copytree(two / "run" / "checkpoint-2", resumed / "run" / "checkpoint-2")
    launch(resumed, "--resume")
    want, got = adapter(two / "run" / "checkpoint-4"), adapter(resumed / "run" / "checkpoint-4")
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert record(resumed)["local_losses"] == record(two)["local_losses"][2:]


def test_a_run_with_bfloat16_moments_resumes_exactly(tmp_path):
    """bfloat16 AdamW moments are rounded stochastically: the checkpoint keeps each process's rounding generators, and
    the resumed run continues them (and b_e, replicated, stays equal on both processes)."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch(whole, "--optimizer-state-dtype", "bfloat16")
    (resumed / "run").mkdir(parents=True)
    shutil.copytree(whole / "run" / "checkpoint-2", resumed / "run" / "checkpoint-2")
    launch(resumed, "--resume", "--optimizer-state-dtype", "bfloat16")
    want, got = adapter(whole / "run" / "checkpoint-4"), adapter(resumed / "run" / "checkpoint-4")
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert record(resumed)["local_losses"] == record(whole)["local_losses"][2:]


def test_fsdp_and_deepspeed_plugins_are_refused_naming_the_launch_to_use(monkeypatch, tmp_path):
    """accelerate sets an FSDP/DeepSpeed plugin only where it can run them (GPUs): GradiendTrainer then refuses at
    once. (On the CPU accelerate drops an FSDP config and the run is sharded by GRADIEND itself.)"""
    from tiny import rows, tiny_model, tokenizer_for

    from gradiend_hf import GradiendConfig, get_gradiend_model
    from gradiend_hf.trainer import GradiendTrainer, GradiendTrainingArguments

    model = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=["female", "male"]))
    args = GradiendTrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, eval_strategy="no",
                                     save_strategy="no", load_best_model_at_end=False)
    trainer = GradiendTrainer(model=model, args=args, train_dataset=rows(), processing_class=tokenizer_for("gpt2"))
    trainer.refuse_other_sharding()  # no plugin: nothing to refuse
    for plugin, name in (("fsdp_plugin", "FSDP"), ("deepspeed_plugin", "DeepSpeed")):
        with monkeypatch.context() as patch:
            patch.setattr(type(trainer.accelerator.state), plugin, property(lambda state: object()), raising=False)
            with pytest.raises(ValueError, match=f"does not run under {name}: .* plain `accelerate launch"):
                trainer.refuse_other_sharding()
