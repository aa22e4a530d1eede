"""Which tokens belong to a feature class: word lists refined by spaCy attributes, and the word they turn into.

A `TokenRule` says "this word (case-insensitive), with these POS / tag / morphology / lemma / dependency / next word,
belongs here, and its counterpart in the other class is `to`". Attributes are what tell ambiguous words apart:
English "her" is possessive (`Poss=Yes`, tag PRP$) in "her dog" but an object (`Case=Acc`) in "saw her"; German
"der" is masculine nominative or feminine dative. A `FeatureClass` is a name plus rules; the first rule that
matches a token decides its alternative.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Optional, Sequence, Union

from ..schema import match_case  # noqa: F401  (re-exported: casing rules live with the schema)
from .spacy_pipeline import Token

Values = Union[str, Iterable[str], None]
MorphSpec = Union[str, Iterable[str], Mapping[str, str], None]


def _values(value: Values, lower: bool = False) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(v.lower() if lower else v for v in items))


def _morph(value: MorphSpec) -> frozenset:
    """"Case=Acc|Poss=Yes", ["Case=Acc"], or {"Case": "Acc"} -> {"Case=Acc", ...}."""
    if value is None:
        return frozenset()
    if isinstance(value, Mapping):
        return frozenset(f"{k}={v}" for k, v in value.items())
    parts = value.split("|") if isinstance(value, str) else list(value)
    bad = [p for p in parts if "=" not in p]
    if bad:
        raise ValueError(f"morphology features look like 'Case=Acc' (spaCy's Feature=Value); got {bad}.")
    return frozenset(p.strip() for p in parts)


@dataclass(frozen=True)
class TokenRule:
    """A token of a feature class: a word list and/or spaCy attributes, plus the other class's word(s) it maps to.

    words: surface forms, case-insensitive (empty = any word, then the attributes alone decide).
    pos / tag / lemma / dep: allowed values (any of them); morph: features that must all be present ("Case=Acc");
    not_morph: features that must be absent; followed_by: allowed (lower-cased) next words, e.g. "white" only before
    "people". to: the alternative word(s) of the other class (one is drawn per row; empty = draw from the other
    class's words found in the data). form: a free label carried into the rows (e.g. "possessive").
    """

    words: tuple[str, ...] = ()
    pos: tuple[str, ...] = ()
    tag: tuple[str, ...] = ()
    morph: frozenset = frozenset()
    not_morph: frozenset = frozenset()
    lemma: tuple[str, ...] = ()
    dep: tuple[str, ...] = ()
    followed_by: tuple[str, ...] = ()
    to: tuple[str, ...] = ()
    form: str = ""

    @classmethod
    def of(
        cls,
        words: Values = None,
        *,
        pos: Values = None,
        tag: Values = None,
        morph: MorphSpec = None,
        not_morph: MorphSpec = None,
        lemma: Values = None,
        dep: Values = None,
        followed_by: Values = None,
        to: Values = None,
        form: str = "",
    ) -> "TokenRule":
        """The friendly constructor: single strings or lists, morphology as "A=B|C=D" or a dict."""
        rule = cls(_values(words, lower=True), _values(pos), _values(tag), _morph(morph), _morph(not_morph),
                   _values(lemma, lower=True), _values(dep), _values(followed_by, lower=True), _values(to), form)
        if not (rule.words or rule.pos or rule.tag or rule.morph or rule.lemma or rule.dep):
            raise ValueError("a TokenRule needs words or at least one spaCy attribute (pos, tag, morph, lemma, dep).")
        return rule

    @property
    def needs_lemma(self) -> bool:
        return bool(self.lemma)

    @property
    def needs_dep(self) -> bool:
        return bool(self.dep)

    def matches(self, tokens: Sequence[Token], i: int) -> bool:
        token = tokens[i]
        if self.words and token.text.lower() not in self.words:
            return False
        if self.pos and token.pos not in self.pos:
            return False
        if self.tag and token.tag not in self.tag:
            return False
        if self.morph and not self.morph <= token.morph_features:
            return False
        if self.not_morph and self.not_morph & token.morph_features:
            return False
        if self.lemma and token.lemma.lower() not in self.lemma:
            return False
        if self.dep and token.dep not in self.dep:
            return False
        if self.followed_by:
            following = tokens[i + 1].text.lower() if i + 1 < len(tokens) else ""
            if following not in self.followed_by:
                return False
        return True

    def describe(self) -> str:
        parts = [f"words={list(self.words)}" if self.words else ""]
        for name in ("pos", "tag", "lemma", "dep", "followed_by"):
            if getattr(self, name):
                parts.append(f"{name}={list(getattr(self, name))}")
        if self.morph:
            parts.append(f"morph={'|'.join(sorted(self.morph))}")
        if self.not_morph:
            parts.append(f"not_morph={'|'.join(sorted(self.not_morph))}")
        return "TokenRule(" + ", ".join(p for p in parts if p) + ")"


@dataclass
class FeatureClass:
    """A feature class (e.g. "female"): its name and the rules of its tokens, tried in order."""

    name: str
    rules: list[TokenRule] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a feature class needs a non-empty name, got {self.name!r}.")
        self.rules = [r if isinstance(r, TokenRule) else TokenRule.of(r) for r in self.rules]
        if not self.rules:
            raise ValueError(f"feature class {self.name!r} has no rules: give words or TokenRules.")

    @classmethod
    def from_words(cls, name: str, words: Iterable[str], **attributes) -> "FeatureClass":
        """One rule per word (so each can later be paired); `attributes` (pos=..., morph=...) apply to all."""
        return cls(name, [TokenRule.of(w, **attributes) for w in dict.fromkeys(words)])

    @property
    def words(self) -> set[str]:
        return {w for rule in self.rules for w in rule.words}

    @property
    def needs_every_sentence(self) -> bool:
        """A rule without words can match any token, so no sentence can be skipped before tagging."""
        return any(not rule.words for rule in self.rules)

    def match(self, tokens: Sequence[Token], i: int) -> Optional[TokenRule]:
        for rule in self.rules:
            if rule.matches(tokens, i):
                return rule
        return None


def aligned_classes(table: Mapping[str, Sequence[Union[str, TokenRule]]], pair: Sequence[str]) -> list[FeatureClass]:
    """Two classes from aligned lists (entry i of one class maps to entry i of the other), e.g. word pairs/triples.

    `table` may hold more classes than the pair (christian/muslim/jewish); each entry is a word or a TokenRule.
    """
    if len(pair) != 2 or pair[0] == pair[1]:
        raise ValueError(f"pair must name two different classes, got {list(pair)}.")
    missing = [name for name in pair if name not in table]
    if missing:
        raise ValueError(f"class(es) {missing} not in the word table; available: {list(table)}.")
    entries = {name: [e if isinstance(e, TokenRule) else TokenRule.of(e) for e in table[name]] for name in pair}
    first, second = pair
    if len(entries[first]) != len(entries[second]):
        raise ValueError(f"aligned lists differ in length: {first!r} has {len(entries[first])} entries, "
                         f"{second!r} has {len(entries[second])}; entry i of one class must match entry i of the "
                         "other.")
    classes = []
    for name, other in ((first, second), (second, first)):
        rules = []
        for own, counterpart in zip(entries[name], entries[other]):
            if not counterpart.words:
                raise ValueError(f"entry {counterpart.describe()} of {other!r} has no word to use as alternative.")
            rules.append(replace(own, to=own.to or counterpart.words[:1]))
        classes.append(FeatureClass(name, rules))
    return classes


def word_pattern(words: Iterable[str]) -> Optional[re.Pattern]:
    """A case-insensitive regex for any of `words` as a whole word (None for no words)."""
    unique = sorted({w for w in words if w}, key=lambda w: (-len(w), w))
    if not unique:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in unique) + r")(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class Match:
    """A token that belongs to a feature class, with the rule that put it there."""

    token: Token
    feature_class: str
    rule: TokenRule


class Matcher:
    """Finds the tokens each class claims; rules are indexed by word, so a token is tried only against its own."""

    def __init__(self, classes: Sequence[FeatureClass]) -> None:
        self.classes = list(classes)
        self.by_word: list[dict[str, list[TokenRule]]] = []
        self.wordless: list[list[tuple[int, TokenRule]]] = []
        for c in self.classes:
            index: dict[str, list[tuple[int, TokenRule]]] = {}
            for order, rule in enumerate(c.rules):
                for word in rule.words:
                    index.setdefault(word, []).append((order, rule))
            free = [(order, rule) for order, rule in enumerate(c.rules) if not rule.words]
            # rules in their original order: word rules of this word merged with the word-less rules
            self.by_word.append({w: [r for _, r in sorted(v + free, key=lambda x: x[0])] for w, v in index.items()})
            self.wordless.append(free)

    def __call__(self, tokens: Sequence[Token]) -> list[Match]:
        """Tokens claimed by exactly one class (a token claimed by two classes is ambiguous and skipped)."""
        out = []
        for i, token in enumerate(tokens):
            word = token.text.lower()
            hits = []
            for c, by_word, free in zip(self.classes, self.by_word, self.wordless):
                rules = by_word.get(word)
                if rules is None:
                    rules = [rule for _, rule in free]
                for rule in rules:
                    if rule.matches(tokens, i):
                        hits.append((c.name, rule))
                        break
            if len(hits) == 1:
                out.append(Match(token, hits[0][0], hits[0][1]))
        return out


def find_matches(tokens: Sequence[Token], classes: Sequence[FeatureClass]) -> list[Match]:
    """Tokens claimed by exactly one class (a token claimed by two classes is ambiguous and skipped)."""
    return Matcher(classes)(tokens)
