"""`gradiend-hf` (also `python -m gradiend_hf`): train, evaluate, rewrite, push, or run everything / the demo.

    gradiend-hf demo                                  # the embedded main job on SmolLM2-135M -> runs/demo/report.md
    gradiend-hf run job.yaml --set training.max_steps=100
    gradiend-hf train job.yaml                        # works under `accelerate launch`
    gradiend-hf evaluate runs/x                       # encoder, decoder grid, edits, report.md
    gradiend-hf rewrite runs/x --goal balance         # plain transformers model in runs/x/models/balance
    gradiend-hf push runs/x/adapter user/my-adapter   # an adapter folder or a rewritten model folder
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .job import JobConfig, JobConfigError, RunFailed, demo_job


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`section.key=value` pairs (values parsed as YAML) written into the raw job mapping."""
    import yaml

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobConfigError(f"--set {item!r}: write it as section.key=value, e.g. training.max_steps=100.")
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise JobConfigError(f"--set {item!r}: {part!r} is not a section.")
        node[last] = yaml.safe_load(value)
    return raw


def read_job(path: Optional[str], overrides: Sequence[str], output_dir: Optional[str]) -> JobConfig:
    base = demo_job().to_dict() if path is None else _raw(path)
    raw = apply_overrides(base, overrides)
    if output_dir is not None:
        raw["output_dir"] = output_dir
    return JobConfig.from_dict(raw)


def _raw(path: str) -> dict[str, Any]:
    return JobConfig.from_file(path).to_dict()  # validated once as written, then again after the overrides


# --- subcommands -----------------------------------------------------------------------------------------------------
def cmd_train(args) -> None:
    import torch
    from accelerate import PartialState

    from .pipeline import RunFolder, build_data, load_base, prepare, train

    job = read_job(args.job, args.set, args.output_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        job.training.setdefault("use_cpu", True)  # launched as several processes on a CPU-only machine: gloo on the CPU
    run = RunFolder(Path(job.output_dir))
    main = PartialState().is_main_process
    data = prepare(job, run) if main else build_data(job)  # every process builds the same rows; one writes them
    base, tokenizer = load_base(job)
    train(job, run, base, tokenizer, data)
    if main:
        print(f"adapter: {run.adapter}\nnext: gradiend-hf evaluate {run.root}")


def _load_run(folder: str):
    from ..model import GradiendModel
    from .pipeline import RunFolder, load_base, load_data

    run = RunFolder(Path(folder))
    job = run.load_job()
    base, tokenizer = load_base(job)
    if not (run.adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{run.adapter} holds no adapter: run `gradiend-hf train` for this run folder first.")
    return run, job, GradiendModel.from_pretrained(base, run.adapter), tokenizer, load_data(run)


def cmd_evaluate(args) -> None:
    from .pipeline import evaluate
    from .report import write_report

    run, job, model, tokenizer, data = _load_run(args.run)
    evaluate(job, run, model, tokenizer, data)
    print(f"report: {write_report(run)}")


def cmd_rewrite(args) -> None:
    from ..edit import Edit
    from .pipeline import describe_data, rewrite

    run, job, model, tokenizer, data = _load_run(args.run)
    if args.feature_factor is not None or args.learning_rate is not None:
        if args.feature_factor is None or args.learning_rate is None or args.goal is not None:
            raise JobConfigError("give either --goal or both --feature-factor and --learning-rate.")
        edit = Edit(feature_factor=args.feature_factor, learning_rate=args.learning_rate, goal=None)
        correlation = None
    else:
        evaluation = run.read_json("evaluation.json")
        goal = args.goal or job.rewrite
        if goal not in evaluation["edits"]:
            raise JobConfigError(
                f"no edit was selected for goal {goal!r}; evaluated goals: {list(evaluation['edits'])}."
            )
        edit = Edit.from_dict(evaluation["edits"][goal])
        correlation = evaluation["encoder"]["correlation"]
    folder = rewrite(job, run, model, tokenizer, edit, out=Path(args.output) if args.output else None,
                     data_text=describe_data(job, data), encoder_correlation=correlation)
    print(f"model: {folder}")


def cmd_push(args) -> None:
    from ..hub import upload_folder

    folder = Path(args.folder)
    if not (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise JobConfigError(f"{folder} is neither an adapter folder (adapter_config.json) nor a model folder "
                             "(config.json): push runs/<run>/adapter or runs/<run>/models/<goal>.")
    kind = "GRADIEND adapter" if (folder / "adapter_config.json").is_file() else "model edited by GRADIEND"
    info = upload_folder(folder, args.repo_id, private=args.private, token=args.token, revision=args.revision,
                         commit_message=f"Upload {kind}")
    print(f"pushed {folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")


def cmd_run(args) -> None:
    from .pipeline import run_all

    job = read_job(getattr(args, "job", None), args.set, args.output_dir)
    report = run_all(job)
    print(f"report: {report}")


def cmd_report(args) -> None:
    from .pipeline import RunFolder
    from .report import write_report

    print(f"report: {write_report(RunFolder(Path(args.run)))}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gradiend-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    def job_options(q, job: bool = True) -> None:
        if job:
            q.add_argument("job", help="job file (.yaml/.json)")
        q.add_argument("--output-dir", help="run folder (default: the job's output_dir)")
        q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a job value")

    q = sub.add_parser("train", help="build the data and train the adapter into a run folder")
    job_options(q)
    q.set_defaults(func=cmd_train)
    q = sub.add_parser("evaluate", help="evaluate a trained run: encoder, decoder grid, edits, plots, report.md")
    q.add_argument("run")
    q.set_defaults(func=cmd_evaluate)
    q = sub.add_parser("rewrite", help="apply an edit and save a plain transformers model")
    q.add_argument("run")
    q.add_argument("--goal", help="balance, <class> or -<class> (an edit chosen by evaluate; default: the job's)")
    q.add_argument("--feature-factor", type=float)
    q.add_argument("--learning-rate", type=float)
    q.add_argument("--output", help="model folder (default: <run>/models/<goal>)")
    q.set_defaults(func=cmd_rewrite)
    q = sub.add_parser("push", help="upload an adapter or rewritten model folder to the Hugging Face Hub")
    q.add_argument("folder")
    q.add_argument("repo_id")
    q.add_argument("--private", action="store_true", default=None)
    q.add_argument("--revision", help="branch to commit to (created if missing)")
    q.add_argument("--token")
    q.set_defaults(func=cmd_push)
    q = sub.add_parser("run", help="train + evaluate + rewrite + report from one job file")
    job_options(q)
    q.set_defaults(func=cmd_run)
    q = sub.add_parser("demo", help="the embedded main job: English gender on SmolLM2-135M, found and debiased")
    job_options(q, job=False)
    q.set_defaults(func=cmd_run, output_dir=None)
    q = sub.add_parser("report", help="rewrite report.md of a run folder from its results")
    q.add_argument("run")
    q.set_defaults(func=cmd_report)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gradiend_hf").setLevel(logging.INFO)
    if args.command == "demo" and args.output_dir is None:
        args.output_dir = "runs/demo"
    try:
        args.func(args)
    except (JobConfigError, FileNotFoundError) as error:
        print(f"gradiend-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunFailed as error:
        print(f"gradiend-hf {args.command}: FAILED: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
