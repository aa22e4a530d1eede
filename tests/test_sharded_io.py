"""Sharded state to and from disk (sharded_io.py), on 2 gloo processes and resharded onto 3.

Oracles: the one-process save_pretrained of the assembled bottleneck (the streamed export must load to identical
tensors and configs); the slices of the saved tensors (from_pretrained onto a sharded model, and a checkpoint saved by
2 processes loaded by 3); the uninterrupted run (save, two steps, load, the same two steps: bit-identical, with float32
and with bfloat16 AdamW moments). tests/sharded_io_worker.py runs the processes and reports what it found.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sharded_io_worker import CASES
from test_sharded_training import free_port
from tiny import tokenizer_for

from gradiend_hf.serialization import save_tensors
from gradiend_hf.sharded_io import load_sharded_checkpoint, safetensors_header, save_sharded_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharded_io_worker.py"


def launch(processes: int, mode: str, out: Path, tokenizers: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), str(WORKER), "--mode", mode, "--out", str(out),
               "--tokenizers", str(tokenizers)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    return [json.loads((out / f"{mode}-rank{rank}.json").read_text()) for rank in range(processes)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reports of 2 processes saving (export, from_pretrained, resume) and of 3 loading their checkpoints."""
    tokenizers = tmp_path_factory.mktemp("tokenizers")
    for kind in {case["kind"] for case in CASES.values()}:
        tokenizer_for(kind).save_pretrained(tokenizers / kind)
    out = tmp_path_factory.mktemp("sharded-io")
    saved = launch(2, "save", out, tokenizers)
    loaded = launch(3, "load", out, tokenizers)
    return out, saved, loaded


@pytest.mark.parametrize("name", list(CASES))
def test_streamed_export_equals_the_one_process_save(runs, name):
    out, reports, _ = runs
    sharded, reference = out / name / "sharded-export", out / name / "one-process"
    assert sorted(os.listdir(sharded)) == sorted(os.listdir(reference)) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((sharded / "adapter_config.json").read_text())
    assert config == json.loads((reference / "adapter_config.json").read_text())
    assert (sharded / "README.md").read_text() == (reference / "README.md").read_text()
    got, expected = load_file(str(sharded / "adapter_model.safetensors")), load_file(
        str(reference / "adapter_model.safetensors"))
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key
    # kept_entries of a sharded model count the whole selection (not a rank's slice)
    for report in reports:
        assert report[name]["kept_entries"] == config["kept_entries"]
        assert report[name]["export_visible_after_return"]  # every rank waited for rank 0
    if CASES[name].get("pruned"):
        assert config["kept_entries"]["model.norm.weight"] == 2
    else:
        assert config["kept_entries"] is None


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_model_refuses_adapter_state(runs, name):
    for report in runs[1]:
        assert "holds 1/2 of its bottleneck" in report[name]["adapter_state_refused"]


@pytest.mark.parametrize("name", list(CASES))
def test_from_pretrained_onto_a_sharded_model_holds_the_slices(runs, name):
    for report in runs[1]:
        assert report[name]["from_pretrained_sharded"]
        assert report[name]["from_pretrained_wrong"] == []
        assert report[name]["from_pretrained_bias_equal"]


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_resumes_exactly(runs, name):
    for report in runs[1]:
        found = report[name]
        assert found["moved_after_save"] > 100  # the two steps after the save changed the state: not vacuous
        assert found["differ_after_load"] == []  # in place, into the same model and optimizer
        assert found["differ_resumed"] == []  # the same two steps again end bit-identical
        assert found["differ_fresh_load"] == []  # into a new model and an optimizer without state
        assert found["differ_fresh_resumed"] == []
        if CASES[name]["state_dtype"] == "bfloat16":  # the rounding generators matter, and were restored
            assert found["differ_resumed_without_generators"] > 0


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_holds_safetensors_and_json_only(runs, name):
    folder = runs[0] / name / "checkpoint"
    files = sorted(os.listdir(folder))
    assert all(f.endswith((".safetensors", ".json")) for f in files), files  # no pickled .metadata
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) == 2  # one per rank
    for shard in shards:
        load_file(str(folder / shard))
    record = json.loads((folder / "sharded_checkpoint.json").read_text())
    assert record["world_size"] == 2 and record["format"] == 1


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_of_two_processes_loads_onto_three(runs, name):
    loaded = runs[2]
    assert len(loaded) == 3
    entries = [report[name]["local_entries"] for report in loaded]
    assert all(0 < n < sum(entries) for n in entries)
    for report in loaded:
        assert report[name]["world_size"] == 3
        assert report[name]["keys_equal"]
        assert report[name]["wrong"] == []  # every rank's slices (and AdamW state) = slices of the saved tensors


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("what", ["export", "checkpoint"])
def test_a_save_failing_on_rank_0_fails_on_every_rank(runs, name, what):
    rank0, rank1 = (report[name][f"blocked_{what}"] for report in runs[1])
    # b_e, replicated, stays equal on the ranks also with bfloat16 moments (rounded with a generator all ranks share)
    assert runs[1][0][name]["encoder_bias_equal_on_ranks"]
    assert rank0.startswith("NotADirectoryError")
    assert rank1.startswith("RuntimeError: Rank 0 could not")


def test_checkpoint_of_another_adapter_is_refused(runs):
    for report in runs[2]:
        assert "belongs to another adapter" in report["other_adapter_error"]


def test_streamed_header_reads_as_safetensors(tmp_path):
    """The header safetensors_header writes, followed by the bytes in order, is a file safetensors reads, with the
    keys and dtypes serialization.save_tensors would write."""
    tensors = {"b.weight": torch.randn(2, 3).to(torch.bfloat16), "a.index": torch.tensor([4, 1, 7]),
               "c.empty": torch.zeros(1, 0), "d.float": torch.randn(5)}
    path = tmp_path / "streamed.safetensors"
    with open(path, "wb") as handle:
        handle.write(safetensors_header([(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]))
        for tensor in tensors.values():
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    save_tensors(tensors, tmp_path / "reference.safetensors")
    got, expected = load_file(str(path)), load_file(str(tmp_path / "reference.safetensors"))
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


def test_one_process_model_is_refused(tmp_path):
    from tiny import tiny_model

    from gradiend_hf import GradiendConfig, get_gradiend_model

    model = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=["female", "male"]))
    with pytest.raises(TypeError, match="sharded"):
        save_sharded_checkpoint(model, None, tmp_path / "checkpoint")
    with pytest.raises(TypeError, match="sharded"):
        load_sharded_checkpoint(model, None, tmp_path / "checkpoint")
