"""The steps of a GRADIEND run, each reading and writing one run folder (runfolder.py), so they can run separately
(`gradiend-hf train`, then `evaluate`, then `rewrite`) or in one go (`gradiend-hf run` / `demo`).

`start` checks the job against the machine and the folder (preflight.py, runfolder.plan_claim) before it writes
anything, then claims the folder and writes the data; `--resume` reuses the saved data, keeps a finished training and
continues an interrupted one from its last complete checkpoint.
"""

from __future__ import annotations


import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import datasets
import pandas as pd
import torch

from ..atomic import write_file_atomically, write_folder_atomically, write_text_atomically
from ..edit import Edit
from .job import JobConfig, JobConfigError, RunFailed
from .names import custom_folder
from .preflight import ROW_SUFFIXES, check_job, check_model_output
from .runfolder import RunFolder, claim, data_record, file_sha256, load_data, plan_claim, save_data

logger = logging.getLogger("gradiend_hf")
NO_NEUTRAL = ("the data has no neutral texts (split 'neutral'), which the language-modelling score needs: give "
              "data.neutral: <texts.txt> or use a recipe with neutral > 0.")


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    write_file_atomically(path, lambda tmp: frame.to_csv(tmp, index=False))


@contextmanager
def timed(run: RunFolder, phase: str) -> Iterator[None]:
    """Adds the phase's wall time (seconds) to results/timings.json (of an opened run: not in a helper process)."""
    start = time.perf_counter()
    yield
    if run.run_id is None:
        return
    path = run.results / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[phase] = round(time.perf_counter() - start, 1)
    run.write_json("timings.json", timings)


# --- inputs --------------------------------------------------------------------------------------------------------
def load_base(job: JobConfig):
    """(model, tokenizer) of the job's base model; weights are read from safetensors only (never pickle), with the
    job's model.dtype and model.device_map (from_pretrained(dtype=..., device_map=...)). A base that comes back
    offloaded (some weights on 'disk' or 'meta': it did not fit the devices) is refused (check_loaded)."""
    from transformers import AutoTokenizer

    from ..offline import embedded_model, name_after_hub

    options, embedded = job.load_options(), embedded_model(job.model)
    if embedded is not None and not options:
        return embedded.load()  # float32 on the CPU
    path: Union[str, Path] = embedded.path() if embedded is not None else job.model
    model = auto_model_class(path, job.model_class).from_pretrained(path, use_safetensors=True, **options)
    check_loaded(job, model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if embedded is not None:  # as its loader: the Hub id as the name, a pad token
        name_after_hub(model, tokenizer, embedded.hub_id)
    return model.eval(), tokenizer


def check_loaded(job: JobConfig, model) -> None:
    """Every base weight is held on a device: offloaded weights (device_map 'auto' on too little memory puts modules
    on 'disk', or on 'cpu' behind a GPU, leaving meta placeholders) cannot have their gradients read or be edited in
    place."""
    offloaded = [name for name, p in model.named_parameters() if p.is_meta]
    placed = getattr(model, "hf_device_map", None) or {}
    offloaded += [f"{module} ({device})" for module, device in placed.items() if device in ("disk", "meta")]
    if offloaded:
        raise JobConfigError(
            f"model.device_map {job.model_device_map!r} offloaded {len(offloaded)} part(s) of {job.model} (e.g. "
            f"{', '.join(offloaded[:3])}): the model does not fit on the devices. GRADIEND reads the gradients of the "
            "base weights and edits them in place, so every weight must be on a device: use a device_map that fits "
            "(more or larger devices), a smaller model.dtype (bfloat16), or a smaller model."
        )


def auto_model_class(path: Union[str, Path], model_class: str = "auto"):
    """AutoModelForMaskedLM or AutoModelForCausalLM; 'auto' reads the architectures of the model's config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    if model_class == "auto":
        architectures = AutoConfig.from_pretrained(path).architectures or []
        model_class = "masked_lm" if any(a.endswith("ForMaskedLM") for a in architectures) else "causal_lm"
    return AutoModelForMaskedLM if model_class == "masked_lm" else AutoModelForCausalLM


def read_rows(path: Union[str, Path]) -> datasets.Dataset:
    """Rows from .jsonl/.json/.csv/.parquet; a .txt file gives one `text` per non-empty line (neutral text)."""
    path = Path(path)
    if not path.is_file():
        raise JobConfigError(f"data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return datasets.Dataset.from_dict({"text": lines})
    readers = dict(zip(ROW_SUFFIXES, (lambda p: pd.read_json(p, lines=True), pd.read_json, pd.read_csv,
                                      pd.read_parquet)))
    if suffix not in readers:
        raise JobConfigError(f"data file {path}: use .jsonl, .json, .csv, .parquet (rows) or .txt (neutral text).")
    return datasets.Dataset.from_pandas(readers[suffix](path), preserve_index=False)


def build_data(job: JobConfig) -> datasets.DatasetDict:
    """The job's splits: a built-in recipe over offline text, or the given row files."""
    spec = job.data
    if spec.recipe is None:
        splits = {name: read_rows(getattr(spec, name)) for name in ("train", "validation", "test", "neutral")
                  if getattr(spec, name) is not None}
        return datasets.DatasetDict(splits)
    from .. import creation

    text = (
        {"wikipedia": creation.wikipedia_texts, "news": creation.news_texts}.get(spec.text)
        if isinstance(spec.text, str)
        else None
    )
    source = text() if text is not None else spec.text
    try:
        return getattr(creation, spec.recipe)(source, **spec.options)
    except TypeError as error:
        raise JobConfigError(f"data.options do not fit recipe {spec.recipe!r}: {error}") from error


def selection_record(base, job: JobConfig, pruning: Optional[list[dict[str, Any]]]) -> dict[str, Any]:
    """What the adapter reads and edits, for report.md: the job's patterns, the base parameters they select (count,
    size, and which are embeddings: weights of nn.Embedding modules), then the pruning steps the adapter recorded."""
    from torch import nn

    from ..selection import select_parameters

    config = job.adapter_config()
    names = select_parameters(base, config.target_parameters, config.exclude_parameters)
    params = dict(base.named_parameters())
    embeddings = {f"{prefix}.{name}" if prefix else name for prefix, module in base.named_modules()
                  if isinstance(module, nn.Embedding) for name, _ in module.named_parameters(recurse=False)}
    return {
        "target_parameters": config.target_parameters, "exclude_parameters": config.exclude_parameters,
        "tensors": len(names), "weights": int(sum(params[n].numel() for n in names)),
        "embedding_tensors": [n for n in names if n in embeddings],
        "pruning": [{k: step.get(k) for k in ("method", "keep", "kept", "total")} for step in pruning or []],
    }


def describe_data(job: JobConfig, data: datasets.DatasetDict) -> str:
    counts = ", ".join(f"{name} {len(split):,}" for name, split in data.items())
    origin = f"recipe `{job.data.recipe}` on {job.data.text}" if job.data.recipe else "row files"
    return f"{origin} ({counts})"


# --- steps -----------------------------------------------------------------------------------------------------------
def train(job: JobConfig, run: RunFolder, base, tokenizer, data: datasets.DatasetDict, resume: bool = False):
    """Train one adapter per seed (keeping the best convergent one), save it to run/adapter, plot training.

    `resume`: a finished training is kept (its adapter loaded, or its failure raised again); an interrupted one
    continues from each seed's last complete checkpoint."""
    from ..model import GradiendModel
    from ..plotting import plot_training
    from ..seeds import train_seeds
    from ..serialization import WEIGHTS_NAME

    if resume and (run.results / "training.json").is_file():
        record = run.read_json("training.json")
        if record.get("adapter_sha256") is None:
            fail(run, "training had finished without a converged seed; resuming cannot change that (start the job "
                      "again with other settings and --overwrite)", write=False)
        run.check_adapter()
        logger.info("%s: training had finished; its adapter is kept.", run.root)
        return GradiendModel.from_pretrained(base, run.adapter)
    args = job.training_arguments(run.training)
    with timed(run, "training"):
        try:
            search = train_seeds(base, job.adapter_config(), args, data["train"], data["validation"], tokenizer,
                                 seeds=job.seeds, resume=resume)
        except FloatingPointError as error:  # every seed diverged (NaN/inf): a failed run, reported like one
            fail(run, f"training diverged for every seed ({error}); lower training.learning_rate", args.should_save)
    model, converged = search.model, search.report["chosen_converged"]
    if converged:  # before training.json, which records the adapter's weights; every process (a sharded model)
        model.save_pretrained(run.adapter, is_main_process=args.should_save, training_data=describe_data(job, data))
    if args.should_save:
        state = json.loads((run.training / f"seed-{search.seed}" / "trainer_state.json").read_text())
        run.plots.mkdir(parents=True, exist_ok=True)
        plot_training(state["log_history"], model.gradiend_config.feature_classes, run.plots / "training.png")
        run.write_json("training.json", {
            **search.report, "selected_entries": model.num_entries,
            "selection": selection_record(base, job, model.gradiend_config.pruning),
            "base_dtype": str(next(base.parameters()).dtype),
            "steps": state.get("global_step"),
            "adapter_sha256": file_sha256(run.adapter / WEIGHTS_NAME) if converged else None,
        })
    if not converged:
        seeds = "; ".join(f"seed {e['seed']}: " + ", ".join(e["reasons"]) for e in search.report["seeds"])
        fail(run, f"no seed converged ({seeds})", args.should_save)
    return model


def fail(run: RunFolder, why: str, write: bool = True) -> None:
    """Stop the run: report.md starts with why (the rest of a failed run stays in its folder for diagnosis)."""
    from .report import failure_report

    if write:
        write_text_atomically(run.report, failure_report(run, why))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process fails alike; none may end the launch before the report is written
    raise RunFailed(f"the encoder is not usable, so no edit was made: {why}. See {run.report}.")


def start(job: JobConfig, mode: str = "new", evaluates: bool = False, main: bool = True,
          barrier: Callable[[], None] = lambda: None) -> tuple[RunFolder, datasets.DatasetDict, bool]:
    """Check everything, claim the run folder and write the data: (run, data, resumed).

    Nothing is written before the job, the machine (preflight.check_job) and the folder (runfolder.plan_claim:
    `mode` new, resume or overwrite) are checked. Several processes (accelerate): every process checks, waits at
    `barrier`, then the main one claims the folder and writes the data while the others build the same rows."""
    action = plan_claim(Path(job.output_dir), job, mode)
    reuse = action == "resume" and (Path(job.output_dir) / "data").is_dir()  # written atomically: complete
    check_job(job, data_files=not reuse, evaluates=evaluates)
    barrier()
    run = claim(Path(job.output_dir), job, action) if main else RunFolder(Path(job.output_dir))
    if reuse:
        return run, load_data(run), True
    with timed(run, "data"):
        data = build_data(job)
        missing = [s for s in ("train", "validation", "test") if s not in data]
        if missing:
            raise JobConfigError(f"the data has no {', '.join(missing)} split(s); splits found: {list(data)}.")
        if evaluates and ("neutral" not in data or len(data["neutral"]) == 0):
            raise JobConfigError(NO_NEUTRAL)
        if main:
            save_data(data, run.data)
            run.write_json("data.json", data_record(job, data))
    return run, data, action == "resume"


def evaluate(job: JobConfig, run: RunFolder, model, tokenizer,
             data: datasets.DatasetDict) -> tuple[dict[str, Any], dict[str, Edit]]:
    """Encoder on held-out rows, the decoder grid, one edit per goal, P(class) in neutral contexts; plots + results."""
    from ..evaluation import evaluate_decoder, evaluate_encoder
    from ..evaluation.contexts import ContextScorer, summarise_contexts
    from ..evaluation.probabilities import class_words
    from ..plotting import plot_decoder, plot_encoder
    from .report import ENCODER_BAR

    spec, classes = job.evaluation, model.gradiend_config.feature_classes
    if "neutral" not in data or len(data["neutral"]) == 0:
        raise JobConfigError(NO_NEUTRAL)
    test = data["test"].shuffle(seed=0)
    run.plots.mkdir(parents=True, exist_ok=True)
    with timed(run, "encoder evaluation"):
        encoder_rows = test if spec.encoder_rows is None else test.select(range(min(spec.encoder_rows, len(test))))
        encoder = evaluate_encoder(model, encoder_rows, tokenizer)
        plot_encoder(encoder, classes, run.plots / "encoder.png")
        write_csv(encoder.frame, run.results / "encoder_rows.csv")
    if abs(encoder.correlation) < ENCODER_BAR:  # before the decoder grid: no edit is chosen from such an encoder
        run.write_json("encoder.json", {**encoder.summary(), "rows": int(len(encoder_rows))})
        fail(run, f"the held-out encoder |correlation| is {abs(encoder.correlation):.3f} < {ENCODER_BAR} on "
                  f"{len(encoder_rows)} rows")
    texts = spec.context_texts()
    words = class_words(list(test), classes, tokenizer)  # P(class) in the contexts: every word of the test rows
    with timed(run, "decoder search"):
        decoder = evaluate_decoder(model, test.select(range(min(spec.decoder_rows, len(test)))), tokenizer,
                                   neutral_texts=data["neutral"]["text"][: spec.neutral_texts],
                                   feature_factors=spec.feature_factors, learning_rates=spec.learning_rates,
                                   lms_ratio=spec.lms_ratio, search=spec.search or "ladder", goals=job.goals,
                                   neutral_contexts=texts, context_words=words)  # balance: where the class is open
        edits = {goal: decoder.best(goal) for goal in job.goals}
        write_csv(decoder.grid, run.results / "decoder_grid.csv")
    contexts = None
    if texts is not None:
        with timed(run, "neutral contexts"):
            scorer, frames = None, {}
            for name, edit in {"base": Edit(0.0, 0.0), **edits}.items():
                frames[name] = decoder.context_frame(edit)
                if frames[name] is None:  # not scored by the search
                    scorer = scorer or ContextScorer(model.get_base_model(), tokenizer, model.objective, texts, words)
                    with model.apply_edit(edit) if edit.learning_rate else nullcontext():
                        frames[name] = scorer.frame()
            write_csv(pd.concat([f.assign(model=name) for name, f in frames.items()]), run.results / "contexts.csv")
            contexts = {name: summarise_contexts(f, classes) for name, f in frames.items()}
    benchmarks = score_benchmarks(job, run, model, tokenizer, edits) if spec.benchmark_plan() else None
    plot_decoder(decoder, edits.values(), run.plots / "decoder.png")
    results = {
        "encoder": {**encoder.summary(), "rows": int(len(encoder_rows))},
        "edits": {goal: edit.to_dict() for goal, edit in edits.items()},
        "contexts": contexts,
        "decoder_rows": int(min(spec.decoder_rows, len(test))),
        "neutral_texts": int(min(spec.neutral_texts, len(data["neutral"]))),
        "candidates": int((~decoder.grid["skipped"]).sum()),
        "lms_only": int((~decoder.grid["skipped"] & decoder.grid["p_" + classes[0]].isna()).sum()),
        "search": decoder.search,
        "benchmarks": benchmarks,
    }
    run.write_json("evaluation.json", results)
    if run.adapter.is_dir() and edits:
        # the adapter stores the balance edit (else the first goal's): merge_and_unload() and PEFT loading apply it;
        # its card lists every chosen edit and the held-out encoder correlation (the weights stay byte-identical)
        model.record_edit(edits.get("balance") or next(iter(edits.values())))
        model.save_pretrained(run.adapter, training_data=describe_data(job, data),
                              encoder_correlation=encoder.correlation, edits=edits)
    return results, edits


def score_benchmarks(job: JobConfig, run: RunFolder, model, tokenizer, edits: dict[str, Edit]) -> list[dict[str, Any]]:
    """The job's public bias benchmarks on the base and under the chosen edits of job.benchmark_goals (applied in
    place, restored after): one row per (model, benchmark, metric) with its bootstrap interval, also in
    results/benchmarks.csv; each result's summary and settings in results/benchmarks.json."""
    from ..evaluation.benchmarks import BENCHMARKS, headline_rows, run_benchmark

    spec, rows, details = job.evaluation, [], {}
    with timed(run, "benchmarks"):
        judged = {goal: edits[goal] for goal in job.benchmark_goals}
        for name, edit in {"base": None, **judged}.items():
            with model.apply_edit(edit) if edit is not None else nullcontext():
                for benchmark, subset in spec.benchmark_plan().items():
                    result = run_benchmark(benchmark, model, tokenizer, subset, limit=spec.benchmark_limit)
                    used = BENCHMARKS[benchmark].subset_for(subset)
                    rows += [{"model": name, "subset": used, **row} for row in headline_rows(result)]
                    details[f"{name}/{benchmark}"] = result.to_dict()
        write_csv(pd.DataFrame(rows), run.results / "benchmarks.csv")
        run.write_json("benchmarks.json", details)
    return rows


def model_folder(run: RunFolder, edit: Edit) -> Path:
    """models/<goal folder> for an edit chosen for a goal, models/custom-ff<f>-lr<lr> for one given by its values."""
    if edit.goal is not None:
        return run.model(edit.goal)
    return run.root / "models" / custom_folder(edit.feature_factor, edit.learning_rate)


def rewrite(job: JobConfig, run: RunFolder, model, tokenizer, edit: Edit, out: Optional[Path] = None,
            data_text: Optional[str] = None, encoder_correlation: Optional[float] = None) -> Path:
    """Merge `edit` into the base (in place; the adapter lets go of it) and save a plain transformers model + card,
    replacing the folder atomically (a reader sees the earlier model or this one)."""
    from ..cards import merged_card
    from .report import card_benchmark_table

    out = Path(out) if out is not None else model_folder(run, edit)
    check_model_output(out, run.root)
    config = model.gradiend_config
    with timed(run, f"rewrite ({edit.goal or 'custom'})"):
        merged = model.merge_and_unload(edit)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.files-", dir=out.parent) as tmp:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            card = merged_card(config, edit=edit, with_tokenizer=True, training_data=data_text,
                               encoder_correlation=encoder_correlation,
                               benchmarks=card_benchmark_table(recorded_benchmarks(run), edit.goal))
            names = sorted(set(os.listdir(tmp)) - {"README.md", "config.json"}) + ["config.json"]  # config last
            writers: dict[str, Callable[[Path], None]] = {"README.md": lambda path: card.save(path)}
            writers.update({name: (lambda path, src=os.path.join(tmp, name): os.replace(src, path)) for name in names})
            write_folder_atomically(out, writers)
    return out


def recorded_benchmarks(run: RunFolder) -> Optional[list[dict[str, Any]]]:
    """The bias benchmark rows of this run's evaluation (None when none were scored or it was not evaluated)."""
    if not (run.results / "evaluation.json").is_file():
        return None
    return run.read_json("evaluation.json").get("benchmarks")  # refuses another run's results


def check_reload(job: JobConfig, run: RunFolder, folder: Path, tokenizer, classes: list[str]) -> Optional[dict]:
    """Load the saved plain model with transformers alone and recompute P(class) in the neutral contexts."""
    from ..evaluation.contexts import context_probabilities, summarise_contexts
    from ..evaluation.probabilities import class_words
    from ..objective import resolve_objective

    texts = job.evaluation.context_texts()
    if texts is None:
        return None
    model = auto_model_class(folder).from_pretrained(folder, use_safetensors=True).eval()
    words = class_words(list(load_data(run)["test"]), classes, tokenizer)
    frame = context_probabilities(model, tokenizer, resolve_objective(model), texts, words)
    return summarise_contexts(frame, classes)


def run_all(job: JobConfig, mode: str = "new", report: bool = True) -> Path:
    """data -> training -> evaluation -> rewrite (the job's goal) -> reload check -> report.md; returns the report.

    `mode`: "new" (refuses a folder that holds a run), "resume" (continues this job's run) or "overwrite"."""
    from .report import write_report

    started = time.perf_counter()
    run, data, resumed = start(job, mode, evaluates=True)
    with timed(run, "load model"):
        base, tokenizer = load_base(job)
    model = train(job, run, base, tokenizer, data, resume=resumed)
    results, edits = evaluate(job, run, model, tokenizer, data)
    folder = rewrite(job, run, model, tokenizer, edits[job.rewrite], data_text=describe_data(job, data),
                     encoder_correlation=results["encoder"]["correlation"])
    del base, model
    with timed(run, "reload check"):
        classes = job.adapter_config().feature_classes
        run.write_json("reload.json", {"folder": str(folder),
                                       "contexts": check_reload(job, run, folder, tokenizer, classes)})
    timings = run.read_json("timings.json")
    timings["total"] = round(time.perf_counter() - started, 1)
    run.write_json("timings.json", timings)
    return write_report(run) if report else run.root
