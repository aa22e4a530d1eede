"""Two CPU processes under `accelerate launch` with DDP replicas of the bottleneck (examples/train_multiprocess.py
--ddp, examples/accelerate_cpu.yaml); the default, sharded mode is tested in test_sharded_trainer.py.

Each process must compute its own gradient rows from its own batches; DDP all-reduces only the bottleneck's
gradients. Oracle: two processes with one batch each per step train on the same batch pairs as one process with
gradient_accumulation_steps=2 (batch i goes to process i % 2), so the bottleneck, the evaluations and the
per-batch losses must match that single-process run, and the last base gradients of process 1 must equal those of
the single process's last batch (they would be the mean of two batches had they been all-reduced).
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradiend_hf import GradiendConfig, get_gradiend_model
from gradiend_hf.sampling import TransitionBatchSampler
from gradiend_hf.sampling import ProcessBatches
from gradiend_hf.trainer import GradiendTrainer, GradiendTrainingArguments

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_multiprocess.py"
CONFIG = ROOT / "examples" / "accelerate_cpu.yaml"
STEPS = 4  # 32 rows, batches of 4: 8 batches = one epoch = 4 steps of 2 processes
BATCH = 4
TIMEOUT = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str], returncode: int = 0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == returncode, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def evidence(folder: Path, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((folder / f"rank{rank}.json").read_text()), load_file(str(folder / f"rank{rank}.safetensors"))


def part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def interleave(first: list, second: list) -> list:
    return [x for pair in zip(first, second) for x in pair]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two-process run folder, single-process gradient-accumulation run folder)."""
    two, one = tmp_path_factory.mktemp("two_processes"), tmp_path_factory.mktemp("one_process")
    common = [str(SCRIPT), "--steps", str(STEPS), "--batch-size", str(BATCH), "--eval-steps", "2"]
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
         "--main_process_port", str(free_port()), *common, "--out", str(two), "--ddp"])
    run([sys.executable, *common, "--out", str(one), "--gradient-accumulation-steps", "2"])
    return two, one


def test_both_processes_trained_as_one_group_of_two(runs):
    two, _ = runs
    for rank in (0, 1):
        record, _ = evidence(two, rank)
        assert (record["rank"], record["world_size"]) == (rank, 2)
        assert record["global_step"] == STEPS and record["batches"] == STEPS
    assert (two / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (two / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_bottleneck_is_bit_identical_on_both_ranks_and_trained(runs):
    two, _ = runs
    first, second = (part(evidence(two, rank)[1], "bottleneck/") for rank in (0, 1))
    assert first and first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    spec = importlib.util.spec_from_file_location("train_multiprocess", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fresh = get_gradiend_model(script.tiny_gpt2(0)[0], GradiendConfig(feature_classes=script.CLASSES, init_seed=0))
    initial = fresh.bottleneck.state_dict()
    assert initial.keys() == first.keys()
    assert not all(torch.equal(initial[k], first[k]) for k in first), "training did not change the bottleneck"


def test_base_gradients_are_each_rank_own_and_not_averaged(runs):
    two, one = runs
    first, second = (part(evidence(two, rank)[1], "gradient/") for rank in (0, 1))
    alone = part(evidence(one, 0)[1], "gradient/")
    assert first and first.keys() == second.keys() == alone.keys()
    flat = {name: torch.cat([g[k].reshape(-1) for k in sorted(g)]) for name, g in (("0", first), ("1", second))}
    assert not torch.allclose(flat["0"], flat["1"], rtol=1e-3, atol=0), "the ranks hold the same base gradients"
    mean = (flat["0"] + flat["1"]) / 2
    assert not torch.allclose(flat["1"], mean, rtol=1e-3, atol=0)
    # process 1's last batch is the single process's last batch: same base gradients, not a mean of two
    for key in alone:
        torch.testing.assert_close(second[key], alone[key], rtol=1e-5, atol=1e-7)


def test_ranks_trained_on_disjoint_whole_single_transition_batches(runs):
    two, _ = runs
    records = [evidence(two, rank)[0] for rank in (0, 1)]
    seen = [[i for batch in r["row_ids"] for i in batch] for r in records]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(records[0]["dataset_rows"]))  # one epoch, every row once
    for record in records:
        assert all(len(batch) == BATCH for batch in record["row_ids"])
        assert all(len(transitions) == 1 for transitions in record["transitions"])


def test_two_processes_equal_one_process_accumulating_two_batches(runs):
    two, one = runs
    (r0, t0), (r1, t1) = (evidence(two, rank) for rank in (0, 1))
    alone, tensors = evidence(one, 0)
    assert interleave(r0["row_ids"], r1["row_ids"]) == alone["row_ids"]
    assert interleave(r0["local_losses"], r1["local_losses"]) == pytest.approx(alone["local_losses"], rel=1e-5)
    # AdamW steps each entry by about +-lr (1e-2) whatever its gradient's size, so entries with a gradient near 0 carry
    # the rounding of the float sums (it depends on the CPU's kernels); a wrong gradient moves entries by ~lr.
    # Each entry to 1e-3 x lr, the bottleneck as a whole to 1e-5 of its norm.
    expected, got = part(tensors, "bottleneck/"), part(t0, "bottleneck/")
    assert got.keys() == expected.keys()
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5)
    difference = torch.cat([(got[key] - expected[key]).reshape(-1) for key in expected])
    assert float(difference.norm()) <= 1e-5 * float(torch.cat([t.reshape(-1) for t in expected.values()]).norm())
    # evaluations (incl. any sign flip) ran on both ranks with the same outcome, as in the single process
    assert r0["evaluations"] == r1["evaluations"] and len(r0["evaluations"]) == 2
    for got, want in zip(r0["evaluations"], alone["evaluations"]):
        assert got["step"] == want["step"] and got.get("eval_sign_flipped") == want.get("eval_sign_flipped")
        assert got["eval_correlation"] == pytest.approx(want["eval_correlation"], rel=1e-4)
    assert r0["best_model_checkpoint"] == r1["best_model_checkpoint"]
    assert r0["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-5)


def test_process_batches_deal_whole_batches_evenly():
    """Short last batches stay whole and unmixed; every process gets the same number of batches."""
    transitions = [("a", "b")] * 6 + [("b", "a")] * 5
    sampler = TransitionBatchSampler(transitions, batch_size=4, seed=3)
    batches = sampler.batches()
    for processes in (2, 3, 5):
        shares = [list(ProcessBatches(sampler, processes, rank)) for rank in range(processes)]
        assert len({len(share) for share in shares}) == 1
        assert all(len(share) == len(ProcessBatches(sampler, processes, 0)) for share in shares)
        dealt = [batch for share in shares for batch in share]
        assert all(batch in batches for batch in dealt)  # whole batches, never cut or refilled
        assert sorted(i for batch in batches for i in batch) == sorted({i for batch in dealt for i in batch})
        assert [shares[r % processes][r // processes] for r in range(len(batches))] == batches
    share = ProcessBatches(sampler, 2, 1)
    share.set_epoch(1)
    assert sampler.epoch == 1


def test_a_launch_without_a_process_group_is_refused(monkeypatch, tmp_path):
    """Two launched processes that each train alone would write the same checkpoints: refuse with the fix."""
    from tiny import rows, tiny_model, tokenizer_for

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    model = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=["female", "male"]))
    args = GradiendTrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, eval_strategy="no",
                                     save_strategy="no", load_best_model_at_end=False)
    with pytest.raises(RuntimeError, match="use_cpu=True"):
        GradiendTrainer(model=model, args=args, train_dataset=rows(), processing_class=tokenizer_for("gpt2"))
