"""Accept raw text in the forms users have it: a list of strings, pandas, a `datasets.Dataset`, or text files."""

from __future__ import annotations

import bz2
import gzip
import os
from pathlib import Path
from typing import Iterable, Union

import datasets
import pandas as pd

TextSource = Union[Iterable[str], pd.DataFrame, pd.Series, datasets.Dataset, str, os.PathLike, Iterable[os.PathLike]]


def _read_file(path: Path) -> str:
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        return handle.read()


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not found:
            raise ValueError(f"the folder {path} holds no files; give text files or a list of strings.")
        return found
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a file or folder. A single string is read as a path; to pass raw text, wrap it in a "
            "list: [text]."
        )
    return [path]


def as_texts(source: TextSource, text_column: str = "text") -> list[str]:
    """The texts of `source` as a list of strings (one document each; paragraphs may be separated by blank lines).

    A str or Path is a file (plain, .gz or .bz2) or a folder of files; a DataFrame or Dataset gives its
    `text_column`; a Series or any iterable gives its items (strings, or paths to files).
    """
    if isinstance(source, datasets.DatasetDict):
        raise TypeError(f"got a DatasetDict with splits {list(source)}; pass one split, e.g. data['train'].")
    if isinstance(source, (str, os.PathLike)):
        return [_read_file(p) for p in _files(Path(source))]
    if isinstance(source, (pd.DataFrame, datasets.Dataset)):
        columns = list(source.columns) if isinstance(source, pd.DataFrame) else source.column_names
        if text_column not in columns:
            raise ValueError(f"the data has no column {text_column!r} (columns: {columns}); pass text_column=...")
        values = (source[text_column].tolist() if isinstance(source, pd.DataFrame)
                  else source.select_columns([text_column])[:][text_column])
        return [v for v in values if isinstance(v, str)]
    if isinstance(source, pd.Series):
        return [v for v in source.tolist() if isinstance(v, str)]
    texts: list[str] = []
    for item in source:
        if isinstance(item, os.PathLike):
            texts.extend(_read_file(p) for p in _files(Path(item)))
        elif isinstance(item, str):
            texts.append(item)
        elif item is not None:
            raise TypeError(f"expected strings or paths, got {type(item).__name__}: {item!r}.")
    return texts


def paragraphs(texts: Iterable[str]) -> list[str]:
    """Paragraphs (split at blank lines, single line breaks joined) so no sentence spans two paragraphs."""
    out: list[str] = []
    for text in texts:
        for block in text.replace("\r\n", "\n").split("\n\n"):
            block = " ".join(block.split())
            if block:
                out.append(block)
    return out


def require_text(texts: list[str]) -> list[str]:
    if not any(t.strip() for t in texts):
        raise ValueError("no text given: the source is empty; pass a list of strings, a DataFrame/Dataset with a "
                         "'text' column, or paths to text files (see gradiend_hf.creation.sources for offline text).")
    return texts
