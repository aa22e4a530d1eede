"""P(class) in neutral contexts and the balance edit chosen there, against hand computations on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny import tiny_model, tokenizer_for

from gradiend_hf import GradiendConfig, evaluate_decoder, get_gradiend_model
from gradiend_hf.creation.wordlists import GENDERED_WORDS
from gradiend_hf.evaluation.contexts import (NEUTRAL_FRAMES, NEUTRAL_SUBJECTS, context_probabilities,
                                             gender_neutral_contexts, summarise_contexts)

CLASSES = ["female", "male"]
WORDS = {"female": ["she", "her"], "male": ["he", "his"]}
CONTEXTS = ["the doctor said that [MASK] went home", "the nurse said that [MASK] was good", "and then [MASK] went home"]
ROWS = [dict(masked=c, factual=f, alternative=a, factual_class=fc, alternative_class=ac)
        for c in CONTEXTS for f, a, fc, ac in (("she", "he", "female", "male"), ("he", "she", "male", "female"))]
NEUTRAL = ["the results were good and they went home", "it was in the room"]


def by_hand(model, tokenizer, objective: str, context: str, word: str) -> float:
    """P(word | context): softmax at the mask (masked LM, one-token words), or the teacher-forced product over the
    word's tokens after the left context (causal; BOS only when there is none)."""
    left = context.split("[MASK]")[0]
    if objective == "masked_lm":
        ids = tokenizer(context.replace("[MASK]", tokenizer.mask_token), return_tensors="pt")["input_ids"]
        position = (ids[0] == tokenizer.mask_token_id).nonzero().item()
        target = tokenizer.convert_tokens_to_ids(word)
    else:
        prefix = tokenizer(left.rstrip(), add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id]
        tokens = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prefix + tokens])).logits[0]
        return math.prod(float(logits[len(prefix) - 1 + j].softmax(-1)[t]) for j, t in enumerate(tokens))
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, position].softmax(-1)[target])


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_context_probabilities_are_the_summed_word_probabilities(kind):
    model, tok = tiny_model(kind), tokenizer_for(kind)
    objective = "masked_lm" if kind == "bert" else "causal_lm"
    frame = context_probabilities(model, tok, objective, CONTEXTS, WORDS)
    for i, context in enumerate(CONTEXTS):
        for cls, words in WORDS.items():
            assert frame.loc[i, cls] == pytest.approx(sum(by_hand(model, tok, objective, context, w) for w in words),
                                                      rel=1e-5)
    summary = summarise_contexts(frame, CLASSES)
    assert summary["ratio"] == pytest.approx(frame["female"].mean() / frame["male"].mean())
    assert summary["mean_abs_log_ratio"] == pytest.approx(
        np.mean([abs(math.log(a / b)) for a, b in zip(frame["female"], frame["male"])]))


def test_an_auxiliary_objective_is_scored_with_the_models_own_lm_head():
    """A causal LM trained with the auxiliary head (objective 'auxiliary_mlm') still predicts words with its LM head:
    its contexts get the causal numbers, not inputs holding the head's added mask."""
    model, tok = tiny_model("gpt2"), tokenizer_for("gpt2")
    auxiliary = context_probabilities(model, tok, "auxiliary_mlm", CONTEXTS, WORDS)
    for i, context in enumerate(CONTEXTS):
        for cls, words in WORDS.items():
            assert auxiliary.loc[i, cls] == pytest.approx(sum(by_hand(model, tok, "causal_lm", context, w)
                                                              for w in words), rel=1e-5)


def test_built_in_neutral_contexts_have_one_mask_and_no_gender_cue():
    texts = gender_neutral_contexts()
    assert len(texts) == len(NEUTRAL_SUBJECTS) * len(NEUTRAL_FRAMES)
    cues = {w.lower() for w in GENDERED_WORDS} | {"she", "he", "her", "his", "him", "hers", "himself", "herself"}
    for text in texts:
        assert text.count("[MASK]") == 1
        assert not {w.strip(".,").lower() for w in text.replace("[MASK]", "").split()} & cues, text
    with pytest.raises(ValueError, match="exactly one"):
        context_probabilities(tiny_model("bert"), tokenizer_for("bert"), "masked_lm", ["no mask here"], WORDS)


@pytest.mark.parametrize("search", ["grid", "ladder"])
def test_the_balance_goal_in_contexts_is_the_most_balanced_feasible_candidate_and_the_model_is_restored(search):
    base = tiny_model("gpt2")
    tok = tokenizer_for("gpt2")
    model = get_gradiend_model(base, GradiendConfig(feature_classes=CLASSES, init_seed=3))
    with torch.no_grad():  # a decoder that moves she/he: random but fixed
        generator = torch.Generator().manual_seed(0)
        for p in model.bottleneck.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    before = {n: p.clone() for n, p in base.state_dict().items()}
    rates = [0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    decoder = evaluate_decoder(model, ROWS, tok, NEUTRAL, learning_rates=rates, lms_ratio=0.5, progress=False,
                               neutral_contexts=CONTEXTS, context_words=WORDS, keep_mass=0.5, search=search)
    edit = decoder.best("balance")
    assert all(torch.equal(p, before[n]) for n, p in base.state_dict().items())
    reference = evaluate_decoder(model, ROWS, tok, NEUTRAL, learning_rates=rates, lms_ratio=0.5, progress=False,
                                 search="grid")  # feasibility of every candidate, without contexts
    # oracle: every feasible candidate applied by hand, |log ratio| from hand-computed probabilities
    oracle = []
    for _, row in reference.feasible().iterrows():
        with model.apply_edit(feature_factor=float(row["feature_factor"]), learning_rate=float(row["learning_rate"])):
            p = {c: [sum(by_hand(base, tok, "causal_lm", ctx, w) for w in ws) for ctx in CONTEXTS]
                 for c, ws in WORDS.items()}
        mass = np.mean(np.add(p["female"], p["male"]))
        oracle.append((np.mean(np.abs(np.log(np.divide(p["female"], p["male"])))), mass, row["feature_factor"],
                       row["learning_rate"]))
    base_mass = oracle[0][1]  # the base comes first in the grid
    best = min((o for o in oracle if o[1] >= 0.5 * base_mass), key=lambda o: o[0])
    assert best[3] != 0, "the oracle must choose an edit for this test to tell searches apart"
    assert (edit.feature_factor, edit.learning_rate) == (best[2], best[3])
    assert edit.metrics["selected_in"] == "neutral contexts"
    assert edit.metrics["context_abs_log_ratio"] == pytest.approx(best[0], rel=1e-4)
    assert edit.metrics["base_context_abs_log_ratio"] == pytest.approx(oracle[0][0], rel=1e-4)
    frame = decoder.context_frame(edit)  # P(class) per context under the chosen edit, as scored
    with model.apply_edit(edit):
        expected = [sum(by_hand(base, tok, "causal_lm", CONTEXTS[0], w) for w in WORDS["female"])]
    assert frame["female"].iloc[0] == pytest.approx(expected[0], rel=1e-4)
    if search == "ladder":
        scored = (~decoder.grid["skipped"]).sum()
        assert scored < (~reference.grid["skipped"]).sum()
