"""Sharded training memory per process: bytes per selected weight on each rank at N = 1, 2, 4 and 8 CPU processes.

A randomly initialised Llama with a tiny word-level vocabulary (built here, nothing downloaded) and ~50M selected
weights (the default selection: every backbone weight, fp32), GRADIEND rows of one transition (32 rows per step,
benchmarks/common.py). The script launches itself once per N with `python -m torch.distributed.run --nproc_per_node N`
(gloo, OMP_NUM_THREADS=1). Each rank loads the base model and collates the batches, then records its resident memory
(VmRSS), starts a new high-water mark (/proc/self/clear_refs, so VmHWM restarts at the current RSS), builds the
GradiendModel (sharded automatically when N > 1), an AdamW over its bottleneck and runs --warmup + --steps training
steps (gradiend_hf.sharding.sharded_training_step for N > 1, gradiend_hf.fused.fused_training_step for N = 1). Reported
per rank: (VmHWM at the end - VmRSS before the GradiendModel) / selected weights, i.e. everything the adapter and its
training add to the loaded base, including transient buffers; and, as a check, the bytes of the state by count
(W_e, W_d, b_d, b_e, the AdamW moments and the source-gradient buffer, from tensor numels and element sizes).

The projection tables give GB per rank for Llama-3.2-1B/3B and Llama-3.1-8B from the measured coefficients (N = 1
as measured; a fit bytes/weight/rank = a / N + c over the sharded runs for N > 1); their selected weights are counted
on meta-device models built from the published configs (no download).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sharded_memory.py [--processes 1 2 4 8] [--steps 3] [--warmup 1]
     [--state-dtypes float32 bfloat16] [--malloc-mmap-threshold 131072 (glibc; writes sharded_memory_mmap.*)]
     [--tables-only (the tables again from the saved JSON)]
Writes benchmarks/results/sharded_memory.json and .md (about 9 minutes on 2 cores; part of `make bench`). Memory is not
timed, so other work on the machine does not change the numbers much; the step seconds in the table are informational.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    FEMALE,
    MALE,
    RESULTS,
    TEMPLATES,
    benchmark_rows,
    markdown,
    memory,
    reset_peak,
    write_results,
)

CLASSES = ["female", "male"]
ROWS = 32
# ~50M selected weights: 8 layers of 6.29M (hidden 768, MLP 2048, 12 heads, 4 key/value heads) + a tiny embedding
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4)
# published configs of the Llama models the docs project to (hidden, MLP, layers, heads, kv heads, vocab, tied)
LLAMAS = {
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.2-3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
STATE_NAMES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


@functools.lru_cache(maxsize=None)
def word_tokenizer():
    """A word-level tokenizer over the words of the benchmark rows. Its vocabulary is fixed (sorted), so every
    process tokenizes identically (a trained BPE's ids can depend on the process's hash seed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    text = " ".join(TEMPLATES + FEMALE + MALE + ["she he [MASK]"]).replace("{name}", "")
    words = sorted({piece for piece, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    vocab = {token: i for i, token in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama(tokenizer, seed: int = 0, dtype: torch.dtype = torch.float32, **shape):
    """A randomly initialised LlamaForCausalLM of `shape` (default SHAPE) over `tokenizer`'s vocabulary, eval mode,
    weights paged in (so the memory baseline is settled)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{**SHAPE, **shape})
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    return model


def selected_counts(shape: dict) -> dict[str, int]:
    """(total parameters, default-selected weights, largest selected parameter) of a Llama of `shape`, counted on
    the meta device (no memory, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradiend_hf.selection import backbone_prefix

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape))
    # selection.select_parameters' default rule (backbone weights, not the LM head nor what is tied to it), by
    # identity: meta tensors have no storage pointers to compare
    head = {id(p) for p in model.get_output_embeddings().parameters()}
    prefix = backbone_prefix(model)
    selected = {n: p for n, p in model.named_parameters() if n.startswith(prefix) and id(p) not in head}
    return {"total": sum(p.numel() for p in model.parameters()),  # tied weights counted once
            "selected": sum(p.numel() for p in selected.values()),
            "largest": max(p.numel() for p in selected.values())}


def state_bytes(model, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of this rank's adapter state by count: the bottleneck's parameters, their AdamW moments, the gradient
    engine's buffers (the source gradient) and the kept indices (a pre-pruned selection)."""
    b = model.bottleneck
    params = sum(p.numel() * p.element_size() for p in b.parameters())
    moments = sum(s[k].numel() * s[k].element_size() for s in optimizer.state.values() for k in STATE_NAMES if k in s)
    buffers = sum(t.numel() * t.element_size() for kind in model.engine.buffers.values() for t in kind.values())
    index_sets = [b.indices] + ([b.global_indices] if hasattr(b, "global_indices") else [])
    indices = sum(i.numel() * i.element_size() for s in index_sets for i in s.values() if i is not None)
    return {"bottleneck": params, "moments": moments, "buffers": buffers, "indices": indices,
            "total": params + moments + buffers + indices}


def train_steps(
    model, batches: list[dict], steps: int, state_dtype: torch.dtype = torch.float32,
    synchronize: Callable[[], None] = lambda: None, after_step: Callable[[int], None] = lambda i: None,
) -> tuple[torch.optim.Optimizer, list[float], list[float]]:
    """`steps` GRADIEND training steps over `batches` (cycled): the sharded step when the model is sharded, else the
    fused one; `after_step(i)` after each (untimed). Returns the optimizer, the losses and each step's seconds."""
    from gradiend_hf.fused import AdamWSteps, fused_training_step
    from gradiend_hf.sharding import sharded_training_step

    optimizer = torch.optim.AdamW(list(model.bottleneck.parameters()), lr=1e-4, weight_decay=0.01, fused=True)
    adamw = AdamWSteps(optimizer, state_dtype=state_dtype)
    step = sharded_training_step if model.is_sharded else fused_training_step
    losses, seconds = [], []
    for i in range(steps):
        synchronize()
        start = time.perf_counter()
        result = step(model, batches[i % len(batches)], optimizer, adamw)
        synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(float(result.loss))
        after_step(i)
    return optimizer, losses, seconds


def worker(steps: int, warmup: int, state_dtype: str) -> Optional[list[dict]]:
    """One rank: baseline, adapter, steps, peak. Returns every rank's record on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model
    from gradiend_hf.objective import CAUSAL_LM

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = word_tokenizer()
    base = tiny_llama(tokenizer)
    collate = GradiendDataCollator(tokenizer, CAUSAL_LM, CLASSES)
    batches = [collate(benchmark_rows(ROWS, t)) for t in ("female->male", "male->female")]
    gc.collect()
    dist.barrier()
    before = memory()["VmRSS"]  # base model, data, torch and gloo loaded; no adapter yet
    reset_peak()
    model = get_gradiend_model(base, GradiendConfig(feature_classes=CLASSES))
    assert model.is_sharded == (world > 1)
    rss = []  # beyond the baseline, after each step: a growth from step to step would be retained or leaked memory
    optimizer, losses, seconds = train_steps(model, batches, warmup + steps, getattr(torch, state_dtype),
                                             after_step=lambda i: rss.append(memory()["VmRSS"] - before))
    after = memory()
    dist.barrier()
    selected = model.num_entries
    record = {"rank": rank, "world_size": world, "selected": selected, "local_entries": model.bottleneck.local_entries
              if model.is_sharded else selected, "baseline_rss": before, "peak_bytes": after["VmHWM"] - before,
              "rss_after_bytes": after["VmRSS"] - before, "state_bytes": state_bytes(model, optimizer),
              "losses": losses, "step_seconds": seconds, "rss_after_each_step": rss}
    records = [None] * world
    dist.all_gather_object(records, record)
    dist.destroy_process_group()
    return records if rank == 0 else None


def run(processes: int, steps: int, warmup: int, state_dtype: str) -> list[dict]:
    """Launch `processes` ranks of this script with torch.distributed.run and return their records."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               __file__, "--worker", "--steps", str(steps), "--warmup", str(warmup), "--state-dtype", state_dtype]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(" ".join(command[1:]), file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{processes} processes failed (exit {done.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares (a, c) of bytes = a / N + c over (N, bytes) points (through c = 0 with one point)."""
    if len(points) == 1:
        return points[0][0] * points[0][1], 0.0
    x = torch.tensor([1.0 / n for n, _ in points], dtype=torch.float64)
    y = torch.tensor([v for _, v in points], dtype=torch.float64)
    design = torch.stack([x, torch.ones_like(x)], dim=1)
    a, c = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1).tolist()
    return a, c


def coefficient(summary: list[dict], n: int) -> float:
    """Bytes per selected weight per rank at N = n: measured for one process (a plain, unsharded bottleneck); from
    the fit a / N + c over the sharded runs (N > 1) otherwise."""
    single = [s["bytes_per_selected"] for s in summary if s["N"] == 1]
    if n == 1 and single:
        return single[0]
    sharded = [(s["N"], s["bytes_per_selected"]) for s in summary if s["N"] > 1]
    a, c = fit(sharded) if sharded else (single[0], 0.0)
    return a / n + c


def projections(summary: list[dict], counts: dict, keep: float = 0.01) -> list[dict]:
    """GB per rank for the LLAMAS at N = 1, 2, 4, 8: a bf16 base replica (2 bytes per parameter) plus
    coefficient(N) bytes per selected weight; pre-pruned to `keep`, plus the int64 indices: 8 bytes per kept weight
    (the whole selection's, on every rank) and, for N > 1, 8 / N (the positions of the rank's slice; a dense slice
    needs none). Activations and the transient buffers of one parameter are not included."""
    out = []
    for name, count in counts.items():
        for selection, weights, pruned in (("all", count["selected"], False),
                                           (f"{keep:.0%} pre-pruned", round(keep * count["selected"]), True)):
            for n in (1, 2, 4, 8):
                indices = (8.0 + (8.0 / n if n > 1 else 0.0)) if pruned else 0.0
                adapter = (coefficient(summary, n) + indices) * weights
                out.append({"model": name, "total_params": count["total"], "selection": selection,
                            "selected": weights, "largest": count["largest"], "N": n, "adapter_gb": adapter / 1e9,
                            "base_gb": 2 * count["total"] / 1e9, "rank_gb": (adapter + 2 * count["total"]) / 1e9})
    return out


def summarise(runs: dict[int, list[dict]]) -> list[dict]:
    """Per N: the largest rank's peak and state, per selected weight."""
    summary = []
    for n, records in runs.items():
        selected = records[0]["selected"]
        peak = max(r["peak_bytes"] for r in records)
        summary.append({"N": n, "selected": selected, "max_peak_bytes": peak,
                        "mean_peak_bytes": sum(r["peak_bytes"] for r in records) / n,
                        "bytes_per_selected": peak / selected,
                        "state_bytes_per_selected": max(r["state_bytes"]["total"] for r in records) / selected,
                        "index_bytes_per_selected": max(r["state_bytes"]["indices"] for r in records) / selected,
                        "rss_after_per_selected": max(r["rss_after_bytes"] for r in records) / selected,
                        "step_seconds": max(min(r["step_seconds"][1:] or r["step_seconds"]) for r in records)})
    return summary


def measured_table(summary: list[dict]) -> str:
    first = summary[0]
    rows = [[s["N"], f"{s['selected']:,}", f"{s['max_peak_bytes'] / 1e9:.2f} / {s['mean_peak_bytes'] / 1e9:.2f}",
             f"**{s['bytes_per_selected']:.1f}**", f"{s['rss_after_per_selected']:.1f}",
             f"{s['state_bytes_per_selected']:.1f} ({s['index_bytes_per_selected']:.1f})",
             f"{s['bytes_per_selected'] * s['N']:.1f}",
             f"{s['bytes_per_selected'] / first['bytes_per_selected']:.2f}"
             + (f" (1/N: {first['N'] / s['N']:.2f})" if s["N"] != first["N"] else ""), f"{s['step_seconds']:.1f}"]
            for s in summary]
    return markdown(["N", "selected weights", "peak GB per rank (max / mean)", "bytes per selected weight per rank",
                     "RSS after the steps, bytes/weight", "state by count, bytes/weight (of it indices)", "x N",
                     f"ratio to N={first['N']}", "step s (not a timing benchmark)"], rows)


def projection_table(projected: list[dict], counts: dict) -> str:
    rows = []
    for name in counts:
        for selection in ("all", "1% pre-pruned"):
            group = [p for p in projected if p["model"] == name and p["selection"] == selection]
            rows.append([name, f"{counts[name]['total'] / 1e9:.2f}B", selection, f"{group[0]['selected']:,}",
                         f"{group[0]['base_gb']:.2f}"] + [f"{p['rank_gb']:.1f}" for p in group])
    return markdown(["model", "params", "selection", "selected weights", "bf16 base GB", "N=1", "N=2", "N=4", "N=8"],
                    rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--state-dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                        help="dtypes of the AdamW moments to measure (AdamWSteps / optimizer_state_dtype)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ in the processes (a fixed threshold: freed large "
                        "buffers go back to the OS instead of staying in the heap); writes sharded_memory_mmap.*")
    parser.add_argument("--tables-only", action="store_true",
                        help="rebuild the tables from the saved JSON's per-rank records instead of measuring")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--state-dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        records = worker(args.steps, args.warmup, args.state_dtype)
        if records is not None:
            print("RESULT " + json.dumps(records), flush=True)
        return
    name = "sharded_memory" if args.malloc_mmap_threshold is None else "sharded_memory_mmap"
    if args.tables_only:  # the tables again from the saved ranks' records (e.g. after a change of the projection)
        saved = json.loads((RESULTS / f"{name}.json").read_text())
        command, date, args.steps, args.warmup = saved["command"], saved["date"], saved["steps"], saved["warmup"]
        runs_of = {dtype: {int(n): records for n, records in saved["results"][dtype]["ranks"].items()}
                   for dtype in saved["results"]}
    else:
        command = ("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sharded_memory.py --processes "
                   + " ".join(map(str, args.processes)) + f" --steps {args.steps} --warmup {args.warmup} "
                   "--state-dtypes " + " ".join(args.state_dtypes))
        if args.malloc_mmap_threshold is not None:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)  # inherited by the launched ranks
            command += f" --malloc-mmap-threshold {args.malloc_mmap_threshold}"
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        runs_of = {dtype: {n: run(n, args.steps, args.warmup, dtype) for n in args.processes}
                   for dtype in args.state_dtypes}
    counts = {model: selected_counts(shape) for model, shape in LLAMAS.items()}
    results = {}
    shape = ", ".join(f"{k} {v}" for k, v in SHAPE.items())
    table = (f"`{command}`\n\n({date}.) Per-rank memory of sharded GRADIEND training beyond the loaded base: a "
             f"tiny-vocabulary Llama (random init, fp32; {shape}), all backbone weights selected, "
             f"{ROWS} rows of one transition per step, {args.warmup} warm-up + {args.steps} steps, "
             "gloo on CPU, OMP_NUM_THREADS=1. Peak = VmHWM after the steps - VmRSS before the GradiendModel is built "
             "(the high-water mark restarted there via /proc/self/clear_refs), largest rank; state = bottleneck + "
             "AdamW moments + source-gradient buffer + indices, from tensor numels."
             + (f" glibc MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}." if args.malloc_mmap_threshold else ""))
    for dtype, runs in runs_of.items():
        summary = summarise(runs)
        projected = projections(summary, counts)
        sharded = [(s["N"], s["bytes_per_selected"]) for s in summary if s["N"] > 1]
        a, c = fit(sharded) if sharded else (float("nan"), float("nan"))
        results[dtype] = {"summary": summary, "ranks": runs, "fit_sharded": {"a": a, "c": c},
                          "projections": projected}
        table += (f"\n\n#### AdamW moments in {dtype}\n\n" + measured_table(summary)
                  + f"\n\nFit over the sharded runs (N > 1): bytes per selected weight per rank = **{a:.1f} / N "
                  f"{'+' if c >= 0 else '-'} {abs(c):.1f}**.\n\nProjected GB per rank ({dtype} moments): bf16 base "
                  "replica (2 bytes per parameter) + selected weights x (the measured bytes per weight for N = 1, the "
                  "fit for N > 1); 1% pre-pruned adds the int64 indices, 8 bytes per kept weight on every rank (the "
                  "whole selection's) + 8 / N for N > 1 (the rank's slice). Activations and the transient buffers of "
                  "the largest parameter are not included.\n\n" + projection_table(projected, counts))
    write_results(name, {"command": command, "malloc_mmap_threshold": args.malloc_mmap_threshold, "date": date,
                         "rows": ROWS, "steps": args.steps, "warmup": args.warmup, "shape": SHAPE,
                         "llama_counts": counts, "results": results}, table)


if __name__ == "__main__":
    main()
