"""Decoder grid: in-place apply/revert (evaluate_decoder) vs a deep copy of the model per candidate.

Same 17 candidates (the base + feature factors +1/-1 x 8 learning rates), same rows and neutral texts, on the real
SmolLM2-135M (30 layers), for three parameter selections: all backbone weights (the default), layers 12-15 and the top
layers 26-29 (attention+MLP). The in-place grid computes only the layers from the first edited one on (prefix replay)
and the logits it scores, so its speed-up grows with the depth at which the selection starts; the deep copy is the
naive approach (copy, write the edit, plain full forward passes). Each variant runs in its own process so that peak
memory is its own. Checks that both give the same numbers, then prints a markdown table and writes JSON.

Run: .venv/bin/python benchmarks/decoder_grid.py [--out benchmarks/results/decoder_grid.json]
(on a shared machine: OMP_NUM_THREADS=1 nice -n 19 ...; the ratios are measured side by side)
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RATES = [1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0]
NAMES = [("Mary", "female"), ("John", "male"), ("Linda", "female"), ("James", "male")]
NEUTRAL = [
    "The committee met on Tuesday to discuss the budget for the next year.",
    "Rain is expected across the northern region later this week.",
    "The museum opened a new wing dedicated to modern sculpture.",
    "Engineers inspected the bridge after the storm passed.",
]


def rows() -> list[dict]:
    out = []
    for name, cls in NAMES:
        other = "male" if cls == "female" else "female"
        word, alt = ("she", "he") if cls == "female" else ("he", "she")
        out.append(dict(masked=f"{name} said that [MASK] would arrive late.", factual=word, alternative=alt,
                        factual_class=cls, alternative_class=other))
    return out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


SELECTIONS = {
    "all backbone": None,
    "layers 12-15": [r"model\.layers\.1[2-5]\.(self_attn|mlp)\."],
    "layers 26-29": [r"model\.layers\.2[6-9]\.(self_attn|mlp)\."],
}


def run(variant: str, selection: str) -> dict:
    from gradiend_hf import GradiendConfig, evaluate_decoder, get_gradiend_model
    from gradiend_hf.data import GradiendDataCollator
    from gradiend_hf.evaluation.lms import language_modelling_score, lms_batches
    from gradiend_hf.evaluation.probabilities import class_probabilities, class_words, word_batches, word_probabilities
    from gradiend_hf.offline import load_smollm2

    base, tokenizer = load_smollm2()
    model = get_gradiend_model(base, GradiendConfig(feature_classes=["female", "male"], target_parameters=SELECTIONS[selection]))
    loaded = rss_mb()
    start = time.perf_counter()
    if variant == "inplace":
        grid = evaluate_decoder(model, rows(), tokenizer, NEUTRAL, feature_factors=[1.0, -1.0], learning_rates=RATES,
                                progress=False).grid
        numbers = grid[["feature_factor", "learning_rate", "p_female", "p_male", "lms"]].values.tolist()
    else:  # the naive way: copy the whole model for every candidate, write the edit into the copy
        data = rows()
        collate = GradiendDataCollator(tokenizer, model.objective, ["female", "male"])
        words = class_words(data, ["female", "male"])
        batches = word_batches(data, [w for ws in words.values() for w in ws], collate)
        neutral = lms_batches(tokenizer, NEUTRAL, model.objective)
        numbers = []
        for ff, lr in [(0.0, 0.0)] + [(ff, lr) for ff in (1.0, -1.0) for lr in RATES]:
            candidate = copy.deepcopy(base)
            params = dict(candidate.named_parameters())
            with torch.no_grad():
                for name in model.bottleneck.names:
                    params[name].add_(model.edit_delta(name, ff, lr))
            probs = class_probabilities(word_probabilities(candidate, batches), words)
            lms = language_modelling_score(candidate, neutral, model.objective)
            numbers.append([ff, lr, float(probs["female"].mean()), float(probs["male"].mean()), lms.lms])
            del candidate
    seconds = time.perf_counter() - start
    return {"variant": variant, "selection": selection, "seconds": seconds, "peak_extra_mb": rss_mb() - loaded, "numbers": numbers,
            "selected_weights": model.num_entries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=["inplace", "deepcopy"])
    parser.add_argument("--selection", choices=list(SELECTIONS), default="all backbone")
    parser.add_argument("--out", default="benchmarks/results/decoder_grid.json")
    parser.add_argument("--repeat", type=int, default=2, help="runs per variant, alternating; the fastest counts")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run(args.variant, args.selection)))
        return
    results, worst = [], 0.0
    print(f"SmolLM2-135M, 17 candidates, {len(rows())} rows, {len(NEUTRAL)} neutral texts, {torch.get_num_threads()} threads, "
          f"best of {args.repeat} alternating runs\n")
    print("| selection | selected weights | in-place s | deep-copy s | speed-up | in-place extra MB | deep-copy extra MB |")
    print("|---|---|---|---|---|---|---|")
    for selection in SELECTIONS:
        pair: dict = {}
        for _ in range(args.repeat):  # alternating, so that a busy spell of the machine hits both variants
            for variant in ("inplace", "deepcopy"):
                command = [sys.executable, __file__, "--variant", variant, "--selection", selection]
                out = subprocess.run(command, capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                if variant not in pair or result["seconds"] < pair[variant]["seconds"]:
                    pair[variant] = result
        fast, slow = pair["inplace"], pair["deepcopy"]
        fast_numbers = {(r[0], r[1]): r[2:] for r in fast["numbers"]}
        for ff, lr, *values in slow["numbers"]:  # the fast path must compute the same numbers
            got, want = torch.tensor(fast_numbers[(ff, lr)]), torch.tensor(values)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
            worst = max(worst, float(((got - want).abs() / want.abs().clamp_min(1e-30)).max()))
        print(f"| {selection} | {fast['selected_weights']:,} | {fast['seconds']:.1f} | {slow['seconds']:.1f} | "
              f"{slow['seconds'] / fast['seconds']:.2f}x | {fast['peak_extra_mb']:.0f} | {slow['peak_extra_mb']:.0f} |")
        results.append({k: {x: v for x, v in r.items() if x != "numbers"} for k, r in pair.items()})
    print(f"\nnumbers of both variants agree (largest relative difference {worst:.1e})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
