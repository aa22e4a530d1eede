"""The peer debiasing methods of benchmarks/debiasing.py (benchmarks/peers.py): counterfactual swaps, LEACE applied
as a hook on the LM head, and the CDA fine-tune."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny import tiny_model, tokenizer_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peers import cda_finetune, cda_texts, fit_leace, leace_applied, prediction_states, swap_gender  # noqa: E402


def test_swaps_keep_case_and_word_boundaries_and_go_both_ways():
    assert swap_gender("He told his wife that Mr Smith and HE were kings.") == \
        "She told her husband that Mrs Smith and SHE were queens."
    assert swap_gender("She gave her sister the ring.") == "He gave his brother the ring."
    assert swap_gender("Sheldon and the heat of the theme") == "Sheldon and the heat of the theme"  # not inside words
    assert cda_texts(["she went home", "the results were good"]) == ["she went home", "he went home"]


def rows():
    templates = ["the nurse said that [MASK] was in the room", "the doctor said that [MASK] went home",
                 "they said that [MASK] was good", "the results were good and [MASK] went home"]
    out = []
    for template in templates:
        for cls, word, other in (("female", "she", "he"), ("male", "he", "she")):
            masked = template.replace("the nurse", "the nurse " + ("her" if cls == "female" else "his"))
            out.append(dict(masked=masked, factual=word, alternative=other, factual_class=cls,
                            alternative_class="male" if cls == "female" else "female"))
    return out


def test_leace_removes_the_linear_class_information_the_head_reads_and_the_hook_goes_away():
    """LEACE's guarantee, checked on the erased states: their cross-covariance with the class label is zero (so no
    linear classifier beats a constant), where the plain states carry it; outside the block the model is unchanged."""
    model, tok = tiny_model("gpt2"), tokenizer_for("gpt2")
    data = rows()
    eraser = fit_leace(model, tok, data, "female", causal=True)
    labels = torch.tensor([float(r["factual_class"] == "female") for r in data])
    plain = prediction_states(model, tok, data, causal=True)
    with leace_applied(model, eraser):
        erased = prediction_states(model, tok, data, causal=True)

    def cross_covariance(states):
        return ((states - states.mean(0)) * (labels - labels.mean())[:, None]).mean(0).abs().max()

    assert cross_covariance(plain) > 1e-3
    assert cross_covariance(erased) < 1e-5 * cross_covariance(plain).clamp(min=1)
    torch.testing.assert_close(prediction_states(model, tok, data, causal=True), plain)


def test_cda_fine_tunes_a_copy_and_leaves_the_base_untouched():
    model, tok = tiny_model("gpt2"), tokenizer_for("gpt2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = cda_finetune(model, tok, ["the nurse said that she was in her room"] * 40, steps=2, batch_size=2, block=8)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in tuned.named_parameters())
