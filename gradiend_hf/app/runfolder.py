"""One run folder holds one run: where each step writes, and who may write there.

A run starts by claiming its folder: `run.json` records a run id and the fingerprint of the job (sha256 of the job
without output_dir), written together with `job.yaml` (atomically). Afterwards

- a new run into a folder that holds a run is refused (`--resume` continues that run if the job is the same,
  `--overwrite` replaces it: the old folder is moved aside and deleted, the new run starts in an empty folder);
- a folder holding anything but run files is never written to nor deleted, even with `--overwrite`;
- every command that reads a run (evaluate, rewrite, report, --resume) checks that job.yaml still has the recorded
  fingerprint, that the results it reads carry the run's id, and that the adapter is the one training recorded.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import datasets

from ..atomic import write_folder_atomically, write_text_atomically
from .job import JobConfig, JobConfigError
from .names import goal_folder

logger = logging.getLogger("gradiend_hf")
RUN_FILE = "run.json"
RUN_ENTRIES = ("run.json", "job.yaml", "data", "training", "adapter", "plots", "results", "models", "report.md")
STAMPED = ("training.json", "evaluation.json", "encoder.json", "reload.json", "data.json")  # carry the run id
MODES = ("new", "resume", "overwrite")


def fingerprint(job: JobConfig) -> str:
    """sha256 of the job as validated, without output_dir (a run may be moved to another folder)."""
    content = {k: v for k, v in job.to_dict().items() if k != "output_dir"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class RunFolder:
    """Where each step puts its output inside one run folder; `run_id` is the run's (None: a helper process of a
    multi-process launch, which writes nothing into the folder)."""

    root: Path
    run_id: Optional[str] = None

    @property
    def job(self) -> Path: return self.root / "job.yaml"
    @property
    def record(self) -> Path: return self.root / RUN_FILE
    @property
    def data(self) -> Path: return self.root / "data"
    @property
    def training(self) -> Path: return self.root / "training"
    @property
    def adapter(self) -> Path: return self.root / "adapter"
    @property
    def plots(self) -> Path: return self.root / "plots"
    @property
    def results(self) -> Path: return self.root / "results"
    @property
    def report(self) -> Path: return self.root / "report.md"

    def model(self, goal: str) -> Path:
        """models/<folder> of the edit chosen for `goal` (names.goal_folder: safe for any class name)."""
        return self.root / "models" / goal_folder(goal)

    def read_json(self, name: str) -> Any:
        path = self.results / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the step that writes it first (train, then evaluate).")
        value = json.loads(path.read_text(encoding="utf-8"))
        if name in STAMPED and self.run_id is not None and value.get("run_id") != self.run_id:
            raise JobConfigError(
                f"{path} was written by another run ({value.get('run_id')}) than the one in {self.root} "
                f"({self.run_id}): the folder mixes runs. Run the step that writes it again for this run, or start "
                "the job again with --overwrite."
            )
        return value

    def write_json(self, name: str, value: Any) -> None:
        if name in STAMPED and self.run_id is not None:
            value = {**value, "run_id": self.run_id}
        self.results.mkdir(parents=True, exist_ok=True)
        write_text_atomically(self.results / name, json.dumps(value, indent=2, default=float))

    def check_adapter(self) -> None:
        """The adapter in the folder is the one this run's training saved (its weights' sha256 in training.json)."""
        from ..serialization import WEIGHTS_NAME

        if not (self.adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{self.adapter} holds no adapter: run `gradiend-hf train` for this run folder "
                                    "first (or `train --resume` to finish an interrupted one).")
        recorded = self.read_json("training.json").get("adapter_sha256")
        if recorded is None or file_sha256(self.adapter / WEIGHTS_NAME) != recorded:
            raise JobConfigError(
                f"{self.adapter} is not the adapter this run's training saved (its weights differ from the sha256 in "
                f"{self.results / 'training.json'}): the folder mixes runs. Train again with --overwrite."
            )

    def load_job(self) -> JobConfig:
        return open_run(self.root)[1]


# --- reading a run ---------------------------------------------------------------------------------------------------
def read_record(root: Path) -> Optional[dict[str, Any]]:
    """run.json of a folder (None if it has none)."""
    path = root / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise JobConfigError(f"{path} is damaged ({error}); the run cannot be checked: start it again with "
                             "--overwrite.") from None
    if not isinstance(record, dict) or not {"run_id", "fingerprint"} <= set(record):
        raise JobConfigError(f"{path} is not a run record (run_id, fingerprint); start the run again with --overwrite.")
    return record


def open_run(root: Path) -> tuple[RunFolder, JobConfig]:
    """A run folder to read, and its job, after checking that job.yaml is the job the run was started with."""
    root = Path(root)
    record = read_record(root)
    if record is None:
        if (root / "job.yaml").is_file():
            raise JobConfigError(
                f"{root} has no {RUN_FILE}: it was made by an older gradiend-hf (or its run never started), so its "
                "files cannot be checked to belong to one run. Run its job again with --overwrite."
            )
        raise FileNotFoundError(f"{root} is not a run folder (no job.yaml): run `gradiend-hf train <job file>` first.")
    job = JobConfig.from_file(root / "job.yaml")
    if fingerprint(job) != record["fingerprint"]:
        raise JobConfigError(
            f"{root / 'job.yaml'} is not the job this run was started with (its fingerprint differs from "
            f"{root / RUN_FILE}): the folder's files were made with another job. Put the original job back, or run "
            "the new job into another folder (or this one with --overwrite)."
        )
    return RunFolder(root, record["run_id"]), job


# --- claiming a folder for a run -----------------------------------------------------------------------------------
def foreign_entries(root: Path) -> list[str]:
    """Entries of `root` that no run writes (atomic writes' hidden temporaries of run entries are run entries)."""
    def ours(name: str) -> bool:
        return name in RUN_ENTRIES or any(name.startswith(f".{entry}.") for entry in RUN_ENTRIES)

    return sorted(entry.name for entry in root.iterdir() if not ours(entry.name))


def job_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: old -> new` for every value that differs (output_dir aside)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        where = f"{prefix}{key}"
        if where == "output_dir":
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += job_differences(a, b, f"{where}.")
        elif a != b:
            out.append(f"{where}: {a!r} in the folder, {b!r} now")
    return out


def describe_difference(root: Path, job: JobConfig) -> str:
    try:
        old = JobConfig.from_file(root / "job.yaml").to_dict()
    except (JobConfigError, OSError):
        return "its job.yaml cannot be read"
    differences = job_differences(old, job.to_dict())
    shown = "; ".join(differences[:5]) + ("; ..." if len(differences) > 5 else "")
    return f"a different job ({shown})" if differences else "the same job"


def plan_claim(root: Path, job: JobConfig, mode: str) -> str:
    """What starting `job` in `root` does: "new" (start in a new or empty folder), "resume" or "replace"; refuses
    (JobConfigError) a folder that holds another run without --overwrite, or anything but run files. Reads only."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise JobConfigError(f"output_dir {root} is a file, not a folder: choose another --output-dir.")
    if not root.is_dir() or not any(root.iterdir()):
        if mode == "resume":
            logger.info("%s holds no run to resume: starting a new one.", root)
        return "new"
    foreign = foreign_entries(root)
    if foreign:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise JobConfigError(
            f"{root} is not a run folder (it holds {listed}): a run is written only into a new or empty folder or "
            "a run folder of its own, and --overwrite never deletes other files. Choose another --output-dir."
        )
    if mode == "overwrite":
        if Path.cwd().resolve().is_relative_to(root.resolve()):
            raise JobConfigError(f"--overwrite would delete {root}, which holds the current folder: run from "
                                 "elsewhere.")
        return "replace"
    record = read_record(root)
    if record is None:
        raise JobConfigError(
            f"{root} holds a run folder without {RUN_FILE} (an older gradiend-hf, or a start that was cut off): "
            "add --overwrite to replace it, or choose another --output-dir."
        )
    same = record["fingerprint"] == fingerprint(job)
    if mode == "resume":
        if same:
            return "resume"
        raise JobConfigError(
            f"--resume: {root} holds a run of {describe_difference(root, job)}. Resume a run with the job it was "
            f"started with ({root / 'job.yaml'}), or use --overwrite instead of --resume to replace it."
        )
    state = "finished" if (root / "report.md").is_file() else "unfinished"
    raise JobConfigError(
        f"{root} already holds a run ({state}, of {describe_difference(root, job)}); one folder holds one run. Add "
        "--resume to continue it (same job only), --overwrite to replace it, or choose another --output-dir."
    )


def claim(root: Path, job: JobConfig, action: str) -> RunFolder:
    """Carry out plan_claim's action (main process only): the run folder with its run.json + job.yaml."""
    root = Path(root)
    if action == "resume":
        return RunFolder(root, read_record(root)["run_id"])
    if action == "replace":
        aside = root.parent / f".{root.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.replace(root, aside)  # atomic: the folder holds the old run or nothing, never half of each
        shutil.rmtree(aside)
        logger.info("%s: the previous run was replaced (--overwrite).", root)
    import yaml

    record = {"run_id": uuid.uuid4().hex, "fingerprint": fingerprint(job),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    files = {"job.yaml": yaml.safe_dump(job.to_dict(), sort_keys=False), RUN_FILE: json.dumps(record, indent=2)}
    if root.exists():  # an empty folder (plan_claim): job.yaml, then run.json (a folder with run.json has its job)
        for name, text in files.items():
            write_text_atomically(root / name, text)
    else:  # the folder appears with both files or not at all
        write_folder_atomically(root, {name: (lambda path, t=text: path.write_text(t, encoding="utf-8"))
                                       for name, text in files.items()})
    return RunFolder(root, record["run_id"])


# --- the run's data ---------------------------------------------------------------------------------------------
def load_data(run: RunFolder) -> datasets.DatasetDict:
    """The run's saved splits, in memory: datasets would otherwise write cache files (e.g. of a shuffle) into them."""
    if not run.data.is_dir():
        raise FileNotFoundError(f"{run.data} is missing: run `gradiend-hf train` for this run folder first.")
    return datasets.load_from_disk(str(run.data), keep_in_memory=True)


def save_data(data: datasets.DatasetDict, folder: Path) -> None:
    """DatasetDict.save_to_disk's layout (one folder per split + dataset_dict.json), written atomically."""
    writers: dict[str, Callable[[Path], None]] = {
        name: (lambda path, split=split: split.save_to_disk(str(path))) for name, split in data.items()
    }
    writers["dataset_dict.json"] = lambda path: path.write_text(json.dumps({"splits": list(data)}), encoding="utf-8")
    write_folder_atomically(folder, writers)


def data_record(job: JobConfig, data: datasets.DatasetDict) -> dict[str, Any]:
    """results/data.json: where the rows came from (recipe and text, or the row files) and how many each split has."""
    spec = job.data
    if spec.recipe is not None:
        origin: dict[str, Any] = {"recipe": spec.recipe, "text": spec.text, "options": spec.options}
    else:
        origin = {"files": {name: getattr(spec, name) for name in ("train", "validation", "test", "neutral")
                            if getattr(spec, name) is not None}}
    return {**origin, "rows": {name: len(split) for name, split in data.items()}}
