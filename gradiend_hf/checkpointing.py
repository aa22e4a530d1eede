"""Checkpoint files: optimizer, scheduler and grad-scaler state as safetensors + JSON (so resuming never unpickles
anything), and which checkpoint folders are complete enough to resume from.

A checkpoint is written whole into a staging folder and renamed into place (GradiendTrainer._save_checkpoint, with
atomic.staged_folder), so an interrupted save leaves no `checkpoint-N`. Folders that are incomplete all the same (made
by an older version, or half deleted by a killed checkpoint rotation) are recognised here and skipped on resume.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from .atomic import write_file_atomically, write_text_atomically
from .config import CONFIG_NAME
from .serialization import WEIGHTS_NAME, load_tensors, save_tensors

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_JSON = "scheduler.json"
SCALER_JSON = "scaler.json"
TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME
SHARDED_STATE = "sharded_state"  # a sharded run's slices of the bottleneck and of the optimizer state (sharded_io)
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR + "-<step>"
# Files a transformers checkpoint may hold that only torch.load (pickle) reads: never read here.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle")


def jsonable(value: Any) -> Any:
    """A state-dict value as JSON can hold it (tuples tagged, 0-dim tensors as numbers); from_json undoes it."""
    if isinstance(value, tuple):
        return {"__tuple__": list(value)}
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def from_json(value: Any) -> Any:
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(value["__tuple__"])
    return value


# --- optimizer, scheduler, grad scaler ---------------------------------------------------------------------------
def save_optimizer_state(optimizer: torch.optim.Optimizer, scheduler: Any, directory: str | os.PathLike) -> None:
    """Write the optimizer (and scheduler) state into `directory`, each file atomically. The trainer calls it on a
    checkpoint's staging folder, which becomes visible only once all its files are written."""
    directory = Path(directory)
    state = optimizer.state_dict()
    tensors = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            tensors[f"{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    groups = [{k: jsonable(v) for k, v in group.items()} for group in state["param_groups"]]
    write_file_atomically(directory / OPTIMIZER_TENSORS, lambda path: save_tensors(tensors, path))
    write_text_atomically(directory / OPTIMIZER_JSON, json.dumps({"param_groups": groups}))
    save_scheduler_state(scheduler, directory)


def save_scheduler_state(scheduler: Any, directory: str | os.PathLike) -> None:
    """scheduler.json (nothing without a scheduler); a sharded run's optimizer state is in SHARDED_STATE."""
    if scheduler is not None:
        sched = {k: jsonable(v) for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        write_text_atomically(Path(directory) / SCHEDULER_JSON, json.dumps(sched))


def load_scheduler_state(scheduler: Any, directory: str | os.PathLike) -> None:
    """Restore scheduler.json into `scheduler` (when both exist)."""
    path = Path(directory) / SCHEDULER_JSON
    if scheduler is not None and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        scheduler.load_state_dict({**scheduler.state_dict(), **{k: from_json(v) for k, v in saved.items()}})


def has_optimizer_state(directory: str | os.PathLike) -> bool:
    return (Path(directory) / OPTIMIZER_TENSORS).is_file() and (Path(directory) / OPTIMIZER_JSON).is_file()


def load_optimizer_state(optimizer: torch.optim.Optimizer, scheduler: Any, directory: str | os.PathLike) -> None:
    directory = Path(directory)
    groups = json.loads((directory / OPTIMIZER_JSON).read_text(encoding="utf-8"))["param_groups"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_tensors(directory / OPTIMIZER_TENSORS).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(
        {"state": state, "param_groups": [{k: from_json(v) for k, v in g.items()} for g in groups]}
    )
    load_scheduler_state(scheduler, directory)


def save_scaler_state(scaler: Any, directory: str | os.PathLike) -> None:
    """The mixed-precision grad scaler's state (a few numbers) as JSON, where transformers would pickle scaler.pt."""
    state = {k: jsonable(v) for k, v in scaler.state_dict().items()}
    write_text_atomically(Path(directory) / SCALER_JSON, json.dumps(state))


def load_scaler_state(scaler: Any, directory: str | os.PathLike) -> bool:
    """Restore the grad scaler from scaler.json; False when the checkpoint has none (the scaler starts afresh)."""
    path = Path(directory) / SCALER_JSON
    if not path.is_file():
        return False
    scaler.load_state_dict({k: from_json(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()})
    return True


# --- which checkpoints can be resumed ----------------------------------------------------------------------------
def checkpoint_problem(checkpoint: str | os.PathLike) -> Optional[str]:
    """Why `checkpoint` cannot be resumed (a missing or unreadable file), or None when it is complete: adapter config
    and weights, optimizer state and a readable trainer_state.json."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        return "it is not a folder"
    sharded = (folder / SHARDED_STATE).is_dir()  # a sharded run's optimizer state (groups included) lives there
    required = [CONFIG_NAME, WEIGHTS_NAME, *([] if sharded else [OPTIMIZER_TENSORS, OPTIMIZER_JSON]), TRAINER_STATE]
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        hint = " (an interrupted save)" if TRAINER_STATE in missing else ""
        if missing == [OPTIMIZER_TENSORS, OPTIMIZER_JSON]:
            hint = " (saved with save_only_model=True: it loads with GradiendModel.from_pretrained, but cannot resume)"
        return f"{', '.join(missing)} missing{hint}"
    try:
        state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{TRAINER_STATE} is unreadable ({error})"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"{TRAINER_STATE} holds no global_step"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Optional[str], list[tuple[str, str]]]:
    """The complete `checkpoint-N` with the highest N in `output_dir` (or None), and the (path, problem) of each
    incomplete one with a higher N that was passed over."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None, []
    found = sorted(
        ((int(match[1]), entry.path) for entry in os.scandir(folder)
         if (match := CHECKPOINT_NAME.match(entry.name)) and entry.is_dir()),
        reverse=True,
    )
    skipped = []
    for _, path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def pickled_files(checkpoint: str | os.PathLike) -> list[str]:
    """Names of files in `checkpoint` that only pickle could read (scaler.pt, rng_state.pth, training_args.bin,
    optimizer.pt ...): written by a plain transformers Trainer or put there by someone else; never read here."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in os.scandir(folder) if entry.name.lower().endswith(PICKLE_SUFFIXES))
