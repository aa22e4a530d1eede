"""Decoder selection side by side with the authors' own package (`gradiend` 0.2.3 on PyPI), on SmolLM2-135M.

Both packages get identical inputs: the real SmolLM2-135M (gradiend_hf.offline), the same GRADIEND weights, the same
rows (common.mixed_rows: female rows with she -> he and male rows with he -> she) and the same neutral sentences.
Each package then chooses an edit theta + lr * dec(ff) for one goal with its own default decoder evaluation:

- theirs: `TextPredictionTrainer.evaluate_decoder(target_class=..., increase_target_probabilities=...)` with
  use_cache=False (nothing is written). By default it scores the base and 16 learning rates (1e-3 ... 100) for the
  one feature factor its sign convention assigns to the goal; every candidate is a deep copy of the model with the
  edit added, scored with plain forward passes;
- ours: `gradiend_hf.evaluate_decoder(model, rows, tokenizer, neutral_texts, goals=[goal], search=...)` with
  search="ladder" (the default: bisection on each ladder, only what the goal needs) and search="grid" (every rung
  until the LMS falls below half the base's). Its defaults are 3 feature factors (+1, -1, 0) x the same 16 rates.

Goals (both packages have them): strengthen "male" (P(male word) on the female rows, theirs' metric key "male") and
weaken "female" (P(female word) on the female rows, theirs' "female_weaken"). The authors' package has no built-in
debiasing ("balance") goal in its decoder evaluation (its papers' BPI needs a custom summary extractor), so ours'
"balance" is not compared. Both keep only candidates with LMS >= 0.99 x the base's LMS, but the rules differ: theirs
falls back to the smallest learning rate when no candidate keeps the LMS, ours to the base (no edit); theirs' LMS is
derived from the perplexity over whole sentences, ours' is 1 / (1 + NLL); theirs scores only the rows a goal needs
(the female rows), ours all rows.

The GRADIEND: our seeded initialisation (gradiend_hf.bottleneck, seed 0) for the encoder weights, encoder bias and
decoder bias, and as decoder weights the unit-norm gradient of mean(log P(" she") - log P(" he")) at the pronoun
position of the rows (a stand-in for a trained decoder, so that the edits move the feature; computed once per
selection in a separate process and saved in a temporary folder). Theirs is built by their own loader over the same
parameters and these tensors are copied into its flat encoder/decoder; a check process applies one candidate with both
packages and requires the edited weights to agree (max abs difference reported), and every timed process reports a
fingerprint of its GRADIEND, which must be the same in all of them.

Selections: "all weights" = every backbone parameter including the (tied) input embeddings (theirs' default), and
"layers only" = the 30 transformer layers, no embeddings, no final norm. --layers K restricts both to the top K layers
(plus embeddings and final norm for "all weights"), for development or a machine without the ~6 GB the full selections
need.

Each (selection, variant) runs in its own process (model, GRADIEND, both goals one after the other); runs alternate
between the variants and each goal's fastest run counts. Only the decoder evaluation call is timed (loading the model
and building the GRADIEND are not). Peak memory = VmHWM over the VmRSS before the timed calls.

Requires the authors' package, installed outside our venv (no dependencies; ours already has torch, transformers,
pandas, numpy, tqdm):
    .venv/bin/pip install --no-deps --target /tmp/authors_gradiend gradiend==0.2.3
    (or the wheel file instead of gradiend==0.2.3); another folder: --authors-path or $GRADIEND_AUTHORS_PATH.
Run (the shared 2-core machine: ~15 minutes for both selections):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/authors_decoder.py [--threads 2] [--repeat 1]
Quick check (a few minutes):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/authors_decoder.py --layers 2 --rows 4 --neutral 2 \
        --learning-rates 0.01 1 --threads 1 --name authors_decoder_dev
Results: benchmarks/results/<name>.{json,md} (default name authors_decoder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

AUTHORS_PATH = os.environ.get("GRADIEND_AUTHORS_PATH", "/tmp/authors_gradiend")
AUTHORS_VERSION = "0.2.3"
INSTALL = (".venv/bin/pip install --no-deps --target /tmp/authors_gradiend gradiend==0.2.3 "
           "(or the downloaded wheel instead of gradiend==0.2.3)")
CLASSES = ["female", "male"]
NUM_LAYERS = 30  # SmolLM2-135M
NEUTRAL = [
    "The committee met on Tuesday to discuss the budget for the next year.",
    "Rain is expected across the northern region later this week.",
    "The museum opened a new wing dedicated to modern sculpture.",
    "Engineers inspected the bridge after the storm passed.",
    "The library extended its opening hours during the exam period.",
    "A new train line will connect the two cities by next spring.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Farmers expect a good harvest after the mild and wet summer.",
]
# goal name in the table -> (ours' goal, theirs' target_class, theirs' increase_target_probabilities, theirs' key)
GOALS = {
    "strengthen male": ("male", "male", True, "male"),
    "weaken female": ("-female", "female", False, "female_weaken"),
}
VARIANTS = ("theirs", "ours-ladder", "ours-grid")


# --- the two selections, in each package's own notation ---------------------------------------------------------------
def layer_ids(layers: Optional[int]) -> list[int]:
    return list(range(NUM_LAYERS)) if layers is None else list(range(NUM_LAYERS - layers, NUM_LAYERS))


def selection_patterns(selection: str, layers: Optional[int]) -> tuple[list[str], Optional[list[str]]]:
    """(ours' target_parameters regexes, theirs' `params` wildcards; None = their default, the whole backbone)."""
    ids = layer_ids(layers)
    if layers is None:
        ours_layers, theirs_layers = [r"^model\.layers\."], ["model.layers.*"]
    else:
        ours_layers = [rf"^model\.layers\.({'|'.join(map(str, ids))})\."]
        theirs_layers = [f"model.layers.{i}.*" for i in ids]
    if selection == "all weights":
        if layers is None:
            return [r"^model\."], None
        return ([r"^model\.embed_tokens\.", *ours_layers, r"^model\.norm\."],
                ["model.embed_tokens.weight", *theirs_layers, "model.norm.weight"])
    if selection == "layers only":
        return ours_layers, theirs_layers
    raise ValueError(f"unknown selection {selection!r}")


SELECTIONS = ("all weights", "layers only")


# --- the authors' package -------------------------------------------------------------------------------------------
def import_authors(path: str):
    """The authors' `gradiend` package from `path` (a pip --target folder), or a clear error saying how to get it."""
    if path and Path(path).is_dir() and path not in sys.path:
        sys.path.insert(0, path)
    try:
        import gradiend
    except ImportError as error:
        raise SystemExit(f"The authors' package `gradiend` is not importable from {path!r} ({error}).\n"
                         f"Install it without touching our venv:\n    {INSTALL}\n"
                         "and pass --authors-path or set GRADIEND_AUTHORS_PATH if you chose another folder.")
    version = getattr(gradiend, "__version__", "?")
    if version != AUTHORS_VERSION:
        print(f"warning: this benchmark was written against gradiend {AUTHORS_VERSION}, found {version}",
              file=sys.stderr)
    return gradiend


def their_frames(rows: list[dict], neutral: list[str]):
    """Their merged data format (one row per sentence) and their neutral frame (a `text` column)."""
    import pandas as pd

    data = pd.DataFrame([{"masked": r["masked"], "label": r["factual"], "label_class": r["factual_class"],
                          "alternative": r["alternative"], "alternative_class": r["alternative_class"],
                          "split": "test"} for r in rows])
    return data, pd.DataFrame({"text": list(neutral)})


def their_trainer(rows: list[dict], neutral: list[str], params: Optional[list[str]], authors_path: str):
    """Their TextPredictionTrainer on SmolLM2 (loaded by their own loader from the local folder) and its model."""
    import_authors(authors_path)
    from gradiend import TextPredictionTrainer, TrainingArguments

    from gradiend_hf.offline import smollm2_path

    data, neutral_df = their_frames(rows, neutral)
    trainer = TextPredictionTrainer(model=str(smollm2_path()), data=data, target_classes=list(CLASSES),
                                    args=TrainingArguments(params=params, use_cache=False))
    return trainer, trainer.get_model(), data, neutral_df


@torch.no_grad()
def copy_into_theirs(ours, theirs) -> None:
    """Our bottleneck's tensors into their flat encoder (1 x n) / decoder (n x 1, bias n), in their param order."""
    g = theirs.gradiend
    names = list(g.param_map)
    if names != ours.bottleneck.names:
        raise SystemExit(f"the two selections differ:\n theirs {names[:5]}... ({len(names)})\n"
                         f" ours {ours.bottleneck.names[:5]}... ({len(ours.bottleneck.names)})")
    enc, dec = g.encoder[0], g.decoder[0]
    b = ours.bottleneck
    start = 0
    for name in names:
        n = math.prod(g.param_map[name]["shape"])
        enc.weight[0, start:start + n].copy_(b.encoder(name).reshape(-1))
        dec.weight[start:start + n, 0].copy_(b.decoder(name).reshape(-1))
        dec.bias[start:start + n].copy_(b.offset(name).reshape(-1))
        start += n
    if start != enc.weight.shape[1]:
        raise SystemExit(f"their GRADIEND has {enc.weight.shape[1]} entries, ours {start}")
    enc.bias.copy_(b.encoder_bias)


def fingerprint_theirs(theirs) -> list[float]:
    g = theirs.gradiend
    return [float(t.detach().double().sum()) for t in (g.encoder[0].weight, g.encoder[0].bias, g.decoder[0].weight,
                                                       g.decoder[0].bias)]


def fingerprint_ours(ours) -> list[float]:
    b = ours.bottleneck
    total = lambda get: float(sum(get(n).detach().double().sum() for n in b.names))
    return [total(b.encoder), float(b.encoder_bias.detach().double().sum()), total(b.decoder), total(b.offset)]


# --- ours -----------------------------------------------------------------------------------------------------------
def our_model(patterns: list[str], decoder_file: Optional[Path]):
    """(our GradiendModel on a fresh SmolLM2, tokenizer); decoder weights from `decoder_file` when given."""
    from gradiend_hf import GradiendConfig, get_gradiend_model

    base, tokenizer = common.load_model("smollm2")
    model = get_gradiend_model(base, GradiendConfig(feature_classes=list(CLASSES), target_parameters=patterns))
    if decoder_file is not None:
        directions = torch.load(decoder_file, weights_only=True)
        with torch.no_grad():
            for name in model.bottleneck.names:
                model.bottleneck.decoder(name).copy_(directions[name].reshape(model.bottleneck.decoder(name).shape))
    return model, tokenizer


def pronoun_ids(tokenizer) -> dict[str, int]:
    ids = {c: tokenizer(f" {w}", add_special_tokens=False)["input_ids"] for c, w in (("female", "she"), ("male", "he"))}
    if any(len(v) != 1 for v in ids.values()):
        raise SystemExit(f"' she' / ' he' are not single tokens: {ids}")
    return {c: v[0] for c, v in ids.items()}


def direction(model, tokenizer, rows: list[dict]) -> dict[str, torch.Tensor]:
    """Unit-norm gradient of mean(log P(' she') - log P(' he')) at the pronoun over the rows, per selected weight:
    decoder weights for which +ff moves towards female and -ff towards male (their convention for these classes)."""
    base = model.get_base_model()
    params = dict(base.named_parameters())
    names = model.bottleneck.names
    for name in names:
        params[name].requires_grad_(True)
        params[name].grad = None
    ids = pronoun_ids(tokenizer)
    total = 0.0
    for row in rows:
        prefix = row["masked"].split("[MASK]")[0].rstrip()
        inputs = tokenizer(prefix, return_tensors="pt")
        logp = base(**inputs).logits[0, -1].log_softmax(-1)
        total = total + logp[ids["female"]] - logp[ids["male"]]
    (total / len(rows)).backward()
    grads = {name: params[name].grad.detach().clone() for name in names}
    for name in names:
        params[name].grad = None
        params[name].requires_grad_(False)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    return {name: g / norm for name, g in grads.items()}


# --- the processes --------------------------------------------------------------------------------------------------
def prepare(selection: str, args) -> dict:
    """Compute and save the decoder direction; check that both packages write the same edit for one candidate."""
    patterns, params = selection_patterns(selection, args.layers)
    rows = common.mixed_rows(args.rows)
    model, tokenizer = our_model(patterns, None)
    directions = direction(model, tokenizer, rows)
    torch.save(directions, Path(args.workdir) / slug(selection))
    with torch.no_grad():
        for name in model.bottleneck.names:
            model.bottleneck.decoder(name).copy_(directions[name].reshape(model.bottleneck.decoder(name).shape))
    del directions
    _, theirs, _, _ = their_trainer(rows, NEUTRAL, params, args.authors_path)
    copy_into_theirs(model, theirs)
    ff, lr = -1.0, 1.0
    torch.set_grad_enabled(False)
    ours_params = dict(model.get_base_model().named_parameters())
    their_base = dict(theirs.base_model.named_parameters())
    base_diff = max(float((ours_params[n] - their_base[n]).abs().max()) for n in model.bottleneck.names)
    edited = theirs.rewrite_base_model(learning_rate=lr, feature_factor=ff)
    edited_params = dict(edited.named_parameters())
    editor = model.editor()
    editor.apply(ff, lr)
    diff = max(float((ours_params[n] - edited_params[n]).abs().max()) for n in model.bottleneck.names)
    change = max(float((ours_params[n] - their_base[n]).abs().max()) for n in model.bottleneck.names)
    untouched = [n for n, p in model.get_base_model().named_parameters() if n not in model.bottleneck.names
                 and n in edited_params and not torch.equal(p, edited_params[n])]
    editor.restore()
    return {"selection": selection, "selected_weights": model.bottleneck.num_entries,
            "parameters": len(model.bottleneck.names), "check_candidate": [ff, lr],
            "base_max_abs_difference": base_diff, "edit_max_abs_difference": diff,
            "edit_max_abs_change": change, "other_parameters_differing": untouched,
            "fingerprint": fingerprint_ours(model)}


def slug(selection: str) -> str:
    return selection.replace(" ", "_") + ".pt"


def run(selection: str, variant: str, args) -> dict:
    """One variant on one selection in this process: both goals, each timed on its own."""
    from decoder_grid import Clock

    torch.set_num_threads(args.threads)
    patterns, params = selection_patterns(selection, args.layers)
    rows = common.mixed_rows(args.rows)
    neutral = NEUTRAL[: args.neutral]
    lrs = args.learning_rates
    ours, tokenizer = our_model(patterns, Path(args.workdir) / slug(selection))
    clock = Clock()
    if variant == "theirs":
        trainer, theirs, data, neutral_df = their_trainer(rows, neutral, params, args.authors_path)
        copy_into_theirs(ours, theirs)
        fingerprint = fingerprint_theirs(theirs)
        selected = theirs.gradiend.decoder[0].weight.shape[0]
        del ours
        from gradiend.model.model_with_gradiend import ModelWithGradiend

        clock.wrap(ModelWithGradiend, "rewrite_base_model", "edit")  # deep copy of the model + the edit added
    else:
        fingerprint = fingerprint_ours(ours)
        selected = ours.bottleneck.num_entries
        from gradiend_hf.edit import InPlaceEditor

        clock.wrap(InPlaceEditor, "apply", "edit")  # written over the selected weights from one backup
        clock.wrap(InPlaceEditor, "restore", "edit")
    common.reset_peak()
    before = common.memory()["VmRSS"]
    goals = {}
    for goal in args.goals:
        ours_goal, target_class, increase, key = GOALS[goal]
        clock.seconds.clear()
        if variant == "theirs":
            start = time.perf_counter()
            out = trainer.evaluate_decoder(target_class=target_class, increase_target_probabilities=increase,
                                           training_like_df=data, neutral_df=neutral_df, use_cache=False, lrs=lrs)
            seconds = time.perf_counter() - start
            grid = out["grid"]
            chosen = out[key]
            base = grid["base"]
            # the goal word's probability: theirs' metric is P(male) on the female rows (strengthen) or
            # 1 - P(female) on the female rows (weaken)
            probability = (lambda v: v) if increase else (lambda v: 1.0 - v)
            base_value = base["probs"][key] if increase else 1.0 - base["probs_factual"][target_class]
            goals[goal] = {
                "seconds": seconds, "candidates": len(grid), "fully_scored": len(grid),
                "feature_factors": sorted({float(e["id"]["feature_factor"]) for k, e in grid.items() if k != "base"}),
                "chosen": {"feature_factor": chosen["feature_factor"], "learning_rate": chosen["learning_rate"],
                           "probability": probability(chosen["value"]), "base_probability": probability(base_value),
                           "lms": chosen["lms"], "base_lms": chosen["base_lms"]},
                "parts": dict(clock.seconds),
            }
        else:
            from gradiend_hf import evaluate_decoder

            search = variant.split("-")[1]
            start = time.perf_counter()
            evaluation = evaluate_decoder(ours, rows, tokenizer, neutral, goals=[ours_goal], search=search,
                                          learning_rates=lrs, progress=False)
            edit = evaluation.best(ours_goal)
            seconds = time.perf_counter() - start
            grid = evaluation.grid
            done = grid[~grid["skipped"]]
            figures = edit.metrics
            probability = (lambda v: v) if increase else (lambda v: -v)  # ours' weaken score is -P(female)
            goals[goal] = {
                "seconds": seconds, "candidates": int(done["lms"].notna().sum()),
                "fully_scored": int(done["balance_product"].notna().sum()),
                "feature_factors": sorted({float(f) for f in grid.loc[~grid["is_base"], "feature_factor"]}),
                "chosen": {"feature_factor": edit.feature_factor, "learning_rate": edit.learning_rate,
                           "probability": probability(figures["score"]),
                           "base_probability": probability(figures["base_score"]),
                           "lms": figures["lms"], "base_lms": figures["base_lms"]},
                "parts": dict(clock.seconds),
            }
    peak = common.memory()["VmHWM"] - before
    return {"selection": selection, "variant": variant, "selected_weights": int(selected), "fingerprint": fingerprint,
            "goals": goals, "peak_extra_mb": peak / 2**20, "threads": torch.get_num_threads()}


# --- the parent -----------------------------------------------------------------------------------------------------
def child(args, *extra: str) -> dict:
    command = [sys.executable, __file__, *extra, "--workdir", args.workdir, "--threads", str(args.threads),
               "--rows", str(args.rows), "--neutral", str(args.neutral), "--authors-path", args.authors_path,
               "--goals", *args.goals]
    if args.layers is not None:
        command += ["--layers", str(args.layers)]
    if args.learning_rates:
        command += ["--learning-rates", *map(str, args.learning_rates)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_fingerprint(a: list[float], b: list[float]) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9) for x, y in zip(a, b))


def edit_text(chosen: dict) -> str:
    if chosen["learning_rate"] == 0:
        return "none (base)"
    return f"ff {chosen['feature_factor']:+g}, lr {chosen['learning_rate']:g}"


def table(results: list[dict], checks: dict) -> str:
    header = ["selection (weights)", "goal", "package (search)", "candidates scored (with P)", "seconds",
              "of which edits s", "s / candidate", "theirs s / this s", "theirs s-per-cand. / this", "chosen edit",
              "P(goal word) chosen (base)", "LMS chosen / base", "peak extra MB"]
    lines = []
    for r in results:
        theirs = r["variants"]["theirs"]
        for variant in VARIANTS:
            if variant not in r["variants"]:
                continue
            v = r["variants"][variant]
            g = v["goals"][r["goal"]]
            t = theirs["goals"][r["goal"]]
            per = g["seconds"] / g["candidates"]
            per_theirs = t["seconds"] / t["candidates"]
            c = g["chosen"]
            name = {"theirs": f"authors' gradiend {AUTHORS_VERSION}", "ours-ladder": "gradiend_hf (ladder)",
                    "ours-grid": "gradiend_hf (grid)"}[variant]
            lines.append([
                f"{r['selection']} ({theirs['selected_weights']:,})", r["goal"], name,
                f"{g['candidates']} ({g['fully_scored']})", f"{g['seconds']:.1f}", f"{g['parts'].get('edit', 0):.1f}",
                f"{per:.2f}",
                "1.00" if variant == "theirs" else f"**{t['seconds'] / g['seconds']:.2f}x**",
                "1.00" if variant == "theirs" else f"{per_theirs / per:.2f}x",
                edit_text(c), f"{c['probability']:.4f} ({c['base_probability']:.4f})",
                f"{c['lms'] / c['base_lms']:.3f}", f"{v['peak_extra_mb']:.0f}",
            ])
    text = common.markdown(header, lines)
    notes = ["", "Edit check (one candidate, ff -1, lr 1, applied by both packages to the same base weights):"]
    for selection, c in checks.items():
        notes.append(f"- {selection}: {c['selected_weights']:,} weights in {c['parameters']} tensors; base weights "
                     f"differ by {c['base_max_abs_difference']:.1e}, edited weights by "
                     f"{c['edit_max_abs_difference']:.1e} (the edit moves weights by up to "
                     f"{c['edit_max_abs_change']:.1e}); unselected parameters changed by theirs: "
                     f"{c['other_parameters_differing'] or 'none'}.")
    return text + "\n" + "\n".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selections", nargs="+", choices=SELECTIONS, default=list(SELECTIONS))
    parser.add_argument("--goals", nargs="+", choices=list(GOALS), default=list(GOALS))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant, alternating; the fastest counts")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every timed process")
    parser.add_argument("--rows", type=int, default=16, help="evaluation rows (half female, half male)")
    parser.add_argument("--neutral", type=int, default=len(NEUTRAL), help=f"neutral sentences (<= {len(NEUTRAL)})")
    parser.add_argument("--layers", type=int, help="only the top K layers (+ embeddings and final norm for 'all')")
    parser.add_argument("--learning-rates", type=float, nargs="+",
                        help="the same learning rates for both (default: each package's own 16)")
    parser.add_argument("--authors-path", default=AUTHORS_PATH, help="folder the authors' package is installed in")
    parser.add_argument("--name", default="authors_decoder", help="results file name")
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)  # a check process
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a timed process
    parser.add_argument("--selection", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        print(json.dumps(prepare(args.prepare, args)))
        return
    if args.variant:
        print(json.dumps(run(args.selection, args.variant, args)))
        return
    import_authors(args.authors_path)  # fail early, with the install hint
    if "theirs" not in args.variants:
        raise SystemExit("--variants must include 'theirs' (the reference of the ratios)")
    args.workdir = tempfile.mkdtemp(prefix="authors_decoder_")
    checks, results, raw = {}, [], {}
    try:
        for selection in args.selections:
            checks[selection] = check = child(args, "--prepare", selection)
            print(f"{selection}: {check['selected_weights']:,} weights; edits agree to "
                  f"{check['edit_max_abs_difference']:.1e}", file=sys.stderr, flush=True)
            if check["base_max_abs_difference"] != 0 or check["edit_max_abs_difference"] > 1e-6:
                raise SystemExit(f"{selection}: the two packages do not edit the weights identically: {check}")
            best: dict[str, dict] = {}
            for _ in range(args.repeat):  # alternating, so that a busy spell of the machine hits every variant
                for variant in args.variants:
                    out = child(args, "--variant", variant, "--selection", selection)
                    if not same_fingerprint(out["fingerprint"], check["fingerprint"]):
                        raise SystemExit(f"{selection} {variant}: another GRADIEND than the checked one "
                                         f"({out['fingerprint']} != {check['fingerprint']})")
                    print(f"  {variant}: " + ", ".join(f"{g} {v['seconds']:.1f} s ({v['candidates']} candidates)"
                                                       for g, v in out["goals"].items()), file=sys.stderr, flush=True)
                    if variant not in best:
                        best[variant] = out
                    else:  # each goal's fastest run
                        for goal, value in out["goals"].items():
                            if value["seconds"] < best[variant]["goals"][goal]["seconds"]:
                                best[variant]["goals"][goal] = value
                        best[variant]["peak_extra_mb"] = max(best[variant]["peak_extra_mb"], out["peak_extra_mb"])
            raw[selection] = best
            for goal in args.goals:
                results.append({"selection": selection, "goal": goal, "variants": best})
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    lrs = "each package's default learning rates" if not args.learning_rates else \
        f"learning rates {args.learning_rates} for both"
    text = (f"Decoder selection, the authors' gradiend {AUTHORS_VERSION} vs gradiend_hf, SmolLM2-135M "
            f"({'all layers' if args.layers is None else f'top {args.layers} layers'}), {args.rows} rows "
            f"({args.rows // 2} female, {args.rows - args.rows // 2} male), {args.neutral} neutral sentences, "
            f"{lrs}, {args.threads} thread(s), best of {args.repeat} alternating run(s) per variant. Candidates "
            "scored include the base; '(with P)' = also scored for the class probabilities (ours' ladder scores only "
            "the LMS of most rungs). Ratios > 1: ours is faster. The packages' selection rules differ (see "
            "benchmarks/authors_decoder.py): compare the chosen edits with care. Edits: theirs deep-copies the model "
            "and adds the edit per candidate, ours writes it over the selected weights in place. P(goal word), each "
            "package's own measurement: strengthen male = P(male word) on the female rows, weaken female = "
            "P(female word) on the female rows (theirs sums the vocabulary entries 'he'/'He' resp. 'she'/'She' "
            "without a leading space, read at the last position of a right-padded batch; ours the word as "
            "tokenised after the row's prefix, ' he' + ' He', without padding effects).\n\n")
    common.write_results(args.name, {
        "authors_version": AUTHORS_VERSION, "rows": args.rows, "neutral_texts": args.neutral, "layers": args.layers,
        "learning_rates": args.learning_rates, "repeat": args.repeat, "threads": args.threads,
        "load": os.getloadavg(), "checks": checks, "runs": raw}, text + table(results, checks))


if __name__ == "__main__":
    main()
