"""On-disk cache of spaCy results, keyed by a hash of the inputs and the settings that shaped them.

spaCy is the slow step of data creation (seconds to minutes per corpus); everything after it is cheap and re-run.
Files are JSON or parquet (never pickle), written atomically, under $GRADIEND_HF_CACHE or ~/.cache/gradiend_hf/creation.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import write_file_atomically

CacheSetting = Union[bool, str, Path, None]
FORMAT_VERSION = 1  # bump when the cached content changes meaning, so old entries are not reused


def cache_dir(setting: CacheSetting = True) -> Optional[Path]:
    """The cache folder for a `cache=` argument: True = default location, a path = that folder, False/None = off."""
    if setting is False or setting is None:
        return None
    if setting is True:
        root = os.environ.get("GRADIEND_HF_CACHE")
        path = Path(root) if root else Path.home() / ".cache" / "gradiend_hf" / "creation"
    else:
        path = Path(setting)
    path.mkdir(parents=True, exist_ok=True)
    return path


def texts_digest(texts: Iterable[str]) -> str:
    """A hash of a sequence of strings (order and boundaries matter)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def cache_key(kind: str, **settings: Any) -> str:
    """A file-name-safe key: `kind` plus a hash of the JSON of the settings (which include input digests)."""
    blob = json.dumps({"format": FORMAT_VERSION, "kind": kind, **settings}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def read_json(folder: Optional[Path], key: str) -> Optional[Any]:
    if folder is None:
        return None
    path = folder / f"{key}.json.gz"
    if not path.is_file():
        return None
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def write_json(folder: Optional[Path], key: str, value: Any) -> None:
    if folder is None:
        return

    def write(tmp: Path) -> None:
        with gzip.open(tmp, "wt", encoding="utf-8") as handle:
            json.dump(value, handle)

    write_file_atomically(folder / f"{key}.json.gz", write)


def read_columns(folder: Optional[Path], key: str) -> Optional[dict[str, list]]:
    """A cached table as {column: values}, or None when absent."""
    if folder is None:
        return None
    path = folder / f"{key}.parquet"
    if not path.is_file():
        return None
    return pq.read_table(path).to_pydict()


def write_columns(folder: Optional[Path], key: str, columns: dict[str, list]) -> None:
    if folder is None:
        return
    table = pa.table(columns)
    write_file_atomically(folder / f"{key}.parquet", lambda tmp: pq.write_table(table, tmp))
