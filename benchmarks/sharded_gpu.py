"""Per-GPU memory and step time of sharded GRADIEND training, at the number of processes it is launched with.

Prepared for GPUs (not run in this repository's CI or benchmarks: the machine has none). One process per GPU, NCCL:

    torchrun --nproc_per_node N benchmarks/sharded_gpu.py --model meta-llama/Llama-3.2-1B [--pre-prune 0.01]
    (N = 1, 2, 4, 8; also meta-llama/Llama-3.2-3B, meta-llama/Llama-3.1-8B; gated: `huggingface-cli login` first)

Each process loads the base in bfloat16 on its GPU, collates --rows rows of one transition per batch
(benchmarks/common.py) and records torch.cuda.memory_allocated (the baseline: base + data + CUDA context's tensors);
then, with the peak statistics reset, builds the GradiendModel (sharded automatically when N > 1; with --pre-prune
first pre-prunes over 64 mixed rows, itself sharded over the processes) and records the peak of that phase; then,
with the peak reset again, runs --warmup + --steps training steps (gradiend_hf.sharding.sharded_training_step for
N > 1, gradiend_hf.fused.fused_training_step for N = 1; torch AdamW fused, moments in --state-dtype) and records
torch.cuda.max_memory_allocated and each step's time (cuda-synchronised, after a barrier). Rank 0 appends one JSON
row per run to --out (per rank: baseline, peaks, state bytes by count, step seconds; the summary takes the largest
rank): peak beyond the baseline / selected weights is the per-GPU bytes per selected weight that docs/distributed.md
projects from the CPU measurements (benchmarks/sharded_memory.py). A run that does not fit stops with CUDA's
out-of-memory error and writes no row (docs/distributed.md's projection says which fit: e.g. Llama-3.1-8B with all
weights needs N = 8 GPUs of 80 GB).

--dry-run: the same code path on the CPU with gloo and a tiny random Llama (benchmarks/sharded_memory.tiny_llama, bf16
base), resident memory (VmRSS/VmHWM) in place of the CUDA counters; to check the script where there is no GPU:

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        benchmarks/sharded_gpu.py --dry-run [--pre-prune 0.01]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, benchmark_rows, machine, memory, mixed_rows, reset_peak  # noqa: E402
from sharded_memory import CLASSES, state_bytes, tiny_llama, train_steps, word_tokenizer  # noqa: E402

DRY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)


class Meter:
    """Memory counters of one device: CUDA's allocator statistics, or the process's resident memory on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def current(self) -> int:
        """Bytes in use now (torch.cuda.memory_allocated, or VmRSS)."""
        self.synchronize()
        return torch.cuda.memory_allocated(self.device) if self.cuda else memory()["VmRSS"]

    def reset_peak(self) -> None:
        """Start a new peak at the current use."""
        self.synchronize()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak()

    def peak(self) -> int:
        """The peak since reset_peak (torch.cuda.max_memory_allocated, or VmHWM)."""
        self.synchronize()
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else memory()["VmHWM"]


def setup(dry_run: bool) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes: NCCL for CUDA tensors (gloo for CPU ones), or gloo alone for the
    dry run. Returns (rank, world size, device)."""
    import torch.distributed as dist

    if dry_run:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this benchmark measures GPU memory. Use --dry-run to check the code path.")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    return dist.get_rank(), dist.get_world_size(), device


def load_base(name: str, dry_run: bool, device: torch.device) -> tuple[Any, Any]:
    """(base model in bfloat16 on `device`, eval mode; tokenizer)."""
    if dry_run:
        tokenizer = word_tokenizer()
        return tiny_llama(tokenizer, dtype=torch.bfloat16, **DRY_SHAPE), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16).to(device).eval()
    return model, tokenizer


def on_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_adapter(base, tokenizer, pre_prune: float | None, device: torch.device):
    """The GradiendModel over every backbone weight, or pre-pruned to keep `pre_prune` of them; its bottleneck is
    sharded when several processes run. Moved to `device` as the Trainer does (b_e too: NCCL sums on the GPU)."""
    from gradiend_hf import GradiendConfig, get_gradiend_model
    from gradiend_hf.pruning import pre_prune as prune

    config = GradiendConfig(feature_classes=CLASSES)
    if pre_prune is None:
        model = get_gradiend_model(base, config)
    else:
        model = prune(base, mixed_rows(64), tokenizer, pre_prune, rows=64, batch_size=8, seed=0, config=config)
    return model.to(device)


def measure(args: argparse.Namespace) -> None:
    """One run at the launched N; rank 0 appends its JSON row to args.out."""
    import torch.distributed as dist

    from gradiend_hf import GradiendDataCollator
    from gradiend_hf.objective import resolve_objective

    rank, world, device = setup(args.dry_run)
    meter = Meter(device)
    name = "tiny-random-llama (dry run)" if args.dry_run else args.model
    base, tokenizer = load_base(args.model, args.dry_run, device)
    collate = GradiendDataCollator(tokenizer, resolve_objective(base), CLASSES)
    batches = [on_device(collate(benchmark_rows(args.rows, t)), device) for t in ("female->male", "male->female")]
    dist.barrier()
    baseline = meter.current()
    meter.reset_peak()
    model = build_adapter(base, tokenizer, args.pre_prune, device)
    assert model.is_sharded == (world > 1), "a GradiendModel built under torch.distributed must be sharded"
    build_peak = meter.peak() - baseline
    meter.reset_peak()

    def synchronize() -> None:
        meter.synchronize()
        dist.barrier()

    optimizer, losses, seconds = train_steps(model, batches, args.warmup + args.steps, getattr(torch, args.state_dtype),
                                             synchronize=synchronize)
    train_peak = meter.peak() - baseline
    selected = model.num_entries
    record = {"rank": rank, "device": str(device), "baseline_bytes": baseline, "build_peak_bytes": build_peak,
              "train_peak_bytes": train_peak, "state_bytes": state_bytes(model, optimizer),
              "local_entries": model.bottleneck.local_entries if model.is_sharded else selected,
              "step_seconds": seconds, "losses": losses}
    records: list[Any] = [None] * world
    dist.all_gather_object(records, record)
    if rank == 0:
        timed = [statistics.median(r["step_seconds"][args.warmup:] or r["step_seconds"]) for r in records]
        peak = max(r["train_peak_bytes"] for r in records)
        row = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": name, "N": world,
            "backend": dist.get_backend(), "device": torch.cuda.get_device_name(device) if meter.cuda else "cpu",
            "memory_counter": "torch.cuda.max_memory_allocated" if meter.cuda else "VmHWM (dry run)",
            "base_dtype": "bfloat16", "selection": "all" if args.pre_prune is None else f"pre-pruned {args.pre_prune}",
            "selected": selected, "rows": args.rows, "warmup": args.warmup, "steps": args.steps,
            "state_dtype": args.state_dtype, "max_baseline_gb": max(r["baseline_bytes"] for r in records) / 1e9,
            "max_train_peak_gb": peak / 1e9, "max_build_peak_gb": max(r["build_peak_bytes"] for r in records) / 1e9,
            "train_bytes_per_selected_per_rank": peak / selected,
            "state_bytes_per_selected_per_rank": max(r["state_bytes"]["total"] for r in records) / selected,
            "step_seconds_median": max(timed), "machine": machine(), "ranks": records,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        summary = {k: row[k] for k in ("model", "N", "selection", "selected", "max_baseline_gb", "max_build_peak_gb",
                                        "max_train_peak_gb", "train_bytes_per_selected_per_rank",
                                        "state_bytes_per_selected_per_rank", "step_seconds_median")}
        print(json.dumps(summary, indent=1))
        print(f"appended to {out}")
    dist.barrier()
    dist.destroy_process_group()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="meta-llama/Llama-3.2-1B", help="a causal LM on the Hub or a local folder")
    parser.add_argument("--pre-prune", type=float, default=None, metavar="KEEP",
                        help="pre-prune to this fraction of the backbone weights (e.g. 0.01); default: all of them")
    parser.add_argument("--rows", type=int, default=32, help="rows per training batch (one transition)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--state-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the AdamW moments (optimizer_state_dtype)")
    parser.add_argument("--out", default=None, help="JSON lines file to append to (default: "
                        "benchmarks/results/sharded_gpu.jsonl, or sharded_gpu_dry_run.jsonl with --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny random Llama on the CPU with gloo (resident memory instead of CUDA counters)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(RESULTS / ("sharded_gpu_dry_run.jsonl" if args.dry_run else "sharded_gpu.jsonl"))
    return args


def main(argv: list[str] | None = None, run: Callable[[argparse.Namespace], None] = measure) -> None:
    args = parse(argv)
    if "RANK" not in os.environ:
        raise SystemExit("Launch with torchrun (or python -m torch.distributed.run) --nproc_per_node N; see --help.")
    run(args)


if __name__ == "__main__":
    main()
