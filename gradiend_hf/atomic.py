"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Every file gradiend_hf writes goes through here: adapters and checkpoints (a folder of files), run results and
reports, the data-creation cache (single files).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]


def write_file_atomically(path: PathLike, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it onto `path` (atomic on one file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path: PathLike, text: str) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_folder_atomically(directory: PathLike, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write files into a temp folder beside `directory`, then move each into place with an atomic rename.

    Files are moved in the given order, so put the file a reader checks first (the config) last: an interrupted
    save leaves the previous adapter or no adapter, never a config pointing at half-written weights.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for filename, write in writers.items():
            write(staging / filename)
        if not directory.exists():
            os.replace(staging, directory)
            return
        for filename in writers:
            os.replace(staging / filename, directory / filename)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
