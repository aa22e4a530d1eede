"""Data creation building blocks without the spaCy model: sources, inputs, rules, splits, cache, German filters."""

import gzip
import importlib.util
import re

import datasets
import pandas as pd
import pytest

from gradiend_hf.creation import (
    AnnotatedSentence,
    FeatureClass,
    TokenRule,
    aligned_classes,
    as_texts,
    balance_classes,
    find_matches,
    first_names,
    german_article_table,
    match_case,
    news_texts,
    split_rows,
    wiki_to_text,
    wikipedia_texts,
    word_pattern,
)
from gradiend_hf.creation import cache as cache_mod
from gradiend_hf.creation import sources
from gradiend_hf.creation.inputs import paragraphs, require_text

MARKUP = """{{Infobox person
 | name = Ada {{small|(born 1815)}}
}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name="a">Some book, p. 3</ref> She wrote
the first [[algorithm]]<ref>{{cite web|url=http://x.org}}</ref> for a machine.
{| class="wikitable"
| cell || cell
|}
== Life ==
[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace|Ada]]]]
* ''Her'' notes were published in 1843 ([http://example.org the notes]).
<!-- a comment -->
[[Category:Mathematicians]]
== References ==
Everything here is dropped.
"""


# --- sources ----------------------------------------------------------------------------------------------------
def test_wiki_markup_is_reduced_to_prose_paragraphs():
    text = wiki_to_text(MARKUP)
    assert text.split("\n\n") == [
        "Ada Lovelace was an English mathematician. She wrote",
        "the first algorithm for a machine.",
        "Her notes were published in 1843 (the notes).",
    ]


def test_wikipedia_news_and_names_are_read_from_installed_packages():
    articles = wikipedia_texts()
    assert 95 <= len(articles) <= 110 and sum(map(len, articles)) > 2_000_000
    assert wikipedia_texts(limit=3) == articles[:3]
    leftovers = sum(t.count("{{") + t.count("[[") + t.count("<ref") for t in articles)
    assert leftovers < 20, leftovers
    assert len(news_texts("background")) == 300 and len(news_texts("test")) == 50 and len(news_texts()) == 350
    assert first_names("female", top=3) == ["Mary", "Patricia", "Linda"]
    assert first_names("male", top=2) == ["James", "John"]
    assert len(first_names("male")) > 1000 and all(n.istitle() for n in first_names("female", top=50))
    with pytest.raises(ValueError, match="gender must be one of"):
        first_names("other")


def test_missing_offline_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    def find_spec(name, *args):
        return None if name in ("gensim", "names") else real(name, *args)

    monkeypatch.setattr(sources.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps gensim")):
        wikipedia_texts()
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps names")):
        first_names("female")


# --- inputs -----------------------------------------------------------------------------------------------------
def test_text_inputs_in_all_supported_forms(tmp_path):
    (tmp_path / "a.txt").write_text("One text.\n\nSecond paragraph\nwrapped line.", encoding="utf-8")
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("Zipped text.")
    assert as_texts(["x", "y"]) == ["x", "y"]
    assert as_texts(pd.DataFrame({"body": ["x", None, "y"]}), text_column="body") == ["x", "y"]
    assert as_texts(pd.Series(["x"])) == ["x"]
    assert as_texts(datasets.Dataset.from_dict({"text": ["x", "y"]})) == ["x", "y"]
    assert as_texts(str(tmp_path / "a.txt")) == ["One text.\n\nSecond paragraph\nwrapped line."]
    assert as_texts(tmp_path) == ["One text.\n\nSecond paragraph\nwrapped line.", "Zipped text."]
    assert as_texts([tmp_path / "b.txt.gz"]) == ["Zipped text."]
    assert paragraphs(as_texts(tmp_path)) == ["One text.", "Second paragraph wrapped line.", "Zipped text."]
    with pytest.raises(FileNotFoundError, match=r"wrap it in a list"):
        as_texts("She said hello.")
    with pytest.raises(ValueError, match="no column 'text'"):
        as_texts(pd.DataFrame({"body": ["x"]}))
    with pytest.raises(TypeError, match="pass one split"):
        as_texts(datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}))
    with pytest.raises(ValueError, match="no text given"):
        require_text(as_texts([]))


# --- rules ------------------------------------------------------------------------------------------------------
def sentence(words, pos, tag, morph, text=None):
    """A hand-annotated sentence (as spaCy would produce it) for testing rules without a pipeline."""
    text = text or " ".join(words)
    starts, at = [], 0
    for w in words:
        at = text.index(w, at)
        starts.append(at)
        at += len(w)
    n = len(words)
    return AnnotatedSentence(text, list(words), starts, list(pos), list(tag), list(morph), [""] * n, [""] * n, [""] * n)


def test_token_rules_match_words_case_insensitively_and_attributes_exactly():
    s = sentence(["I", "saw", "HER", "dog"], ["PRON", "VERB", "PRON", "NOUN"], ["PRP", "VBD", "PRP$", "NN"],
                 ["Case=Nom", "", "Gender=Fem|Poss=Yes", "Number=Sing"])
    t = s.tokens
    assert TokenRule.of("her", morph="Poss=Yes").matches(t, 2)
    assert TokenRule.of("her", morph={"Poss": "Yes", "Gender": "Fem"}).matches(t, 2)
    assert not TokenRule.of("her", morph="Case=Acc").matches(t, 2)
    assert not TokenRule.of("her", not_morph="Poss=Yes").matches(t, 2)
    assert TokenRule.of(pos="PRON", tag=["PRP$", "WP$"]).matches(t, 2)
    assert TokenRule.of("her", followed_by="dog").matches(t, 2)
    assert not TokenRule.of("her", followed_by="cat").matches(t, 2)
    with pytest.raises(ValueError, match="Feature=Value"):
        TokenRule.of("her", morph="Acc")
    with pytest.raises(ValueError, match="needs words or at least one"):
        TokenRule.of()
    assert match_case("his", "HER") == "HIS" and match_case("his", "Her") == "His" and match_case("his", "her") == "his"
    pattern = word_pattern(["he", "his"])
    assert pattern.search("And HE said") and pattern.search("he's") and not pattern.search("the theory, shell")


def test_aligned_lists_pair_entries_and_explain_mismatches():
    table = {"christian": ["church", "christians"], "muslim": ["mosque", "muslims"], "jewish": ["synagogue"]}
    first, second = aligned_classes(table, ("christian", "muslim"))
    assert [(r.words, r.to) for r in first.rules] == [(("church",), ("mosque",)), (("christians",), ("muslims",))]
    assert [(r.words, r.to) for r in second.rules] == [(("mosque",), ("church",)), (("muslims",), ("christians",))]
    with pytest.raises(ValueError, match="differ in length"):
        aligned_classes(table, ("christian", "jewish"))
    with pytest.raises(ValueError, match=r"not in the word table"):
        aligned_classes(table, ("christian", "hindu"))


def test_german_article_filters_tell_der_masculine_nominative_from_der_feminine_dative():
    """The German recipe's rules on tokens annotated as de_core_news_sm does (that pipeline is not installed here)."""
    art = "PronType=Art|Definite=Def"
    s = sentence(
        ["Der", "Mann", "gibt", "der", "Frau", "das", "Buch", "des", "Vaters", "."],
        ["DET", "NOUN", "VERB", "DET", "NOUN", "DET", "NOUN", "DET", "NOUN", "PUNCT"],
        ["ART", "NN", "VVFIN", "ART", "NN", "ART", "NN", "ART", "NN", "$."],
        [f"Case=Nom|{art}|Gender=Masc|Number=Sing", "", "", f"Case=Dat|{art}|Gender=Fem|Number=Sing", "",
         f"Case=Acc|{art}|Gender=Neut|Number=Sing", "", f"Case=Gen|{art}|Gender=Masc|Number=Sing", "", ""],
    )
    table = german_article_table()
    masc_nom, fem_dat = aligned_classes(table, ("masc_nom", "fem_dat"))
    assert [(m.token.text, m.feature_class) for m in find_matches(s.tokens, [masc_nom, fem_dat])] == [
        ("Der", "masc_nom"), ("der", "fem_dat")]
    masc_nom, fem_nom = aligned_classes(table, ("masc_nom", "fem_nom"))
    matches = find_matches(s.tokens, [masc_nom, fem_nom])
    assert [(m.token.text, m.rule.to) for m in matches] == [("Der", ("die",))]  # "der" (dative) is no nominative
    neut_acc, masc_gen = aligned_classes(table, ("neut_acc", "masc_gen"))
    assert [(m.token.text, m.rule.to) for m in find_matches(s.tokens, [neut_acc, masc_gen])] == [
        ("das", ("des",)), ("des", ("das",))]


# --- balancing and splits ---------------------------------------------------------------------------------------
def fake_rows(n_a=60, n_b=40, words=("w1", "w2", "w3", "w4", "w5")):
    rows = []
    for i in range(n_a + n_b):
        cls = "a" if i < n_a else "b"
        rows.append(dict(factual_class=cls, sentence_id=i // 2, word=f"{cls}-{words[i % len(words)]}"))
    return rows


def test_balancing_downsamples_to_the_smaller_class_or_caps_deterministically():
    rows = fake_rows()
    balanced = balance_classes(rows, "downsample", seed=3)
    assert sum(r["factual_class"] == "a" for r in balanced) == 40 == sum(r["factual_class"] == "b" for r in balanced)
    assert balanced == balance_classes(rows, "downsample", seed=3) != balance_classes(rows, "downsample", seed=4)
    capped = balance_classes(rows, None, max_per_class=10)
    assert [sum(r["factual_class"] == c for r in capped) for c in "ab"] == [10, 10]
    assert balance_classes(rows, None) == rows


@pytest.mark.parametrize("by,key", [("row", "sentence_id"), ("word", "word")])
def test_splits_are_disjoint_stratified_and_seeded(by, key):
    rows = fake_rows(300, 200)
    parts = split_rows(rows, by=by, fractions=(0.6, 0.2, 0.2), seed=1)
    units = {name: {r[key] for r in part} for name, part in parts.items()}
    train, validation, test = units["train"], units["validation"], units["test"]
    assert not (train & validation or train & test or validation & test)
    assert sum(len(p) for p in parts.values()) == len(rows)
    for name, part in parts.items():
        assert {r["factual_class"] for r in part} == {"a", "b"}, name
    assert parts == split_rows(rows, by=by, fractions=(0.6, 0.2, 0.2), seed=1)
    assert parts != split_rows(rows, by=by, fractions=(0.6, 0.2, 0.2), seed=2)
    if by == "row":
        assert [len(parts[n]) for n in ("train", "validation", "test")] == [300, 100, 100]


def test_word_split_needs_a_word_per_split_and_fractions_are_checked():
    rows = fake_rows(words=("w1", "w2"))
    with pytest.raises(ValueError, match="only 2 distinct target word.*use split='row'"):
        split_rows(rows, by="word")
    assert split_rows(rows, by="word", fractions=(0.5, 0.5, 0.0))["test"] == []
    with pytest.raises(ValueError, match="summing to 1"):
        split_rows(rows, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="split must be 'row' or 'word'"):
        split_rows(rows, by="sentence")


# --- cache --------------------------------------------------------------------------------------------------------
def test_cache_keys_depend_on_inputs_and_settings_and_files_are_not_pickle(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIEND_HF_CACHE", str(tmp_path / "c"))
    folder = cache_mod.cache_dir(True)
    assert folder == tmp_path / "c" and cache_mod.cache_dir(False) is None
    def key_of(sentences, pipes=("tagger",)):
        return cache_mod.cache_key("annotations", pipes=list(pipes), sentences=cache_mod.texts_digest(sentences))

    key = key_of(["a b", "c"])
    assert key == key_of(["a b", "c"]) != key_of(["a", "b c"])
    assert key != key_of(["a b", "c"], pipes=("tagger", "parser"))
    cache_mod.write_columns(folder, key, {"text": ["a b"], "words": [["a", "b"]]})
    assert cache_mod.read_columns(folder, key) == {"text": ["a b"], "words": [["a", "b"]]}
    cache_mod.write_json(folder, "k", [["s", 1]])
    assert cache_mod.read_json(folder, "k") == [["s", 1]] and cache_mod.read_json(folder, "missing") is None
    assert sorted(p.suffix for p in folder.iterdir()) == [".gz", ".parquet"]


def test_feature_class_needs_rules():
    with pytest.raises(ValueError, match="has no rules"):
        FeatureClass("female", [])
    assert FeatureClass.from_words("x", ["A", "b", "a"]).words == {"a", "b"}
