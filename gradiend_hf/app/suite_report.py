"""report.md of a suite run: what results/suite.json holds, as tables (every number comes from that file)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomically
from .report import _table, number


def rows_per_class(data) -> dict[str, dict[str, int]]:
    """{split: {factual class: rows}} (neutral text: its row count under 'text')."""
    out = {}
    for name, split in data.items():
        if "factual_class" in split.column_names:
            out[name] = dict(sorted(Counter(split["factual_class"]).items()))
        else:
            out[name] = {"text": len(split)}
    return out


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _matrix(frame) -> dict[str, dict[str, Any]]:
    return {str(r): {str(c): _finite(float(v)) for c, v in row.items()} for r, row in frame.iterrows()}


def suite_record(job, data, suite, evaluations: dict[str, dict[str, Any]], tables: dict[str, Any]) -> dict[str, Any]:
    """results/suite.json: the pairs, each pair's evaluation figures, and the comparison tables."""
    from ..suite import pair_label

    pairs = []
    for pair, result in suite.results.items():
        label = pair_label(pair)
        entry = {**result.summary(), "validation_correlation": result.correlation}
        evaluation = evaluations.get(label, {})
        if "failed" in evaluation:
            entry["failed"] = evaluation["failed"]
        if "results" in evaluation:
            entry["encoder"] = evaluation["results"]["encoder"]
            entry["edits"] = {goal: edit.to_dict() for goal, edit in evaluation["edits"].items()}
        pairs.append(entry)
    decoders, probabilities = tables["decoders"], tables["probabilities"]
    change = probabilities.change()
    return {
        "classes": suite.classes,
        "other_classes": job.other_classes or "identity",
        "rows": rows_per_class(data),
        "pairs": pairs,
        "cross_encoding": {"correlation": _matrix(tables["cross"].correlation),
                           "means": tables["cross"].means.to_dict(orient="records")},
        "decoders": {"k": decoders.overlap.k, "overlap": _matrix(decoders.overlap.overlap),
                     "cosine": _matrix(decoders.cosine), "by_layer": _matrix(decoders.by_layer)},
        "edit_probabilities": {"change": [{"pair": p, "edit": e, **{c: _finite(float(v)) for c, v in row.items()}}
                                          for (p, e), row in change.iterrows()],
                               "rows": probabilities.frame.to_dict(orient="records")},
    }


def _matrix_table(matrix: dict[str, dict[str, Any]], corner: str) -> str:
    columns = list(dict.fromkeys(c for row in matrix.values() for c in row))
    return _table([corner, *columns], [[r, *(number(row.get(c)) for c in columns)] for r, row in matrix.items()])


def render(record: dict[str, Any], timings: dict[str, Any], job) -> str:
    classes = record["classes"]
    lines = [f"# GRADIEND suite: {', '.join(classes)} ({len(record['pairs'])} pairs)", ""]
    lines += [f"Model `{job.model}`; data {job.data.recipe or 'row files'}"
              + (f" on {job.data.text}" if job.data.recipe else "")
              + f"; rows of the other classes in each pair's training: {record['other_classes']}; seeds {job.seeds}; "
              "training " + ", ".join(f"{k} {v}" for k, v in job.training.items()) + ".", ""]
    lines += ["## Rows per class", "", _table(["split", *classes, "other"], [
        [split, *(number(counts.get(c, 0)) for c in classes),
         number(sum(v for k, v in counts.items() if k not in classes))] for split, counts in record["rows"].items()
    ]), ""]
    lines += ["## Pairs", "", "Each pair's encoder on its own held-out rows (first class +1), and the edits its "
              "decoder grid chose (results/<pair>/). Pairs that did not converge are compared below too: read their "
              "rows with care.", ""]
    rows = []
    for entry in record["pairs"]:
        a, b = entry["pair"]
        encoder = entry.get("encoder") or {}
        edits = "; ".join(f"{goal}: ff {number(e['feature_factor'])}, lr {number(e['learning_rate'])}"
                          for goal, e in (entry.get("edits") or {}).items())
        rows.append([entry["label"], "yes" if entry["converged"] else "**no**", entry["seed"],
                     number(entry["validation_correlation"]), number(encoder.get("correlation")),
                     f"{number(encoder.get(f'mean_h_{a}'))} / {number(encoder.get(f'mean_h_{b}'))}",
                     edits or entry.get("failed", "n/a")])
    lines += [_table(["pair", "converged", "seed", "validation r", "held-out r", "mean h (first / second class)",
                      "chosen edits"], rows), ""]
    lines += ["## Encoders on each other's rows", "",
              "Pearson r of each pair's h (rows) with the labels of each data pair's held-out rows (columns): off the "
              "diagonal, how much one pair's neuron also separates another pair.", "",
              _matrix_table(record["cross_encoding"]["correlation"], "encoder \\ rows"), "",
              "Mean h per class (rows labelled by the class the gradient points to):", "",
              _table(["encoder", "rows of", "class", "rows", "mean h", "std h"],
                     [[m["encoder"], m["data"], m["class"], number(m["rows"]), number(m["mean_h"]), number(m["std_h"])]
                      for m in record["cross_encoding"]["means"]]), ""]
    decoders = record["decoders"]
    k = decoders["k"]
    top = f"{k:.0%}" if isinstance(k, float) else f"{k:,} entries"
    lines += ["## Decoders", "", f"Overlap |A∩B|/min of the top {top} of each decoder's entries by |weight|:", "",
              _matrix_table(decoders["overlap"], "pair"), "", "Cosine similarity of the decoder vectors:", "",
              _matrix_table(decoders["cosine"], "pair"), "", "Share of |decoder| mass per layer:", "",
              _matrix_table(decoders["by_layer"], "layer"), ""]
    lines += ["## Each pair's edits on every class", "",
              "Mean over the held-out rows of all classes of P(class) under the edit minus on the base "
              "(results/edit_probabilities.csv holds every row class).", "",
              _table(["pair", "edit", *classes], [[c["pair"], c["edit"], *(number(c.get(k)) for k in classes)]
                                                  for c in record["edit_probabilities"]["change"]]), ""]
    lines += ["## Files and timings", "", "Plots: plots/cross_encoding.png, plots/decoder_overlap.png, "
              "plots/decoder_cosine.png, plots/decoder_layers.png, plots/edit_probabilities.png; each pair's own "
              "plots under results/<pair>/plots/.", "",
              _table(["phase", "seconds"], [[k, number(v)] for k, v in timings.items()]), ""]
    return "\n".join(lines)


def write_suite_report(run) -> Path:
    """report.md of a suite run folder, from results/suite.json and results/timings.json."""
    from .runfolder import open_run

    _, job = open_run(run.root)
    text = render(run.read_json("suite.json"), run.read_json("timings.json"), job)
    write_text_atomically(run.report, text)
    return run.report
