"""Optimizer and scheduler state as safetensors + JSON, so resuming a checkpoint never unpickles anything."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .atomic import write_folder_atomically
from .serialization import load_tensors, save_tensors

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_JSON = "scheduler.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": list(value)}
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(value["__tuple__"])
    return value


def save_optimizer_state(optimizer: torch.optim.Optimizer, scheduler: Any, directory: str | os.PathLike) -> None:
    state = optimizer.state_dict()
    tensors = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            tensors[f"{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    groups = [{k: _jsonable(v) for k, v in group.items()} for group in state["param_groups"]]
    writers = {
        OPTIMIZER_TENSORS: lambda path: save_tensors(tensors, path),
        OPTIMIZER_JSON: lambda path: path.write_text(json.dumps({"param_groups": groups}), encoding="utf-8"),
    }
    if scheduler is not None:
        sched = {k: _jsonable(v) for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        writers[SCHEDULER_JSON] = lambda path: path.write_text(json.dumps(sched), encoding="utf-8")
    write_folder_atomically(directory, writers)


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
        {"state": state, "param_groups": [{k: _from_json(v) for k, v in g.items()} for g in groups]}
    )
    if scheduler is not None and (directory / SCHEDULER_JSON).is_file():
        saved = json.loads((directory / SCHEDULER_JSON).read_text(encoding="utf-8"))
        scheduler.load_state_dict({**scheduler.state_dict(), **{k: _from_json(v) for k, v in saved.items()}})
