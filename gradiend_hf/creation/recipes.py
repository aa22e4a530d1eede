"""Built-in recipes: one call from raw text to a `DatasetDict` ready for GradiendTrainer.

Every recipe returns splits "train", "validation", "test" (GRADIEND rows plus the columns sentence_id, word, form,
source) and a "neutral" split with a single `text` column (sentences without any feature word), unless neutral=0.
`source` is anything `DataCreator.corpus` accepts (list of strings, DataFrame/Dataset with a text column, file
paths, or a Corpus built once and reused). Keyword `options` go to `DataCreator.create`: split ("row" / "word"),
fractions, balance, max_per_class, neutral, neutral_exclude_words, neutral_exclude_rules, seed, text_column.

The word-list recipes `race` and `religion` build three classes by default (asian/black/white,
christian/jewish/muslim): each row holds one transition (its alternative class, assigned per split by
creator.assign_transitions) plus a `counterparts` column with the row's aligned word in every class; train one pair
with `schema.prepare_rows(split, pair)` (other classes become identity rows). `pair=` (or two `classes`) gives the
two-class data set as before.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import datasets

from .creator import AlignedClass, Corpus, DataCreator
from .filters import FeatureClass, TokenRule, aligned_classes
from .inputs import TextSource
from .sources import first_names
from .spacy_pipeline import load_pipeline
from .templates import NameTemplate, disjoint_names, fill_name_templates, mine_name_templates
from .wordlists import (
    GENDER_FORMS,
    GENDERED_WORDS,
    RACE_CLASSES,
    RACE_WORDS,
    RELIGION_CLASSES,
    RELIGION_WORDS,
    german_article_table,
    gender_pronoun_classes,
    pronoun_number_classes,
)

Source = Union[TextSource, Corpus]


def english_pronoun_number(source: Source, *, include_it: bool = True, creator: Optional[DataCreator] = None,
                           **options: Any) -> datasets.DatasetDict:
    """3rd person singular (he/she/it, class "singular", +1) vs plural (they, "plural", -1) from real text.

    Each case form maps to its counterpart: he/she/it -> they, him/her/it -> them, his/her/its -> their,
    himself/herself/itself -> themselves; plural words map to a singular form drawn with the seed. "her" is split
    by morphology (object vs possessive); "it" by the parser's dependency label (include_it=False skips the parser).
    """
    classes = pronoun_number_classes(include_it)
    options.setdefault("neutral_exclude_rules", [TokenRule.of(pos="PRON", morph="Person=3|PronType=Prs")])
    return (creator or DataCreator()).create(source, classes, **options)


def english_gender_pronouns(source: Source, *, creator: Optional[DataCreator] = None,
                            **options: Any) -> datasets.DatasetDict:
    """female ("+1": she/her/hers/herself) vs male ("-1": he/him/his/himself) pronouns in real text.

    Alternatives follow the grammatical form that spaCy assigns: she->he, her (object)->him, her (possessive)->his,
    hers->his, herself->himself; he->she, him->her, his (determiner)->her, his (standalone)->hers, himself->herself.
    Neutral sentences contain no gendered pronoun and none of GENDERED_WORDS ("wife", "king", ...).
    """
    options.setdefault("neutral_exclude_words", GENDERED_WORDS)
    options.setdefault("neutral_exclude_rules", [TokenRule.of(pos="PRON", morph="Gender=Fem"),
                                                 TokenRule.of(pos="PRON", morph="Gender=Masc")])
    return (creator or DataCreator()).create(source, gender_pronoun_classes(), **options)


def english_gender_names(
    source: Source,
    *,
    female_names: Optional[Sequence[str]] = None,
    male_names: Optional[Sequence[str]] = None,
    top_names: int = 300,
    names_per_template: int = 8,
    templates: Optional[Sequence[NameTemplate]] = None,
    creator: Optional[DataCreator] = None,
    split: str = "word",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    neutral: Optional[int] = 1000,
    seed: int = 0,
    text_column: str = "text",
) -> datasets.DatasetDict:
    """Paper-style name templates: "[NAME] said that [MASK] would come." filled with female and male first names.

    Templates are mined from `source` (one PERSON entity, then exactly one gendered pronoun, no other gender cue),
    or given as `templates`. Names default to the `top_names` most frequent US-census first names per gender of
    the `names` package (names of both genders dropped). split="word" (default) holds out names: test rows use names
    never seen in training. Rows are balanced by construction (each template gets as many names of each class).
    """
    creator = creator or DataCreator()
    classes = gender_pronoun_classes()
    corpus = creator.corpus(source, text_column)
    if templates is None:
        templates = mine_name_templates(creator, corpus, classes, exclude_words=GENDERED_WORDS)
        if not templates:
            raise ValueError("no name template found in the text (a PERSON followed by exactly one gendered pronoun "
                             "and no other gender cue); give more text, or templates=[NameTemplate(...)].")
    names = disjoint_names({
        "female": list(female_names) if female_names is not None else first_names("female"),
        "male": list(male_names) if male_names is not None else first_names("male"),
    }, top=top_names)
    rows = fill_name_templates(templates, names, GENDER_FORMS, names_per_template=names_per_template, seed=seed)
    texts = None
    if neutral:
        name_rule = TokenRule.of(sorted({n.lower() for v in names.values() for n in v}), pos="PROPN")
        words = {w for c in classes for w in c.words} | set(GENDERED_WORDS)
        texts = creator.neutral(corpus, words, [name_rule], limit=neutral, seed=seed)
    return DataCreator.finish(rows, ["female", "male"], split=split, fractions=fractions, balance=None, seed=seed,
                              neutral_texts=texts)


def english_gender(source: Source, *, names: bool = True, creator: Optional[DataCreator] = None,
                   names_options: Optional[Mapping[str, Any]] = None, **options: Any) -> datasets.DatasetDict:
    """Both gender recipes in one DatasetDict: real-text pronoun rows (source="text") plus, with names=True, name
    template rows (source="template", names held out). `options` go to the pronoun part (and its seed and fractions
    to the name part as well); `names_options` to english_gender_names."""
    creator = creator or DataCreator()
    corpus = creator.corpus(source, options.get("text_column", "text"))
    pronouns = english_gender_pronouns(corpus, creator=creator, **options)
    if not names:
        return pronouns
    extra = {k: options[k] for k in ("seed", "fractions") if k in options}
    templated = english_gender_names(corpus, creator=creator, **{"neutral": 0, **extra, **(names_options or {})})
    out = {name: datasets.concatenate_datasets([pronouns[name], templated[name]])
           for name in ("train", "validation", "test")}
    if "neutral" in pronouns:
        out["neutral"] = pronouns["neutral"]
    return datasets.DatasetDict(out)


def _word_table(words: Mapping[str, Sequence[Any]], extra_words: Optional[Mapping[str, Sequence[Any]]]) -> dict:
    table = {name: list(entries) for name, entries in words.items()}
    for name, entries in (extra_words or {}).items():
        table.setdefault(name, []).extend(entries)
    return table


def aligned_multiclass(table: Mapping[str, Sequence[Union[str, TokenRule]]],
                       classes: Sequence[str]) -> list[FeatureClass]:
    """Feature classes from aligned lists (entry i of one class <-> entry i of every other): two classes as
    filters.aligned_classes, three or more as AlignedClass objects that know each entry's word in every class."""
    names = list(classes)
    if len(names) == 2:
        return aligned_classes(table, names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"classes must name two or more different classes, got {names}.")
    missing = [name for name in names if name not in table]
    if missing:
        raise ValueError(f"class(es) {missing} not in the word table; available: {list(table)}.")
    entries = {name: [e if isinstance(e, TokenRule) else TokenRule.of(e) for e in table[name]] for name in names}
    lengths = {name: len(rules) for name, rules in entries.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"aligned lists differ in length: {lengths}; entry i of one class must match entry i of "
                         "every other class.")
    for name, rules in entries.items():
        for rule in rules:
            if rule.to:
                raise ValueError(f"entry {rule.describe()} of {name!r} sets to={list(rule.to)}, which cannot say which "
                                 "class it belongs to when there are more than two classes; drop `to` (the aligned "
                                 "entry of each class is used) or build two-class data with pair=.")
            if not rule.words:
                raise ValueError(f"entry {rule.describe()} of {name!r} has no word to use as alternative.")
    return [AlignedClass(name, list(entries[name]),
                         [{other: entries[other][i].words[0] for other in names if other != name}
                          for i in range(lengths[name])]) for name in names]


def _chosen_classes(classes: Sequence[str], pair: Optional[Sequence[str]], default: Sequence[str]) -> list[str]:
    """`pair` is the older name for two classes; it may not contradict `classes`."""
    if pair is None:
        return list(classes)
    if classes is not default and list(classes) != list(pair):
        raise ValueError(f"give classes= or pair=, not both (classes={list(classes)}, pair={list(pair)}).")
    if len(pair) != 2:
        raise ValueError(f"pair must name two classes, got {list(pair)}; use classes= for more.")
    return list(pair)


def _word_list_recipe(source: Source, table: Mapping[str, Sequence[Any]], classes: Sequence[str],
                      creator: Optional[DataCreator], options: dict) -> datasets.DatasetDict:
    classes = aligned_multiclass(table, classes)
    all_words = {w for entries in table.values() for e in entries
                 for w in (e.words if isinstance(e, TokenRule) else [e.lower()])}
    options.setdefault("neutral_exclude_words", sorted(all_words))  # every class, also those outside the pair
    return (creator or DataCreator()).create(source, classes, **options)


def religion(source: Source, classes: Sequence[str] = RELIGION_CLASSES, *, pair: Optional[Sequence[str]] = None,
             words: Mapping[str, Sequence[Any]] = RELIGION_WORDS,
             extra_words: Optional[Mapping[str, Sequence[Any]]] = None,
             creator: Optional[DataCreator] = None, **options: Any) -> datasets.DatasetDict:
    """Religions from aligned word lists (christian/jewish/muslim built in; entry i of one class <-> entry i of every
    other). Three classes by default: one transition per row plus a `counterparts` column (see module docstring);
    `pair=("christian", "muslim")` (or two classes) gives two-class data, the first class +1. `extra_words` appends
    aligned entries per class (words or TokenRules); `words` replaces the table."""
    chosen = _chosen_classes(classes, pair, RELIGION_CLASSES)
    return _word_list_recipe(source, _word_table(words, extra_words), chosen, creator, options)


def race(source: Source, classes: Sequence[str] = RACE_CLASSES, *, pair: Optional[Sequence[str]] = None,
         words: Mapping[str, Sequence[Any]] = RACE_WORDS, extra_words: Optional[Mapping[str, Sequence[Any]]] = None,
         creator: Optional[DataCreator] = None, **options: Any) -> datasets.DatasetDict:
    """Races from aligned word lists (asian/black/white built in; the adjectives count only before a person noun
    such as "people" or "Americans"). Three classes by default: one transition per row plus a `counterparts` column
    (see module docstring); `pair=("white", "black")` (or two classes) gives two-class data, the first class +1.
    `extra_words` appends aligned entries per class; `words` replaces the table."""
    chosen = _chosen_classes(classes, pair, RACE_CLASSES)
    return _word_list_recipe(source, _word_table(words, extra_words), chosen, creator, options)


def german_articles(source: Source, pair: Sequence[str] = ("masc_nom", "fem_nom"), *, nlp: Any = "de_core_news_sm",
                    creator: Optional[DataCreator] = None, **options: Any) -> datasets.DatasetDict:
    """German definite articles of two gender-case cells (e.g. "masc_nom" der vs "fem_nom" die; classes are
    masc/fem/neut/plur x nom/acc/dat/gen), told apart by de_core_news_sm morphology (Gender, Case, Number,
    PronType=Art), so "der" as masculine nominative never counts as feminine dative.

    Needs the German pipeline: `pip install de-core-news-sm` (not installed by this project).
    """
    table = german_article_table()
    if len(pair) == 2 and all(name in table for name in pair) and table[pair[0]][0].words == table[pair[1]][0].words:
        article = table[pair[0]][0].words[0]
        raise ValueError(f"{pair[0]!r} and {pair[1]!r} use the same article {article!r}: swapping it changes "
                         "nothing; pick two cells with different articles.")
    if creator is None:
        load_pipeline(nlp)  # fail before reading any text when the pipeline is missing
        creator = DataCreator(nlp)
    return _word_list_recipe(source, table, pair, creator, options)
