"""Pre- and post-pruning against naive oracles: exact top-k, masked-full-adapter training, merge, save/load,
evaluation."""

import itertools

import pytest
import torch
from oracle import naive_gradients
from safetensors.torch import load_file
from tiny import tiny_model, tokenizer_for

import gradiend_hf.importance as importance_module
import gradiend_hf.pruning as pruning
import gradiend_hf.topk as topk
from gradiend_hf import (
    GradiendConfig,
    GradiendDataCollator,
    GradiendModel,
    evaluate_decoder,
    evaluate_encoder,
    get_gradiend_model,
)
from gradiend_hf.pruning import importance_batches, keep_count, post_prune, pre_prune, select_top
from gradiend_hf.sampling import TransitionBatchSampler
from gradiend_hf.selection import select_parameters
from gradiend_hf.serialization import WEIGHTS_NAME
from gradiend_hf.trainer import GradiendTrainer, GradiendTrainingArguments
from test_trainer import CONTEXTS as TRAINER_CONTEXTS, WORDS  # the same learnable feature

CLASSES = ["female", "male"]
CONTEXTS = TRAINER_CONTEXTS[:6]
SIGN = {"female": 1.0, "male": -1.0}


def feature_rows(contexts):
    out = []
    for context, (fc, ac) in itertools.product(contexts, [("female", "male"), ("male", "female")]):
        for i in range(2):
            out.append(dict(masked=context, factual=WORDS[fc][i], alternative=WORDS[ac][i], factual_class=fc,
                            alternative_class=ac))
    return out


def objective(kind):
    return "masked_lm" if kind in ("bert", "roberta", "distilbert", "albert") else "causal_lm"


def oracle_top(scores: dict, k: int) -> dict:
    """Naive global top-k: concatenate everything, stable descending sort (ties: parameter order, flat index)."""
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    chosen = torch.sort(flat, descending=True, stable=True).indices[:k]
    offsets = torch.tensor([0] + list(itertools.accumulate(scores[n].numel() for n in names)))
    out = {}
    for i, name in enumerate(names):
        mine = chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i]
        if mine.numel():
            out[name] = mine.sort().values
    return out


def as_indices(kept: dict, scores: dict) -> dict:
    """select_top's result with None (parameter kept whole) spelled out."""
    return {n: (torch.arange(scores[n].numel()) if v is None else v) for n, v in kept.items()}


def base_indices(model: GradiendModel) -> dict:
    b = model.bottleneck
    return {n: (torch.arange(b.shapes[n].numel()) if b.indices[n] is None else b.indices[n]) for n in b.names}


def same_indices(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


def randomise(model: GradiendModel, seed=0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.bottleneck.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


# --- exact top-k --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_select_top_equals_a_naive_full_vector_top_k_including_ties(monkeypatch, chunk):
    monkeypatch.setattr(topk, "CHUNK", chunk)
    generator = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.randint(0, 5, (6, 5), generator=generator).float() / 4,  # many exact ties
        "b": torch.zeros(13),
        "c": torch.rand(40, generator=generator),
        "d": torch.full((3, 3), 0.5),
        "e": torch.rand(60, generator=generator) * 10.0 ** torch.randint(-40, 30, (60,), generator=generator).float(),
    }
    total = sum(s.numel() for s in scores.values())
    for keep in [1, 2, 7, 30, 31, 45, 90, total, 0.01, 0.1, 0.25, 0.5, 0.999, 1.0]:
        kept, info = select_top(scores, keep)
        k = keep_count(keep, total)
        assert info["kept"] == k and info["total"] == total
        assert same_indices(as_indices(kept, scores), oracle_top(scores, k)), keep
        assert all(v is None or v.numel() < scores[n].numel() for n, v in kept.items())
    for threshold in [0.0, 0.25, 0.5, 0.75, 0.9]:
        kept, info = select_top(scores, threshold=threshold)
        expected = {n: (s.reshape(-1) >= threshold).nonzero().squeeze(1) for n, s in scores.items()}
        assert same_indices(as_indices(kept, scores), {n: v for n, v in expected.items() if v.numel()}), threshold
    assert select_top(scores, 1.0)[0] == {n: None for n in scores}
    with pytest.raises(ValueError, match="keeps no entry"):
        select_top(scores, threshold=1e38)
    with pytest.raises(ValueError, match="exactly one"):
        select_top(scores, 0.1, threshold=0.1)
    for bad in [0, 0.0, 1.5, -3, True]:
        with pytest.raises((ValueError, TypeError)):
            keep_count(bad, total)


# --- pre-pruning --------------------------------------------------------------------------------------------------
def naive_importance(kind, data_kind, batches, names, aggregate):
    """|sum_b w_b g_b| with naive per-row gradients (oracle.py), w_b = rows_b / rows (times the label for 'label')."""
    model, tok = tiny_model(kind), tokenizer_for(kind)
    weights = [len(b) * (SIGN[b[0]["alternative_class" if data_kind == "alternative" else "factual_class"]]
                         if aggregate == "label" else 1.0) for b in batches]
    total = sum(abs(w) for w in weights)
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in names}
    for rows, w in zip(batches, weights):
        sides = {side: naive_gradients(model, tok, objective(kind), rows, side, names)
                 for side in ("factual", "alternative")}
        for n in names:
            g = sides["factual"][n] - sides["alternative"][n] if data_kind == "diff" else sides[data_kind][n]
            acc[n] += (g.abs() if aggregate == "abs" else g) * (w / total)
    return {n: acc[n].abs() for n in names}


@pytest.mark.parametrize(
    "kind, data_kind, aggregate",
    [("gpt2", "alternative", "mean"), ("bert", "diff", "mean"), ("llama", "factual", "label"), ("gpt2", "diff", "abs")]
)
def test_pre_pruning_selects_the_naive_top_k_of_the_mean_gradient(kind, data_kind, aggregate):
    data, tok = feature_rows(CONTEXTS), tokenizer_for(kind)
    batches = importance_batches(data, CLASSES, rows=12, batch_size=4, seed=3)
    assert [len(b) for b in batches] == [4, 4, 2, 2]  # stratified: 6 rows per transition, alternating
    assert all(len({(r["factual_class"], r["alternative_class"]) for r in b}) == 1 for b in batches)
    dense = get_gradiend_model(tiny_model(kind), GradiendConfig(feature_classes=CLASSES))
    names = dense.bottleneck.names
    naive = naive_importance(kind, data_kind, batches, names, aggregate)
    collate = GradiendDataCollator(tok, dense.objective, CLASSES)
    engine_scores = pruning.importance(tiny_model(kind), pruning.Selection(dense.bottleneck.shapes), batches, collate,
                                       data_kind, aggregate, CLASSES)
    for n in names:
        torch.testing.assert_close(engine_scores[n], naive[n], rtol=1e-4, atol=1e-7)
    total = sum(s.numel() for s in naive.values())
    nonzero = sum(int((s != 0).sum()) for s in naive.values())
    assert nonzero < total  # unused embedding rows: exact zeros, so keeping nonzero + 5 is decided by tie-breaking
    keeps = [0.01, 0.1, 37]
    if objective(kind) == "causal_lm":  # the padded masked-LM batch gives unused position embeddings ~1e-12, not 0
        assert all(torch.equal(engine_scores[n] == 0, naive[n] == 0) for n in names)
        keeps.append(nonzero + 5)
    for keep in keeps:
        model = pre_prune(tiny_model(kind), data, tok, keep, rows=12, batch_size=4, seed=3, kind=data_kind,
                          aggregate=aggregate, config=GradiendConfig(feature_classes=CLASSES))
        k = keep_count(keep, total)
        assert model.num_entries == k
        assert same_indices(base_indices(model), oracle_top(naive, k)), keep
        record = model.gradiend_config.pruning[-1]
        assert record["method"] == "pre" and record["kept"] == k and record["total"] == total and record["rows"] == 12
    # a threshold in a clear gap of the naive values (rounding differences must not decide it)
    ranked = torch.cat([s.reshape(-1) for s in naive.values()]).sort(descending=True).values[:80]
    i = int((ranked[10:-1] - ranked[11:]).argmax()) + 10
    cut = float(ranked[i] + ranked[i + 1]) / 2
    model = pre_prune(dense, data, tok, threshold=cut, rows=12, batch_size=4, seed=3, kind=data_kind,
                      aggregate=aggregate)
    expected = {n: (s.reshape(-1) >= cut).nonzero().squeeze(1) for n, s in naive.items()}
    assert same_indices(base_indices(model), {n: v for n, v in expected.items() if v.numel()})


def test_pre_pruning_keeps_one_accumulator_per_selected_entry_and_never_a_dense_adapter(monkeypatch):
    """Memory: pre-pruning a base model allocates one float32 accumulator per selected entry (the engine's per-kind
    gradient buffers stay unused) and builds only the pruned bottleneck."""
    engines, bottlenecks = [], []

    class Spy(pruning.ImportanceEngine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            engines.append(self)
            self.sizes = [(a.numel(), a.dtype) for a in self.accumulators.values()]

    original = pruning.GradiendModel.__init__

    def spy_model(self, *a, **k):
        original(self, *a, **k)
        bottlenecks.append(self.num_entries)

    monkeypatch.setattr(importance_module, "ImportanceEngine", Spy)
    monkeypatch.setattr(pruning.GradiendModel, "__init__", spy_model)
    base = tiny_model("llama")
    config = GradiendConfig(feature_classes=CLASSES, source="diff")
    selected = sum(p.numel() for n, p in base.named_parameters() if n.startswith("model."))
    model = pre_prune(base, feature_rows(CONTEXTS), tokenizer_for("llama"), 0.05, rows=8, batch_size=4, config=config)
    (engine,) = engines
    assert engine.buffers == {}
    assert sum(n for n, _ in engine.sizes) == selected and {d for _, d in engine.sizes} == {torch.float32}
    assert engine.accumulators == {}  # handed over to the selection, which dropped each once its indices were known
    assert bottlenecks == [model.num_entries] == [keep_count(0.05, selected)]


def test_pre_pruning_an_already_pruned_adapter_composes_indices():
    data, tok = feature_rows(CONTEXTS), tokenizer_for("gpt2")
    config = GradiendConfig(feature_classes=CLASSES)
    first = pre_prune(tiny_model("gpt2"), data, tok, 0.3, config=config)
    second = pre_prune(first, data, tok, 0.1, rows=8)
    assert second.num_entries == keep_count(0.1, first.num_entries)
    kept_first, kept_second = base_indices(first), base_indices(second)
    assert all(set(kept_second[n].tolist()) <= set(kept_first[n].tolist()) for n in kept_second)
    assert [r["method"] for r in second.gradiend_config.pruning] == ["pre", "pre"]


# --- training ------------------------------------------------------------------------------------------------------
def args(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path / "run"), disable_tqdm=True, seed=0, eval_strategy="no", save_strategy="no",
                load_best_model_at_end=False, logging_steps=50)
    base.update(overrides)
    return GradiendTrainingArguments(**base)


def test_a_config_with_pre_prune_allocates_no_dense_bottleneck_before_pre_pruning(tmp_path):
    """The dense bottleneck would be thrown away at training start: until pre-pruning, it is a shapes-only placeholder
    (meta tensors, no bytes), every use names the fix, and moving the model leaves it alone."""
    config = GradiendConfig(feature_classes=CLASSES, pre_prune=0.15, pre_prune_rows=8)
    dense = get_gradiend_model(tiny_model("gpt2"), GradiendConfig(feature_classes=CLASSES))
    model = get_gradiend_model(tiny_model("gpt2"), config)
    assert model.awaits_pre_pruning and not model.bottleneck.allocated
    assert all(p.is_meta for p in model.bottleneck.parameters())
    assert model.num_entries == dense.num_entries  # the shapes are known
    model.to("cpu")
    assert all(not p.is_meta for p in model.get_base_model().parameters())
    batch = GradiendDataCollator(tokenizer_for("gpt2"), "causal_lm", CLASSES)(feature_rows(CONTEXTS[:2]))
    for use in (lambda: model(**batch), lambda: model.save_pretrained(tmp_path / "a"), lambda: model.merge_and_unload(
            feature_factor=1.0, learning_rate=0.1), lambda: model.decode(1.0)):
        with pytest.raises(RuntimeError, match="pre_prune=0.15.*GradiendTrainer"):
            use()
    GradiendTrainer(model=model, args=args(tmp_path, max_steps=1, per_device_train_batch_size=2),
                    train_dataset=feature_rows(CONTEXTS[:4]), processing_class=tokenizer_for("gpt2"))
    assert not model.awaits_pre_pruning and model.bottleneck.allocated
    assert model.num_entries == keep_count(0.15, dense.num_entries)


def test_training_a_pre_pruned_adapter_equals_a_full_adapter_with_masked_input(tmp_path):
    """GradiendTrainer with config.pre_prune == hand-written dense auto-encoder on naive FULL gradients, whose input and
    target are masked to the kept entries (MSE over the kept entries), with AdamW from the same initial values."""
    steps, lr, tok = 3, 1e-3, tokenizer_for("gpt2")
    config = GradiendConfig(feature_classes=CLASSES, pre_prune=0.15, pre_prune_rows=8)
    model = get_gradiend_model(tiny_model("gpt2"), config)
    dense_entries = model.num_entries
    trainer = GradiendTrainer(model=model,
                              args=args(tmp_path, max_steps=steps, learning_rate=lr, per_device_train_batch_size=2),
                              train_dataset=feature_rows(CONTEXTS[:4]), processing_class=tok)
    assert trainer.gradiend_model is model  # pruned in place: the caller's reference is the trained model
    assert model.num_entries == keep_count(0.15, dense_entries)
    b = model.bottleneck
    names, kept = b.names, base_indices(model)
    shapes = {n: b.shapes[n] for n in names}
    # the same selection as a direct call with the trainer's settings
    again = pre_prune(tiny_model("gpt2"), feature_rows(CONTEXTS[:4]), tok, 0.15, rows=8, batch_size=2, seed=0,
                      config=GradiendConfig(feature_classes=CLASSES))
    assert same_indices(base_indices(again), kept)

    def dense(get):  # a dense flat vector: the pruned tensor's values at the kept entries, zeros elsewhere
        return torch.cat([torch.zeros(shapes[n].numel()).index_copy(0, kept[n], get(n).detach().reshape(-1))
                          for n in names])

    mask = dense(lambda n: torch.ones(kept[n].numel()))
    w_e = dense(lambda n: b.encoder(n)).requires_grad_()
    w_d = dense(lambda n: b.decoder(n)).requires_grad_()
    b_d = dense(lambda n: b.offset(n)).requires_grad_()
    b_e = b.encoder_bias.detach().clone().requires_grad_()
    optimizer = torch.optim.AdamW([w_e, b_e, w_d, b_d], lr=lr, weight_decay=0.01)
    sampler = TransitionBatchSampler.from_dataset(trainer.train_dataset, batch_size=2, seed=0)
    row_batches = [[trainer.train_dataset[i] for i in batch] for batch in sampler.batches()[:steps]]
    for expected, got in zip(row_batches, trainer.get_train_dataloader()):  # the trainer sees the same batches
        assert all(torch.equal(v, got[k]) for k, v in trainer.data_collator(expected).items())
    oracle_model = tiny_model("gpt2")
    for rows in row_batches:
        grads = {side: naive_gradients(oracle_model, tok, "causal_lm", rows, side, names)
                 for side in ("factual", "alternative")}
        full = lambda f: torch.cat([f(n).reshape(-1) for n in names])
        s = full(lambda n: grads["alternative"][n]) * mask
        t = full(lambda n: grads["factual"][n] - grads["alternative"][n]) * mask
        h = torch.tanh(w_e @ s + b_e)
        loss = (((w_d * h + b_d - t) ** 2) * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trainer.train()
    on_kept = lambda v: v.detach()[mask.bool()]
    flat = lambda get: torch.cat([get(n).detach().reshape(-1) for n in names])
    torch.testing.assert_close(flat(b.encoder), on_kept(w_e), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat(b.decoder), on_kept(w_d), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flat(b.offset), on_kept(b_d), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.encoder_bias.detach(), b_e.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(flat(b.encoder), on_kept(dense(lambda n: again.bottleneck.encoder(n))))  # it did train


def test_trainer_post_prunes_at_the_end_and_saves_indices(tmp_path):
    config = GradiendConfig(feature_classes=CLASSES, pre_prune=0.5, post_prune=40, post_prune_by="decoder_sum")
    model = get_gradiend_model(tiny_model("bert"), config)
    trainer = GradiendTrainer(model=model, args=args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2,
                                                     save_strategy="steps", save_steps=2, load_best_model_at_end=True,
                                                     learning_rate=1e-2, per_device_train_batch_size=2),
                              train_dataset=feature_rows(CONTEXTS[:4]), eval_dataset=feature_rows(CONTEXTS[4:]),
                              processing_class=tokenizer_for("bert"))
    pre_kept = base_indices(model)
    trainer.train()  # the checkpoints are pre-pruned; the best one loads onto the pre-pruned model, then post-pruning
    assert model.num_entries == 40
    assert [r["method"] for r in model.gradiend_config.pruning] == ["pre", "post"]
    post_kept = base_indices(model)
    assert all(set(post_kept[n].tolist()) <= set(pre_kept[n].tolist()) for n in post_kept)
    trainer.save_model(str(tmp_path / "final"))
    keys = load_file(tmp_path / "final" / WEIGHTS_NAME)
    assert sum(k.count("gradiend_index") for k in keys) == len(post_kept)
    loaded = GradiendModel.from_pretrained(tiny_model("bert"), tmp_path / "final")
    assert (same_indices(base_indices(loaded), post_kept)
            and loaded.gradiend_config.pruning == model.gradiend_config.pruning)
    # a trainer given the loaded (already pruned) model prunes nothing again
    GradiendTrainer(model=loaded, args=args(tmp_path), train_dataset=feature_rows(CONTEXTS[:4]),
                    processing_class=tokenizer_for("bert"))
    assert same_indices(base_indices(loaded), post_kept)
    # checkpoints of another pruning do not load silently
    with pytest.raises(ValueError, match="pruning differs|other parameters"):
        model.load_adapter_weights(tmp_path / "run" / "checkpoint-2")


# --- sparse adapters everywhere: merge, save/load, evaluation ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_pruned_merge_equals_the_dense_merge_on_kept_entries_and_base_elsewhere(kind):
    data, tok = feature_rows(CONTEXTS), tokenizer_for(kind)
    config = GradiendConfig(feature_classes=CLASSES)
    pruned = pre_prune(tiny_model(kind), data, tok, 0.2, config=config)
    randomise(pruned)
    dense = get_gradiend_model(tiny_model(kind), config)
    b, d = pruned.bottleneck, dense.bottleneck
    with torch.no_grad():  # the dense adapter: the pruned values at the kept entries, zeros elsewhere
        for n in d.names:
            for get in (d.encoder, d.decoder):
                get(n).zero_()
            d.offset(n).zero_()
        for n in b.names:
            d.decoder(n).copy_(b.to_full(n, b.decoder(n)[0]).unsqueeze(0))
            d.offset(n).copy_(b.to_full(n, b.offset(n)))
    original = {n: p.detach().clone() for n, p in tiny_model(kind).named_parameters()}
    kept = base_indices(pruned)
    ff, lr = 0.7, 3.0
    merged_pruned = dict(pruned.merge_and_unload(feature_factor=ff, learning_rate=lr).named_parameters())
    merged_dense = dict(dense.merge_and_unload(feature_factor=ff, learning_rate=lr).named_parameters())
    for name, before in original.items():
        p, q = merged_pruned[name].detach().reshape(-1), merged_dense[name].detach().reshape(-1)
        if name in kept:
            idx = kept[name]
            assert torch.equal(p[idx], q[idx]) and not torch.equal(p[idx], before.reshape(-1)[idx]), name
            rest = torch.ones(p.numel(), dtype=torch.bool)
            rest[idx] = False
            assert torch.equal(p[rest], before.reshape(-1)[rest]), name
        else:
            assert torch.equal(p, before.reshape(-1)), name


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_save_load_round_trip_of_a_pruned_adapter_is_exact(tmp_path, kind):
    data, tok = feature_rows(CONTEXTS), tokenizer_for(kind)
    model = pre_prune(tiny_model(kind), data, tok, 0.1, config=GradiendConfig(feature_classes=CLASSES))
    randomise(model)
    model.save_pretrained(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / WEIGHTS_NAME)
    index_keys = [k for k in tensors if "gradiend_index" in k]
    assert len(index_keys) == sum(v is not None for v in model.bottleneck.indices.values()) > 0
    assert all(tensors[k].dtype == torch.int64 for k in index_keys)
    loaded = GradiendModel.from_pretrained(tiny_model(kind), tmp_path / "a")
    assert same_indices(base_indices(loaded), base_indices(model))
    batch = GradiendDataCollator(tok, model.objective, CLASSES)(data[:4])
    assert torch.equal(loaded.encode_rows(batch), model.encode_rows(batch))
    assert torch.equal(loaded.encode(batch), model.encode(batch))
    assert all(torch.equal(v, model.decode(0.5)[n]) for n, v in loaded.decode(0.5).items())
    assert loaded.gradiend_config.pruning == model.gradiend_config.pruning


def test_encoder_and_decoder_evaluation_run_on_a_pruned_adapter():
    data, tok = feature_rows(CONTEXTS), tokenizer_for("gpt2")
    model = pre_prune(tiny_model("gpt2"), data, tok, 0.05, config=GradiendConfig(feature_classes=CLASSES))
    randomise(model)
    enc = evaluate_encoder(model, data, tok, neutral=4, progress=False)
    assert len(enc.frame) == len(data) + 4 and enc.frame["h"].abs().max() > 0
    batch = GradiendDataCollator(tok, model.objective, CLASSES)(data[:3])
    per_row = torch.stack([model.encode(GradiendDataCollator(tok, model.objective, CLASSES)([r])) for r in data[:3]])
    torch.testing.assert_close(model.encode_rows(batch), per_row, rtol=1e-4, atol=1e-6)
    before = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    dec = evaluate_decoder(model, data, tok, neutral_texts=["the nurse went home", "the results were good"],
                           learning_rates=[0.1, 1.0], progress=False)
    assert len(dec.grid) == 1 + 3 * 2 and dec.grid["p_female"].nunique() > 1  # the sparse edits change predictions
    assert dec.best("balance").learning_rate is not None
    assert all(torch.equal(p, before[n]) for n, p in model.base_model.named_parameters())


# --- post-pruning -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("latent_dim", [1, 2])
@pytest.mark.parametrize("by", pruning.POST_CRITERIA)
def test_post_pruning_keeps_exactly_the_top_k_by_each_criterion(by, latent_dim):
    data, tok = feature_rows(CONTEXTS), tokenizer_for("llama")
    model = pre_prune(tiny_model("llama"), data, tok, 0.3,
                      config=GradiendConfig(feature_classes=CLASSES, latent_dim=latent_dim))
    randomise(model, seed=latent_dim)
    b = model.bottleneck
    with torch.no_grad():  # ties across parameters: decided by (parameter order, flat index)
        for n in b.names[:3]:
            for get in (b.encoder, b.decoder, b.offset):
                get(n)[..., :4] = 0.25
    d = latent_dim
    naive = {}
    for n in b.names:
        w_e, w_d, b_d = (t.detach().reshape(-1) for t in (b.encoder(n), b.decoder(n), b.offset(n)))
        w_e, w_d = w_e.reshape(d, -1), w_d.reshape(d, -1)
        naive[n] = {"decoder": w_d.abs().sum(0), "encoder": w_e.abs().sum(0), "decoder_bias": b_d.abs(),
                    "decoder_sum": (w_d.sum(0) + b_d).abs()}[by]
    old_kept = base_indices(model)
    for keep in [0.1, 25, 0.5]:
        pruned = post_prune(model, keep, by=by)
        k = keep_count(keep, model.num_entries)
        positions = oracle_top(naive, k)
        assert same_indices(base_indices(pruned), {n: old_kept[n][pos] for n, pos in positions.items()}), keep
        nb = pruned.bottleneck
        for n, pos in positions.items():
            assert torch.equal(nb.encoder(n).detach(), b.encoder(n).detach()[:, pos])
            assert torch.equal(nb.decoder(n).detach(), b.decoder(n).detach()[:, pos])
            assert torch.equal(nb.offset(n).detach(), b.offset(n).detach()[pos])
        assert torch.equal(nb.encoder_bias, b.encoder_bias)
        record = {k: v for k, v in pruned.gradiend_config.pruning[-1].items()
                  if k not in ("cutoff", "target_parameters_before")}
        assert record == {"method": "post", "keep": keep, "threshold": None, "by": by, "kept": k,
                          "total": model.num_entries}
    # every entry kept: the same adapter, values and indices
    same = post_prune(model, 1.0, by=by)
    assert same_indices(base_indices(same), old_kept)


def test_post_pruning_in_place_and_a_dense_parameter_kept_whole():
    model = get_gradiend_model(tiny_model("gpt2"),
                               GradiendConfig(feature_classes=CLASSES, target_parameters=[r"h\.0\.ln_1"]))
    randomise(model)
    with torch.no_grad():
        model.bottleneck.decoder("transformer.h.0.ln_1.weight").add_(10.0)  # this parameter beats all others
    n_weight = model.bottleneck.shapes["transformer.h.0.ln_1.weight"].numel()
    same = post_prune(model, n_weight, inplace=True)
    assert same is model and model.bottleneck.names == ["transformer.h.0.ln_1.weight"]
    assert model.bottleneck.indices["transformer.h.0.ln_1.weight"] is None  # kept whole: stays dense


def test_config_validates_the_pruning_fields():
    config = GradiendConfig(feature_classes=CLASSES, pre_prune=0.01, post_prune=1000, post_prune_by="encoder")
    again = GradiendConfig.from_dict(config.to_dict())
    assert again.pre_prune == 0.01 and again.post_prune == 1000 and isinstance(again.post_prune, int)
    for bad, message in [(dict(pre_prune=0.0), "pre_prune"), (dict(pre_prune=1.5), "pre_prune"),
                         (dict(post_prune=0), "post_prune"), (dict(post_prune=True), "post_prune"),
                         (dict(post_prune_by="weights"), "post_prune_by"), (dict(pre_prune_rows=0), "pre_prune_rows")]:
        with pytest.raises(ValueError, match=message):
            GradiendConfig(feature_classes=CLASSES, **bad)
    assert "pre_prune" in GradiendConfig.help() and "post_prune_by" in GradiendConfig.help()


def test_a_pre_pruned_adapter_with_pruning_fields_loads_through_peft_and_merges_the_same(tmp_path):
    from peft import PeftModel

    data, tok = feature_rows(CONTEXTS), tokenizer_for("llama")
    config = GradiendConfig(feature_classes=CLASSES, pre_prune=0.1, post_prune=0.5, feature_factor=1.0,
                            learning_rate=0.3)
    model = pre_prune(tiny_model("llama"), data, tok, 0.1, config=config)
    randomise(model)
    model = post_prune(model, 0.5)
    assert len(model.bottleneck.names) < len(select_parameters(model.base_model, None, None))  # some were dropped
    assert model.gradiend_config.pruning[0]["target_parameters_before"] is None
    assert select_parameters(tiny_model("llama"), model.gradiend_config.target_parameters) == model.bottleneck.names
    model.save_pretrained(tmp_path / "a")
    inputs = tok(["the nurse said that she was in her room", "he said the results were bad"], return_tensors="pt",
                 padding=True)
    with torch.no_grad():
        expected = (GradiendModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
                    .merge_and_unload()(**inputs).logits)
        peft_model = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
        assert torch.equal(peft_model(**inputs).logits, expected)
        assert not torch.equal(tiny_model("llama")(**inputs).logits, expected)
