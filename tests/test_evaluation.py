"""evaluate_encoder / evaluate_decoder against hand computations (oracle.py and closed forms)."""

import copy
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from oracle import row_nll
from tiny import CORPUS, rows, tiny_model, tokenizer_for, wordpiece_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (ConvBertConfig, ConvBertForMaskedLM, FunnelConfig, FunnelForMaskedLM, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model
from gradiend_hf.evaluation import evaluate_decoder, evaluate_encoder, learning_rate_ladder, neutral_rows
from gradiend_hf.evaluation.contexts import context_probabilities
from gradiend_hf.evaluation.replay import GridForward
from gradiend_hf.layout import padded_passes_exact
from gradiend_hf.evaluation.encoder import encode_dataset, summarise
from gradiend_hf.evaluation.lms import language_modelling_score, lms_batches
from gradiend_hf.evaluation.probabilities import (
    case_variants,
    class_probabilities,
    class_words,
    word_batches,
    word_probabilities,
)

CLASSES = ["female", "male"]
NEUTRAL = ["the doctor went home and it was good", "they said the results were bad", "the room was good"]


def both_classes():
    """The tiny rows plus their mirror (male -> female), so both classes have rows."""
    mirrored = [dict(r, factual=r["alternative"], alternative=r["factual"], factual_class="male",
                     alternative_class="female") for r in rows()]
    return rows() + mirrored


def wrap(kind):
    model = tiny_model(kind)
    return model, get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES))


# --- encoder metrics -------------------------------------------------------------------------------------------
def test_encoder_metrics_match_hand_computation():
    frame = pd.DataFrame([
        dict(masked="x [MASK]", factual="he", alternative="she",
             factual_class="male", alternative_class="female", h=0.9),
        dict(masked="x [MASK]", factual="he", alternative="her",
             factual_class="male", alternative_class="female", h=0.2),
        dict(masked="x [MASK]", factual="she", alternative="he",
             factual_class="female", alternative_class="male", h=-0.7),
        dict(masked="x [MASK]", factual="her", alternative="his",
             factual_class="female", alternative_class="male", h=0.1),
        dict(masked="x [MASK]", factual="the", alternative="the",
             factual_class="neutral", alternative_class="neutral", h=-0.6),
    ])
    result = summarise(frame, CLASSES, "alternative")
    h = np.array([0.9, 0.2, -0.7, 0.1])
    y = np.array([1, 1, -1, -1.0])
    r = ((h - h.mean()) * (y - y.mean())).sum() / math.sqrt(((h - h.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert result.correlation == pytest.approx(r)
    assert result.binary_accuracy == pytest.approx(3 / 4)  # 0.1 has the wrong sign
    assert result.ternary_accuracy == pytest.approx(2 / 5)  # 0.9 -> +1 right, -0.7 -> -1 right, the rest wrong
    assert result.neutral_mean_abs_h == pytest.approx(0.6)
    assert result.by_class.loc["female", "mean"] == pytest.approx(0.55)
    assert result.by_word.loc["his", "mean"] == pytest.approx(0.1)
    assert result.by_class.loc["male", "median"] == pytest.approx(-0.3)


def test_neutral_rows_mask_a_non_feature_word():
    data = rows()
    feature_words = {r[s].lower() for r in data for s in ("factual", "alternative")}
    neutral = neutral_rows(data, 10, seed=3)
    assert neutral and all(r["factual"] == r["alternative"] and r["factual"].lower() not in feature_words
                           for r in neutral)
    assert all(r["masked"].count("[MASK]") == 1 for r in neutral)
    assert neutral == neutral_rows(data, 10, seed=3)


def test_evaluate_encoder_uses_the_models_per_row_encodings():
    _, gradiend = wrap("gpt2")
    result = evaluate_encoder(gradiend, rows(), tokenizer_for("gpt2"), neutral=4, progress=False)
    collate = GradiendDataCollator(tokenizer_for("gpt2"), "causal_lm", CLASSES)
    expected = gradiend.encode_rows(collate(rows()))[:, 0].numpy()
    np.testing.assert_allclose(result.frame["h"].to_numpy()[:4], expected, rtol=1e-6)
    assert (result.frame["label_class"] == "neutral").sum() == 4


def test_encode_dataset_batches_rows_by_length_and_keeps_their_order():
    model = tiny_model("gpt2")
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES, encoder_activation="identity"))
    collate = GradiendDataCollator(tokenizer_for("gpt2"), "causal_lm", CLASSES)
    data = both_classes() + [
        dict(rows()[0], masked="the doctor and the nurse said that the results were good and that [MASK] went")]
    widths, encode_rows = [], gradiend.encode_rows
    gradiend.encode_rows = lambda batch: widths.append(batch["alternative_input_ids"].shape[1]) or encode_rows(batch)
    frame = encode_dataset(gradiend, data, collate, batch_size=3, progress=False)
    assert widths == sorted(widths) and len(widths) == 3
    expected = torch.stack([gradiend.encode(collate([r])) for r in data])[:, 0].numpy()
    np.testing.assert_allclose(frame["h"].to_numpy(), expected, rtol=1e-4, atol=1e-7)
    assert list(frame["masked"]) == [r["masked"] for r in data]


# --- class probabilities ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_class_probabilities_sum_case_variants_and_multiply_tokens(kind):
    model, gradiend = wrap(kind)
    tok = tokenizer_for(kind)
    data = rows()
    words = class_words(data, CLASSES, tok)
    assert "zyxwv" in words["male"]  # a multi-token word
    # case variants count when the tokenizer tells them apart; the uncased WordPiece reads "She" as "she": once only
    assert ("She" in words["female"]) == (kind != "bert") and "she" in words["female"]
    collate = GradiendDataCollator(tok, gradiend.objective, CLASSES)
    probs = class_probabilities(
        word_probabilities(model, word_batches(data, [w for ws in words.values() for w in ws], collate)), words)
    with torch.no_grad():
        for c in CLASSES:
            expected = [sum(math.exp(-float(row_nll(model, tok, gradiend.objective, r["masked"], w))) for w in words[c])
                        for r in data]
            np.testing.assert_allclose(probs[c].numpy(), expected, rtol=1e-4)


def test_case_variants():
    assert case_variants("she") == ["she", "She"]
    assert case_variants("He") == ["He", "he"]


# --- language-modelling score ----------------------------------------------------------------------------------
def test_causal_lms_is_the_shifted_mean_nll():
    model, _ = wrap("llama")
    tok = tokenizer_for("llama")
    result = language_modelling_score(model, lms_batches(tok, NEUTRAL, "causal_lm", batch_size=2), "causal_lm")
    total, count = 0.0, 0
    with torch.no_grad():
        for text in NEUTRAL:  # unpadded, one text at a time: logits at i predict token i+1
            ids = torch.tensor([tok(text)["input_ids"]])
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
            total -= sum(float(logp[i, ids[0, i + 1]]) for i in range(ids.shape[1] - 1))
            count += ids.shape[1] - 1
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.lms == pytest.approx(1 / (1 + total / count), rel=1e-5)
    assert result.tokens == count


def test_masked_lms_is_the_accuracy_at_fixed_masked_positions():
    model, _ = wrap("bert")
    tok = tokenizer_for("bert")
    batches = lms_batches(tok, NEUTRAL * 4, "masked_lm", batch_size=5, seed=1)
    again = lms_batches(tok, NEUTRAL * 4, "masked_lm", batch_size=5, seed=1)
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(batches, again))  # fixed by the seed
    scored = sum(int((b.labels != -100).sum()) for b in batches)
    real = sum(int(b.inputs["attention_mask"].sum()) - 2 * b.labels.shape[0] for b in batches)
    assert 0.05 < scored / real < 0.35  # about 15% of the real tokens
    correct = 0
    with torch.no_grad():
        for b in batches:
            for i in range(b.labels.shape[0]):  # one text at a time, without padding
                n = int(b.inputs["attention_mask"][i].sum())
                logits = model(input_ids=b.inputs["input_ids"][i : i + 1, :n]).logits[0]
                positions = (b.labels[i, :n] != -100).nonzero().flatten()
                correct += int((logits[positions].argmax(-1) == b.labels[i, positions]).sum())
    assert language_modelling_score(model, batches, "masked_lm").lms == pytest.approx(correct / scored)


# --- the decoder grid ------------------------------------------------------------------------------------------
def test_learning_rate_ladder():
    assert learning_rate_ladder() == [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_grid_leaves_the_model_bit_exact_and_its_numbers_are_real(kind):
    model, gradiend = wrap(kind)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    tok = tokenizer_for(kind)
    result = evaluate_decoder(gradiend, both_classes(), tok, NEUTRAL, learning_rates=[0.5, 5.0, -5.0], progress=False)
    assert all(torch.equal(v, before[n]) for n, v in model.state_dict().items())
    assert len(result.grid) == 1 + 3 * 3 and result.grid["is_base"].sum() == 1
    # oracle: the candidate ff=1, lr=5 merged for real, P(female) on male rows computed row by row by hand
    row = result.grid[(result.grid.feature_factor == 1.0) & (result.grid.learning_rate == 5.0)].iloc[0]
    data = both_classes()
    words = class_words(data, CLASSES, tok)["female"]
    merged = gradiend.merge_and_unload(feature_factor=1.0, learning_rate=5.0)
    with torch.no_grad():
        p = [sum(math.exp(-float(row_nll(merged, tok, gradiend.objective, r["masked"], w))) for w in words)
             for r in data if r["factual_class"] == "male"]
    assert len(p) == 4 and row["p_female@male"] == pytest.approx(np.mean(p), rel=1e-4)


def test_best_strengthens_its_class_within_the_lms_budget():
    _, gradiend = wrap("gpt2")
    result = evaluate_decoder(gradiend, both_classes(), tokenizer_for("gpt2"), NEUTRAL, progress=False)
    feasible = result.grid[(result.grid.lms >= 0.99 * result.base_lms) & ~result.grid.skipped]
    for goal in ("female", "male", "-female", "balance"):
        edit = result.best(goal)
        column = f"score_{goal}"
        assert edit.metrics["score"] == pytest.approx(feasible[column].max())
        assert edit.metrics["lms"] >= 0.99 * edit.metrics["base_lms"]
    edit = result.best("male")
    assert edit.metrics["probabilities"]["male"] != edit.metrics["base_probabilities"]["male"]
    assert result.grid.loc[(result.grid.feature_factor == edit.feature_factor)
                           & (result.grid.learning_rate == edit.learning_rate),
                           "p_male@female"].iloc[0] > result.grid.loc[result.grid.is_base, "p_male@female"].iloc[0]


def test_no_feasible_candidate_returns_the_base_with_a_warning(caplog):
    _, gradiend = wrap("gpt2")
    result = evaluate_decoder(gradiend, both_classes(), tokenizer_for("gpt2"), NEUTRAL, learning_rates=[1.0],
                              progress=False)
    result.lms_ratio = 2.0  # nothing but the base can keep twice the base LMS
    with caplog.at_level(logging.WARNING, logger="gradiend_hf"):
        edit = result.best("female")
    assert edit.learning_rate == 0.0 and "no edit" in caplog.text


def test_unknown_goal_is_explained():
    _, gradiend = wrap("gpt2")
    result = evaluate_decoder(gradiend, rows(), tokenizer_for("gpt2"), NEUTRAL, learning_rates=[1.0], progress=False)
    with pytest.raises(ValueError, match="Unknown goal"):
        result.best("neutral")
    with pytest.raises(ValueError, match="lack one of the classes"):
        result.best("female")  # rows() holds only female -> male rows


def test_merging_an_edit_records_it_with_its_figures(tmp_path):
    _, gradiend = wrap("gpt2")
    result = evaluate_decoder(gradiend, both_classes(), tokenizer_for("gpt2"), NEUTRAL, learning_rates=[1.0, 10.0],
                              progress=False)
    edit = result.best("balance")
    gradiend.merge_and_unload(edit)
    config = gradiend.gradiend_config
    assert (config.feature_factor, config.learning_rate) == (edit.feature_factor, edit.learning_rate)
    assert config.evaluation["goal"] == "balance" and config.evaluation["base_lms"] == result.base_lms


# --- tokenizers without a pad token (Llama, Mistral, GPT-NeoX) ---------------------------------------------------
def llama_style_tokenizers():
    """The same BPE tokenizer with BOS <s> prepended and EOS </s>, once without a pad token (as Llama ships) and once
    with <pad>, whose id differs from EOS (the fallback): padding must not matter either way."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    plain = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return (PreTrainedTokenizerFast(tokenizer_object=backend, **plain),
            PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(backend), pad_token="<pad>", **plain))


def llama_for(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=24, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                         pad_token_id=None, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_every_evaluation_path_works_without_a_pad_token_and_padding_changes_nothing():
    no_pad, with_pad = llama_style_tokenizers()
    assert no_pad.pad_token is None and with_pad.pad_token_id not in (None, no_pad.eos_token_id)
    model = llama_for(no_pad)
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES,
                                                        target_parameters=[r"model\.layers\.1\."]))
    assert GridForward(model, gradiend.selected_parameters().values(), cut=True).replays  # the fast grid path
    data = both_classes()
    results = {}
    for name, tok in (("no pad", no_pad), ("pad", with_pad)):
        results[name] = dict(
            encoder=evaluate_encoder(gradiend, data, tok, neutral=4, progress=False).frame["h"].to_numpy(),
            grid=evaluate_decoder(gradiend, data, tok, NEUTRAL, learning_rates=[1.0, -5.0], progress=False).grid,
            lms=language_modelling_score(model, lms_batches(tok, NEUTRAL, "causal_lm", batch_size=2), "causal_lm"),
            contexts=context_probabilities(model, tok, "causal_lm", [r["masked"] for r in data[:4]],
                                           {"female": ["she", "her"], "male": ["he", "zyxwv"]}),
        )
    assert no_pad.pad_token is None and no_pad.pad_token_id is None  # the user's tokenizer is left as it was
    with pytest.raises(ValueError, match="padding token"):
        no_pad(["she went", "he"], padding=True)
    a, b = results["no pad"], results["pad"]
    np.testing.assert_allclose(a["encoder"], b["encoder"], rtol=1e-5, atol=1e-7)
    pd.testing.assert_frame_equal(a["grid"], b["grid"], rtol=1e-5)
    assert a["lms"].nll == pytest.approx(b["lms"].nll, rel=1e-6) and a["lms"].tokens == b["lms"].tokens
    pd.testing.assert_frame_equal(a["contexts"], b["contexts"], rtol=1e-5)
    # and against computations without any padding: each row / text alone
    collate = GradiendDataCollator(no_pad, "causal_lm", CLASSES)
    alone = torch.stack([gradiend.encode(collate([r])) for r in data])[:, 0].numpy()
    np.testing.assert_allclose(a["encoder"][: len(data)], alone, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        total, count = 0.0, 0
        for text in NEUTRAL:
            ids = torch.tensor([no_pad(text)["input_ids"]])
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
            total -= sum(float(logp[i, ids[0, i + 1]]) for i in range(ids.shape[1] - 1))
            count += ids.shape[1] - 1
    assert a["lms"].nll == pytest.approx(total / count, rel=1e-5)


def test_a_masked_lm_tokenizer_without_pad_token_gives_the_same_grid():
    no_pad = copy.deepcopy(tokenizer_for("bert"))
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    _, gradiend = wrap("bert")
    grids = [evaluate_decoder(gradiend, both_classes(), tok, NEUTRAL, learning_rates=[1.0], progress=False).grid
             for tok in (no_pad, tokenizer_for("bert"))]
    pd.testing.assert_frame_equal(grids[0], grids[1], rtol=1e-5)
    assert no_pad.pad_token is None


# --- models whose results change with padding (Funnel, ConvBERT) -------------------------------------------------
def funnel():
    torch.manual_seed(0)
    config = FunnelConfig(vocab_size=len(wordpiece_tokenizer()), d_model=16, n_head=2, d_head=8, d_inner=24,
                          block_sizes=[1, 1], num_decoder_layers=1)
    return FunnelForMaskedLM(config).eval()


def convbert_with_large_weights():
    torch.manual_seed(0)
    config = ConvBertConfig(vocab_size=len(wordpiece_tokenizer()), max_position_embeddings=64, embedding_size=16,
                            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
    model = ConvBertForMaskedLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return model


def batched_and_alone(model, tok, objective, data):
    """P(word) per row and word: in one padded batch, and with each row in a batch of its own (no padding)."""
    words = ["she", "he", "zyxwv"]
    collate = GradiendDataCollator(tok, objective, CLASSES)
    batched = word_probabilities(model, word_batches(data, words, collate))
    alone = [word_probabilities(model, word_batches([r], words, collate)) for r in data]
    return ({w: batched[w] for w in words}, {w: torch.cat([a[w] for a in alone]) for w in words})


SENSITIVE = {"funnel": funnel, "convbert x4": convbert_with_large_weights}


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "albert", "gpt2", "llama", *SENSITIVE])
def test_padded_passes_are_allowed_exactly_where_padding_leaves_the_numbers_unchanged(kind):
    """The layout rule (from the model's family) against the oracle: what padding really does to the probabilities."""
    model = SENSITIVE[kind]() if kind in SENSITIVE else tiny_model(kind)
    tok = wordpiece_tokenizer() if kind in SENSITIVE else tokenizer_for(kind)
    objective = "causal_lm" if kind in ("gpt2", "llama") else "masked_lm"
    model.eval()
    batched, alone = batched_and_alone(model, tok, objective, both_classes())
    changes = any(not torch.allclose(batched[w].log(), alone[w].log(), rtol=1e-4, atol=1e-4) for w in batched)
    assert changes == (kind in SENSITIVE)
    assert padded_passes_exact(model, objective == "causal_lm", 64) == (not changes)


def test_a_padding_sensitive_model_is_evaluated_one_row_per_pass_and_gets_the_rows_alone_numbers(caplog):
    model, tok = funnel(), wordpiece_tokenizer()
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES))
    data = both_classes()
    collate = GradiendDataCollator(tok, "masked_lm", CLASSES)
    with caplog.at_level(logging.INFO, logger="gradiend_hf"):
        grid = evaluate_decoder(gradiend, data, tok, NEUTRAL, learning_rates=[1.0], progress=False).grid
    assert "one row per pass" in caplog.text
    words = class_words(data, CLASSES, tok)["female"]
    with torch.no_grad():
        expected = np.mean([sum(math.exp(-float(row_nll(model, tok, "masked_lm", r["masked"], w))) for w in words)
                            for r in data if r["factual_class"] == "male"])
        batched = class_probabilities(word_probabilities(
            model, word_batches(data, [w for ws in class_words(data, CLASSES, tok).values() for w in ws], collate)),
            class_words(data, CLASSES, tok))["female"][4:].mean()
    base = grid[grid.is_base].iloc[0]
    assert base["p_female@male"] == pytest.approx(expected, rel=1e-4)
    assert float(batched) != pytest.approx(expected, rel=1e-3)  # what a padded batch would have reported
    lms_alone = language_modelling_score(model, lms_batches(tok, NEUTRAL, "masked_lm", batch_size=1), "masked_lm")
    assert base["nll"] == pytest.approx(lms_alone.nll, rel=1e-5)
    encoded = evaluate_encoder(gradiend, data, tok, neutral=0, progress=False).frame["h"].to_numpy()
    alone = torch.stack([gradiend.encode(collate([r])) for r in data])[:, 0].numpy()
    np.testing.assert_allclose(encoded, alone, rtol=1e-4, atol=1e-7)
    contexts = [r["masked"] for r in data[:4]]
    frame = context_probabilities(model, tok, "masked_lm", contexts, {"female": ["she"], "male": ["he"]})
    one_by_one = [context_probabilities(model, tok, "masked_lm", [c], {"female": ["she"], "male": ["he"]})
                  for c in contexts]
    np.testing.assert_allclose(frame["female"], [f["female"].iloc[0] for f in one_by_one], rtol=1e-5)


