"""Per-row encodings: one forward-mode pass (model.encode_rows, torch.func.jvp along W_e) vs one backward pass per row.

For each model (`bert-base`: BERT-base-shaped masked LM, random init; `smollm2`: the real SmolLM2-135M) and selection
(`default`: GradiendConfig's default target_parameters, every backbone weight; `middle-layers`: 4 middle transformer
layers, BERT 4-7 / SmolLM2 12-15; `pruned-1%`: pre_prune to the top 1% of the default selection), 32 rows of both
classes (common.mixed_rows) are collated into one batch and timed side by side (alternating, best of --repeats; the
first call of each path is the warm-up and the correctness check):

- jvp: `model.encode_rows(batch)`, h of every row's own gradient by one forward-mode pass;
- per-row backward: `torch.stack([model.encode(collate([r])) for r in rows])`, the product's naive path (one 1-row
  batch at a time: the source AND the target gradient, then W_e . source);
- per-row source only: the least a per-row backward path must do (only the source gradient of each 1-row batch).

The encoder activation is the identity here so that the check compares the linear read-outs themselves: the run fails
unless max |jvp - per-row| <= 1e-3 x max |h| for both per-row paths. Prints a markdown table and writes
benchmarks/results/per_row.{json,md} (or --name).

Run (on the shared 2-core machine):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/per_row.py [--models bert-base smollm2] [--rows 32] [--repeats 3]
        [--selections default middle-layers pruned-1%]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODELS, load_model, markdown, mixed_rows, write_results  # noqa: E402

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model  # noqa: E402
from gradiend_hf.forward_mode import kept_tokens, lane_assignment  # noqa: E402

CLASSES = ["female", "male"]
SELECTIONS = ("default", "middle-layers", "pruned-1%")
MIDDLE_LAYERS = {"bert-base": [r"bert\.encoder\.layer\.[4-7]\."], "smollm2": [r"model\.layers\.1[2-5]\."]}
# max |difference| / max |h|: h sums n ~ 1e7-1e8 products of random sign (a random encoder), so float32 rounding of the
# gradients, summed in other orders by the two paths, reaches ~1e-4 of |h|; an error in what is computed is far larger.
RELATIVE_TOLERANCE = 1e-3


def adapter(base, tokenizer, model_name: str, selection: str):
    config = GradiendConfig(feature_classes=CLASSES, encoder_activation="identity")
    if selection == "default":
        return get_gradiend_model(base, config)
    if selection == "middle-layers":
        return get_gradiend_model(base, config.with_updates(target_parameters=MIDDLE_LAYERS[model_name]))
    if selection == "pruned-1%":
        from gradiend_hf.pruning import pre_prune

        return pre_prune(base, mixed_rows(32), tokenizer, 0.01, config=config, rows=16, batch_size=8)
    raise ValueError(selection)


def tokens_run(model, batch) -> int:
    """Tokens the forward-mode pass runs: the rows' kept tokens in packed lanes (or the padded batch)."""
    engine, side = model.engine, model.gradiend_config.source
    side = "alternative" if side == "diff" else side
    keep = kept_tokens(batch[f"{side}_attention_mask"], [batch[f"{side}_labels"]], engine.causal)
    if not engine.packing:
        return int(keep.shape[0] * (keep.any(0).nonzero().max() + 1))
    counts = keep.sum(1).tolist()
    lanes = lane_assignment(counts)
    return len(lanes) * max(sum(counts[r] for r in lane) for lane in lanes)


def measure(model_name: str, selection: str, n_rows: int, repeats: int, base, tokenizer) -> dict:
    model = adapter(base, tokenizer, model_name, selection)
    collate = GradiendDataCollator(tokenizer, model.objective, CLASSES)
    rows = mixed_rows(n_rows)
    batch = collate(rows)
    source = model.gradiend_config.source
    paths = {
        "jvp": lambda: model.encode_rows(batch),
        "per_row_backward": lambda: torch.stack([model.encode(collate([r])) for r in rows]),
        "per_row_source": lambda: torch.stack(
            [model.bottleneck.encode(model.engine.compute(collate([r]), (source,))[source]) for r in rows]),
    }
    with torch.no_grad():
        first = {name: fn() for name, fn in paths.items()}  # warm-up, and the check
    scale = float(first["per_row_backward"].abs().max())
    for name in ("per_row_backward", "per_row_source"):
        torch.testing.assert_close(first["jvp"], first[name], rtol=0, atol=RELATIVE_TOLERANCE * scale,
                                   msg=lambda m: f"{model_name}/{selection}: jvp vs {name}: {m}")
    best = {name: float("inf") for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            with torch.no_grad():
                fn()
            best[name] = min(best[name], time.perf_counter() - start)
    mask = batch["alternative_attention_mask"]
    result = {
        "model": model_name, "selection": selection, "selected_weights": model.num_entries, "rows": n_rows,
        "real_tokens": int(mask.sum()), "padded_tokens": int(mask.numel()), "jvp_tokens": tokens_run(model, batch),
        "packed": bool(model.engine.packing), "max_abs_h": scale,
        "max_relative_difference": float((first["jvp"] - first["per_row_backward"]).abs().max()) / scale,
        **{f"{name}_s": t for name, t in best.items()},
        "speedup": best["per_row_backward"] / best["jvp"],
        "speedup_vs_source_only": best["per_row_source"] / best["jvp"],
    }
    print(result, flush=True)
    model.unload()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--selections", nargs="+", default=list(SELECTIONS), choices=SELECTIONS)
    parser.add_argument("--name", default="per_row", help="results file stem (benchmarks/results/<name>.json)")
    args = parser.parse_args()
    results = []
    for model_name in args.models:
        base, tokenizer = load_model(model_name)
        for selection in args.selections:
            results.append(measure(model_name, selection, args.rows, args.repeats, base, tokenizer))
        del base
    header = ["model", "selection", "selected weights", "tokens: real / padded / jvp runs", "jvp s",
              "per-row backward s", "speed-up", "per-row source-only s", "speed-up vs source-only"]
    table = markdown(header, [
        [r["model"], r["selection"], f"{r['selected_weights']:,}",
         f"{r['real_tokens']} / {r['padded_tokens']} / {r['jvp_tokens']}{'' if r['packed'] else ' (padded)'}",
         f"{r['jvp_s']:.2f}", f"{r['per_row_backward_s']:.2f}", f"**{r['speedup']:.1f}x**",
         f"{r['per_row_source_s']:.2f}", f"{r['speedup_vs_source_only']:.1f}x"] for r in results])
    write_results(args.name, {"rows": args.rows, "repeats": args.repeats, "results": results,
                              "generated": time.strftime("%Y-%m-%d %H:%M:%S")}, table)


if __name__ == "__main__":
    main()
