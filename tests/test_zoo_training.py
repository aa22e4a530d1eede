"""The zoo (zoo_models.py), trained and evaluated: per architecture, one GradiendTrainer step and a tiny decoder grid
(evaluate_decoder), each against a naive oracle (plain per-row forward/backward passes, arithmetic written out here).

- trainer step: one step of GradiendTrainer with SGD (no momentum, no weight decay, no clipping, constant learning
  rate) on one batch of the zoo's long rows (one transition, so one batch holds every row), the default selection and
  the default auto-encoder (source 'alternative', target 'diff', tanh encoder). The oracle: the rows' own gradients
  (test_zoo.oracle_row_gradients), s = mean alternative gradient, t = mean factual - s, h = tanh(<W_e, s> + b_e),
  L = mean((W_d h + b_d - t)^2) over all n entries, its gradient in closed form, and theta - lr * grad. The step is
  compared as an update (after - before) per tensor group, with a learning rate that makes every group move.
- decoder grid: evaluate_decoder over feature factors (+1, -1) x learning rates (+0.1, -0.1) (one rate per sign, so no
  candidate is skipped). For the base and every candidate, P(class) per row is computed here: the edit written by
  hand into a copy of the base (theta + lr * (W_d * ff + b_d)), then per row and per class word (its case variants that
  tokenise differently in context) exp(-NLL of the word) from a plain forward (oracle.row_nll); the grid's p_<class>,
  p_<class>@<factual class> and balance_product must match. Causal LMs: the neutral-text NLL (plain forward per text,
  shifted cross-entropy over all its tokens) must match the grid's nll too. The base is restored bit-exactly after.
  Three times: with the default selection (embeddings included, so every candidate runs the whole model), with the
  last transformer layer only (the grid then replays that layer's recorded input, replay.py; ff +1 only there) and
  with the last layer plus a few input-embedding rows, as a pruned adapter keeps them (the batch that looks none of
  them up replays). Where a model's layers cannot be replayed (last_layer_pattern says why), it runs whole.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from oracle import masked_text_ids, row_nll
from test_zoo import CLASSES, LONG_ROWS, oracle_row_gradients, row
from transformers import logging as hf_logging
from zoo_models import SPECS, build, tokenizer_of

from gradiend_hf import GradiendConfig, GradiendModel, evaluate_decoder, get_gradiend_model
from gradiend_hf.evaluation import decoder as decoder_module
from gradiend_hf.trainer import GradiendTrainer, GradiendTrainingArguments

SGD_LR = 1e6  # the bottleneck's gradients are ~1/n small: a big step moves every group well beyond fp32 rounding
STEP_TOLERANCE = 2e-4  # relative, on the update of each group (W_e, b_e, W_d, b_d); seen: up to 2e-5


@pytest.fixture(autouse=True)
def quiet_transformers():
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    yield
    hf_logging.set_verbosity(verbosity)


def flat(tensors, names):
    return torch.cat([tensors[n].reshape(-1) for n in names])


def groups(bottleneck):
    """(W_e, b_e, W_d, b_d) of the bottleneck as flat vectors in selection order."""
    names = bottleneck.names
    return {
        "encoder": torch.cat([bottleneck.encoder(n).detach().reshape(-1) for n in names]).clone(),
        "encoder_bias": bottleneck.encoder_bias.detach().clone(),
        "decoder": torch.cat([bottleneck.decoder(n).detach().reshape(-1) for n in names]).clone(),
        "offset": torch.cat([bottleneck.offset(n).detach().reshape(-1) for n in names]).clone(),
    }


@pytest.mark.parametrize("name", list(SPECS))
def test_zoo_one_trainer_step_equals_the_hand_computed_sgd_step(name, tmp_path):
    model, tokenizer = build(name), tokenizer_of(name)
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES, init_seed=3))  # default selection
    b, objective = gradiend.bottleneck, gradiend.objective
    names = list(b.names)

    # the oracle's gradients: every row alone (the base never changes during training)
    per_row = oracle_row_gradients(model, tokenizer, objective, LONG_ROWS, names)
    s = sum(flat(g["alternative"], names) for g in per_row) / len(per_row)
    t = sum(flat(g["factual"], names) for g in per_row) / len(per_row) - s
    # W_e scaled so that <W_e, s> = +-0.5 and b_e = 0: h far from 0 (the decoder's gradient is h-proportional) and
    # from +-1 (a saturated tanh has no encoder gradient); some zoo models have gradients of norm 1e4 to 1e7
    scale = 0.5 / abs(float(groups(b)["encoder"] @ s))
    with torch.no_grad():
        for n in names:
            b.encoder(n).mul_(scale)
        b.encoder_bias.zero_()
    before = groups(b)

    args = GradiendTrainingArguments(
        output_dir=str(tmp_path / "run"), disable_tqdm=True, seed=0, max_steps=1, learning_rate=SGD_LR,
        lr_scheduler_type="constant", optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
        per_device_train_batch_size=len(LONG_ROWS), eval_strategy="no", save_strategy="no",
        load_best_model_at_end=False, logging_steps=1, report_to=[],
    )
    trainer = GradiendTrainer(model=gradiend, args=args, train_dataset=LONG_ROWS, processing_class=tokenizer)
    trainer.train()
    assert type(trainer.optimizer.optimizer) is torch.optim.SGD
    assert trainer.optimizer.param_groups[0]["momentum"] == 0 and trainer.optimizer.param_groups[0]["lr"] == SGD_LR
    after = groups(b)

    # the auto-encoder's loss and its gradient, written out
    n = s.numel()
    w_e, b_e, w_d, b_d = before["encoder"], before["encoder_bias"], before["decoder"], before["offset"]
    h = torch.tanh(w_e @ s + b_e)
    assert 0.4 < abs(float(h)) < 0.5
    r = w_d * h + b_d - t
    loss = float((r * r).sum() / n)
    d_pre = 2 * (r * w_d).sum() / n * (1 - h * h)
    gradient = {"encoder": d_pre * s, "encoder_bias": d_pre, "decoder": 2 * r * h / n, "offset": 2 * r / n}

    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged and logged[0] == pytest.approx(loss, rel=1e-4)
    for group, grad in gradient.items():
        expected_step, step = -SGD_LR * grad, after[group] - before[group]
        assert float(expected_step.norm()) > 1e-3 * float(before[group].norm()), group  # the group really moves
        error = float((step - expected_step).norm() / expected_step.norm())
        assert error <= STEP_TOLERANCE, f"{group}: relative error {error:.2e} of the update"


# --- the decoder grid ----------------------------------------------------------------------------------------------
def swapped(r: dict) -> dict:
    return dict(r, factual=r["alternative"], alternative=r["factual"], factual_class=r["alternative_class"],
                alternative_class=r["factual_class"])


# rows of both factual classes and of different lengths; 'qrstu' (female) and 'zyxwv' (male) are multi-token words
GRID_ROWS = [LONG_ROWS[3], LONG_ROWS[4], swapped(LONG_ROWS[1]), row("[MASK] was good", "she", "he")]
FEATURE_FACTORS = [1.0, -1.0]
LEARNING_RATES = [0.1, -0.1]
PROB_TOLERANCE = 1e-5  # relative; seen: up to 6e-7 (probabilities), 3e-7 (causal NLL)
NEUTRAL = ["the doctor went home and it was good", "they said the results were bad"]


def spellings(word: str) -> list[str]:
    return list(dict.fromkeys([word, word.lower(), word[:1].upper() + word[1:]]))


def naive_class_probabilities(model, tokenizer, objective, rows) -> dict[str, torch.Tensor]:
    """Per row: sum over the class's words (every spelling the data implies, counted once per distinct tokenisation
    in that row's context) of exp(-NLL), each word from its own plain forward pass."""
    words = {c: [] for c in CLASSES}
    for r in rows:
        for side in ("factual", "alternative"):
            for w in spellings(r[side]):
                if w not in words[r[f"{side}_class"]]:
                    words[r[f"{side}_class"]].append(w)
    out = {c: [] for c in CLASSES}
    for r in rows:
        for c in CLASSES:
            seen, total = set(), 0.0
            for w in words[c]:
                if objective == "masked_lm":
                    key = tuple(masked_text_ids(tokenizer, r["masked"], w)[2])
                else:
                    key = tuple(tokenizer(r["masked"].split("[MASK]")[0] + w)["input_ids"])
                if key in seen:
                    continue
                seen.add(key)
                with torch.no_grad():
                    total += float(torch.exp(-row_nll(model, tokenizer, objective, r["masked"], w)))
            out[c].append(total)
    return {c: torch.tensor(v, dtype=torch.float64) for c, v in out.items()}


@torch.no_grad()
def naive_causal_nll(model, tokenizer, texts) -> float:
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
        total += float(-logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].sum())
        count += ids.shape[1] - 1
    return total / count


def edited_copy(base, bottleneck, ff, lr):
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in bottleneck.names:
            delta = lr * (bottleneck.decoder(n)[0].detach() * ff + bottleneck.offset(n).detach())
            params[n].copy_(params[n] + bottleneck.to_full(n, delta).reshape(params[n].shape))
    return model


def last_layer_pattern(name: str, model) -> tuple[str, bool]:
    """A pattern selecting the last of the model's transformer layers (the biggest ModuleList of one class), and
    whether the grid can replay. Where it cannot, every candidate runs whole: ALBERT has one layer shared by every
    step; Funnel's and SqueezeBERT's biggest ModuleLists are not what is called layer after layer, and XLM's holds
    its FFNs only, so what one returns is not what the next receives (the recording pass checks both)."""
    if name == "albert":
        return r"\.albert_layer_groups\.0\.", False
    best, size = None, 0
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            total = sum(p.numel() for p in module.parameters())
            if total > size:
                best, size = (path, len(module)), total
    return rf"^{re.escape(best[0])}\.{best[1] - 1}\.", name not in ("funnel", "squeezebert", "xlm")


class RecordingGridForward(decoder_module.GridForward):
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingGridForward.made.append(self)


def rows_of_a_neutral_word(model, tokenizer) -> tuple[str, dict[str, torch.Tensor], str]:
    """(pattern, indices, neutral text): the input embeddings' rows of tokens that only this extra neutral text holds
    (no grid row), as a pruned adapter keeps a few rows: the rows' batch replays, the neutral texts' runs in full."""
    weight = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is weight)
    in_rows = {i for r in GRID_ROWS for text in (r["masked"], r["factual"], r["alternative"]) + tuple(NEUTRAL)
               for i in tokenizer(text)["input_ids"]}
    for word in ("jazz", "fjord", "kiwi", "vox", "gym", "pub", "wolf"):
        ids = [i for i in tokenizer(f" {word}", add_special_tokens=False)["input_ids"] if i not in in_rows]
        if ids:
            break
    assert ids, "no word outside the grid rows and neutral texts"
    width = weight.shape[1]
    indices = {name: (torch.tensor(sorted(set(ids)))[:, None] * width + torch.arange(width)).reshape(-1)}
    return rf"^{re.escape(name)}$", indices, f"the {word} was good"


@pytest.mark.parametrize("selection", ["default", "last_layer", "last_layer_and_embedding_rows"])
@pytest.mark.parametrize("name", list(SPECS))
def test_zoo_decoder_grid_probabilities_equal_naive_forwards(name, selection, monkeypatch):
    """The default selection (embeddings included: every candidate runs the whole model), the last layer only (the
    grid replays the recorded input of that layer: replay.py) and the last layer with a few input-embedding rows (a
    pruned adapter's shape: batches without those tokens replay, the others run in full)."""
    model, tokenizer = build(name), tokenizer_of(name)
    pristine = copy.deepcopy(model)
    pattern, replays = last_layer_pattern(name, model)
    targets, indices, neutral = None if selection == "default" else [pattern], None, NEUTRAL
    if selection == "last_layer_and_embedding_rows":
        rows_pattern, indices, extra = rows_of_a_neutral_word(model, tokenizer)
        targets, neutral = targets + [rows_pattern], NEUTRAL + [extra]
    config = GradiendConfig(feature_classes=CLASSES, target_parameters=targets)
    gradiend = GradiendModel(model, config, indices=indices) if indices else get_gradiend_model(model, config)
    monkeypatch.setattr(decoder_module, "GridForward", RecordingGridForward)
    RecordingGridForward.made = []
    b, objective = gradiend.bottleneck, gradiend.objective
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # decoder tensors large enough for the candidates to differ visibly
        for n in b.names:
            b.decoder(n).copy_(torch.randn(b.decoder(n).shape, generator=generator) * 0.1)
            b.offset(n).copy_(torch.randn(b.offset(n).shape, generator=generator) * 0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    factors = FEATURE_FACTORS if selection == "default" else FEATURE_FACTORS[:1]  # replay: 2 candidates suffice
    result = evaluate_decoder(gradiend, GRID_ROWS, tokenizer, neutral_texts=neutral, feature_factors=factors,
                              learning_rates=LEARNING_RATES, progress=False, search="grid")  # every candidate
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # every candidate was reverted
    grid = result.grid
    (forward,) = RecordingGridForward.made
    # the last layer (and rows): the grid replays (structure seen by replay_plan, calls by the recording pass)
    assert bool(forward.records) == (selection != "default" and replays)
    assert len(grid) == 1 + len(factors) * len(LEARNING_RATES) and not grid["skipped"].any()

    factual = [CLASSES.index(r["factual_class"]) for r in GRID_ROWS]
    base_probs = None
    for _, record in grid.iterrows():
        ff, lr = float(record["feature_factor"]), float(record["learning_rate"])
        candidate = pristine if record["is_base"] else edited_copy(pristine, b, ff, lr)
        probs = naive_class_probabilities(candidate, tokenizer, objective, GRID_ROWS)
        where = f"{name} ff={ff} lr={lr}"
        for c in CLASSES:
            assert record[f"p_{c}"] == pytest.approx(float(probs[c].mean()), rel=PROB_TOLERANCE, abs=1e-9), where
            for i, d in enumerate(CLASSES):
                chosen = probs[c][[k for k, f in enumerate(factual) if f == i]]
                assert record[f"p_{c}@{d}"] == pytest.approx(float(chosen.mean()), rel=PROB_TOLERANCE, abs=1e-9), where
        product = float((4 * probs[CLASSES[0]] * probs[CLASSES[1]]).mean())
        assert record["balance_product"] == pytest.approx(product, rel=PROB_TOLERANCE, abs=1e-12), where
        if objective == "causal_lm":
            assert record["nll"] == pytest.approx(naive_causal_nll(candidate, tokenizer, neutral), rel=1e-5), where
        if record["is_base"]:
            base_probs = probs
        else:  # the candidate really differs from the base (else the comparison could not tell edits apart)
            change = max(float(((probs[c] - base_probs[c]) / base_probs[c]).abs().max()) for c in CLASSES)
            assert change > 100 * PROB_TOLERANCE, where
