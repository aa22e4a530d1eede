"""`gradiend-hf` (also `python -m gradiend_hf`): train, evaluate, rewrite, push, or run everything / the demo.

    gradiend-hf demo                                  # the embedded main job on SmolLM2-135M -> runs/demo/report.md
    gradiend-hf demo --set model=gemma3               # the same job on Gemma-3-270m (embedded models: smollm2, gemma3)
    gradiend-hf run job.yaml --set training.max_steps=100
    gradiend-hf run suite.yaml                        # a job with pairs: one adapter per pair, compared in report.md
    gradiend-hf run job.yaml --resume                 # continue an interrupted run (--overwrite: replace the run)
    gradiend-hf train job.yaml                        # works under `accelerate launch`
    gradiend-hf evaluate runs/x                       # encoder, decoder grid, edits, report.md
    gradiend-hf rewrite runs/x --goal balance         # plain transformers model in runs/x/models/balance
    gradiend-hf rewrite runs/x --goal -female         # weaken a class (also --goal=-female, --goal weaken:female)
    gradiend-hf push runs/x/adapter user/my-adapter   # the adapter's files only (listed first; --dry-run: only list)

Relative paths in a job file are relative to the job file's folder; --set and --output-dir values are relative to
the current folder. Exit codes: 0 done, 2 bad input (job, options, folder; nothing was started), 3 the run failed
(report.md says why).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .job import JobConfig, JobConfigError, RunFailed, demo_job, parse_yaml, read_job_file, resolve_paths
from .names import canonical_goal

SHORTHANDS = {"model": "name"}  # `model: x` is short for `model: {name: x}`, so --set model.dtype=... applies to it
OPTIONS_WITH_GOALS = ("--goal",)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`section.key=value` pairs (values parsed as YAML, safe_load) written into the raw job mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or "" in key.split("."):
            raise JobConfigError(f"--set {item!r}: write it as section.key=value, e.g. training.max_steps=100.")
        *path, last = key.split(".")
        node = raw
        for depth, part in enumerate(path):
            if node.get(part) is None:
                node[part] = {}
            if depth == 0 and part in SHORTHANDS and isinstance(node[part], str):
                node[part] = {SHORTHANDS[part]: node[part]}
            node = node[part]
            if not isinstance(node, dict):
                raise JobConfigError(f"--set {item!r}: {part!r} is not a section.")
        node[last] = parse_yaml(value, f"--set {item!r}: the value")
    return raw


def read_job(path: Optional[str], overrides: Sequence[str], output_dir: Optional[str]) -> JobConfig:
    """The job file (or the embedded demo job) with the overrides, validated once as a whole."""
    raw = demo_job().to_dict() if path is None else resolve_paths(read_job_file(path), Path(path).parent)
    raw = {} if raw is None else raw
    if isinstance(raw, dict):  # anything else is refused by from_dict
        raw = apply_overrides(raw, overrides)
        if output_dir is not None:
            raw["output_dir"] = output_dir
    source = "the demo job" if path is None else f"job file {path}"
    return JobConfig.from_dict(raw, source=source + (" with --set" if overrides else ""))


def mode(args) -> str:
    """new, resume or overwrite: what the command does with a run folder that already holds a run."""
    return "resume" if getattr(args, "resume", False) else "overwrite" if getattr(args, "overwrite", False) else "new"


def refuse_suite(job: JobConfig, command: str) -> None:
    """A job with pairs: (a suite of adapters) runs in one go; the step-by-step commands handle one adapter."""
    if job.pairs:
        raise JobConfigError(f"{command} handles a job of one pair; a job with pairs: (a suite) runs with "
                             "`gradiend-hf run JOB` (its report.md and results/ compare the pairs).")


# --- subcommands -----------------------------------------------------------------------------------------------------
def cmd_train(args) -> None:
    import torch
    from accelerate import PartialState

    from .pipeline import load_base, start, train

    job = read_job(args.job, args.set, args.output_dir)
    refuse_suite(job, "train")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        job.training.setdefault("use_cpu", True)  # launched as several processes on a CPU-only machine: gloo on the CPU
    state = PartialState(cpu=bool(job.training.get("use_cpu")))  # cpu: the processes join one gloo group at once
    run, data, resumed = start(job, mode(args), main=state.is_main_process, barrier=state.wait_for_everyone)
    base, tokenizer = load_base(job)
    train(job, run, base, tokenizer, data, resume=resumed)
    if state.is_main_process:
        print(f"adapter: {run.adapter}\nnext: gradiend-hf evaluate {run.root}")


def _open(folder: str):
    """The run folder (checked: runfolder.open_run) and its job, its base model checked before anything loads."""
    from .preflight import base_problems
    from .runfolder import open_run

    run, job = open_run(Path(folder))
    refuse_suite(job, "this command")
    problems = base_problems(job)
    if problems:
        raise JobConfigError(f"{run.job}: {problems[0]}")
    run.check_adapter()
    return run, job


def _load(run, job):
    from ..model import GradiendModel
    from .pipeline import load_base
    from .runfolder import load_data

    data = load_data(run)
    base, tokenizer = load_base(job)
    return GradiendModel.from_pretrained(base, run.adapter), tokenizer, data


def cmd_evaluate(args) -> None:
    from .pipeline import evaluate
    from .report import write_report

    run, job = _open(args.run)
    model, tokenizer, data = _load(run, job)
    evaluate(job, run, model, tokenizer, data)
    print(f"report: {write_report(run)}")


def cmd_rewrite(args) -> None:
    from ..edit import Edit
    from .pipeline import describe_data, model_folder, rewrite
    from .preflight import check_model_output

    run, job = _open(args.run)
    if args.feature_factor is not None or args.learning_rate is not None:
        if args.feature_factor is None or args.learning_rate is None or args.goal is not None:
            raise JobConfigError("give either --goal or both --feature-factor and --learning-rate.")
        if not (math.isfinite(args.feature_factor) and math.isfinite(args.learning_rate)):
            raise JobConfigError("--feature-factor and --learning-rate must be finite numbers.")
        edit = Edit(feature_factor=args.feature_factor, learning_rate=args.learning_rate, goal=None)
        correlation = None
    else:
        evaluation = run.read_json("evaluation.json")
        goal = canonical_goal(args.goal) if args.goal is not None else job.rewrite
        if goal not in evaluation["edits"]:
            raise JobConfigError(
                f"no edit was selected for goal {goal!r}; evaluated goals: {list(evaluation['edits'])} (write "
                "-<class> as --goal=-<class> or --goal weaken:<class>)."
            )
        edit = Edit.from_dict(evaluation["edits"][goal])
        correlation = evaluation["encoder"]["correlation"]
    out = Path(args.output) if args.output else model_folder(run, edit)
    check_model_output(out, run.root)  # before the model is loaded
    model, tokenizer, data = _load(run, job)
    folder = rewrite(job, run, model, tokenizer, edit, out=out, data_text=describe_data(job, data),
                     encoder_correlation=correlation)
    print(f"model: {folder}")


def cmd_push(args) -> None:
    from ..hub import plan_push, push_planned

    try:
        plan = plan_push(Path(args.folder), args.repo_id)
    except ValueError as error:
        raise JobConfigError(str(error)) from None
    print(plan.describe())
    if args.dry_run:
        print("dry run: nothing was uploaded.")
        return
    kind = "GRADIEND adapter" if plan.kind == "adapter" else "model edited by GRADIEND"
    info = push_planned(plan, args.repo_id, private=args.private, token=args.token, revision=args.revision,
                        commit_message=f"Upload {kind}")
    print(f"pushed {plan.folder} to {args.repo_id}: {getattr(info, 'commit_url', info)}")


def cmd_run(args) -> None:
    from .pipeline import run_all
    from .suite_pipeline import run_suite

    job = read_job(getattr(args, "job", None), args.set, args.output_dir)
    report = (run_suite if job.pairs else run_all)(job, mode(args))
    print(f"report: {report}")


def cmd_report(args) -> None:
    from .report import write_report
    from .runfolder import open_run
    from .suite_report import write_suite_report

    run, job = open_run(Path(args.run))
    print(f"report: {(write_suite_report if job.pairs else write_report)(run)}")


def version() -> str:
    """The version of the installed distribution (from its metadata, so it is the one pip installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("gradiend_hf")
    except PackageNotFoundError:
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    """The argument parser; every subcommand, argument and option has a help text (a test checks it)."""
    p = argparse.ArgumentParser(
        prog="gradiend-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"gradiend-hf {version()}",
                   help="print the version of gradiend_hf and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do (COMMAND --help: its "
                           "options)")

    def job_options(q, job: bool = True) -> None:
        if job:
            q.add_argument("job", help="job file (.yaml/.yml/.json); relative paths in it are relative to its folder")
        q.add_argument("--output-dir", help="run folder (default: the job's output_dir); relative to the current "
                                            "folder")
        q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a job value (parsed as YAML; repeat for several); a relative path given here is "
                            "relative to the current folder")
        folder = q.add_mutually_exclusive_group()
        folder.add_argument("--resume", action="store_true",
                            help="continue the run of this same job in the run folder (from its last checkpoint)")
        folder.add_argument("--overwrite", action="store_true",
                            help="replace the run the run folder holds (it is deleted first)")

    run_folder = "run folder (the output_dir of `train` or `run`)"
    q = sub.add_parser("train", help="build the data and train the adapter into a run folder")
    job_options(q)
    q.set_defaults(func=cmd_train)
    q = sub.add_parser("evaluate", help="evaluate a trained run: encoder, decoder grid, edits, plots, report.md")
    q.add_argument("run", help=run_folder)
    q.set_defaults(func=cmd_evaluate)
    q = sub.add_parser("rewrite", help="apply an edit and save a plain transformers model")
    q.add_argument("run", help=run_folder)
    q.add_argument("--goal", metavar="GOAL",
                   help="balance, <class> (strengthen it) or -<class> (weaken it; also written weaken:<class>): the "
                        "edit evaluate chose for this goal (default: the job's rewrite goal)")
    q.add_argument("--feature-factor", type=float, metavar="F",
                   help="feature value h fed to the decoder, for an edit of your own (with --learning-rate)")
    q.add_argument("--learning-rate", type=float, metavar="LR",
                   help="step size of an edit of your own: theta + LR * decoder(F) (with --feature-factor)")
    q.add_argument("--output", help="model folder (default: <run>/models/<goal>)")
    q.set_defaults(func=cmd_rewrite)
    q = sub.add_parser("push", help="upload an adapter or rewritten model folder to the Hugging Face Hub")
    q.add_argument("folder", help="an adapter folder (<run>/adapter) or a rewritten model folder (<run>/models/...)")
    q.add_argument("repo_id", help="Hub repository to upload to, user/name (created if missing)")
    q.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    q.add_argument("--revision", help="branch to commit to (created if missing)")
    q.add_argument("--token", help="Hub token (default: HF_TOKEN, or the token stored by `hf auth login`)")
    q.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded, upload nothing")
    q.set_defaults(func=cmd_push)
    q = sub.add_parser("run", help="train + evaluate + rewrite + report from one job file")
    job_options(q)
    q.set_defaults(func=cmd_run)
    q = sub.add_parser("demo", help="the embedded main job: English gender on SmolLM2-135M, found and debiased "
                                    "(--set model=gemma3: on Gemma-3-270m)")
    job_options(q, job=False)
    q.set_defaults(func=cmd_run, output_dir=None)
    q = sub.add_parser("report", help="rewrite report.md of a run folder from its results")
    q.add_argument("run", help=run_folder)
    q.set_defaults(func=cmd_report)
    return p


def join_dash_values(argv: Sequence[str]) -> list[str]:
    """`--goal -female` as `--goal=-female`: argparse takes a value that starts with '-' for an option and stops
    with "expected one argument". A following value with a single leading dash is the goal (no option of
    `rewrite` is spelled with one dash but -h, and `--goal -h` asks for no help); `--goal --output x` stays an error."""
    out: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        nxt = items[i + 1] if i + 1 < len(items) else None
        if item in OPTIONS_WITH_GOALS and nxt is not None and nxt.startswith("-") and not nxt.startswith("--"):
            out.append(f"{item}={nxt}")
            i += 2
            continue
        out.append(item)
        i += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(join_dash_values(sys.argv[1:] if argv is None else argv))
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
