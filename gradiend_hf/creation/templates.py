"""Name templates in the style of the GRADIEND paper: "[NAME] said that [MASK] would come." filled with first names.

Templates are mined from real text: a sentence with exactly one person (spaCy NER, PERSON) and no other proper noun
before exactly one gendered pronoun, and no other gender cue (no other gendered pronoun, no word like "wife" or
"king"). The person becomes [NAME] and the pronoun [MASK]; its grammatical form (subject, object, possessive, ...) is
kept so that every name gets the right pronoun: "Mary said that [MASK] would come." -> factual "she", alternative
"he". Filling each template with names of both classes gives balanced rows whose only gender signal is the name.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..data import MASK
from .creator import Corpus, DataCreator
from .filters import FeatureClass, Matcher, match_case, word_pattern

NAME = "[NAME]"


@dataclass(frozen=True)
class NameTemplate:
    """A sentence with one [NAME] and one [MASK]; `form` names the pronoun form, `like` its original casing."""

    text: str
    form: str
    like: str = "x"

    def __post_init__(self) -> None:
        if self.text.count(NAME) != 1 or self.text.count(MASK) != 1:
            raise ValueError(f"a name template needs exactly one {NAME} and one {MASK}: {self.text!r}.")
        if self.text.index(NAME) > self.text.index(MASK):
            raise ValueError(f"the {NAME} must come before the {MASK} it refers to: {self.text!r}.")


def mine_name_templates(
    creator: DataCreator,
    corpus: Corpus,
    classes: Sequence[FeatureClass],
    exclude_words: Iterable[str] = (),
    entity: str = "PERSON",
) -> list[NameTemplate]:
    """Templates from sentences with one `entity` span before exactly one pronoun that a class rule claims."""
    indices = creator.candidates(corpus, classes)
    annotated = creator.annotate([corpus.sentences[i] for i in indices], ner=True,
                                 dep=any(r.needs_dep for c in classes for r in c.rules))
    gendered = word_pattern({w for c in classes for w in c.words} | set(exclude_words))
    templates: dict[str, NameTemplate] = {}
    matcher = Matcher(classes)
    for sentence in annotated:
        tokens, text = sentence.tokens, sentence.text
        matches = matcher(tokens)
        if len(matches) != 1 or not matches[0].rule.form:
            continue
        pronoun = matches[0].token
        spans = _entity_spans(tokens, entity)
        if len(spans) != 1 or spans[0][1] > pronoun.i:
            continue
        first, last = spans[0]
        if any(t.pos == "PROPN" for t in tokens[:pronoun.i] if not first <= t.i < last):
            continue  # another name before the pronoun (NER missed it), which the pronoun might refer to
        start, end = tokens[first].start, tokens[last - 1].end
        rest = text[:start] + " " + text[end:pronoun.start] + " " + text[pronoun.end:]
        if gendered is not None and gendered.search(rest):
            continue  # another gender cue besides the pronoun
        left_words = sum(t.is_word for t in tokens[:pronoun.i]) - sum(t.is_word for t in tokens[first:last]) + 1
        if left_words < creator.min_left_words:
            continue
        template = text[:start] + NAME + text[end:pronoun.start] + MASK + text[pronoun.end:]
        templates.setdefault(template, NameTemplate(template, matches[0].rule.form, pronoun.text))
    return list(templates.values())


def _entity_spans(tokens, label: str) -> list[tuple[int, int]]:
    spans: list[list[int]] = []
    for token in tokens:
        iob, _, kind = token.ent.partition("-")
        if kind != label:
            continue
        if iob == "B" or not spans or spans[-1][1] != token.i:
            spans.append([token.i, token.i + 1])
        else:
            spans[-1][1] = token.i + 1
    return [(a, b) for a, b in spans]


def fill_name_templates(
    templates: Sequence[NameTemplate],
    names: Mapping[str, Sequence[str]],
    forms: Mapping[str, Mapping[str, str]],
    names_per_template: int = 4,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows: each template filled with `names_per_template` names of each class (drawn with the seed).

    names: class -> names; forms: pronoun form -> class -> pronoun (e.g. forms["object"] = {"female": "her", ...}).
    The `word` column holds the name, so split="word" holds out names.
    """
    classes = list(names)
    if len(classes) != 2:
        raise ValueError(f"names must map exactly two classes to name lists, got {classes}.")
    for cls in classes:
        if not names[cls]:
            raise ValueError(f"no names for class {cls!r}; give a list of first names.")
    rng = random.Random(f"{seed}:names")
    rows = []
    for index, template in enumerate(templates):
        if template.form not in forms:
            raise ValueError(f"template form {template.form!r} has no pronouns; known forms: {list(forms)}.")
        for cls, other in ((classes[0], classes[1]), (classes[1], classes[0])):
            pool = list(names[cls])
            for name in rng.sample(pool, min(names_per_template, len(pool))):
                rows.append(dict(
                    masked=template.text.replace(NAME, name),
                    factual=match_case(forms[template.form][cls], template.like),
                    alternative=match_case(forms[template.form][other], template.like),
                    factual_class=cls, alternative_class=other, sentence_id=index, word=name,
                    form=template.form, source="template",
                ))
    return rows


def disjoint_names(names: Mapping[str, Sequence[str]], top: Optional[int] = None) -> dict[str, list[str]]:
    """Per class, its names minus those of the other class (a name of both genders is no signal), first `top` kept."""
    lowered = {cls: {n.lower() for n in values} for cls, values in names.items()}
    out = {}
    for cls, values in names.items():
        others = set().union(*(v for c, v in lowered.items() if c != cls))
        kept = [n for n in dict.fromkeys(values) if n.lower() not in others]
        out[cls] = kept[:top] if top is not None else kept
    return out
