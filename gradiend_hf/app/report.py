"""report.md of a run folder: what was trained on what, the numbers that matter, and whether they meet the bar.

Everything comes from the run's JSON results, so the report can be rewritten at any time (`gradiend-hf report`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from ..atomic import write_text_atomically

ENCODER_BAR = 0.8  # |correlation| on held-out rows that counts as "the encoder found the feature"


def _f(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _mark(ok: Optional[bool]) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[ok]


def _table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(_f(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def checks(evaluation: dict[str, Any], classes: Sequence[str]) -> list[tuple[str, Optional[bool], str]]:
    """(claim, holds?, evidence) for the encoder, the balance edit and each strengthening edit."""
    out = []
    corr = evaluation["encoder"]["correlation"]
    out.append((f"encoder |correlation| >= {ENCODER_BAR} on held-out rows", abs(corr) >= ENCODER_BAR, f"{corr:.3f}"))
    edits, contexts = evaluation["edits"], evaluation.get("contexts") or {}
    if "balance" in edits:
        m = edits["balance"]["metrics"]
        lms_ok = m["lms"] >= 0.99 * m["base_lms"]
        if contexts:
            before, after = contexts["base"]["mean_abs_log_ratio"], contexts["balance"]["mean_abs_log_ratio"]
            out.append(("balance edit brings the classes closer in neutral contexts (mean |log P(a)/P(b)| falls)",
                        after < before, f"{before:.3f} -> {after:.3f}; ratio {contexts['base']['ratio']:.3f} -> "
                                        f"{contexts['balance']['ratio']:.3f}"))
        out.append(("balance edit keeps LMS >= 0.99 x base", lms_ok, f"{m['lms']:.4f} vs base {m['base_lms']:.4f}"))
    for goal in classes:
        if goal in edits:
            m = edits[goal]["metrics"]
            out.append((f"strengthening {goal!r} raises P({goal}) on the other class's rows",
                        m["score"] > m["base_score"], f"{m['base_score']:.4f} -> {m['score']:.4f}"))
    return out


def failure_report(run, why: str) -> str:
    """report.md of a run that must not be used: the failure first, then where to look."""
    job = run.load_job()
    a, b = job.adapter_config().feature_classes
    return "\n".join([
        f"# GRADIEND run FAILED: {a} vs {b} on `{job.model}`", "",
        f"**The encoder is not usable, so no edit was made and no model was saved: {why}.**", "",
        "What to try: more training steps, another learning rate (the encoder saturates if it is too high: h = +-1 for "
        "both classes), more seeds (`seeds: [0, 1, 2]`), more or cleaner data.", "",
        "Training curves: `plots/training.png`; per-seed verdicts: `results/training.json`, "
        "`training/seed_report.json`.", "",
    ])


def write_report(run) -> Path:
    """Render run/report.md from the run's results; returns its path."""
    job = run.load_job()
    config = job.adapter_config()
    classes = list(config.feature_classes)
    a, b = classes
    evaluation = run.read_json("evaluation.json")
    training = run.read_json("training.json")
    timings = run.read_json("timings.json")
    reload = run.read_json("reload.json") if (run.results / "reload.json").is_file() else None
    lines = [f"# GRADIEND run: {a} vs {b} on `{job.model}`", ""]

    selection = config.target_parameters or "all weights except embeddings"
    pruning = f", pre-pruned to the top {config.pre_prune} by |mean gradient|" if config.pre_prune else ""
    args = job.training_arguments(run.training)
    lines += [
        "## Setup", "",
        f"- base model: `{job.model}`; selected parameters: {selection}{pruning} -> "
        f"**{training['selected_entries']:,} weights** in the adapter",
        f"- data: `{job.data.recipe or 'row files'}` ({job.data.text if job.data.recipe else ''}); held-out rows for "
        f"the encoder: {evaluation['encoder']['rows']}, for the decoder grid: {evaluation['decoder_rows']}, "
        f"neutral texts for LMS: {evaluation['neutral_texts']}",
        f"- training: {training.get('steps')} steps, batch {args.per_device_train_batch_size} rows, learning rate "
        f"{args.learning_rate}, seeds tried {training['seeds_tried']} (converged {training['seeds_converged']}; chosen "
        f"seed {training['chosen_seed']})",
        f"- decoder grid: {evaluation['candidates']} candidates evaluated; selection keeps LMS >= "
        f"{job.evaluation.lms_ratio} x base",
        "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), "",
    ]

    lines += ["## Checks", "", "| claim | holds | evidence |", "|---|---|---|"]
    lines += [f"| {claim} | {_mark(ok)} | {evidence} |" for claim, ok, evidence in checks(evaluation, classes)]
    lines.append("")

    enc = evaluation["encoder"]
    lines += ["## Encoder (held-out rows)", "",
              _table(pd.DataFrame([{"correlation": enc["correlation"], "binary accuracy": enc["binary_accuracy"],
                                    "ternary accuracy": enc["ternary_accuracy"],
                                    f"mean h ({a})": enc.get(f"mean_h_{a}"), f"mean h ({b})": enc.get(f"mean_h_{b}"),
                                    "neutral mean abs h": enc["neutral_mean_abs_h"]}])),
              "", "![encoder](plots/encoder.png)", ""]

    rows = []
    for goal, record in evaluation["edits"].items():
        m = record["metrics"]
        rows.append({"goal": goal, "feature factor": record["feature_factor"], "learning rate": record["learning_rate"],
                     f"P({a}) base": m["base_probabilities"][a], f"P({a})": m["probabilities"][a],
                     f"P({b}) base": m["base_probabilities"][b], f"P({b})": m["probabilities"][b],
                     "LMS base": m["base_lms"], "LMS": m["lms"], "perplexity base": m.get("base_perplexity"),
                     "perplexity": m.get("perplexity")})
    balance = evaluation["edits"].get("balance", {}).get("metrics", {})
    where = (f"The balance edit is chosen in the neutral contexts below (closest P({a})/P({b}) to 1 among candidates "
             "that keep the LMS and 90% of the classes' probability mass); the others on held-out rows."
             if balance.get("selected_in") == "neutral contexts" else "All edits are chosen on held-out rows.")
    lines += ["## Edits", "",
              "P(class) is the mean over held-out rows of the summed probability of the class's words at the mask. "
              + where, "",
              _table(pd.DataFrame(rows)), "", "![decoder grid](plots/decoder.png)", ""]

    contexts = evaluation.get("contexts")
    if contexts:
        frame = pd.DataFrame([{"model": name, f"P({a})": c[f"p_{a}"], f"P({b})": c[f"p_{b}"],
                               f"P({a})/P({b})": c["ratio"], "mean abs log ratio": c["mean_abs_log_ratio"]}
                              for name, c in contexts.items()])
        lines += ["## Neutral contexts (the class is not decided by the text)", "",
                  "Sentences like \"The doctor said that [MASK] would be late today.\"; a balanced model has "
                  "P(a)/P(b) near 1 and mean |log ratio| near 0.", "", _table(frame), ""]
    if reload and reload.get("contexts"):
        saved, expected = reload["contexts"], (contexts or {}).get(job.rewrite)
        diff = max(abs(saved[k] - expected[k]) for k in saved) if expected else None
        lines += ["## The saved model", "",
                  f"`{reload['folder']}` holds the `{job.rewrite}` edit merged into a plain model. Loaded back with "
                  f"transformers alone it gives P({a}) {saved[f'p_{a}']:.4f}, P({b}) {saved[f'p_{b}']:.4f} in the "
                  f"neutral contexts (largest difference to the table above: {_f(diff, 2)}).", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = AutoModelForCausalLM.from_pretrained(\"{reload['folder']}\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{reload['folder']}\")", "```", ""]
    lines += ["## Training", "", "![training](plots/training.png)", "",
              "Files: `adapter/` (GRADIEND adapter: `GradiendModel.from_pretrained(base, 'adapter')`), "
              "`models/` (plain edited models), `results/` (JSON/CSV behind every number here), `plots/`, "
              "`training/` (checkpoints).", ""]
    write_text_atomically(run.report, "\n".join(lines))
    return run.report
