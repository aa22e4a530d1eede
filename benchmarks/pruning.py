"""Pre-pruning on the real SmolLM2-135M (CPU): peak memory, step time and encoder quality at 100%, 10%, 1% kept.

Each setting runs in its own subprocess (so peaks do not mix): load the base and page in its (memory-mapped) weights,
take the resident memory as the baseline, then
  0. plain forward+backward passes over the importance batches whose hooks just drop the gradients (reference: what any
     gradient pass costs beyond the base: activations, one parameter's gradient at a time, allocator slack);
  1. pre-prune over the default selection (all backbone weights except the tied embedding/LM head, ~106M entries);
     100% = the dense adapter, no pruning pass. Reported: its peak beyond the baseline and, per selected weight, its
     peak minus the plain pass's peak (the accumulator is 4 B per selected weight);
  2. train with GradiendTrainer on a learnable task (gender pronouns after first names: "{name} said that [MASK] ..."
     with she/he), reporting the median step time and the training peak;
  3. evaluate the encoder (evaluation.evaluate_encoder) on rows with held-out names: |Pearson correlation|.
Peaks are the kernel's resident high-water mark (VmHWM), reset before each phase (/proc/self/clear_refs).

Run: .venv/bin/python benchmarks/pruning.py [--keeps 1.0 0.1 0.01] [--steps 30] [--threads 1]
Writes benchmarks/results/pruning.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "pruning.json"
FEMALE = ["Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen",
          "Nancy", "Lisa", "Betty", "Margaret", "Sandra", "Ashley", "Emily", "Donna", "Michelle", "Carol", "Amanda",
          "Melissa", "Deborah", "Stephanie"]
MALE = ["James", "John", "Robert", "Michael", "William", "David", "Richard", "Joseph", "Thomas", "Charles",
        "Christopher", "Daniel", "Matthew", "Anthony", "Mark", "Donald", "Steven", "Paul", "Andrew", "Joshua",
        "Kenneth", "Kevin", "Brian", "George"]
TEMPLATES = [
    "{name} said that [MASK] would be late today.",
    "{name} called because [MASK] needed some help.",
    "When {name} arrived, [MASK] was very tired.",
    "{name} told me that [MASK] had finished the report.",
    "I asked {name} whether [MASK] wanted coffee.",
]
TEST_NAMES = 8  # per class, held out from training


def pronoun_rows(names: dict[str, list[str]], templates: list[str]) -> list[dict]:
    word = {"female": "she", "male": "he"}
    other = {"female": "male", "male": "female"}
    return [dict(masked=t.format(name=n), factual=word[c], alternative=word[other[c]], factual_class=c,
                 alternative_class=other[c])
            for c, ns in names.items() for n in ns for t in templates]


def memory() -> dict[str, int]:
    """Current and peak resident memory of this process, bytes."""
    text = Path("/proc/self/status").read_text()
    return {key: 1024 * int(re.search(rf"{key}:\s+(\d+)", text).group(1)) for key in ("VmRSS", "VmHWM")}


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def plain_gradient_pass(base, names: list[str], batch) -> None:
    """Reference cost: one forward+backward of the same rows with hooks that just drop each gradient."""
    import torch

    from gradiend_hf.gradients import side_inputs
    from gradiend_hf.objective import row_losses
    from gradiend_hf.selection import parameter_dict

    params = parameter_dict(base, names)
    handles = []
    for p in params.values():
        p.requires_grad_(True)
        handles.append(p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None)))
    with torch.enable_grad():
        row_losses(base(**side_inputs(batch, "alternative")).logits, batch["alternative_labels"]).mean().backward()
    for handle in handles:
        handle.remove()
    for p in params.values():
        p.requires_grad_(False)


def worker(keep: float, steps: int, learning_rate: float, rows: int, seed: int, threads: int) -> dict:
    import torch
    from transformers import TrainerCallback

    from gradiend_hf import (GradiendConfig, GradiendDataCollator, GradiendTrainer, GradiendTrainingArguments,
                             evaluate_encoder, get_gradiend_model)
    from gradiend_hf.offline import load_smollm2
    from gradiend_hf.pruning import importance_batches, pre_prune
    from gradiend_hf.selection import select_parameters

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    base, tokenizer = load_smollm2()
    with torch.no_grad():  # the weights are memory-mapped: page them all in before taking the baseline
        for p in base.parameters():
            p.sum()
    train = pronoun_rows({"female": FEMALE[TEST_NAMES:], "male": MALE[TEST_NAMES:]}, TEMPLATES)
    test = pronoun_rows({"female": FEMALE[:TEST_NAMES], "male": MALE[:TEST_NAMES]}, TEMPLATES[:3])
    config = GradiendConfig(feature_classes=["female", "male"], init_seed=seed)
    names = select_parameters(base, config.target_parameters, config.exclude_parameters)
    params = dict(base.named_parameters())
    selected = sum(params[n].numel() for n in names)
    collate = GradiendDataCollator(tokenizer, "causal_lm", config.feature_classes)
    batches = [collate(b)
               for b in importance_batches(train, config.feature_classes, rows=rows, batch_size=8, seed=seed)]
    base_rss = memory()["VmRSS"]

    reset_peak()
    for batch in batches:  # the same batches pre-pruning reads
        plain_gradient_pass(base, names, batch)
    plain_peak = memory()["VmHWM"] - base_rss

    reset_peak()
    start = time.perf_counter()
    if keep >= 1.0:
        model = get_gradiend_model(base, config)
    else:
        model = pre_prune(base, train, tokenizer, keep, rows=rows, batch_size=8, seed=seed, config=config)
    prune_seconds = time.perf_counter() - start
    prune_peak = memory()["VmHWM"] - base_rss

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    reset_peak()
    trainer = GradiendTrainer(
        model=model,
        args=GradiendTrainingArguments(output_dir="/tmp/gradiend_pruning_benchmark", max_steps=steps,
                                       learning_rate=learning_rate, per_device_train_batch_size=4, eval_strategy="no",
                                       save_strategy="no", load_best_model_at_end=False, logging_steps=max(steps, 1),
                                       disable_tqdm=True, seed=seed),
        train_dataset=train, processing_class=tokenizer, callbacks=[StepTimer()],
    )
    trainer.train()
    train_peak = memory()["VmHWM"] - base_rss
    start = time.perf_counter()
    encoder = evaluate_encoder(model, test, tokenizer, neutral=0, progress=False, seed=seed)
    eval_seconds = time.perf_counter() - start
    return {
        "keep": keep,
        "selected": selected,
        "kept": model.num_entries,
        "tensors": len(model.bottleneck.names),
        "plain_gradient_pass_peak_bytes": plain_peak,
        "prune_seconds": prune_seconds if keep < 1.0 else None,
        "prune_peak_bytes": prune_peak if keep < 1.0 else None,
        "prune_overhead_bytes_per_selected": (prune_peak - plain_peak) / selected if keep < 1.0 else None,
        "train_peak_bytes": train_peak,
        "train_peak_bytes_per_selected": train_peak / selected,
        "step_seconds_median": statistics.median(times[1:] or times),
        "step_seconds_all": times,
        "encoder_correlation": encoder.correlation,
        "encoder_abs_correlation": abs(encoder.correlation),
        "encoder_binary_accuracy": encoder.binary_accuracy,
        "eval_seconds": eval_seconds,
        "test_rows": len(test),
        "train_rows": len(train),
        "steps": steps,
        "learning_rate": learning_rate,
        "importance_rows": rows if keep < 1.0 else 0,
        "threads": torch.get_num_threads(),
    }


def table(results: list[dict]) -> str:
    gb = lambda b: f"{b / 1e9:.2f}"
    lines = [
        "| kept | entries | pre-prune s | pre-prune peak GB | pre-prune minus plain fwd+bwd, B/selected "
        "| train peak GB (B/selected) | step s | abs corr, held-out names |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["prune_seconds"] is None:
            prune = "- (dense) | - | -"
        else:
            prune = (f"{r['prune_seconds']:.1f} | {gb(r['prune_peak_bytes'])} | "
                     f"{r['prune_overhead_bytes_per_selected']:.2f}")
        lines.append(
            f"| {100 * r['keep']:g}% | {r['kept']:,} | {prune} | {gb(r['train_peak_bytes'])} "
            f"({r['train_peak_bytes_per_selected']:.2f}) | {r['step_seconds_median']:.2f} | "
            f"{r['encoder_abs_correlation']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--rows", type=int, default=32, help="rows pre-pruning estimates the importance from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a shared 2-core machine makes 2 spinning threads many times slower)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.keeps[0], args.steps, args.learning_rate, args.rows, args.seed,
                                            args.threads)))
        return
    results = []
    for keep in args.keeps:
        command = [sys.executable, __file__, "--worker", "--keeps", str(keep), "--steps", str(args.steps),
                   "--learning-rate", str(args.learning_rate), "--rows", str(args.rows), "--seed", str(args.seed),
                   "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode or not line:
            sys.stderr.write(done.stderr[-3000:])
            raise SystemExit(f"setting keep={keep} failed (exit {done.returncode})")
        results.append(json.loads(line[-1][len("RESULT "):]))
        print(f"keep={keep}: done", file=sys.stderr)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"results": results}, indent=2) + "\n")
    print(f"SmolLM2-135M, default selection ({results[0]['selected']:,} weights), {args.steps} steps of 4 rows, lr "
          f"{args.learning_rate}, {results[0]['threads']} thread(s), importance from {args.rows} rows; "
          f"peaks: resident memory "
          f"beyond the loaded base; plain fwd+bwd passes over the same 8-row batches peak at "
          f"{results[0]['plain_gradient_pass_peak_bytes'] / 1e9:.2f} GB\n")
    print(table(results))


if __name__ == "__main__":
    main()
