"""Neutral text: sentences without any feature word, to check that an edited model still models language.

A sentence is neutral when no feature word occurs in it as a whole word (case-insensitive), and, optionally, no
token matches given spaCy rules (e.g. no pronoun with a `Gender` feature, no proper noun that is a first name).
Only as many candidates as needed are tagged, in seeded random order.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable, Optional, Sequence

from .filters import TokenRule, word_pattern
from .spacy_pipeline import AnnotatedSentence

Annotator = Callable[[Sequence[str]], list[AnnotatedSentence]]


def neutral_sentences(
    sentences: Sequence[str],
    exclude_words: Iterable[str],
    exclude_rules: Sequence[TokenRule] = (),
    limit: Optional[int] = None,
    seed: int = 0,
    annotate: Optional[Annotator] = None,
) -> list[str]:
    """Up to `limit` sentences (all when None) without `exclude_words` and without tokens matching `exclude_rules`.

    The result is in seeded random order. `annotate` (sentences -> annotated sentences) is needed only with rules.
    """
    pattern = word_pattern(exclude_words)
    candidates = [s for s in dict.fromkeys(sentences) if pattern is None or not pattern.search(s)]
    random.Random(f"{seed}:neutral").shuffle(candidates)
    if not exclude_rules:
        return candidates if limit is None else candidates[:limit]
    if annotate is None:
        raise ValueError("exclude_rules need spaCy annotations: pass annotate= (e.g. DataCreator.annotate).")
    out: list[str] = []
    chunk = max(64, 2 * limit) if limit is not None else max(1, len(candidates))
    for start in range(0, len(candidates), chunk):
        for sentence in annotate(candidates[start:start + chunk]):
            tokens = sentence.tokens
            if not any(rule.matches(tokens, i) for i in range(len(tokens)) for rule in exclude_rules):
                out.append(sentence.text)
                if limit is not None and len(out) >= limit:
                    return out
    return out
