"""prepare_rows (validation, alternative filling) and TransitionBatchSampler, checked against brute-force oracles."""

import logging
import math
import re
from collections import Counter

import datasets
import pandas as pd
import pytest
import torch
from tiny import wordpiece_tokenizer
from torch.utils.data import DataLoader

from gradiend_hf.data import GradiendDataCollator
from gradiend_hf.schema import _label_names, count_transitions, prepare_rows, transition_of
from gradiend_hf.sampling import TransitionBatchSampler

CLASSES = ["female", "male"]
COLUMNS = ["masked", "factual", "alternative", "factual_class", "alternative_class"]


def row(masked="[MASK] said the results were good", factual="she", alternative="he", f="female", a="male", **extra):
    return dict(masked=masked, factual=factual, alternative=alternative, factual_class=f, alternative_class=a, **extra)


def small_rows():
    """Mixed rows: given alternatives, missing ones (None and ""), an identity row, an extra column."""
    return [
        row(source="a"),
        row(factual="he", alternative="she", f="male", a="female", source="b"),
        row(factual="She", alternative=None, source="c"),
        row(factual="him", alternative="", f="male", a="female", source="d"),
        row(factual="nurse", alternative="nurse", f="female", a="female", source="e"),
    ]


def as_records(dataset):
    return [dict(r) for r in dataset]


# ---------------------------------------------------------------------------------------------- input types


def test_three_input_types_give_identical_rows():
    rows = small_rows()
    outs = [
        prepare_rows(rows, CLASSES, seed=3),
        prepare_rows(pd.DataFrame(rows), CLASSES, seed=3),
        prepare_rows(datasets.Dataset.from_list(rows), CLASSES, seed=3),
    ]
    for out in outs:
        assert out.column_names == COLUMNS + ["source"]
        assert all(isinstance(out[c][i], str) for c in COLUMNS for i in range(len(rows)))
    assert as_records(outs[0]) == as_records(outs[1]) == as_records(outs[2])
    records = as_records(outs[0])
    assert len(records) == len(rows)  # nothing dropped
    assert [r["source"] for r in records] == list("abcde")  # order and extras kept
    # given values untouched
    for given, got in zip(rows, records):
        for col in COLUMNS:
            if given[col]:
                assert got[col] == given[col]
    # row 2 (She, missing) -> a male word, capitalised; row 3 (him, "") -> a female word, lower case
    assert records[2]["alternative"] in {"He", "Him"} and records[2]["alternative_class"] == "male"
    assert records[3]["alternative"] in {"she", "nurse"} and records[3]["alternative_class"] == "female"


def class_label_dataset(rows, names):
    """The rows as a Dataset whose class columns are ClassLabel ints (names in the features), as `datasets` stores
    them after class_encode_column; a missing class is ClassLabel's -1. An extra ClassLabel column rides along."""
    label = datasets.ClassLabel(names=names)
    features = datasets.Features({"masked": datasets.Value("string"), "factual": datasets.Value("string"),
                                  "alternative": datasets.Value("string"), "factual_class": label,
                                  "alternative_class": label, "source": datasets.ClassLabel(names=list("abcde"))})
    encoded = [dict(r, factual_class=names.index(r["factual_class"]),
                    alternative_class=-1 if r["alternative_class"] is None else names.index(r["alternative_class"]))
               for r in rows]
    return datasets.Dataset.from_list(encoded, features=features)


@pytest.mark.parametrize("names", [["female", "male"], ["male", "female"], ["male", "neutral", "female"]])
def test_class_label_columns_are_read_by_their_names(names):
    rows = small_rows()
    rows[2]["alternative_class"] = None  # filled, as for string columns
    dataset = class_label_dataset(rows, names)
    assert isinstance(dataset.features["factual_class"], datasets.ClassLabel)
    assert all(isinstance(v, int) for v in dataset["factual_class"])  # ints on disk: the case that was refused
    out = prepare_rows(dataset, CLASSES, seed=3)
    expected = as_records(prepare_rows([dict(r, source="abcde".index(r["source"])) for r in rows], CLASSES, seed=3))
    assert as_records(out) == expected  # the names, as if the rows had been given as strings
    assert out.features["source"] == dataset.features["source"]  # extra columns keep their type
    assert count_transitions(out) == count_transitions(expected)


def test_class_label_names_outside_the_pair_and_bare_integer_classes_are_explained():
    rows = [dict(r, factual_class={"female": "woman", "male": "man"}[r["factual_class"]]) for r in small_rows()]
    rows = [dict(r, alternative_class=None) for r in rows]
    dataset = class_label_dataset(rows, ["woman", "man"])
    with pytest.raises(ValueError, match=r"row 0: factual_class 'woman' is not one of the feature classes"):
        prepare_rows(dataset, CLASSES)  # named by its label name, not by the int 0
    plain = [dict(r, factual_class=0) for r in small_rows()]  # bare ints without names
    with pytest.raises(ValueError, match=r"row 0: factual_class 0 is not one of .*map integer labels to names"):
        prepare_rows(plain, CLASSES)
    label = datasets.ClassLabel(names=CLASSES)  # an int outside the names (datasets refuses to store one)
    with pytest.raises(ValueError, match=r"row 1: factual_class 5 is not a label of its ClassLabel feature"):
        _label_names({"factual_class": [0, 5]}, datasets.Features({"factual_class": label}))


def test_nan_and_missing_alternative_columns_are_filled():
    rows = small_rows()
    frame = pd.DataFrame(rows)
    frame.loc[0, "alternative"] = float("nan")
    out = prepare_rows(frame, CLASSES)
    assert out[0]["alternative"] in {"he", "him"}
    # no alternative / alternative_class column at all: classes come from the pair, identity rows are not possible
    bare = [{k: v for k, v in r.items() if k in ("masked", "factual", "factual_class")} for r in rows[:4]]
    out = prepare_rows(bare, CLASSES)
    assert out.column_names == COLUMNS
    assert out["alternative_class"] == ["male", "female", "male", "female"]
    assert out[1]["alternative"] in {"she"} and out[2]["alternative"] in {"He", "Him"}
    # an identity row without alternative_class stays within its class
    identity = {"masked": "the [MASK] went home", "factual": "nurse", "alternative": "nurse", "factual_class": "female"}
    out = prepare_rows(bare + [identity], CLASSES)
    assert transition_of(out[4]) == ("female", "female") and out[4]["alternative"] == "nurse"


# ---------------------------------------------------------------------------------------------- errors


def test_missing_column_names_it_and_lists_present():
    rows = [{"text": "[MASK] went home", "factual": "she", "factual_class": "female"}]
    with pytest.raises(ValueError, match=r"column 'masked' is missing; got \['text', 'factual', 'factual_class'\]"):
        prepare_rows(rows, CLASSES)
    with pytest.raises(ValueError, match="column 'factual_class' is missing"):
        prepare_rows(pd.DataFrame([{"masked": "[MASK] x", "factual": "she"}]), CLASSES)


@pytest.mark.parametrize(
    "empty", [[], pd.DataFrame(columns=COLUMNS), datasets.Dataset.from_dict({c: [] for c in COLUMNS})]
)
def test_empty_data(empty):
    with pytest.raises(ValueError, match="no rows"):
        prepare_rows(empty, CLASSES)


@pytest.mark.parametrize("masked, found", [("she said the results were good", 0), ("[MASK] and [MASK] went home", 2)])
def test_masked_needs_exactly_one_mask(masked, found):
    rows = small_rows()
    rows[1]["masked"] = masked
    with pytest.raises(ValueError, match=rf"row 1: 'masked' needs exactly one '\[MASK\]', found {found} "
                                         rf"in {re.escape(repr(masked))}"):
        prepare_rows(rows, CLASSES)


def test_unknown_classes():
    rows = small_rows()
    rows[2]["factual_class"] = "woman"
    with pytest.raises(ValueError, match=r"row 2: factual_class 'woman' is not one of the feature classes "
                                         r"\['female', 'male'\]"):
        prepare_rows(rows, CLASSES)
    rows = small_rows()
    rows[0]["alternative_class"] = "man"
    with pytest.raises(ValueError, match=r"row 0: alternative_class 'man' is not one of the feature classes"):
        prepare_rows(rows, CLASSES)
    with pytest.raises(ValueError, match="feature_classes must be two different class names"):
        prepare_rows(small_rows(), ["female", "male", "neutral"])
    with pytest.raises(ValueError, match="feature_classes must be two different class names"):
        prepare_rows(small_rows(), ["female", "female"])


def test_same_class_only_for_identity_rows():
    rows = small_rows()
    rows[0]["alternative_class"] = "female"  # she -> he within 'female': not an identity row
    with pytest.raises(ValueError, match=r"row 0: factual_class == alternative_class == 'female' but "
                                         r"factual 'she' != alternative 'he'"):
        prepare_rows(rows, CLASSES)
    rows = small_rows()
    rows[2]["alternative_class"] = "female"  # nothing to fill from the same class
    with pytest.raises(ValueError, match=r"row 2: no alternative given and alternative_class equals factual_class"):
        prepare_rows(rows, CLASSES)
    ok = prepare_rows([row(factual="nurse", alternative="nurse", a="female"), row()], CLASSES)
    assert transition_of(ok[0]) == ("female", "female")


@pytest.mark.parametrize("word", ["", "   ", None, float("nan")])
def test_empty_factual_word(word):
    rows = small_rows()
    rows[3]["factual"] = word
    with pytest.raises(ValueError, match=r"row 3: the factual word is empty"):
        prepare_rows(rows, CLASSES)


def test_cannot_fill_without_words_of_the_other_class():
    rows = [row(alternative=None), row(factual="her", alternative=None)]
    with pytest.raises(ValueError, match=r"cannot fill alternatives for class 'female': no row has a factual word "
                                         r"of class 'male'; give an `alternative` column"):
        prepare_rows(rows, CLASSES)


def test_tokenizer_vocabulary_checks():
    tok = wordpiece_tokenizer()
    # sanity of the premise: known words are single tokens, an unseen latin word splits into pieces, CJK is [UNK]
    assert len(tok(" nurse", add_special_tokens=False)["input_ids"]) == 1
    assert tok.unk_token_id not in tok(" zyxwv", add_special_tokens=False)["input_ids"]
    assert set(tok(" 日本", add_special_tokens=False)["input_ids"]) == {tok.unk_token_id}
    assert tok(" \x00", add_special_tokens=False)["input_ids"] == []

    assert len(prepare_rows(small_rows() + [row(alternative="zyxwv")], CLASSES, tokenizer=tok)) == 6
    rows = small_rows() + [row(alternative="日本")]
    with pytest.raises(ValueError, match=r"row 5: the word '日本' tokenizes only to the unknown token: "
                                         r"it is not in the vocabulary"):
        prepare_rows(rows, CLASSES, tokenizer=tok)
    rows = small_rows()
    rows[1]["factual"] = "\x00"
    with pytest.raises(ValueError, match=r"row 1: the word '\\x00' tokenizes to nothing: it is not in the vocabulary"):
        prepare_rows(rows, CLASSES, tokenizer=tok)
    assert len(prepare_rows(rows, CLASSES)) == 5  # without a tokenizer the word is not checked


# ---------------------------------------------------------------------------------------------- filling


def frequency_rows():
    """3000 rows: 1000 male (he 75% / him 25%, alternatives given), 2000 female without alternatives (mixed case)."""
    rows = []
    for i in range(1000):
        rows.append(row(factual="he" if i % 4 else "him", alternative="she", f="male", a="female"))
    casings = ["she", "She", "SHE", "her"]
    for i in range(2000):
        rows.append(row(factual=casings[i % 4], alternative=None, a=None))
    return rows


def test_filled_alternatives_follow_data_frequencies():
    rows = frequency_rows()
    out = as_records(prepare_rows(rows, CLASSES, seed=0))
    # oracle: brute-force frequency of each male factual word in the input
    male = Counter(r["factual"].lower() for r in rows if r["factual_class"] == "male")
    expected = {w: c / sum(male.values()) for w, c in male.items()}
    assert expected == {"he": 0.75, "him": 0.25}
    filled = [o for r, o in zip(rows, out) if r["alternative"] is None]
    assert len(filled) == 2000
    assert all(o["alternative_class"] == "male" for o in filled)
    got = Counter(o["alternative"].lower() for o in filled)
    assert set(got) == {"he", "him"}
    for word, p in expected.items():
        assert abs(got[word] / len(filled) - p) < 0.04, (word, got)


def test_filled_alternatives_follow_casing():
    rows = frequency_rows()
    out = as_records(prepare_rows(rows, CLASSES, seed=1))
    for r, o in zip(rows, out):
        if r["alternative"] is not None:
            continue
        alt, fact = o["alternative"], r["factual"]
        if fact == "SHE":
            assert alt in {"HE", "HIM"}
        elif fact == "She":
            assert alt in {"He", "Him"}
        else:
            assert alt in {"he", "him"}


def test_filling_is_deterministic_with_seed():
    rows = frequency_rows()
    a = prepare_rows(rows, CLASSES, seed=7)["alternative"]
    b = prepare_rows(rows, CLASSES, seed=7)["alternative"]
    c = prepare_rows(rows, CLASSES, seed=8)["alternative"]
    assert list(a) == list(b)
    assert list(a) != list(c)


def test_logging_and_transition_counts(caplog):
    rows = frequency_rows()
    with caplog.at_level(logging.INFO, logger="gradiend_hf"):
        out = prepare_rows(rows, CLASSES)
    oracle = Counter((r["factual_class"], "male" if r["factual_class"] == "female" else "female") for r in rows)
    assert count_transitions(out) == dict(oracle) == {("male", "female"): 1000, ("female", "male"): 2000}
    assert count_transitions(as_records(out)) == dict(oracle)
    message = " ".join(r.getMessage() for r in caplog.records if r.name == "gradiend_hf")
    assert "3000" in message and "male->female: 1000" in message and "female->male: 2000" in message
    assert "filled 2000 alternatives" in message


# ---------------------------------------------------------------------------------------------- sampler


def transitions_of(sizes):
    """Row transitions interleaved irregularly: sizes[t] rows of transition t."""
    names = [("female", "male"), ("male", "female"), ("female", "female")][: len(sizes)]
    out, left = [], list(sizes)
    i = 0
    while any(left):
        t = (i * 7 + i // 3) % len(sizes)
        if left[t]:
            out.append(names[t])
            left[t] -= 1
        i += 1
    return out


@pytest.mark.parametrize(
    "sizes, batch_size", [((10, 10), 3), ((23, 5), 4), ((1, 40), 8), ((7, 9, 4), 2), ((5,), 5), ((6, 6), 1)]
)
def test_sampler_every_index_once_and_single_transition(sizes, batch_size):
    transitions = transitions_of(sizes)
    sampler = TransitionBatchSampler(transitions, batch_size, seed=2)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(transitions)))  # each index exactly once
        assert all(len({transitions[i] for i in b}) == 1 for b in batches)  # one transition per batch
        assert len(sampler) == len(batches) == sum(math.ceil(n / batch_size) for n in sizes)
        # only the last batch of each transition may be short
        per_transition = {}
        for b in batches:
            per_transition.setdefault(transitions[b[0]], []).append(len(b))
        for lengths in per_transition.values():
            assert all(n == batch_size for n in lengths[:-1]) and 1 <= lengths[-1] <= batch_size


@pytest.mark.parametrize("sizes, batch_size", [((10, 10), 3), ((23, 5), 4), ((7, 9, 4), 2)])
def test_sampler_alternates_while_transitions_have_rows(sizes, batch_size):
    transitions = transitions_of(sizes)
    batches = list(TransitionBatchSampler(transitions, batch_size, seed=0))
    sequence = [transitions[b[0]] for b in batches]
    total = Counter(sequence)
    used = Counter()
    for prev, cur in zip(sequence, sequence[1:]):
        used[prev] += 1
        still_open = [t for t in total if used[t] < total[t]]
        if len(still_open) >= 2:
            assert cur != prev, sequence
    # two transitions of equal size: strict A, B, A, B, ...
    if len(sizes) == 2 and sizes[0] == sizes[1]:
        assert all(sequence[i] == sequence[i % 2] for i in range(len(sequence))) and sequence[0] != sequence[1]


def test_sampler_shuffles_per_epoch_deterministically():
    transitions = transitions_of((30, 30))
    s = TransitionBatchSampler(transitions, 4, seed=5)
    epoch0 = list(s)
    s.set_epoch(1)
    epoch1 = list(s)
    s.set_epoch(0)
    assert list(s) == epoch0  # same epoch, same order
    assert epoch0 != epoch1
    assert list(TransitionBatchSampler(transitions, 4, seed=5)) == epoch0  # same seed, same order
    assert list(TransitionBatchSampler(transitions, 4, seed=6)) != epoch0
    ordered = list(TransitionBatchSampler(transitions, 4, shuffle=False))
    for batch in ordered:
        assert batch == sorted(batch)
    assert [i for b in ordered if transitions[b[0]] == transitions[0] for i in b] == [
        i for i, t in enumerate(transitions) if t == transitions[0]
    ]


def test_sampler_errors():
    with pytest.raises(ValueError, match="batch_size"):
        TransitionBatchSampler([("a", "b")], 0)
    with pytest.raises(ValueError, match="no rows"):
        TransitionBatchSampler([], 2)
    with pytest.raises(ValueError, match="factual_class"):
        TransitionBatchSampler.from_dataset(datasets.Dataset.from_dict({"x": [1]}), 2)


def test_sampler_in_a_dataloader_with_the_collator():
    rows = frequency_rows()[::10] + [row(factual="nurse", alternative="nurse", a="female")] * 3
    dataset = prepare_rows(rows, CLASSES, seed=0, tokenizer=wordpiece_tokenizer())
    sampler = TransitionBatchSampler.from_dataset(dataset, batch_size=8, seed=1)
    transitions = [transition_of(r) for r in dataset]
    assert list(sampler) == list(TransitionBatchSampler(transitions, 8, seed=1))

    plain = DataLoader(dataset, batch_sampler=sampler, collate_fn=list)
    seen = [transition_of(r) for batch in plain for r in batch]
    assert Counter(seen) == Counter(transitions)

    collator = GradiendDataCollator(wordpiece_tokenizer(), "masked_lm", CLASSES)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)
    batches = list(loader)
    assert len(batches) == len(sampler) == len(loader)
    assert sum(b["factual_class"].numel() for b in batches) == len(dataset)
    for b in batches:
        assert torch.unique(b["factual_class"]).numel() == 1
        assert torch.unique(b["alternative_class"]).numel() == 1


def test_a_cross_class_row_whose_two_words_are_the_same_is_refused():
    rows = [dict(masked="[MASK] went home", factual="she", factual_class="female", alternative="he"),
            dict(masked="[MASK] said so", factual="he", factual_class="male", alternative="He")]
    with pytest.raises(ValueError, match="row 1: factual 'he' .* are the same word"):
        prepare_rows(rows, ["female", "male"])


def test_an_extra_column_of_mixed_types_is_named_before_arrow_fails():
    rows = [dict(masked="[MASK] went home", factual="she", factual_class="female", alternative="he", source=3),
            dict(masked="[MASK] said so", factual="he", factual_class="male", alternative="she", source="wiki")]
    with pytest.raises(ValueError, match=r"extra column 'source' mixes value types \['int', 'str'\]"):
        prepare_rows(rows, ["female", "male"])
    for row, value in zip(rows, ("3", "wiki")):
        row["source"] = value
    assert prepare_rows(rows, ["female", "male"])["source"] == ["3", "wiki"]  # one type: kept as given
