"""Training cost (issue 8, items 1 and 2): step time as a ratio to a plain forward+backward, and peak memory per
selected weight, on a BERT-base-shaped masked LM (random init) and the real SmolLM2-135M.

Item 1, in one process, timed side by side (alternating, best of --repeats): one GRADIEND training step on a batch
of 32 rows (default source 'alternative', target 'diff'; the trainer's fused step), the plain step for reference
(GradiendModel.forward + backward + AdamW.step), and one plain forward+backward of the base model on the same batch
with the same weights requiring grad. With all default-selected weights and with 1% kept after pre-pruning. Checks
that the fused step's bottleneck after the step equals the plain step's (else fails).

Item 2, one subprocess per setting so peaks do not mix: the base is loaded and paged in, then GradiendTrainer runs
--memory-steps steps of 32 rows; reported is the resident high-water mark beyond the loaded base (VmHWM - VmRSS
before training), per selected weight. Variants: the fused step (float32 AdamW moments, the default),
the fused step with optimizer_state_dtype='bfloat16', and the plain step (forced by a clipping norm that is never
reached) for comparison.

Run: .venv/bin/python benchmarks/training.py [--models bert-base smollm2] [--repeats 3]
Writes benchmarks/results/training.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    MODELS,
    alternating,
    benchmark_rows,
    load_model,
    markdown,
    memory,
    mixed_rows,
    reset_peak,
    write_results,
)

CLASSES = ["female", "male"]
ROWS = 32
VARIANTS = ("fused", "fused-bf16", "plain")  # the trainer's step; with bfloat16 AdamW moments; autograd + AdamW.step


def adapter(base, tokenizer, keep: float):
    from gradiend_hf import GradiendConfig, get_gradiend_model
    from gradiend_hf.pruning import pre_prune

    config = GradiendConfig(feature_classes=CLASSES)
    if keep >= 1.0:
        return get_gradiend_model(base, config)
    return pre_prune(base, mixed_rows(64), tokenizer, keep, rows=64, batch_size=8, seed=0, config=config)


def optimizer(model) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.bottleneck.parameters(), lr=1e-4, weight_decay=0.01, fused=True)


def step_times(name: str, repeats: int) -> list[dict]:
    from gradiend_hf import GradiendDataCollator
    from gradiend_hf.fused import fused_step
    from gradiend_hf.gradients import side_inputs
    from gradiend_hf.objective import row_losses

    base, tokenizer = load_model(name)
    out = []
    for keep in (1.0, 0.01):
        model = adapter(base, tokenizer, keep)
        collate = GradiendDataCollator(tokenizer, model.objective, CLASSES)
        batch = collate(benchmark_rows(ROWS))
        params = list(model.selected_parameters().values())

        def plain_forward_backward():
            for p in params:
                p.requires_grad_(True)
            loss = row_losses(base(**side_inputs(batch, "alternative")).logits, batch["alternative_labels"]).mean()
            loss.backward()
            for p in params:
                p.grad = None
                p.requires_grad_(False)

        fused_optimizer, plain_optimizer = optimizer(model), optimizer(model)

        def plain_step():
            model(**batch).loss.backward()
            plain_optimizer.step()
            plain_optimizer.zero_grad(set_to_none=True)

        # fast == slow: one step of each from the same bottleneck
        start = copy.deepcopy(model.bottleneck.state_dict())
        fused_step(model, batch, optimizer(model))
        fused_after = {k: v.clone() for k, v in model.bottleneck.state_dict().items()}
        model.bottleneck.load_state_dict(start)
        plain_step()
        worst = 0.0
        for key, value in model.bottleneck.state_dict().items():
            torch.testing.assert_close(fused_after[key], value, rtol=1e-4, atol=1e-7)
            worst = max(worst, float((fused_after[key] - value).abs().max()))
        del start, fused_after
        plain_optimizer = optimizer(model)
        times = alternating({"plain_fwd_bwd": plain_forward_backward,
                             "fused": lambda: fused_step(model, batch, fused_optimizer),
                             "plain_step": plain_step}, repeats)
        out.append({"model": name, "keep": keep, "selected": model.num_entries, "seconds": times,
                    "ratio_fused": times["fused"] / times["plain_fwd_bwd"],
                    "ratio_plain_step": times["plain_step"] / times["plain_fwd_bwd"],
                    "largest_difference_fused_vs_plain": worst})
        print(f"{name} keep={keep}: {times}", file=sys.stderr)
        base = model.unload()
        model = fused_optimizer = plain_optimizer = None  # free before the next model (the closures are done)
    return out


def memory_worker(name: str, variant: str, steps: int) -> dict:
    from gradiend_hf import GradiendTrainer, GradiendTrainingArguments

    base, tokenizer = load_model(name)
    before = memory()["VmRSS"]  # the bottleneck itself counts: it exists only for training
    reset_peak()
    model = adapter(base, tokenizer, 1.0)
    trainer = GradiendTrainer(
        model=model,
        args=GradiendTrainingArguments(output_dir="/tmp/gradiend_training_benchmark", max_steps=steps,
                                       learning_rate=1e-4, per_device_train_batch_size=ROWS, eval_strategy="no",
                                       save_strategy="no", load_best_model_at_end=False, disable_tqdm=True,
                                       logging_steps=steps, max_grad_norm=1e9 if variant == "plain" else 0.0,
                                       optimizer_state_dtype="bfloat16" if variant == "fused-bf16" else "float32"),
        train_dataset=mixed_rows(2 * ROWS * steps), processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.uses_fused_step() == (variant != "plain")
    peak = memory()["VmHWM"] - before
    return {"model": name, "variant": variant, "selected": model.num_entries, "peak_bytes": peak,
            "bytes_per_selected": peak / model.num_entries, "steps": steps}


def memory_of(name: str, variant: str, steps: int) -> dict:
    command = [sys.executable, __file__, "--memory-worker", name, variant, "--memory-steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"memory worker {name}/{variant} failed (exit {done.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        print("RESULT " + json.dumps(memory_worker(*args.memory_worker, args.memory_steps)))
        return
    steps = [r for name in args.models for r in step_times(name, args.repeats)]
    peaks = [] if args.skip_memory else [memory_of(name, v, args.memory_steps)
                                         for name in args.models for v in VARIANTS]
    kept = lambda r: "all (default selection)" if r["keep"] >= 1 else f"{100 * r['keep']:g}% after pre-pruning"
    target = lambda r: 2.5 if r["keep"] >= 1 else 2.1
    table = ("Training step of 32 rows / plain forward+backward of the same batch "
             "(best of alternating runs)\n\n") + markdown(
        ["model", "selected weights", "plain fwd+bwd s", "GRADIEND step s", "ratio", "target", "plain GRADIEND step s",
         "its ratio"],
        [[r["model"], kept(r) + f", {r['selected']:,}", f"{r['seconds']['plain_fwd_bwd']:.3f}",
          f"{r['seconds']['fused']:.3f}", f"**{r['ratio_fused']:.2f}x**", f"<= {target(r)}x",
          f"{r['seconds']['plain_step']:.3f}", f"{r['ratio_plain_step']:.2f}x"]
         for r in steps])
    if peaks:
        table += ("\n\nPeak resident memory of training beyond the loaded base, "
                  "all default-selected weights\n\n") + markdown(
            ["model", "selected weights", "step", "peak GB", "bytes per selected weight", "target"],
            [[r["model"], f"{r['selected']:,}", r["variant"], f"{r['peak_bytes'] / 1e9:.2f}",
              f"**{r['bytes_per_selected']:.1f}**",
              "(56 for the textbook layout)" if r["variant"] == "plain" else "<= 40"] for r in peaks])
    write_results("training", {"steps": steps, "memory": peaks}, table)


if __name__ == "__main__":
    main()
