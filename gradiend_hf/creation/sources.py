"""Offline real text and name lists: locate the data files that pip packages ship, and read them without importing.

Nothing is downloaded at run time. `gensim` ships ~105 English Wikipedia articles and the Lee news corpus as test data;
`names` ships US-census first names by gender. Both are installed with `pip install --no-deps` (their import-time
dependencies are not needed to read the files), so this module only finds their folders and parses the files.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator, Optional

WIKIPEDIA_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILES = {"background": "lee_background.cor", "test": "lee.cor"}
NAME_FILES = {"female": "dist.female.first", "male": "dist.male.first"}


def package_folder(package: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (gensim's own dependencies may be absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise ModuleNotFoundError(
            f"The offline data source needs the package {package!r}, which is not installed; run `{install}`."
        )
    return Path(spec.origin).parent


def gensim_data_file(name: str) -> Path:
    """A file of gensim's test data (Wikipedia dump, Lee corpus)."""
    path = package_folder("gensim", "pip install --no-deps gensim") / "test" / "test_data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed gensim; reinstall with "
                                "`pip install --no-deps gensim`.")
    return path


# --- Wikipedia markup -> plain text ------------------------------------------------------------------------------
DROP_SECTIONS = ("references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
                 "footnotes", "citations", "works cited")
DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "help:", "template:", "portal:")
DROP_ELEMENTS = ("math", "gallery", "timeline", "score", "syntaxhighlight", "source", "pre", "code", "imagemap", "chem")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref\b[^>/]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_ELEMENT = re.compile(r"<(%s)\b[^>]*>.*?</\1\s*>" % "|".join(DROP_ELEMENTS), re.S | re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")


def _innermost(pattern: re.Pattern, repl, text: str) -> str:
    """Apply a non-nesting pattern until nothing changes, so nested structures go from the inside out."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    if target.strip().lower().startswith(DROP_LINK_PREFIXES) or re.match(r"^[a-z]{2,3}(-[a-z]+)?:", target):
        return ""  # files, categories, interlanguage links: not prose
    return (label.rpartition("|")[2] if label else target).strip()


def wiki_to_text(markup: str) -> str:
    """Plain prose paragraphs (separated by blank lines) from MediaWiki markup: a small cleaner for sentence mining.

    Drops templates, tables, references, comments, files/categories, headings, list markers and the reference
    sections at the end; keeps link labels and the text of inline HTML; removes bold/italic quotes.
    """
    text = html.unescape(markup)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _ELEMENT.sub("", text)
    text = _innermost(_TEMPLATE, "", text)
    text = _innermost(_TABLE, "", text)
    text = _innermost(_LINK, _link, text)
    text = _EXTERNAL.sub(lambda m: m.group(1), text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # parentheses left empty by removed templates: "Asia ()"
    paragraphs: list[str] = []
    for line in text.splitlines():
        heading = _HEADING.match(line.strip())
        if heading:
            if heading.group(2).strip().lower() in DROP_SECTIONS:
                break  # the reference sections come last: nothing of prose follows
            continue
        line = re.sub(r"^[*#:;|!]+", "", line.strip()).strip()
        if line.startswith(("{", "}", "|")) or not line:
            continue
        paragraphs.append(re.sub(r"\s+", " ", line))
    return "\n\n".join(paragraphs)


def iter_wikipedia_pages(path: Path) -> Iterator[tuple[str, str]]:
    """(title, markup) of each main-namespace article of a MediaWiki XML dump (.bz2 or plain), redirects skipped."""
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as handle:
        title, namespace, markup = "", "0", ""
        for _, element in ET.iterparse(handle, events=("end",)):
            tag = element.tag.rpartition("}")[2]
            if tag == "title":
                title = element.text or ""
            elif tag == "ns":
                namespace = element.text or "0"
            elif tag == "text":
                markup = element.text or ""
            elif tag == "page":
                if namespace == "0" and markup and not markup.lstrip().upper().startswith("#REDIRECT"):
                    yield title, markup
                title, namespace, markup = "", "0", ""
                element.clear()


def wikipedia_texts(limit: Optional[int] = None, path: Optional[Path] = None) -> list[str]:
    """Plain text of the English Wikipedia articles shipped by gensim (~105 articles; `limit` keeps the first N).

    Paragraphs are separated by blank lines. Requires `pip install --no-deps gensim` (only its data file is read).
    """
    path = Path(path) if path is not None else gensim_data_file(WIKIPEDIA_FILE)
    texts = []
    for _, markup in iter_wikipedia_pages(path):
        text = wiki_to_text(markup)
        if text:
            texts.append(text)
            if limit is not None and len(texts) >= limit:
                break
    return texts


def news_texts(which: str = "all") -> list[str]:
    """The Lee news corpus shipped by gensim: one news text per line ("background": 300, "test": 50, or "all")."""
    if which not in (*NEWS_FILES, "all"):
        raise ValueError(f"which must be one of {[*NEWS_FILES, 'all']}, got {which!r}.")
    names = NEWS_FILES.values() if which == "all" else [NEWS_FILES[which]]
    texts: list[str] = []
    for name in names:
        with open(gensim_data_file(name), encoding="utf-8", errors="replace") as handle:
            texts.extend(line.strip() for line in handle if line.strip())
    return texts


def first_names(gender: str, top: Optional[int] = None) -> list[str]:
    """US-census first names of a gender ("female"/"male"), most frequent first, title-cased (`top` keeps the first N).

    Requires `pip install --no-deps names` (only its data files are read).
    """
    if gender not in NAME_FILES:
        raise ValueError(f"gender must be one of {list(NAME_FILES)}, got {gender!r}.")
    path = package_folder("names", "pip install --no-deps names") / NAME_FILES[gender]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed names; reinstall with "
                                "`pip install --no-deps names`.")
    out: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            fields = line.split()
            if fields:
                out.append(fields[0].title())
                if top is not None and len(out) >= top:
                    break
    return out
