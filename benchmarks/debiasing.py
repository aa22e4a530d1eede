"""GRADIEND beside peer debiasing methods on the same model and the same public benchmarks.

    python benchmarks/debiasing.py --run runs/demo            # the run of `gradiend-hf demo` (SmolLM2-135M)

Methods: the base; GRADIEND's balance edit and its strengthen edits (from the run's adapter and chosen edits); LEACE
(concept-erasure, fitted on the run's training rows); CDA (a short two-sided counterfactual fine-tune on the offline
Wikipedia text); GRADIEND balance + LEACE (the eraser fitted on the edited model). Each method runs in its own process,
so that its time and peak memory are its own (os.wait4). Columns: CrowS-Pairs gender (% stereotypical preferred,
50 = unbiased), StereoSet gender SS / LMS / ICAT, BBQ gender bias score in ambiguous contexts (0 = unbiased), the
perplexity on the run's neutral Wikipedia texts, P(female)/P(male) in the 120 gender-neutral contexts, setup time
(GRADIEND: the run's training + decoder grid, taken from results/timings.json) and peak memory. Brackets: 95%
bootstrap confidence intervals. Results: benchmarks/results/debiasing.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

METHODS = ("base", "gradiend-balance", "gradiend-female", "gradiend-male", "leace", "cda", "gradiend-balance+leace")


def load(run: Path):
    """The run's base model, tokenizer, adapter (GradiendModel), data and chosen edits."""
    import datasets

    from gradiend_hf import GradiendModel
    from gradiend_hf.app.runfolder import open_run
    from gradiend_hf.app.pipeline import load_base

    folder, job = open_run(run)
    base, tokenizer = load_base(job)
    model = GradiendModel.from_pretrained(base, run / "adapter")
    data = datasets.load_from_disk(str(run / "data"))
    edits = json.loads((run / "results" / "evaluation.json").read_text())["edits"]
    timings = json.loads((run / "results" / "timings.json").read_text())
    return model, tokenizer, data, edits, timings


def evaluate(base, tokenizer, data, classes, limit, bbq_limit, seed) -> dict[str, Any]:
    """Every benchmark on `base` as it is now (edits, hooks) ."""
    from gradiend_hf import evaluation
    from gradiend_hf.evaluation.contexts import context_probabilities, gender_neutral_contexts, summarise_contexts
    from gradiend_hf.evaluation.lms import language_modelling_score, lms_batches
    from gradiend_hf.evaluation.probabilities import class_words
    from gradiend_hf.objective import resolve_objective

    objective = resolve_objective(base)
    out: dict[str, Any] = {}
    crows = evaluation.crows_pairs(base, tokenizer, "gender", limit=limit, seed=seed)
    out["crows_gender"], out["crows_gender_ci"], out["crows_n"] = crows.score, crows.ci, crows.n
    stereo = evaluation.stereoset(base, tokenizer, "gender", limit=limit, seed=seed)
    for metric in ("ss", "lms", "icat"):
        out[f"stereoset_{metric}"] = getattr(stereo, metric)
        out[f"stereoset_{metric}_ci"] = stereo.ci[metric]
    out["stereoset_n"] = stereo.n
    if bbq_limit:
        bbq = evaluation.bbq(base, tokenizer, "Gender_identity", limit=bbq_limit, seed=seed)
        out["bbq_bias_ambiguous"], out["bbq_bias_ambiguous_ci"] = bbq.value("bias_ambig"), bbq.interval("bias_ambig")
        out["bbq_accuracy_disambiguated"] = bbq.value("accuracy_disambig")
        out["bbq_n"] = bbq.n
    lms = language_modelling_score(base, lms_batches(tokenizer, data["neutral"]["text"], objective, seed=seed),
                                   objective)
    out["perplexity"] = lms.perplexity
    words = class_words(list(data["test"]), classes, tokenizer)
    frame = context_probabilities(base, tokenizer, objective, gender_neutral_contexts(), words)
    out["context_ratio"] = summarise_contexts(frame, classes)["ratio"]
    return out


def run_method(run: Path, method: str, limit: int, bbq_limit: int, seed: int, cda_steps: int) -> dict[str, Any]:
    """Set up one method, then evaluate it; times in seconds."""
    import contextlib

    from peers import fit_leace, leace_applied

    from gradiend_hf.creation.sources import wikipedia_texts

    model, tokenizer, data, edits, timings = load(run)
    base = model.get_base_model()
    classes = list(model.gradiend_config.feature_classes)
    causal = model.lm_objective == "causal_lm"
    train = list(data["train"])
    row: dict[str, Any] = {"method": method}
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if method.startswith("gradiend-"):
            goal = method.split("-", 1)[1].split("+")[0]
            edit = edits[goal]
            stack.enter_context(model.apply_edit(feature_factor=edit["feature_factor"],
                                                 learning_rate=edit["learning_rate"]))
            row["edit"] = {"feature_factor": edit["feature_factor"], "learning_rate": edit["learning_rate"]}
            row["setup_note"] = "the run's training + decoder grid"
        if method.endswith("leace"):
            eraser = fit_leace(base, tokenizer, train, classes[0], causal)
            stack.enter_context(leace_applied(base, eraser))
        if method == "cda":
            from peers import cda_finetune

            base = cda_finetune(base, tokenizer, wikipedia_texts(), steps=cda_steps, causal=causal, seed=seed)
            row["cda_steps"] = cda_steps
        setup = time.perf_counter() - start
        if method.startswith("gradiend-"):
            setup += timings["training"] + timings["decoder grid"]
        row["setup_seconds"] = setup
        start = time.perf_counter()
        row.update(evaluate(base, tokenizer, data, classes, limit, bbq_limit, seed))
        row["evaluation_seconds"] = time.perf_counter() - start
    return row


def fmt(value: Any, ci: Any = None, digits: int = 1) -> str:
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    return f"{text} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else text


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | CrowS gender (50) | SS gender (50) | LMS gender | ICAT | BBQ gender bias, ambiguous (0) | "
            "perplexity | P(f)/P(m) neutral (1) | setup s | peak memory GB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["method"], fmt(r.get("crows_gender"), r.get("crows_gender_ci")),
                 fmt(r.get("stereoset_ss"), r.get("stereoset_ss_ci")),
                 fmt(r.get("stereoset_lms"), r.get("stereoset_lms_ci")), fmt(r.get("stereoset_icat")),
                 fmt(r.get("bbq_bias_ambiguous"), r.get("bbq_bias_ambiguous_ci"), 3),
                 fmt(r.get("perplexity"), digits=2), fmt(r.get("context_ratio"), digits=3),
                 fmt(r.get("setup_seconds"), digits=0), fmt(r.get("peak_rss_gb"), digits=2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished run folder (gradiend-hf demo: runs/demo)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--limit", type=int, default=None, help="seeded subsample per benchmark (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bbq-limit", type=int, default=200,
                        help="seeded subsample of BBQ Gender_identity questions (0: skip BBQ; about 0.6 s each)")
    parser.add_argument("--cda-steps", type=int, default=100)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--out", type=Path, default=HERE / "results" / "debiasing")
    args = parser.parse_args()
    if args.one:
        row = run_method(args.run, args.one, args.limit, args.bbq_limit, args.seed, args.cda_steps)
        print("RESULT " + json.dumps(row, default=float), flush=True)
        return
    if not (args.run / "adapter").is_dir() or not (args.run / "results" / "evaluation.json").is_file():
        sys.exit(f"{args.run} is not a finished run folder (no adapter/ or results/evaluation.json): run "
                 "`gradiend-hf demo` first, or pass --run <output_dir of your job>.")
    rows = []
    for method in args.methods:
        command = [sys.executable, __file__, "--run", str(args.run), "--one", method, "--seed", str(args.seed),
                   "--cda-steps", str(args.cda_steps), "--bbq-limit", str(args.bbq_limit)]
        command += ["--limit", str(args.limit)] if args.limit else []
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        if status != 0:
            sys.exit(f"{method} failed (exit status {status}); its output:\n{out[-3000:]}")
        row = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
        row["peak_rss_gb"] = usage.ru_maxrss / 1024 ** 2  # kilobytes on Linux
        row["wall_seconds"] = time.perf_counter() - started
        rows.append(row)
        print(table(rows[-1:]), flush=True)
    meta = {"run": str(args.run), "limit": args.limit, "bbq_limit": args.bbq_limit, "seed": args.seed,
            "cda_steps": args.cda_steps,
            "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
    args.out.with_suffix(".md").write_text(f"`{meta['command']}`\n\n{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
