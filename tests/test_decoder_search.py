"""The ladder search returns the full grid's choice: brute force on synthetic curves, and the grid on tiny models."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tiny import tiny_model, tokenizer_for

from gradiend_hf import GradiendConfig, evaluate_decoder, get_gradiend_model
from gradiend_hf.evaluation.decoder import BASE, CandidateScorer, all_goals, choose_candidates, learning_rate_ladder
from gradiend_hf.evaluation.search import ladders, last_true, unimodal_argmax

CLASSES = ["female", "male"]


def counting(values):
    calls = []

    def f(i):
        calls.append(i)
        return values[i]
    return f, calls


@pytest.mark.parametrize("rungs", range(0, 18))
def test_last_true_finds_the_end_of_every_prefix_in_log_calls(rungs):
    for end in range(-1, rungs):
        test, calls = counting({i: i <= end for i in range(rungs)})
        assert last_true(test, rungs) == end
        assert len(calls) <= math.ceil(math.log2(rungs + 1))


def unimodal(rng: random.Random, size: int) -> list[float]:
    """Distinct values rising to a random peak, then falling."""
    peak = rng.randrange(size)
    steps = [rng.uniform(0.01, 1.0) for _ in range(size)]
    values = [0.0] * size
    values[peak] = 10.0
    for i in range(peak - 1, -1, -1):
        values[i] = values[i + 1] - steps[i]
    for i in range(peak + 1, size):
        values[i] = values[i - 1] - steps[i]
    return values


def test_unimodal_argmax_equals_brute_force_and_monotone_curves_cost_two_calls():
    rng = random.Random(0)
    for size in range(1, 20):
        for _ in range(30):
            values = unimodal(rng, size)
            offset = rng.randrange(-1, 3)
            score, calls = counting({i + offset: v for i, v in enumerate(values)})
            best = unimodal_argmax(score, offset, offset + size - 1)
            assert values[best - offset] == max(values)
            assert len(set(calls)) <= 4 + 2 * math.ceil(math.log2(size + 1))
    for values in ([1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]):
        score, calls = counting(dict(enumerate(values)))
        assert values[unimodal_argmax(score, 0, 7)] == 8 and len(set(calls)) == 2 + (values[0] == 8) * 2
    score, _ = counting(dict(enumerate([1, 5, 5, 3])))
    assert unimodal_argmax(score, 0, 3) == 1  # ties go to the smaller step, as in the grid


class CurveEditor:
    """Stands in for the model: which candidate is applied (the scorer's measure functions read it)."""

    def __init__(self):
        self.rung = BASE

    def apply(self, ff, lr):
        self.rung = (ff, lr)

    def restore(self):
        self.rung = BASE


def synthetic_scorer(rng: random.Random, contexts: bool) -> CandidateScorer:
    """Smooth curves in lr per feature factor, of the kinds real grids show: the LMS falls with |lr| (after a
    possible small rise), P(class) moves like a logistic in lr, the contexts' log ratio crosses zero or not."""
    editor = CurveEditor()
    bias, log_ratio = rng.uniform(-2, 2), rng.uniform(-1, 1)  # the base: where every ladder starts
    shape = {ff: dict(lms_scale=rng.uniform(0.02, 3.0), lms_rise=rng.uniform(0, 0.002),
                      slope=rng.uniform(-30, 30), bias=bias, log_ratio=log_ratio,
                      ratio_slope=rng.uniform(-40, 40), mass_scale=rng.uniform(0.05, 5))
             for ff in (1.0, -1.0, 0.0)}

    def lms():
        ff, lr = editor.rung
        if lr == 0:
            return {"lms": 0.2}
        s = shape[ff]
        x = abs(lr) / s["lms_scale"]
        return {"lms": 0.2 * (1 + s["lms_rise"] * math.exp(-x) * x - 0.05 * x * x)}

    def probabilities():
        ff, lr = editor.rung
        s = shape.get(ff, shape[0.0])
        z = s["bias"] + s["slope"] * lr * (1 if ff != 0 else 0.3)
        pa = 0.5 / (1 + math.exp(-z)) * math.exp(-abs(lr) / 10)
        pb = 0.5 / (1 + math.exp(z)) * math.exp(-abs(lr) / 10)
        return {"p_female": pa, "p_male": pb, "p_female@female": pa * 1.5, "p_female@male": pa * 0.5,
                "p_male@female": pb * 0.5, "p_male@male": pb * 1.5, "balance_product": 4 * pa * pb}

    def frame():
        import pandas as pd

        ff, lr = editor.rung
        s = shape.get(ff, shape[0.0])
        log_ratio = max(-30.0, min(30.0, s["log_ratio"] + s["ratio_slope"] * lr))
        mass = 0.3 * math.exp(-abs(lr) / s["mass_scale"])
        pa, pb = mass / (1 + math.exp(-log_ratio)), mass / (1 + math.exp(log_ratio))
        return pd.DataFrame({"context": ["c"], "female": [pa], "male": [pb]})

    return CandidateScorer(editor, lms, probabilities, CLASSES, 0.99, frame if contexts else None, 0.9)


@pytest.mark.parametrize("contexts", [False, True])
def test_the_search_chooses_what_the_full_grid_chooses_on_synthetic_curves(contexts):
    rungs = ladders([1.0, -1.0, 0.0], [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100])
    scored = {"ladder": 0, "grid": 0}
    for seed in range(40):
        choices = {}
        for search in ("grid", "ladder"):
            evaluation = choose_candidates(synthetic_scorer(random.Random(seed), contexts), rungs, search,
                                           all_goals(CLASSES))
            choices[search] = {g: (evaluation.best(g).feature_factor, evaluation.best(g).learning_rate)
                               for g in all_goals(CLASSES)}
            scored[search] += int((~evaluation.grid["skipped"]).sum())
        assert choices["ladder"] == choices["grid"], seed
    assert scored["ladder"] < 0.8 * scored["grid"]


def feature_direction(model, tokenizer, rows, names):
    """d/dtheta of log P(she) - log P(he) over the rows, per selected parameter, unit norm overall: a decoder
    direction that moves the feature smoothly, as a trained one does (a random one on a random model does not)."""
    base = model.get_base_model()
    params = dict(base.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    objective = 0.0
    for row in rows:
        prefix = tokenizer(row["masked"].split("[MASK]")[0].rstrip(), add_special_tokens=False)["input_ids"]
        logits = base(input_ids=torch.tensor([prefix])).logits[0, -1].log_softmax(-1)
        she, he = (tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("she", "he"))
        objective = objective + logits[she] - logits[he]
    grads = torch.autograd.grad(objective, [params[n] for n in names])
    for name in names:
        params[name].requires_grad_(False)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    return {n: (g / norm).float() for n, g in zip(names, grads)}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_search_chooses_what_the_full_grid_chooses_on_tiny_models(kind):
    base = tiny_model(kind)
    tok = tokenizer_for(kind)
    rows = [dict(masked=f"{s} said that [MASK] went home", factual=f, alternative=a, factual_class=fc,
                 alternative_class=ac)
            for s in ("the doctor", "the nurse", "my friend")
            for f, a, fc, ac in (("she", "he", "female", "male"), ("he", "she", "male", "female"))]
    neutral = ["the results were good and they went home", "it was in the room", "my friend said it was late"]
    rates = learning_rate_ladder(1e-2, 200.0)
    model = get_gradiend_model(base, GradiendConfig(feature_classes=CLASSES))
    names = list(model.selected_parameters())
    direction = feature_direction(model, tok, rows, names)
    for ratio, tilt in ((0.99, 0.0), (0.9, 0.5)):
        with torch.no_grad():  # dec(ff) = ff * d_feature + tilt * b (b: a fixed random direction)
            generator = torch.Generator().manual_seed(0)
            for name in names:
                model.bottleneck.decoder(name).copy_(direction[name].unsqueeze(0))
                bias = model.bottleneck.offset(name)
                bias.copy_(torch.randn(bias.shape, generator=generator) * tilt / math.sqrt(model.num_entries))
        kwargs = dict(learning_rates=rates, lms_ratio=ratio, progress=False,
                      neutral_contexts=[r["masked"] for r in rows[::2]])
        grid = evaluate_decoder(model, rows, tok, neutral, search="grid", **kwargs)
        ladder = evaluate_decoder(model, rows, tok, neutral, **kwargs)
        for goal in all_goals(CLASSES):
            chosen = grid.best(goal), ladder.best(goal)
            assert (chosen[0].feature_factor, chosen[0].learning_rate) == (chosen[1].feature_factor,
                                                                           chosen[1].learning_rate), (goal, ratio, tilt)
            assert chosen[1].metrics["score"] == pytest.approx(chosen[0].metrics["score"], rel=1e-5, abs=1e-12)
        assert (~ladder.grid["skipped"]).sum() < (~grid.grid["skipped"]).sum()


def test_a_goal_the_search_did_not_answer_is_refused_with_the_fix():
    base = tiny_model("gpt2")
    tok = tokenizer_for("gpt2")
    model = get_gradiend_model(base, GradiendConfig(feature_classes=CLASSES))
    rows = [dict(masked="the doctor said that [MASK] went home", factual=f, alternative=a, factual_class=fc,
                 alternative_class=ac) for f, a, fc, ac in (("she", "he", "female", "male"),
                                                            ("he", "she", "male", "female"))]
    evaluation = evaluate_decoder(model, rows, tok, ["it was in the room"], learning_rates=[0.1], progress=False,
                                  goals=["female"])
    evaluation.best("female")
    with pytest.raises(ValueError, match="search='grid'"):
        evaluation.best("-male")
