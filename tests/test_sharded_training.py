"""Sharded training (sharding.py) on 2 and 3 gloo processes against the one-process fused step on the same batches.

Oracle: the one-process fused step (itself tested against autograd + torch.optim.AdamW in test_fused.py) on the whole
batches. Each process of tests/sharded_worker.py holds 1/N of the bottleneck, computes its share of each batch's rows
(3 rows over 2 processes, and 1 row, where a process has none), trains four steps with a sign flip after the second,
and encodes rows; the assembled bottleneck, the losses, the gradient norms and the per-row h must equal one process's.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sharded_worker import CASES, LEARNING_RATE, build, train
from tiny import tokenizer_for

from gradiend_hf.fused import fused_training_step

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "sharded_worker.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(processes: int, out: Path, tokenizers: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), str(WORKER), "--out", str(out),
               "--tokenizers", str(tokenizers)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """This process's tiny tokenizers, for the launched processes (their trained vocabularies could differ)."""
    folder = tmp_path_factory.mktemp("tokenizers")
    for kind in {case["kind"] for case in CASES.values()}:
        tokenizer_for(kind).save_pretrained(folder / kind)
    return folder


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, tokenizers):
    runs = {}
    for processes in (2, 3):
        out = tmp_path_factory.mktemp(f"sharded{processes}")
        launch(processes, out, tokenizers)
        runs[processes] = out
    return runs


@pytest.fixture(scope="module")
def one_process(tokenizers):
    reference = {}
    for name, case in CASES.items():
        gradiend, collator = build(case, tokenizers)
        assert not gradiend.is_sharded
        losses, norms, h, gradients = train(gradiend, collator, fused_training_step)
        reference[name] = (gradiend.bottleneck.state_dict(), losses, norms, h, gradients)
    return reference


@pytest.mark.parametrize("processes", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_steps_equal_the_one_process_fused_step(sharded_runs, one_process, processes, name):
    state, losses, norms, h, gradients = one_process[name]
    record = json.loads((sharded_runs[processes] / f"{name}.json").read_text())
    saved = load_file(str(sharded_runs[processes] / f"{name}.safetensors"))
    assert record["world_size"] == processes
    latent = state["encoder_bias"].numel()
    assert record["num_entries"] * latent == sum(t.numel() for k, t in state.items() if k.startswith("encoder_weight"))
    # each process held one slice of every parameter: about 1/N of the entries
    assert record["local_entries"] <= -(-record["num_entries"] // processes) + len(gradients)
    # the first step's whole-batch gradient, assembled from the slices the reduce-scatter handed each process:
    # equal to one process's up to the order of float sums (<= 1e-6 of the gradient's norm; per parameter too, since
    # some are 0 but for rounding, e.g. attention key biases, which the softmax cannot see)
    norm = float(torch.cat(list(gradients.values())).norm())
    for parameter, expected in gradients.items():
        got = saved[f"gradient.{parameter}"]
        assert float((got - expected).norm()) <= 1e-6 * norm, parameter
    assert record["losses"] == pytest.approx(losses, rel=1e-6)
    assert record["norms"] == pytest.approx(norms, rel=1e-5)  # sums of squares in another order
    # the bottleneck after four steps and a sign flip. AdamW makes each entry's step about +-lr whatever the size of
    # its gradient, so an entry whose gradient is ~0 (|g| near AdamW's eps) carries the rounding of the float sums
    # into its step; how much depends on the CPU's kernels (a parameter of norm 0.06 differed by 1.2e-5 of its norm on
    # CI, 5e-7 here). A wrong gradient, row share or slice moves entries by ~lr. So: the bottleneck as a whole to
    # 1e-5 of its norm, each entry to 1e-3 x lr
    assert saved.keys() >= state.keys()
    for key, expected in state.items():
        assert saved[key].shape == expected.shape, key
        torch.testing.assert_close(saved[key], expected, rtol=1e-4, atol=1e-3 * LEARNING_RATE, msg=key)
    difference = torch.cat([(saved[key] - expected).reshape(-1) for key, expected in state.items()])
    whole = torch.cat([expected.reshape(-1) for expected in state.values()])
    assert float(difference.norm()) <= 1e-5 * float(whole.norm())
    torch.testing.assert_close(torch.tensor(record["h"]), h, rtol=1e-5, atol=1e-6)
    # the steps moved the bottleneck away from its initialisation: not a vacuous comparison
    fresh, _ = build(CASES[name])
    assert not torch.allclose(fresh.bottleneck.encoder_bias, state["encoder_bias"])
