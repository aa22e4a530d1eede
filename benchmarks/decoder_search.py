"""Decoder selection: the ladder search (the default) against the full grid, on a trained adapter of the main job.

Both run the main job's evaluation settings (every goal: balance judged in the 120 gender-neutral contexts,
strengthen and weaken each class; feature factors +1, -1, 0 x the 16-rung learning-rate ladder; 24 held-out rows,
24 neutral texts) on the run's own data, one after the other in one process, alternating `--repeat` times (the
fastest counts). The run fails unless both choose the same edit for every goal with the same scores.

Run after the main job (`make demo` writes runs/demo), on an idle machine:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/decoder_search.py --run runs/demo [--repeat 1]
Results: benchmarks/results/decoder_search.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import datasets

from common import markdown, write_results

from gradiend_hf import GradiendModel
from gradiend_hf.app.job import JobConfig
from gradiend_hf.app.pipeline import load_base
from gradiend_hf.evaluation import evaluate_decoder
from gradiend_hf.evaluation.decoder import all_goals
from gradiend_hf.evaluation.probabilities import class_words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="a finished run folder of the main job")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    job = JobConfig.from_file(f"{args.run}/job.yaml")
    base, tokenizer = load_base(job)
    model = GradiendModel.from_pretrained(base, f"{args.run}/adapter")
    data = datasets.load_from_disk(f"{args.run}/data")
    test = data["test"].shuffle(seed=0)
    spec, classes = job.evaluation, model.gradiend_config.feature_classes
    goals = all_goals(classes)
    kwargs = dict(neutral_texts=data["neutral"]["text"][: spec.neutral_texts], lms_ratio=spec.lms_ratio, goals=goals,
                  neutral_contexts=spec.context_texts(), context_words=class_words(list(test), classes, tokenizer),
                  progress=False)
    rows = test.select(range(min(spec.decoder_rows, len(test))))
    seconds, results = {"grid": [], "ladder": []}, {}
    for _ in range(args.repeat):
        for search in ("grid", "ladder"):
            start = time.perf_counter()
            results[search] = evaluate_decoder(model, rows, tokenizer, search=search, **kwargs)
            seconds[search].append(time.perf_counter() - start)
    table_rows, payload = [], {"run": args.run, "goals": goals, "searches": {}}
    for search, evaluation in results.items():
        grid = evaluation.grid
        scored = ~grid["skipped"]
        counts = {"lms": int(scored.sum()), "probabilities": int(grid[f"p_{classes[0]}"].notna().sum()),
                  "contexts": int(grid["context_mass"].notna().sum())}
        choice = {goal: evaluation.best(goal) for goal in goals}
        payload["searches"][search] = {"seconds": min(seconds[search]), "scored": counts,
                                       "edits": {g: e.to_dict() for g, e in choice.items()}}
        chosen = [f"{e.feature_factor:g} x {e.learning_rate:g}" for e in choice.values()]
        table_rows.append([search, f"{min(seconds[search]):.1f}", counts["lms"], counts["probabilities"],
                           counts["contexts"], *chosen])
    grid_edits, ladder_edits = (payload["searches"][s]["edits"] for s in ("grid", "ladder"))
    same = all((grid_edits[g]["feature_factor"], grid_edits[g]["learning_rate"])
               == (ladder_edits[g]["feature_factor"], ladder_edits[g]["learning_rate"]) for g in goals)
    if not same:
        raise SystemExit(f"the search chose differently from the grid: {ladder_edits} vs {grid_edits}")
    speedup = min(seconds["grid"]) / min(seconds["ladder"])
    payload["speedup"] = speedup
    table = markdown(["search", "seconds", "LMS scored", "P(class) scored", "contexts scored",
                      *[f"{g} (ff x lr)" for g in goals]], table_rows)
    table += (f"\n\nLadder search {speedup:.1f}x faster than the full grid, same edit for every goal "
              f"({args.run}, {len(rows)} rows, {spec.neutral_texts} neutral texts, "
              f"{len(spec.context_texts() or [])} neutral contexts).")
    write_results("decoder_search", payload, table)


if __name__ == "__main__":
    main()
