"""The fast decoder-grid forward (gradiend_hf/evaluation/replay.py) against plain full forward passes."""

import copy

import pytest
import torch
from tiny import rows, tiny_model, tokenizer_for

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model
from gradiend_hf.evaluation import evaluate_decoder
from gradiend_hf.evaluation.lms import language_modelling_score, lms_batches
from gradiend_hf.evaluation.probabilities import class_probabilities, class_words, word_batches, word_probabilities
from gradiend_hf.evaluation.replay import GridForward

CLASSES = ["female", "male"]
NEUTRAL = ["the doctor went home and it was good", "they said the results were bad", "the room was good",
           "she went home"]
UPPER = {"bert": r"bert\.encoder\.layer\.1\.", "gpt2": r"transformer\.h\.1\.", "llama": r"model\.layers\.1\.",
         "distilbert": r"distilbert\.transformer\.layer\.1\.", "roberta": r"roberta\.encoder\.layer\.1\."}
TIED = {"bert": r"bert\.embeddings\.word_embeddings\.", "gpt2": r"transformer\.wte\.",
        "llama": r"model\.embed_tokens\.", "distilbert": r"distilbert\.embeddings\.word_embeddings\.",
        "roberta": r"roberta\.embeddings\.word_embeddings\."}
# selection -> the layer the replay starts at (0: full forward)
SELECTIONS = {"upper layer": (lambda k: [UPPER[k]], 1),
              "tied embeddings + upper layer": (lambda k: [UPPER[k], TIED[k]], 0),
              "everything": (lambda k: None, 0)}


def both_classes():
    mirrored = [dict(r, factual=r["alternative"], alternative=r["factual"], factual_class="male",
                     alternative_class="female") for r in rows()]
    return rows() + mirrored


def wrap(kind, selection):
    model = tiny_model(kind)
    if kind == "llama":  # tie the tiny Llama's head to its embeddings, as SmolLM2 does
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    return model, get_gradiend_model(
        model, GradiendConfig(feature_classes=CLASSES, target_parameters=SELECTIONS[selection][0](kind)))


def plain_numbers(model, gradiend, tok, data, neutral):
    """P(class) per row and the LMS of the model as it is, with plain full forward passes."""
    words = class_words(data, CLASSES, tok)
    collate = GradiendDataCollator(tok, gradiend.objective, CLASSES)
    probs = class_probabilities(
        word_probabilities(model, word_batches(data, [w for ws in words.values() for w in ws], collate)), words)
    return probs, language_modelling_score(model, neutral, gradiend.objective)


@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "distilbert", "roberta"])
def test_fast_forward_gives_the_numbers_of_full_forward_passes(kind, selection):
    model, gradiend = wrap(kind, selection)
    tok = tokenizer_for(kind)
    data = both_classes()
    words = class_words(data, CLASSES, tok)
    collate = GradiendDataCollator(tok, gradiend.objective, CLASSES)
    batches = word_batches(data, [w for ws in words.values() for w in ws], collate)
    neutral = lms_batches(tok, NEUTRAL, gradiend.objective, batch_size=3)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    editor = gradiend.editor()
    head_rows = []  # the LM head runs on the scored positions only: (1, N, hidden) in, (1, N, vocab) out
    watch = model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_rows.append(out.shape[0]))
    forward = GridForward(model, gradiend.selected_parameters().values(), cut=gradiend.objective == "causal_lm")
    assert forward.start == SELECTIONS[selection][1]
    for ff, lr in [(0.0, 0.0), (1.0, 5.0), (-1.0, 0.5), (0.0, 20.0)]:  # the base first: it records
        if lr:
            editor.apply(ff, lr)
        head_rows.clear()
        fast = class_probabilities(word_probabilities(model, batches, forward), words)
        fast_lms = language_modelling_score(model, neutral, gradiend.objective, forward)
        assert head_rows and set(head_rows) == {1}
        slow, slow_lms = plain_numbers(model, gradiend, tok, data, neutral)
        for c in CLASSES:
            torch.testing.assert_close(fast[c], slow[c], rtol=1e-5, atol=1e-7)
        assert fast_lms.lms == pytest.approx(slow_lms.lms, rel=1e-6) and fast_lms.tokens == slow_lms.tokens
        assert fast_lms.nll == pytest.approx(slow_lms.nll, rel=1e-5)
    assert bool(forward.records) == (forward.start > 0) and not forward.plain
    editor.restore()
    watch.remove()
    assert all(torch.equal(v, before[n]) for n, v in model.state_dict().items())
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is gone
    assert not any("forward" in vars(m) for m in model.modules())  # no stub left behind


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("selection", ["upper layer", "tied embeddings + upper layer"])
def test_grid_equals_a_naive_deep_copy_grid_and_restores_the_model(kind, selection):
    model, gradiend = wrap(kind, selection)
    tok = tokenizer_for(kind)
    data = both_classes()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    grid = evaluate_decoder(gradiend, data, tok, NEUTRAL, learning_rates=[0.5, 5.0, -5.0], progress=False).grid
    assert all(torch.equal(v, before[n]) for n, v in model.state_dict().items())
    assert (not any("forward" in vars(m) for m in model.modules())
            and not model.get_output_embeddings()._forward_pre_hooks)
    neutral = lms_batches(tok, NEUTRAL, gradiend.objective)
    for _, row in grid[~grid.skipped].iterrows():
        candidate = copy.deepcopy(model)
        params = dict(candidate.named_parameters())
        with torch.no_grad():
            for name in gradiend.bottleneck.names:
                params[name].add_(gradiend.bottleneck.edit_delta(name, row.feature_factor, row.learning_rate))
        probs, lms = plain_numbers(candidate, gradiend, tok, data, neutral)
        assert row.lms == pytest.approx(lms.lms, rel=1e-6) and row.nll == pytest.approx(lms.nll, rel=1e-5)
        for c in CLASSES:
            assert row[f"p_{c}"] == pytest.approx(float(probs[c].mean()), rel=1e-5)


def test_a_layer_shared_with_a_module_below_the_layers_is_not_replayed():
    model, _ = wrap("bert", "upper layer")
    shared = model.bert.embeddings.LayerNorm.weight  # the edited layer's norm is also the embeddings' norm
    model.bert.encoder.layer[1].output.LayerNorm.weight = shared
    # named as the embeddings' (named_parameters names a shared tensor once, by its first owner)
    config = GradiendConfig(feature_classes=CLASSES, target_parameters=[r"bert\.embeddings\.LayerNorm\.weight"])
    gradiend = get_gradiend_model(model, config)
    forward = GridForward(model, gradiend.selected_parameters().values(), cut=False)
    assert forward.start == 1  # by the module structure: the tensor is in layer 1 and in a module outside
    grid_numbers_equal_plain_ones(model, gradiend, "bert", forward, batch_size=4)
    assert forward.start == 0 and not forward.records  # the recording pass saw the shared norm run before the layers


def test_a_layer_shared_with_a_module_after_the_layers_replays():
    model, _ = wrap("gpt2", "upper layer")
    model.transformer.h[1].ln_1.weight = model.transformer.ln_f.weight  # the edited layer's norm is also the final norm
    gradiend = get_gradiend_model(
        model, GradiendConfig(feature_classes=CLASSES, target_parameters=[r"transformer\.h\.1\.ln_1"]))
    forward = GridForward(model, gradiend.selected_parameters().values(), cut=True)
    assert forward.start == 1 and forward.plan.after == [model.transformer.ln_f]
    grid_numbers_equal_plain_ones(model, gradiend, "gpt2", forward, batch_size=4)
    assert forward.records and not forward.plain


def test_causal_inputs_are_cut_after_the_last_scored_position():
    model, _ = wrap("gpt2", "upper layer")
    inputs = {"input_ids": torch.arange(12).reshape(2, 6), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    positions = torch.zeros(2, 6, dtype=torch.bool)
    positions[0, 1] = positions[1, 3] = True
    forward = GridForward(model, [], cut=True)
    cut, kept = forward.trim(inputs, positions)
    assert cut["input_ids"].shape == (2, 4) and kept.shape == (2, 4) and kept.sum() == 2
    full = model(**inputs).logits[positions]
    torch.testing.assert_close(forward.logits("k", inputs, positions), full, rtol=1e-5, atol=1e-6)
    forward = GridForward(model, [], cut=False)
    assert forward.trim(inputs, positions)[0]["input_ids"].shape == (2, 6)



def test_a_model_that_needs_all_logits_gets_them():
    model, gradiend = wrap("gpt2", "upper layer")
    head = model.get_output_embeddings()
    plain = head.forward
    head.forward = lambda x: plain(x) if x.shape[0] == 2 else (_ for _ in ()).throw(ValueError("batch-shaped head"))
    inputs = {"input_ids": torch.arange(12).reshape(2, 6), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    positions = torch.rand(2, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    positions[1, 5] = True
    forward = GridForward(model, gradiend.selected_parameters().values(), cut=True)
    with torch.no_grad():
        full = model(**inputs).logits[positions]
    for _ in range(2):  # records, then replays
        torch.testing.assert_close(forward.logits("k", inputs, positions), full)
    assert not forward.gathers and forward.records


def pruned_to_rows(kind: str, word: str):
    """The upper layer and the (tied) input embedding's rows of `word`'s tokens only, as a pruned adapter keeps them."""
    model, _ = wrap(kind, "upper layer")
    tok = tokenizer_for(kind)
    config = GradiendConfig(feature_classes=CLASSES, target_parameters=[UPPER[kind], TIED[kind]])
    embedding = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is embedding)
    rows = torch.tensor(tok(word, add_special_tokens=False)["input_ids"])
    width = embedding.shape[1]
    indices = {name: (rows[:, None] * width + torch.arange(width)).reshape(-1)}
    from gradiend_hf.model import GradiendModel

    return model, GradiendModel(model, config, indices=indices), rows


def grid_numbers_equal_plain_ones(model, gradiend, kind, forward, batch_size=1):
    """P(class) per row and the LMS under three edits, with `forward` and with plain forward passes."""
    tok = tokenizer_for(kind)
    data = both_classes()
    words = class_words(data, CLASSES, tok)
    collate = GradiendDataCollator(tok, gradiend.objective, CLASSES)
    batches = [word_batches(data[i:i + batch_size], [w for ws in words.values() for w in ws], collate)
               for i in range(0, len(data), batch_size)]
    neutral = lms_batches(tok, NEUTRAL, gradiend.objective, batch_size=batch_size)
    editor = gradiend.editor()
    b = gradiend.bottleneck
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # decoder tensors large enough for the edits to change the numbers visibly
        for n in b.names:
            b.decoder(n).copy_(torch.randn(b.decoder(n).shape, generator=generator) * 0.1)
    for ff, lr in [(0.0, 0.0), (1.0, 5.0), (-1.0, 0.5)]:  # the base first: it records
        if lr:
            editor.apply(ff, lr)
        fast = [class_probabilities(word_probabilities(model, chunk, forward), words) for chunk in batches]
        fast_lms = language_modelling_score(model, neutral, gradiend.objective, forward)
        slow = [class_probabilities(word_probabilities(model, chunk), words) for chunk in batches]
        slow_lms = language_modelling_score(model, neutral, gradiend.objective)
        for got, want in zip(fast, slow):
            for c in CLASSES:
                torch.testing.assert_close(got[c], want[c], rtol=1e-5, atol=1e-7)
        assert fast_lms.lms == pytest.approx(slow_lms.lms, rel=1e-6)
        assert fast_lms.nll == pytest.approx(slow_lms.nll, rel=1e-5)
        editor.restore()
    assert not any("forward" in vars(m) for m in model.modules())  # no stub left behind


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "distilbert", "roberta"])
def test_batches_without_the_edited_embedding_rows_replay(kind):
    """A pruned adapter editing a few rows of the (tied) input embeddings and the upper layer: batches that look
    none of those rows up start at the upper layer, the others run in full; the numbers are plain forwards'."""
    model, gradiend, rows = pruned_to_rows(kind, "nurse")
    selected = gradiend.selected_parameters()
    names = gradiend.bottleneck.names
    forward = GridForward(model, [selected[n] for n in names], cut=gradiend.objective == "causal_lm",
                          edited=[gradiend.bottleneck.selected_indices(n) for n in names])
    assert forward.start == 1 and torch.equal(forward.plan.rows, rows.unique())
    grid_numbers_equal_plain_ones(model, gradiend, kind, forward)
    assert forward.records and forward.plain  # both kinds of batch occurred ("nurse" is in some rows only)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_dense_embedding_rows_or_a_module_below_the_layers_stop_the_replay(kind):
    model, gradiend = wrap(kind, "tied embeddings + upper layer")  # every embedding row edited
    assert GridForward(model, gradiend.selected_parameters().values(), cut=True).start == 0
    below = {"gpt2": r"transformer\.wpe\.", "llama": r"model\.embed_tokens\.", "bert": r"bert\.embeddings\.LayerNorm"}
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES,
                                                        target_parameters=[UPPER[kind], below[kind]]))
    forward = GridForward(model, gradiend.selected_parameters().values(), cut=gradiend.objective == "causal_lm")
    grid_numbers_equal_plain_ones(model, gradiend, kind, forward, batch_size=4)
    assert forward.start == 0 and not forward.records  # the recording pass saw the module run before the layers


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_modules_after_the_layers_leave_only_the_last_layer_to_run(kind):
    """The final norm (and BERT's MLM head transform) run after the layers: every pass recomputes only the last layer
    and what follows."""
    after = {"gpt2": r"transformer\.ln_f\.", "llama": r"model\.norm\.", "bert": r"cls\.predictions\.transform\."}
    model, _ = wrap(kind, "upper layer")
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES, target_parameters=[after[kind]]))
    forward = GridForward(model, gradiend.selected_parameters().values(), cut=gradiend.objective == "causal_lm")
    assert forward.start == len(forward.layers) - 1 and forward.plan.after
    grid_numbers_equal_plain_ones(model, gradiend, kind, forward, batch_size=4)
    assert forward.records and not forward.plain


def test_a_selected_module_that_runs_before_the_last_layer_is_not_replayed():
    """GPT-2's final norm also applied to the embedding output (a model we cannot know the insides of): the recording
    pass sees it run before the layers, so every batch runs in full and the numbers stay right."""
    model, _ = wrap("gpt2", "upper layer")
    config = GradiendConfig(feature_classes=CLASSES, target_parameters=[r"transformer\.ln_f\."])
    gradiend = get_gradiend_model(model, config)
    norm = model.transformer.ln_f
    model.transformer.wte.register_forward_hook(lambda module, args, output: norm(output))
    forward = GridForward(model, gradiend.selected_parameters().values(), cut=True)
    assert forward.start == len(forward.layers) - 1  # by the module structure
    grid_numbers_equal_plain_ones(model, gradiend, "gpt2", forward, batch_size=4)
    assert forward.start == 0 and not forward.records  # by what the recording pass saw
