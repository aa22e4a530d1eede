"""Real-length text: rows up to the model's position limit work everywhere, longer rows are refused by name before
any model pass (or cut on the left when asked). Oracles: the raw model (where it stops working), the naive per-row
computations of oracle.py on the text as a whole, and texts shortened by hand."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch
from oracle import causal_text_ids, masked_text_ids, naive_gradients, row_nll
from tiny import bpe_tokenizer, rows, tiny_model, tokenizer_for, wordpiece_tokenizer
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model
from gradiend_hf.data import RowTooLongError
from gradiend_hf.evaluation import evaluate_decoder, evaluate_encoder
from gradiend_hf.evaluation.contexts import context_probabilities
from gradiend_hf.evaluation.probabilities import class_words
from gradiend_hf.lengths import check_rows, collator_for, max_positions
from gradiend_hf.trainer import GradiendTrainer, GradiendTrainingArguments

CLASSES = ["female", "male"]
NEUTRAL = ["the doctor went home and it was good", "they said the results were bad", "the room was good"]
FILLER = "the room was said that the were went "  # words that are single tokens for both tiny tokenizers


def objective_of(kind: str) -> str:
    return "masked_lm" if kind in ("bert", "distilbert", "roberta", "albert") else "causal_lm"


def oracle_length(kind: str, masked: str, word: str) -> int:
    """Tokens of the model input built from the whole text (oracle.py), not from the collator's pieces."""
    tok = tokenizer_for(kind)
    if objective_of(kind) == "masked_lm":
        return len(masked_text_ids(tok, masked, word)[0])
    return len(causal_text_ids(tok, masked, word)[0]) - 1  # the last word token is predicted, never fed


def long_row(kind: str, tokens: int, word: str = "she", right: str = " was in her room", widest=()) -> dict:
    """A female -> male row whose model input has exactly `tokens` tokens (checked with the oracle), with `word` or
    with the longest of the words in `widest`."""
    words = FILLER.split()
    for n in range(1, 4 * tokens):
        left = " ".join((words * (n // len(words) + 1))[:n])
        masked = f"{left} [MASK]{right}"
        length = max(oracle_length(kind, masked, w) for w in (word, *widest))
        if length == tokens:
            return dict(masked=masked, factual=word, alternative="he", factual_class="female", alternative_class="male")
        if length > tokens:
            break
    raise AssertionError(f"no filler text gives exactly {tokens} tokens for {kind}")


def text_nll(model, tokenizer, objective: str, masked: str, word: str) -> float:
    """oracle.row_nll without feeding a causal LM the word's last token (it predicts nothing that is scored), so
    that a row of exactly the model's limit can be checked."""
    if objective == "masked_lm":
        return float(row_nll(model, tokenizer, objective, masked, word))
    ids, positions = causal_text_ids(tokenizer, masked, word)
    logp = model(input_ids=torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
    return -sum(float(logp[pos - 1, ids[pos]]) for pos in positions)


def both_classes(data):
    return data + [dict(r, factual=r["alternative"], alternative=r["factual"], factual_class="male",
                        alternative_class="female") for r in data]


def forward_calls(model):
    """Counts the model's forward passes (a pre-hook on the top module)."""
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


# --- the limit ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "albert", "gpt2"])
def test_the_limit_is_exactly_where_the_raw_model_stops_working(kind):
    model = tiny_model(kind)
    limit = max_positions(model)
    assert limit is not None and limit <= 72
    with torch.no_grad():
        for n in (limit, limit - 1):
            model(input_ids=torch.full((1, n), 7), attention_mask=torch.ones(1, n, dtype=torch.long))
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.full((1, limit + 1), 7), attention_mask=torch.ones(1, limit + 1, dtype=torch.long))
    if kind == "roberta":  # positions start after the padding index: one fewer than the table
        assert limit == model.config.max_position_embeddings - model.config.pad_token_id - 1


def test_a_rotary_model_has_no_limit_and_longer_rows_work():
    model = tiny_model("llama")  # max_position_embeddings=64, but rotary: nothing to overflow
    assert max_positions(model) is None
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES))
    row = long_row("llama", 100)
    result = evaluate_decoder(gradiend, both_classes([row]), tokenizer_for("llama"), NEUTRAL, learning_rates=[1.0],
                              progress=False)
    words = class_words(both_classes([row]), CLASSES, tokenizer_for("llama"))["female"]
    with torch.no_grad():
        expected = sum(math.exp(-float(row_nll(model, tokenizer_for("llama"), "causal_lm", row["masked"], w)))
                       for w in words)
    assert result.grid.loc[result.grid.is_base, "p_female@female"].iloc[0] == pytest.approx(expected, rel=1e-4)


# --- rows of real length (~250 tokens) on models whose limit allows them ----------------------------------------
def long_models():
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=len(wordpiece_tokenizer()), max_position_embeddings=512,
                                      hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=24)).eval()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe_tokenizer()), n_embd=16, n_layer=2, n_head=2,
                                      n_positions=512, bos_token_id=0, eos_token_id=0)).eval()
    return {"bert": bert, "gpt2": gpt2}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_rows_of_250_tokens_give_the_naive_gradients_encodings_and_probabilities(kind):
    model = long_models()[kind]
    tok = tokenizer_for(kind)
    assert max_positions(model) == 512
    data = [long_row(kind, 250), long_row(kind, 237, word="her"), rows()[1]]  # padded against each other
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES))
    collate = collator_for(model, tok, gradiend.objective, CLASSES)
    batch = collate(data)
    assert batch["factual_input_ids"].shape[1] == 250
    # gradients (training): the engine on the padded batch against one naive backward per row on the whole text
    grads = gradiend.engine.compute(batch, ("factual", "alternative"))
    names = gradiend.bottleneck.names
    for side in ("factual", "alternative"):
        expected = naive_gradients(model, tok, gradiend.objective, data, side, names)
        flat = lambda g: torch.cat([g[n].reshape(-1) for n in names])  # noqa: E731
        assert float((flat(grads[side]) - flat(expected)).norm() / flat(expected).norm()) < 1e-5
    # encoder evaluation: batched forward-mode values against each row encoded alone
    result = evaluate_encoder(gradiend, data, tok, neutral=0, progress=False)
    alone = torch.stack([gradiend.encode(collate([r])) for r in data])[:, 0].numpy()
    np.testing.assert_allclose(result.frame["h"].to_numpy(), alone, rtol=1e-4, atol=1e-7)
    # the decoder grid: P(female) on the female rows against -log P computed from the whole text
    grid = evaluate_decoder(gradiend, both_classes(data), tok, NEUTRAL, learning_rates=[1.0], progress=False).grid
    words = class_words(both_classes(data), CLASSES, tok)["female"]
    with torch.no_grad():
        expected = np.mean([sum(math.exp(-float(row_nll(model, tok, gradiend.objective, r["masked"], w)))
                                for w in words) for r in data])
    assert grid.loc[grid.is_base, "p_female@female"].iloc[0] == pytest.approx(expected, rel=1e-4)


def test_training_runs_on_rows_of_250_tokens(tmp_path):
    model = long_models()["gpt2"]
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES))
    data = both_classes([long_row("gpt2", 250), long_row("gpt2", 180, word="her")])
    args = GradiendTrainingArguments(output_dir=str(tmp_path / "run"), disable_tqdm=True, max_steps=4,
                                     per_device_train_batch_size=2, eval_strategy="no", save_strategy="no",
                                     logging_steps=1, report_to=[])
    before = torch.cat([p.detach().reshape(-1).clone() for p in gradiend.bottleneck.parameters()])
    trainer = GradiendTrainer(model=gradiend, args=args, train_dataset=data, processing_class=bpe_tokenizer(),
                              data_collator=collator_for(model, bpe_tokenizer(), "causal_lm", CLASSES))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    after = torch.cat([p.detach().reshape(-1) for p in gradiend.bottleneck.parameters()])
    assert losses and all(math.isfinite(loss) for loss in losses) and not torch.equal(before, after)


# --- rows beyond the limit ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_the_row_at_the_limit_works_and_one_token_more_is_refused_by_name_before_any_model_pass(kind):
    model = tiny_model(kind)
    limit = max_positions(model)
    assert limit == 64
    tok = tokenizer_for(kind)
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES))
    fits = long_row(kind, limit, widest=["She", "He", "he"])  # the grid scores every class word, case variants too
    evaluated = both_classes(rows()[:2] + [fits])
    grid = evaluate_decoder(gradiend, evaluated, tok, NEUTRAL, learning_rates=[1.0], progress=False).grid
    words = class_words(evaluated, CLASSES, tok)["female"]
    with torch.no_grad():
        expected = np.mean([sum(math.exp(-text_nll(model, tok, gradiend.objective, r["masked"], w)) for w in words)
                            for r in evaluated if r["factual_class"] == "female"])
    assert grid.loc[grid.is_base, "p_female@female"].iloc[0] == pytest.approx(expected, rel=1e-4)
    too_long = long_row(kind, limit + 1)
    data = both_classes(rows()[:3] + [too_long])
    calls, handle = forward_calls(model)
    try:
        for run in (lambda: evaluate_decoder(gradiend, data, tok, NEUTRAL, learning_rates=[1.0], progress=False),
                    lambda: evaluate_encoder(gradiend, data, tok, neutral=0, progress=False),
                    lambda: context_probabilities(model, tok, gradiend.objective, [too_long["masked"]],
                                                  {"female": ["she"], "male": ["he"]})):
            with pytest.raises(RowTooLongError) as caught:
                run()
            message = str(caught.value)
            assert f"is {limit + 1} tokens long" in message and f"at most {limit} positions" in message
            assert "truncation='left'" in message and "word 'she'" in message
        assert not calls  # refused before the first model pass
    finally:
        handle.remove()
    with pytest.raises(RowTooLongError, match=r"^row 3 \("):  # its index in the data, not in a batch
        evaluate_encoder(gradiend, data, tok, neutral=0, progress=False)


def test_a_class_word_that_pushes_a_row_over_the_limit_is_named_in_the_grid():
    """The grid scores every class word in every row: a longer word of the other class can overflow a row that fits
    with its own word."""
    model = tiny_model("bert")
    tok = tokenizer_for("bert")
    assert len(tok(" zyxwv", add_special_tokens=False)["input_ids"]) > 1
    fits = long_row("bert", 64)  # with 'she', one token
    length = oracle_length("bert", fits["masked"], "zyxwv")
    data = [fits, dict(rows()[1], factual="he", alternative="zyxwv", factual_class="male", alternative_class="female")]
    check_rows(data, collator_for(model, tok, "masked_lm", CLASSES))  # each row fits with its own words
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES))
    with pytest.raises(RowTooLongError, match=rf"^row 0 .*word .zyxwv.\) is {length} tokens long"):
        evaluate_decoder(gradiend, data, tok, NEUTRAL, learning_rates=[1.0], progress=False)


def test_check_rows_names_the_row_of_a_dataset_and_a_collator_without_limit_checks_nothing():
    tok = tokenizer_for("gpt2")
    data = datasets.Dataset.from_list(rows() * 70 + [long_row("gpt2", 65)] + rows())
    collate = collator_for(tiny_model("gpt2"), tok, "causal_lm", CLASSES)
    with pytest.raises(RowTooLongError, match=r"^row 280 \(.* is 65 tokens long, but the model takes at most 64"):
        check_rows(data, collate)
    check_rows(data, GradiendDataCollator(tok, "causal_lm", CLASSES))  # no limit known: nothing to refuse
    with pytest.raises(RowTooLongError, match=r"^row 0 of this batch"):
        collate([long_row("gpt2", 65)])


def test_collator_arguments_are_checked():
    with pytest.raises(ValueError, match="truncation must be one of"):
        GradiendDataCollator(tokenizer_for("gpt2"), "causal_lm", max_length=64, truncation="right")
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        GradiendDataCollator(tokenizer_for("gpt2"), "causal_lm", max_length=0)


# --- left truncation ---------------------------------------------------------------------------------------------
def cut_by_hand(kind: str, row: dict, limit: int, words) -> dict:
    """The row with whole words removed from the start of its text until its input with the longest of `words` has
    `limit` tokens (the filler words are one token each, so this is exactly the left-truncated input)."""
    parts = row["masked"].split(" ")
    for start in range(len(parts)):
        masked = " ".join(parts[start:])
        if kind == "gpt2" and start:  # a BPE word inside the text carries its leading space
            masked = " " + masked
        length = max(oracle_length(kind, masked, w) for w in words)
        if length <= limit:
            assert length == limit
            return dict(row, masked=masked)
    raise AssertionError("the row cannot be cut to the limit")


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_left_truncation_equals_the_text_cut_by_hand(kind):
    model = tiny_model(kind)
    tok = tokenizer_for(kind)
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES))
    data = [long_row(kind, 90), long_row(kind, 140, word="her"), dict(rows()[1], alternative="zyxwv")]
    collate = collator_for(model, tok, gradiend.objective, CLASSES, truncation="left")
    batch = collate(data)
    assert batch["factual_input_ids"].shape[1] <= 64 and batch["alternative_input_ids"].shape[1] <= 64
    for i, row in enumerate(data[:2]):  # the feature words are still what is scored
        for side in ("factual", "alternative"):
            labels = batch[f"{side}_labels"][i]
            assert labels[labels != -100].tolist() == tok(" " + row[side], add_special_tokens=False)["input_ids"]
    # both sides of a row are cut alike: as the text cut by hand for the longer of its two words
    cut = [cut_by_hand(kind, r, 64, [r["factual"], r["alternative"]]) for r in data[:2]] + data[2:]
    with torch.no_grad():
        truncated = gradiend.encode_rows(batch)
        by_hand = gradiend.encode_rows(collator_for(model, tok, gradiend.objective, CLASSES)(cut))
    torch.testing.assert_close(truncated, by_hand, rtol=1e-5, atol=1e-7)
    # the grid scores every class word of a row in one context: the text cut for the longest class word
    evaluated = both_classes(data)
    grid = evaluate_decoder(gradiend, evaluated, tok, NEUTRAL, learning_rates=[1.0], truncation="left",
                            progress=False).grid
    words = class_words(evaluated, CLASSES, tok)
    every = words["female"] + words["male"]
    assert max(len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in every) > 1
    with torch.no_grad():
        expected = np.mean([sum(math.exp(-text_nll(model, tok, gradiend.objective, r["masked"], w))
                                for w in words["male"])
                            for r in [cut_by_hand(kind, r, 64, every) for r in data[:2]] + data[2:]])
    assert grid.loc[grid.is_base, "p_male@female"].iloc[0] == pytest.approx(expected, rel=1e-4)


def test_masked_lm_truncation_cuts_the_right_context_only_when_the_left_is_gone():
    tok = tokenizer_for("bert")
    collate = GradiendDataCollator(tok, "masked_lm", CLASSES, max_length=10, truncation="left")
    row = dict(rows()[1], masked="the nurse [MASK] said the results were good and they went home")
    ids = collate([row])["factual_input_ids"][0].tolist()
    right = "said the results were good and they went home".split()
    while len(masked_text_ids(tok, "[MASK] " + " ".join(right), "she")[0]) > 10:  # words off the end, by hand
        right.pop()
    by_hand = masked_text_ids(tok, "[MASK] " + " ".join(right), "she")[0]
    assert ids == by_hand and len(ids) == 10
    tiny_limit = GradiendDataCollator(tok, "masked_lm", CLASSES, max_length=3, truncation="left")
    with pytest.raises(RowTooLongError, match="alone do not fit"):  # [CLS] + 3 masks of 'zyxwv' + [SEP] > 3
        tiny_limit([dict(row, factual="zyxwv")])


def test_the_auxiliary_input_is_refused_or_cut_like_the_others():
    """Causal LM + auxiliary head: left context + one added mask + right context must fit too."""
    tok = tokenizer_for("gpt2")
    row = dict(rows()[0], masked="the room was said that the were went [MASK] was in her room")
    full = GradiendDataCollator(tok, "auxiliary_mlm", CLASSES)([row])["factual_input_ids"]
    limit = full.shape[1] - 3
    with pytest.raises(RowTooLongError, match=rf"is {full.shape[1]} tokens long, but the model takes at most {limit}"):
        GradiendDataCollator(tok, "auxiliary_mlm", CLASSES, max_length=limit)([row])
    cut = GradiendDataCollator(tok, "auxiliary_mlm", CLASSES, max_length=limit, truncation="left")([row])
    by_hand = dict(row, masked=" said that the were went [MASK] was in her room")  # three one-token words fewer
    expected = GradiendDataCollator(tok, "auxiliary_mlm", CLASSES)([by_hand])
    assert all(torch.equal(cut[k], expected[k]) for k in expected)


def test_neutral_texts_longer_than_the_limit_are_scored_on_their_first_tokens():
    model, tok = tiny_model("gpt2"), tokenizer_for("gpt2")
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES))
    long_text = " ".join([FILLER.strip()] * 15)
    assert len(tok(long_text)["input_ids"]) > 100
    grid = evaluate_decoder(gradiend, both_classes(rows()), tok, [long_text, NEUTRAL[0]], learning_rates=[1.0],
                            progress=False).grid
    with torch.no_grad():  # by hand: the first 64 tokens of the long text (the model's limit), the short one whole
        total, count = 0.0, 0
        for ids in (tok(long_text)["input_ids"][:64], tok(NEUTRAL[0])["input_ids"]):
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            total -= sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1))
            count += len(ids) - 1
    assert grid.loc[grid.is_base, "nll"].iloc[0] == pytest.approx(total / count, rel=1e-5)


def test_the_trainer_refuses_an_over_long_row_by_its_index_before_any_work(tmp_path, monkeypatch):
    """tiny BERT takes 64 positions: a 65-token row among short ones fails at construction, named by its index,
    before pre-pruning or any forward pass."""
    base = tiny_model("bert")
    limit = max_positions(base)
    data = both_classes(rows())
    data.insert(3, long_row("bert", limit + 1))
    calls = []
    base.register_forward_hook(lambda *args: calls.append(1))
    model = get_gradiend_model(base, GradiendConfig(feature_classes=CLASSES, pre_prune=0.5))
    args = GradiendTrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", disable_tqdm=True)
    with pytest.raises(RowTooLongError, match=rf"^row 3\b.*{limit}"):
        GradiendTrainer(model=model, args=args, train_dataset=data, processing_class=wordpiece_tokenizer())
    assert not calls
