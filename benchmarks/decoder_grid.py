"""Decoder grid: in-place apply/revert (evaluate_decoder) vs a deep copy of the model per candidate.

Same 17 candidates (the base + feature factors +1/-1 x 8 learning rates), same 4 rows and 4 neutral texts, on the two
benchmark models of common.py: `bert-base` (masked LM: P(word) at the mask, LMS = accuracy on 15% masked neutral
tokens) and `smollm2` (causal LM: P(word) after the prefix, LMS = 1/(1+NLL) on the neutral text). Three selections per
model: all backbone weights (the default, which includes layer 0 (SmolLM2) or the position embeddings (BERT), so
nothing can be replayed), four middle layers, the top four layers (attention + MLP weights), and the top four layers
with what a pruned adapter may keep beside them: the input embeddings' rows of she/he (tied to the LM head) and the
final norm (SmolLM2) or the MLM head's transform (BERT), which before replay.py's plan meant full forwards.

- in-place: evaluate_decoder, i.e. one backup of the selected weights, every candidate written over them, the prefix
  below the first edited layer replayed from the base pass, logits only where scored (replay.GridForward);
- deep copy: the naive way, copy.deepcopy of the model per candidate, the edit added to the copy, plain full forwards.

Each (model, selection, variant) runs in its own process so that its peak memory (VmHWM over the VmRSS before the
grid, common.reset_peak) is its own; runs alternate between the variants and the fastest counts. Per variant the time
of the forward passes is measured too (in-place: the scoring calls inside evaluate_decoder; deep copy: the scoring
calls after the copy and the edit), so the table shows what is left when copying and editing cost nothing. The run
fails unless both variants give the same numbers (P(female), P(male), LMS and NLL of every candidate, rtol 1e-4).

Run (on the shared 2-core machine, a few minutes per model):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decoder_grid.py --models bert-base smollm2 [--repeat 2]
Results: benchmarks/results/decoder_grid.{json,md}; a run of some models or selections keeps the others' results.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RATES = [1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0]
NAMES = [("Mary", "female"), ("John", "male"), ("Linda", "female"), ("James", "male")]
NEUTRAL = [
    "The committee met on Tuesday to discuss the budget for the next year.",
    "Rain is expected across the northern region later this week.",
    "The museum opened a new wing dedicated to modern sculpture.",
    "Engineers inspected the bridge after the storm passed.",
]
BERT_BLOCK = r"(attention\.self|attention\.output\.dense|intermediate|output\.dense)\."
SELECTIONS = {
    "smollm2": {
        "all backbone": None,
        "layers 12-15": [r"model\.layers\.1[2-5]\.(self_attn|mlp)\."],
        "layers 26-29": [r"model\.layers\.2[6-9]\.(self_attn|mlp)\."],
        # a pruned adapter's shape: the tied embeddings' rows of the feature words, the top layers, the final norm
        "layers 26-29 + norm + she/he rows": [r"model\.layers\.2[6-9]\.(self_attn|mlp)\.", r"model\.norm\.",
                                               r"model\.embed_tokens\."],
    },
    "bert-base": {
        "all backbone": None,
        "layers 4-7": [r"bert\.encoder\.layer\.[4-7]\." + BERT_BLOCK],
        "layers 8-11": [r"bert\.encoder\.layer\.([89]|1[01])\." + BERT_BLOCK],
        "layers 8-11 + head + she/he rows": [r"bert\.encoder\.layer\.([89]|1[01])\." + BERT_BLOCK,
                                             r"cls\.predictions\.transform\.", r"bert\.embeddings\.word_embeddings\."],
    },
}
ROW_WORDS = ["she", "he", " she", " he", "She", "He", " She", " He"]  # "... rows": only these tokens' embedding rows
CANDIDATES = [(0.0, 0.0)] + [(ff, lr) for ff in (1.0, -1.0) for lr in RATES]
COLUMNS = ["p_female", "p_male", "lms", "nll"]


def rows() -> list[dict]:
    out = []
    for name, cls in NAMES:
        other = "male" if cls == "female" else "female"
        word, alt = ("she", "he") if cls == "female" else ("he", "she")
        out.append(dict(masked=f"{name} said that [MASK] would arrive late.", factual=word, alternative=alt,
                        factual_class=cls, alternative_class=other))
    return out


class Clock:
    """Wraps functions so that the time spent in them adds up under one name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attribute: str, key: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, attribute, timed)


def run(model_name: str, variant: str, selection: str) -> dict:
    """One grid in this process: seconds, its parts, peak memory over the state before it, and the numbers."""
    from gradiend_hf import GradiendConfig, evaluate_decoder, get_gradiend_model
    from gradiend_hf.data import GradiendDataCollator
    from gradiend_hf.edit import InPlaceEditor
    from gradiend_hf.evaluation import decoder as decoder_module
    from gradiend_hf.evaluation.lms import language_modelling_score, lms_batches
    from gradiend_hf.evaluation.probabilities import class_probabilities, class_words, word_batches, word_probabilities

    base, tokenizer = common.load_model(model_name)
    config = GradiendConfig(feature_classes=["female", "male"], target_parameters=SELECTIONS[model_name][selection])
    if selection.endswith(" rows"):  # the input embeddings pruned to the feature words' rows
        from gradiend_hf.model import GradiendModel

        embedding = base.get_input_embeddings().weight
        name = next(n for n, p in base.named_parameters() if p is embedding)
        ids = sorted({i for word in ROW_WORDS for i in tokenizer(word, add_special_tokens=False)["input_ids"]})
        width = embedding.shape[1]
        indices = {name: (torch.tensor(ids)[:, None] * width + torch.arange(width)).reshape(-1)}
        model = GradiendModel(base, config, indices=indices)
    else:
        model = get_gradiend_model(base, config)
    objective = model.lm_objective
    model_bytes = sum(t.numel() * t.element_size() for t in list(base.parameters()) + list(base.buffers()))
    clock = Clock()
    common.reset_peak()
    before = common.memory()["VmRSS"]
    start = time.perf_counter()
    if variant == "inplace":
        clock.wrap(decoder_module, "word_probabilities", "forwards")
        clock.wrap(decoder_module, "language_modelling_score", "forwards")
        clock.wrap(InPlaceEditor, "apply", "edit")
        clock.wrap(InPlaceEditor, "__init__", "backup")
        grid = evaluate_decoder(model, rows(), tokenizer, NEUTRAL, feature_factors=[1.0, -1.0], learning_rates=RATES,
                                search="grid", progress=False).grid
        if grid["skipped"].any():
            raise SystemExit("the grid skipped candidates (LMS give-up rule); the comparison needs all of them")
        numbers = grid[["feature_factor", "learning_rate"] + COLUMNS].values.tolist()
    else:  # the naive way: copy the whole model for every candidate, write the edit into the copy, plain forwards
        data = rows()
        collate = GradiendDataCollator(tokenizer, objective, ["female", "male"])
        words = class_words(data, ["female", "male"], tokenizer)
        batches = word_batches(data, [w for ws in words.values() for w in ws], collate)
        neutral = lms_batches(tokenizer, NEUTRAL, objective)
        numbers, seconds = [], {"copy": 0.0, "edit": 0.0, "forwards": 0.0}
        for ff, lr in CANDIDATES:
            t0 = time.perf_counter()
            candidate = copy.deepcopy(base)
            t1 = time.perf_counter()
            params = dict(candidate.named_parameters())
            with torch.no_grad():
                for name in model.bottleneck.names:
                    b = model.bottleneck
                    params[name].add_(b.to_full(name, b.edit_delta(name, ff, lr)).reshape(params[name].shape))
            t2 = time.perf_counter()
            probs = class_probabilities(word_probabilities(candidate, batches), words)
            lms = language_modelling_score(candidate, neutral, objective)
            t3 = time.perf_counter()
            numbers.append([ff, lr, float(probs["female"].mean()), float(probs["male"].mean()), lms.lms, lms.nll])
            del candidate, params
            for key, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2)):
                seconds[key] += dt
        clock.seconds.update(seconds)
    total = time.perf_counter() - start
    peak = common.memory()["VmHWM"] - before
    return {"model": model_name, "variant": variant, "selection": selection, "seconds": total,
            "parts": clock.seconds, "peak_extra_mb": peak / 2**20, "model_mb": model_bytes / 2**20,
            "selected_weights": model.num_entries, "numbers": numbers}


def compare(fast: dict, slow: dict) -> float:
    """Largest relative difference of the two variants' numbers; fails when they differ beyond rounding."""
    fast_numbers = {(r[0], r[1]): r[2:] for r in fast["numbers"]}
    if set(fast_numbers) != {(r[0], r[1]) for r in slow["numbers"]}:
        raise SystemExit(f"{fast['model']} {fast['selection']}: the two grids hold different candidates")
    worst = 0.0
    for ff, lr, *values in slow["numbers"]:
        got, want = torch.tensor(fast_numbers[(ff, lr)], dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-9):
            raise SystemExit(f"{fast['model']} {fast['selection']} ff={ff} lr={lr}: in-place {got.tolist()} "
                             f"!= deep copy {want.tolist()} ({COLUMNS})")
        worst = max(worst, float(((got - want).abs() / want.abs().clamp_min(1e-30)).max()))
    return worst


def summary(model_name: str, selection: str, fast: dict, slow: dict, worst: float) -> dict:
    strip = lambda r: {k: v for k, v in r.items() if k != "numbers"}
    fwd = fast["parts"]["forwards"]
    return {
        "model": model_name, "selection": selection, "selected_weights": fast["selected_weights"],
        "model_mb": fast["model_mb"], "inplace": strip(fast), "deepcopy": strip(slow),
        "speedup": slow["seconds"] / fast["seconds"],
        # what the in-place grid could reach if writing the edits cost nothing: its forward passes are the floor
        "speedup_bound_forwards_only": slow["seconds"] / fwd,
        "resident_models_inplace": 1 + fast["peak_extra_mb"] / fast["model_mb"],
        "resident_models_deepcopy": 1 + slow["peak_extra_mb"] / slow["model_mb"],
        "largest_relative_difference": worst,
    }


def table(runs: list[dict]) -> str:
    header = ["model", "selection", "selected weights", "in-place s", "deep-copy s", "speed-up",
              "in-place: forwards s / edits s", "deep copy: forwards s / copy+edit s", "bound (forwards only)",
              "in-place extra MB (models held)", "deep-copy extra MB (models held)"]
    lines = []
    for r in runs:
        fast, slow = r["inplace"], r["deepcopy"]
        edits = fast["parts"].get("edit", 0.0) + fast["parts"].get("backup", 0.0)
        lines.append([
            r["model"], r["selection"], f"{r['selected_weights']:,}", f"{fast['seconds']:.2f}",
            f"{slow['seconds']:.2f}",
            f"**{r['speedup']:.2f}x**", f"{fast['parts']['forwards']:.2f} / {edits:.2f}",
            f"{slow['parts']['forwards']:.2f} / {slow['parts']['copy'] + slow['parts']['edit']:.2f}",
            f"{r['speedup_bound_forwards_only']:.2f}x",
            f"{fast['peak_extra_mb']:.0f} ({r['resident_models_inplace']:.2f})",
            f"{slow['peak_extra_mb']:.0f} ({r['resident_models_deepcopy']:.2f})",
        ])
    return common.markdown(header, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(SELECTIONS), default=list(SELECTIONS))
    parser.add_argument("--selections", nargs="+", help="only these selections (names as in the table)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per variant, alternating; the fastest counts")
    parser.add_argument("--variant", choices=["inplace", "deepcopy"], help=argparse.SUPPRESS)  # one run (subprocess)
    parser.add_argument("--selection", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run(args.models[0], args.variant, args.selection)))
        return
    previous = common.RESULTS / "decoder_grid.json"
    kept = []
    if previous.exists():  # a run of some models keeps the other models' results
        old = json.loads(previous.read_text())
        rerun = lambda r: r["model"] in args.models and (not args.selections or r["selection"] in args.selections)
        kept = [r for r in old.get("runs", []) if not rerun(r) and r["selection"] in SELECTIONS[r["model"]]]
    runs = []
    for model_name in args.models:
        for selection in SELECTIONS[model_name]:
            if args.selections and selection not in args.selections:
                continue
            pair: dict = {}
            for _ in range(args.repeat):  # alternating, so that a busy spell of the machine hits both variants
                for variant in ("inplace", "deepcopy"):
                    command = [sys.executable, __file__, "--models", model_name, "--variant", variant,
                               "--selection", selection]
                    out = subprocess.run(command, capture_output=True, text=True)
                    if out.returncode:
                        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    if variant not in pair or result["seconds"] < pair[variant]["seconds"]:
                        pair[variant] = result
            worst = compare(pair["inplace"], pair["deepcopy"])
            runs.append(summary(model_name, selection, pair["inplace"], pair["deepcopy"], worst))
            print(f"{model_name} {selection}: {runs[-1]['speedup']:.2f}x (numbers agree, largest relative difference "
                  f"{worst:.1e})", file=sys.stderr, flush=True)
    order = {m: i for i, m in enumerate(SELECTIONS)}
    runs = sorted(kept + runs, key=lambda r: (order[r["model"]], list(SELECTIONS[r["model"]]).index(r["selection"])))
    text = (f"Decoder grid: {len(CANDIDATES)} candidates, {len(rows())} rows, {len(NEUTRAL)} neutral texts, "
            f"{torch.get_num_threads()} thread(s), best of {args.repeat} alternating runs per variant. "
            "Speed-up = deep-copy s / in-place s; bound = deep-copy s / in-place forwards s (the speed-up if writing "
            "edits cost nothing). Extra MB = peak resident memory over the state before the grid (model and adapter "
            "loaded); models held = 1 + extra / model size. Both variants give the same numbers (checked).\n\n")
    common.write_results("decoder_grid", {"candidates": len(CANDIDATES), "rows": len(rows()),
                                          "neutral_texts": len(NEUTRAL), "repeat": args.repeat, "runs": runs},
                         text + table(runs))


if __name__ == "__main__":
    main()
