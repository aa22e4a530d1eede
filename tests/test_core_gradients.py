"""The gradient engine against naive per-row computations (oracle.py)."""

import pytest
import torch
from oracle import naive_gradients, row_nll
from tiny import CAUSAL, MASKED, rows, tiny_model, tokenizer_for

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model
from gradiend_hf.forward_mode import kept_tokens, lane_assignment, pack_rows
from gradiend_hf.gradients import side_inputs
from gradiend_hf.objective import row_losses

CLASSES = ["female", "male"]
SIDES = ("factual", "alternative")


def wrap(kind, **config):
    model = tiny_model(kind)
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES, **config))
    collator = GradiendDataCollator(tokenizer_for(kind), gradiend.objective, CLASSES)
    return model, gradiend, collator


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_gradients_close(got: dict, expected: dict, tolerance: float = 1e-5) -> None:
    """Relative error of the whole gradient <= tolerance, and per tensor relative to the whole gradient's norm
    (some entries, such as attention key biases, have an exactly zero gradient up to rounding)."""
    names = list(expected)
    flat_got = torch.cat([got[n].reshape(-1) for n in names])
    flat_expected = torch.cat([expected[n].reshape(-1) for n in names])
    assert relative_error(flat_got, flat_expected) <= tolerance
    scale = float(flat_expected.norm())
    for n in names:
        assert float((got[n] - expected[n]).norm()) <= tolerance * scale, n


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta", "albert", "gpt2", "llama"])
@pytest.mark.parametrize("subset", ["single", "multi"])
def test_engine_gradients_equal_naive_per_row_backward(kind, subset):
    model, gradiend, collator = wrap(kind)
    data = rows()[:2] if subset == "single" else rows()
    tokenizer = tokenizer_for(kind)
    if subset == "multi":  # the data really holds words of several tokens
        assert any(len(tokenizer(" " + r["alternative"], add_special_tokens=False)["input_ids"]) > 1 for r in data)
    batch = collator(data)
    grads = gradiend.engine.compute(batch, ("factual", "alternative", "diff"))
    names = gradiend.bottleneck.names
    expected = {side: naive_gradients(model, tokenizer, gradiend.objective, data, side, names)
                for side in ("factual", "alternative")}
    for side in ("factual", "alternative"):
        assert_gradients_close(grads[side], expected[side])
    assert_gradients_close(grads["diff"], {n: expected["factual"][n] - expected["alternative"][n] for n in names})


@pytest.mark.parametrize("kinds", [("diff",), ("alternative", "diff"), ("factual", "diff"), ("alternative",)])
def test_every_gradient_plan_gives_the_same_gradients(kinds):
    _, gradiend, collator = wrap("gpt2")
    batch = collator(rows())
    reference = {k: {n: t.clone() for n, t in v.items()}
                 for k, v in gradiend.engine.compute(batch, ("factual", "alternative", "diff")).items()}
    got = gradiend.engine.compute(batch, kinds)
    for kind in kinds:
        assert_gradients_close(got[kind], reference[kind])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_differentiated_loss_is_minus_log_p_of_the_word(kind):
    """The loss on the collated (padded, shifted) batch equals -log p(target | context) computed by hand."""
    model, gradiend, collator = wrap(kind)
    data = rows()
    batch = collator(data)
    with torch.no_grad():
        for side in ("factual", "alternative"):
            logits = model(**side_inputs(batch, side)).logits
            got = row_losses(logits, batch[f"{side}_labels"])
            expected = torch.stack([row_nll(model, tokenizer_for(kind), gradiend.objective, r["masked"], r[side])
                                    for r in data])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_causal_labels_sit_on_the_position_that_predicts_the_word():
    """Off-by-one guard: the label of the first word token sits on the last context token, not on the word."""
    _, gradiend, collator = wrap("gpt2")
    tokenizer = tokenizer_for("gpt2")
    batch = collator([dict(masked="the nurse said that [MASK] was", factual="he", alternative="she",
                           factual_class="male", alternative_class="female")])
    context = tokenizer("the nurse said that")["input_ids"]
    he = tokenizer(" he", add_special_tokens=False)["input_ids"]
    assert len(he) == 1
    assert batch["factual_input_ids"][0].tolist() == context  # the word itself is not an input
    labels = batch["factual_labels"][0].tolist()
    assert labels[len(context) - 1] == he[0]
    assert all(l == -100 for i, l in enumerate(labels) if i != len(context) - 1)


def test_masked_lm_shares_one_forward_when_words_have_equal_length(monkeypatch):
    _, gradiend, collator = wrap("bert")
    batch = collator(rows()[:2])
    calls = []
    original = gradiend.engine._forward
    monkeypatch.setattr(gradiend.engine, "_forward", lambda inputs: calls.append(1) or original(inputs))
    gradiend.engine.compute(batch, ("alternative", "diff"))
    assert len(calls) == 1
    calls.clear()
    gradiend.engine.compute(collator(rows()), ("alternative", "diff"))  # 'zyxwv' has more pieces than 'she'
    assert len(calls) == 2


def test_hooks_free_the_base_gradients_and_restore_flags():
    model, gradiend, collator = wrap("llama")
    gradiend.engine.compute(collator(rows()), ("alternative", "diff"))
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters()
               if getattr(p, "_post_accumulate_grad_hooks", None))


@pytest.mark.parametrize("kind", MASKED + CAUSAL)
@pytest.mark.parametrize("source", ["alternative", "factual", "diff"])
def test_jvp_row_encodings_equal_per_row_backward_encodings(kind, source):
    # identity activation: compare the linear read-outs themselves (tanh would hide errors where it saturates)
    _, gradiend, collator = wrap(kind, source=source, encoder_activation="identity")
    data = rows()
    rows_h = gradiend.encode_rows(collator(data))
    single = torch.stack([gradiend.encode(collator([r])) for r in data])
    assert rows_h.shape == (len(data), 1)
    torch.testing.assert_close(rows_h, single, rtol=1e-4, atol=1e-6)


def test_jvp_handles_several_latent_units():
    _, gradiend, collator = wrap("gpt2", latent_dim=3)
    data = rows()
    rows_h = gradiend.encode_rows(collator(data))
    single = torch.stack([gradiend.encode(collator([r])) for r in data])
    assert rows_h.shape == (4, 3)
    torch.testing.assert_close(rows_h, single, rtol=1e-4, atol=1e-7)


# --- the fast forward-mode path (packed rows, LM head at scored positions, causal cut) against oracles ----------------
TIED_EMBEDDINGS = {"bert": "word_embeddings", "distilbert": "word_embeddings", "albert": "word_embeddings",
                   "gpt2": "wte", "llama-tied": "embed_tokens"}


def tiny_any(kind):
    """tiny_model, plus 'llama-tied': a Llama whose LM head is its input embedding and whose pad id (0) is also BOS, so
    real inputs hold the embedding's padding_idx row (no gradient through the lookup, but one through the head)."""
    if kind != "llama-tied":
        return tiny_model(kind)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer_for("llama")), hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=24, num_key_value_heads=1, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def varied_rows():
    """rows() plus rows of very different lengths (one with no left context), so that packed lanes hold several rows."""
    extra = [
        ("[MASK] was good", "she", "he"),
        ("the nurse and the doctor said that the results were good and that [MASK] went home", "she", "he"),
        ("the doctor said that [MASK] was in the room and it was bad", "qrstu", "he"),
    ]
    return rows() + [dict(masked=m, factual=f, alternative=a, factual_class="female", alternative_class="male")
                     for m, f, a in extra]


def oracle_read_outs(model, kind, gradiend, data, source):
    """<W_e, gradient of row i's source loss> + b_e per row, with the gradient from oracle.naive_gradients (one row at a
    time, tokenised from the whole text, plain autograd; a tied head's gradient included)."""
    tokenizer, names = tokenizer_for(kind.replace("-tied", "")), gradiend.bottleneck.names
    out = []
    for row in data:
        sides = {side: naive_gradients(model, tokenizer, gradiend.objective, [row], side, names)
                 for side in SIDES_OF[source]}
        grad = sides[source] if source != "diff" else {n: sides["factual"][n] - sides["alternative"][n] for n in names}
        out.append(sum((gradiend.bottleneck.encoder(n)[0] * grad[n]).sum() for n in names)
                   + gradiend.bottleneck.encoder_bias[0])
    return torch.stack(out).detach()


SIDES_OF = {"alternative": ("alternative",), "factual": ("factual",), "diff": ("factual", "alternative")}


@pytest.mark.parametrize("kind", list(TIED_EMBEDDINGS))
@pytest.mark.parametrize("selection", ["default", "tied embedding + layer 1", "layer 0"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_fast_jvp_read_outs_equal_the_naive_oracle(kind, selection, layout):
    model = tiny_any(kind)
    patterns = {"default": None, "layer 0": [r"(layer|layers|h)\.0\."],  # later layers: constant weights, dual inputs
                "tied embedding + layer 1": [TIED_EMBEDDINGS[kind], r"(layer|layers|h)\.1\."]}[selection]
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES, target_parameters=patterns,
                                                        encoder_activation="identity", source="diff"))
    if selection.startswith("tied"):  # the tied embedding is selected, and with it the LM head's weight
        head = model.get_output_embeddings().weight
        assert any(gradiend.engine.params[n] is head for n in gradiend.bottleneck.names)
    if layout == "padded":
        gradiend.engine.packing = False
    collator = GradiendDataCollator(tokenizer_for(kind.replace("-tied", "")), gradiend.objective, CLASSES)
    data = varied_rows()
    got = gradiend.encode_rows(collator(data))[:, 0]
    assert gradiend.engine.packing == (layout == "packed")  # every tiny model but RoBERTa packs (see below)
    expected = oracle_read_outs(model, kind, gradiend, data, "diff")
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_unselected_linear_layers_get_the_constant_weight_rule_and_their_own_forward_back(kind, monkeypatch):
    from gradiend_hf import forward_mode

    model, gradiend, collator = wrap(kind, target_parameters=[r"(layers|h)\.0\."], encoder_activation="identity")
    calls, apply = [], forward_mode._RuledLinear.apply
    monkeypatch.setattr(forward_mode._RuledLinear, "apply",
                        lambda x, bias, anchor, rule: calls.append(rule.module) or apply(x, bias, anchor, rule))
    got = gradiend.encode_rows(collator(rows()))
    selected = {id(p) for p in gradiend.engine.params.values()}
    assert calls and all(not any(id(p) in selected for p in m.parameters()) for m in calls)
    assert model.get_output_embeddings() in calls  # the LM head
    assert not any("forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(got, torch.stack([gradiend.encode(collator([r])) for r in rows()]), rtol=1e-4, atol=1e-6)


ONE_WEIGHT = {"gpt2": r"h\.0\.attn\.c_attn\.weight", "llama": r"layers\.0\.self_attn\.q_proj\.weight",
              "bert": r"layer\.0\.attention\.self\.query\.weight"}


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("selection", ["default", "one weight"])
def test_pruned_adapters_take_sparse_weight_tangents_and_equal_the_naive_oracle(kind, selection, monkeypatch):
    """A pruned adapter's linear weights go in as sparse tangents (below 10% kept); 'one weight' reads the first
    layer's query weight only, whose input carries no tangent (only the sparse term is left)."""
    from gradiend_hf import gradients
    from gradiend_hf.pruning import pre_prune

    model, tokenizer = tiny_model(kind), tokenizer_for(kind)
    config = GradiendConfig(feature_classes=CLASSES, encoder_activation="identity", source="diff",
                            target_parameters=None if selection == "default" else [ONE_WEIGHT[kind]])
    keep = 0.1 if selection == "default" else 0.05  # default: some linear weights kept sparsely, some densely
    gradiend = pre_prune(model, varied_rows(), tokenizer, keep, config=config)
    b = gradiend.bottleneck
    made, make = [], gradients.sparse_weight_tangent
    monkeypatch.setattr(gradients, "sparse_weight_tangent", lambda *a: made.append(a[2]) or make(*a))
    got = gradiend.encode_rows(GradiendDataCollator(tokenizer, gradiend.objective, CLASSES)(varied_rows()))[:, 0]
    assert made and len(made) == sum(n in gradiend.engine.linear_weights
                                     and b.indices[n].numel() <= 0.1 * b.shapes[n].numel()
                                     for n in b.names)
    expected = []
    for row in varied_rows():
        grads = {side: naive_gradients(model, tokenizer, gradiend.objective, [row], side, b.names) for side in SIDES}
        expected.append(sum((b.encoder(n)[0] * b.entries(n, grads["factual"][n] - grads["alternative"][n])).sum()
                            for n in b.names) + b.encoder_bias[0])
    expected = torch.stack(expected).detach()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))


def test_lm_head_projects_only_the_scored_positions():
    model, gradiend, collator = wrap("bert")
    batch = collator(rows())
    gradiend.encode_rows(batch)  # the first call also checks once whether rows can be packed for this model
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(tuple(out.shape[:2])))
    try:
        gradiend.encode_rows(batch)
    finally:
        handle.remove()
    assert [shape[0] for shape in seen] == [1] * len(seen)  # gathered into one (1, positions) row
    assert sum(shape[1] for shape in seen) == int((batch["alternative_labels"] != -100).sum())  # source: alternative


def test_a_head_called_twice_in_one_pass_gets_every_position():
    """Gathering the scored positions is only exact when the head runs once, on the last states."""
    from gradiend_hf.forward_mode import logits_at

    head = torch.nn.Linear(4, 3)
    states = torch.randn(2, 5, 4)
    positions = torch.zeros(2, 5, dtype=torch.bool)
    positions[0, 1] = positions[1, 3] = True
    once = lambda inputs: head(states)
    twice = lambda inputs: head(states) + head(2 * states)  # e.g. a second prediction head sharing the weights
    logits, gathers = logits_at(once, head, {}, positions)
    assert gathers and torch.allclose(logits, head(states)[positions])
    logits, gathers = logits_at(twice, head, {}, positions)
    assert not gathers and torch.allclose(logits, twice({})[positions])


def test_a_head_that_needs_every_position_falls_back_to_the_full_head():
    model, gradiend, collator = wrap("gpt2", encoder_activation="identity")
    data = rows()
    expected = torch.stack([gradiend.encode(collator([r])) for r in data])
    shapes = {}
    model.register_forward_pre_hook(lambda module, args, kwargs: shapes.update(s=kwargs["input_ids"].shape),
                                    with_kwargs=True)
    model.lm_head.register_forward_hook(lambda module, args, out: out.reshape(*shapes["s"], -1))  # shape-bound
    got = gradiend.encode_rows(collator(data))
    assert not gradiend.engine.gathers
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_columns_after_the_last_scored_position_are_cut_for_causal_lms_only(kind):
    """Extra real tokens after a causal row's scored position cannot change its loss (they are cut); a masked LM's right
    context must stay."""
    model, gradiend, collator = wrap(kind, encoder_activation="identity")
    data = rows()
    batch = collator(data)
    longer = {k: v.clone() for k, v in batch.items()}
    for side in ("factual", "alternative"):
        n = longer[f"{side}_input_ids"].shape[0]
        longer[f"{side}_input_ids"] = torch.cat([longer[f"{side}_input_ids"], torch.full((n, 3), 7)], dim=1)
        longer[f"{side}_attention_mask"] = torch.cat(
            [longer[f"{side}_attention_mask"], torch.ones(n, 3, dtype=torch.long)], dim=1)
        longer[f"{side}_labels"] = torch.cat([longer[f"{side}_labels"], torch.full((n, 3), -100)], dim=1)
    same = torch.allclose(gradiend.encode_rows(longer), gradiend.encode_rows(batch), rtol=1e-5, atol=1e-7)
    assert same == (kind in CAUSAL)


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_rows_are_packed_only_where_packed_rows_give_the_padded_losses(kind):
    """RoBERTa derives position ids from the padding (they start at padding_idx + 1): packed rows with positions from 0
    would change its losses, so the engine's one-time check keeps it on the padded batch; its encodings stay exact."""
    model, gradiend, collator = wrap(kind, encoder_activation="identity")
    data = varied_rows()
    got = gradiend.encode_rows(collator(data))
    assert gradiend.engine.packing == (kind != "roberta")
    expected = torch.stack([gradiend.encode(collator([r])) for r in data])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("data", ["varied", "similar", "identical"])
def test_a_model_ignoring_the_packed_mask_is_not_packed(data):
    """A model that drops the 4D attention mask and the position ids: packed rows would see each other. (Dropping the
    mask alone is not enough since transformers 5.25, which rebuilds the block mask from position ids that restart.)"""
    model, gradiend, collator = wrap("bert", encoder_activation="identity")
    with torch.no_grad():  # sharper attention than at random init, so that what a token attends to matters
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(30)
    forward = model.forward
    model.forward = lambda **kw: forward(**{k: v for k, v in kw.items() if k not in ("attention_mask", "position_ids")})
    texts = {"varied": [r["masked"] for r in varied_rows()],
             "similar": ["the nurse said that [MASK] was good", "the doctor said that [MASK] was bad"] * 2,
             "identical": ["the nurse said that [MASK] was good"] * 4}[data]
    data_rows = [dict(rows()[0], masked=text) for text in texts]
    got = gradiend.encode_rows(collator(data_rows))
    # identical rows cannot show an ignored mask (they attend to copies of themselves): undecided, the batch runs padded
    assert gradiend.engine.packing is (None if data == "identical" else False)
    if data == "identical":
        torch.testing.assert_close(got, gradiend.encode(collator(data_rows[:1])).expand(4, 1), rtol=1e-4, atol=1e-6)


def test_lanes_take_whole_rows_with_the_fewest_padded_tokens():
    assert lane_assignment([3, 7, 2, 5, 4], capacity=8) == [[1], [3, 2], [4, 0]]  # 21 tokens: 3 lanes of 7, no filler
    assert lane_assignment([12, 2], capacity=8) == [[0], [1]]  # a row longer than the capacity: the lane is wider
    assert lane_assignment([2, 2, 2], capacity=64) == [[0], [1], [2]]  # as few tokens as one lane, narrower
    assert lane_assignment([6, 5, 5, 4], capacity=10) == [[0, 3], [1, 2]]  # 2 x 10, not 3 lanes of 6 (18 + filler)
    assert lane_assignment([], capacity=8) == []
    # rows longer on average than a lane: one lane each (this returned [] and crashed real-length text)
    assert lane_assignment([250, 260]) == [[1], [0]]
    assert lane_assignment([300, 20, 200], capacity=128) == [[0], [2], [1]]


@pytest.mark.parametrize("causal", [False, True])
def test_packed_rows_are_blocks_of_their_own_with_positions_from_zero(causal):
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    attention = (ids != 0).long()
    labels = torch.full_like(ids, -100)
    labels[0, 1], labels[1, 0], labels[2, 2] = 11, 12, 13
    keep = kept_tokens(attention, [labels], causal)
    assert keep.sum(1).tolist() == ([2, 1, 3] if causal else [3, 2, 4])  # causal: nothing after the last scored token
    packed = pack_rows(ids, keep, {"alternative": labels}, causal, "bool", torch.float32, capacity=6)
    assert packed.rows.tolist() == ([[2, 2, 2], [0, 0, 1]] if causal else [[2, 2, 2, 2, -1], [0, 0, 0, 1, 1]])
    assert packed.inputs["position_ids"].tolist() == ([[0, 1, 2], [0, 1, 0]] if causal
                                                      else [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]])
    assert packed.inputs["input_ids"].tolist() == ([[1, 2, 3], [5, 6, 8]] if causal
                                                   else [[1, 2, 3, 4, 0], [5, 6, 7, 8, 9]])
    assert sorted(packed.labels["alternative"][packed.labels["alternative"] != -100].tolist()) == [11, 12, 13]
    mask = packed.inputs["attention_mask"][:, 0]
    for lane, block in enumerate(packed.rows):  # filler (-1) is a block of its own
        for q in range(mask.shape[1]):
            for k in range(mask.shape[2]):
                assert bool(mask[lane, q, k]) == (bool(block[q] == block[k]) and (k <= q or not causal))
    additive = pack_rows(ids, keep, {"alternative": labels}, causal, "additive", torch.float32, capacity=6)
    assert torch.equal(additive.inputs["attention_mask"] == 0, packed.inputs["attention_mask"])
    one = pack_rows(ids, keep, {"alternative": labels}, causal, "bool", torch.float32, one_lane=True)
    assert one.rows.tolist() == [[0] * int(keep[0].sum()) + [1] * int(keep[1].sum()) + [2] * int(keep[2].sum())]


def test_nan_in_the_base_model_raises_a_clear_error():
    model, gradiend, collator = wrap("gpt2")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "ln_f" in n).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="not finite"):
        gradiend(**collator(rows()))


# --- which layout a batch runs in (layout.py): decided from the model's configuration, per batch ----------------------
def layout_of(config, causal=True, kind="bool"):
    from types import SimpleNamespace

    from gradiend_hf.layout import layout_rules

    return layout_rules(SimpleNamespace(config=config), causal, kind)


def test_layout_rules_come_from_the_attention_configuration():
    import transformers

    small = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
    rules = layout_of(transformers.LlamaConfig(**small))
    assert (rules.batch_limit, rules.pack_limit, rules.cut) == (None, None, True)
    assert layout_of(transformers.MistralConfig(sliding_window=32, **small)).pack_limit == 32
    assert layout_of(transformers.Qwen2Config(**small)).pack_limit is None  # use_sliding_window=False: no window
    assert layout_of(transformers.Qwen2Config(use_sliding_window=True, sliding_window=64, **small)).pack_limit == 64
    assert layout_of(transformers.Gemma2Config(**small)).pack_limit == 4096  # local layers' window
    bidirectional = layout_of(transformers.Gemma3TextConfig(use_bidirectional_attention=True, **small))
    assert (bidirectional.batch_limit, bidirectional.pack_limit, bidirectional.cut) == (0, 0, False)
    not_decoder = layout_of(transformers.BertConfig(**small))  # BertLMHeadModel without is_decoder: unmasked
    assert (not_decoder.batch_limit, not_decoder.pack_limit, not_decoder.cut) == (None, 0, False)
    assert layout_of(transformers.BertConfig(is_decoder=True, **small)).cut
    assert layout_of(transformers.ModernBertConfig(local_attention=128, **small), causal=False).pack_limit == 64
    assert layout_of(transformers.FalconConfig(alibi=True, **small)).pack_limit == 0
    assert layout_of(transformers.BloomConfig(), kind=None).pack_limit == 0  # no position_ids argument
    chunked = transformers.LlamaConfig(**small)
    chunked.layer_types, chunked.attention_chunk_size = ["chunked_attention", "full_attention"], 8
    assert layout_of(chunked).pack_limit == 8
    chunked.attention_chunk_size = None
    assert layout_of(chunked).pack_limit == 0  # chunked layers of unknown size
    chunked.layer_types = ["linear_attention", "full_attention"]
    assert layout_of(chunked).pack_limit == 0  # a layer type these rules do not know
    local = transformers.GPTNeoConfig(hidden_size=16, num_layers=2, num_heads=2, attention_types=[[["local"], 2]])
    assert layout_of(local).pack_limit == 0  # its local attention is not one these rules know
    roberta = layout_of(transformers.RobertaConfig(**small), causal=False)
    assert (roberta.batch_limit, roberta.pack_limit) == (None, 0)  # positions come from the padding
    funnel = layout_of(transformers.FunnelConfig(), causal=False, kind=None)
    assert (funnel.batch_limit, funnel.pack_limit) == (0, 0)  # pooling reaches the padding: row by row
    longrope = transformers.Phi3Config(**small, max_position_embeddings=64, original_max_position_embeddings=16,
                                       rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 4,
                                                        "long_factor": [2.0] * 4, "rope_theta": 1e4,
                                                        "original_max_position_embeddings": 16})
    rules = layout_of(longrope)
    assert (rules.batch_limit, rules.pack_limit, rules.cut) == (15, 15, False)


def test_layout_per_batch_from_the_rows_kept_lengths():
    from gradiend_hf.layout import LayoutRules

    windowed = LayoutRules(batch_limit=None, pack_limit=4, cut=True, why="")
    lengths = torch.tensor
    assert windowed.layout(lengths([3, 4, 2]), right_padded=True, may_pack=True) == "packed"
    assert windowed.layout(lengths([3, 5, 2]), right_padded=True, may_pack=True) == "padded"  # a row beyond the window
    assert windowed.layout(lengths([3, 4, 2]), right_padded=True, may_pack=False) == "padded"  # vetoed / undecided
    assert windowed.layout(lengths([5, 5]), right_padded=True, may_pack=True) == "padded"  # no padding at all
    assert windowed.layout(lengths([3, 5, 2]), right_padded=False, may_pack=True) == "rows"  # left padding
    row_by_row = LayoutRules(batch_limit=0, pack_limit=0, cut=False, why="")
    assert row_by_row.layout(lengths([3, 5]), right_padded=True, may_pack=True) == "rows"
    assert row_by_row.layout(lengths([5, 5]), right_padded=True, may_pack=True) == "padded"


def zoo_wrap(name, **config):
    from zoo_models import build, tokenizer_of

    model, tokenizer = build(name), tokenizer_of(name)
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES, encoder_activation="identity",
                                                        source="diff", **config))
    return model, tokenizer, gradiend, GradiendDataCollator(tokenizer, gradiend.objective, CLASSES)


def read_outs(model, tokenizer, gradiend, data, nll=row_nll):
    """<W_e, g_f - g_a> + b_e per row, the gradients by plain autograd on one row at a time (`nll`: the row's loss)."""
    b, params = gradiend.bottleneck, dict(model.named_parameters())
    out = []
    for r in data:
        total = b.encoder_bias[0].detach().clone()
        for side, sign in (("factual", 1.0), ("alternative", -1.0)):
            for n in b.names:
                params[n].requires_grad_(True)
                params[n].grad = None
            nll(model, tokenizer, gradiend.objective, r["masked"], r[side]).backward()
            for n in b.names:
                if params[n].grad is not None:
                    total += sign * (b.encoder(n)[0].detach() * params[n].grad).sum()
                params[n].requires_grad_(False)
                params[n].grad = None
        out.append(total)
    return torch.stack(out)


def rows_of_lengths(collator, length: int) -> list[dict]:
    """Distinct rows whose longer side's causal input keeps exactly `length` tokens."""
    words = "the nurse said that the doctor and the nurse went home and it was good".split()
    chosen = []
    for k in range(len(words)):
        for factual, alternative in (("she", "he"), ("it", "they"), ("good", "bad"), ("qrstu", "zyxwv")):
            r = dict(rows()[0], masked=" ".join(words[:k] + ["[MASK]", "was"]), factual=factual,
                     alternative=alternative)
            batch = collator([r])
            if max(int(batch[f"{side}_attention_mask"].sum()) for side in SIDES) == length:
                chosen.append(r)
    return chosen


def test_windowed_rows_pack_up_to_the_window_and_no_further(monkeypatch):
    """Mistral, window 4: rows of up to 4 kept tokens (one of exactly 4) pack and equal the oracle; with longer rows
    the batch runs padded (equal again). Negative control: packing the longer rows anyway (the window dropped) gives
    other values."""
    import dataclasses

    from zoo_models import WINDOW

    model, tokenizer, gradiend, collator = zoo_wrap("mistral")
    at_window = rows_of_lengths(collator, WINDOW)[:1] + rows_of_lengths(collator, WINDOW - 2)[:3]
    beyond = rows_of_lengths(collator, WINDOW + 1)[:1] + rows_of_lengths(collator, WINDOW + 5)[:1]
    assert len(at_window) == 4 and len(beyond) == 2
    seen, choose = [], gradiend.engine._layout
    monkeypatch.setattr(gradiend.engine, "_layout", lambda *a: seen.append(choose(*a)) or seen[-1])
    for data, packs in ((at_window, True), (at_window[:1] + beyond, False)):
        seen.clear()
        got = gradiend.encode_rows(collator(data))[:, 0]
        assert ("packed" in seen) == packs  # (a side whose rows are all one length runs unpadded: 'padded')
        expected = read_outs(model, tokenizer, gradiend, data)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))
    gradiend.engine.rules = dataclasses.replace(gradiend.engine.rules, pack_limit=None)
    wrong = gradiend.encode_rows(collator(at_window[:1] + beyond))[:, 0]
    assert (wrong - expected).abs().max() > 1e-3 * expected.abs().max()


def test_padding_sensitive_encoders_run_row_by_row():
    """Funnel pools padded positions into real ones: its rows run alone (grouped by length). Negative control: the
    padded batch gives other values."""
    import dataclasses

    model, tokenizer, gradiend, collator = zoo_wrap("funnel")
    data = varied_rows()
    expected = read_outs(model, tokenizer, gradiend, data)
    got = gradiend.encode_rows(collator(data))[:, 0]
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))
    gradiend.engine.rules = dataclasses.replace(gradiend.engine.rules, batch_limit=None)
    wrong = gradiend.encode_rows(collator(data))[:, 0]
    assert (wrong - expected).abs().max() > 1e-3 * expected.abs().max()


def collated_nll(model, tokenizer, objective, masked, word):
    """-log P(word) of a causal row whose input ends before the word's last token (only a label): the input a causal
    objective reads. Same as row_nll for position-independent models, not for rotary embeddings that rescale with the
    input length."""
    from oracle import causal_text_ids

    ids, positions = causal_text_ids(tokenizer, masked, word)
    logp = model(input_ids=torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
    return -sum(logp[pos - 1, ids[pos]] for pos in positions)


def test_length_dependent_rotary_embeddings_run_rows_alone_beyond_the_original_context():
    """Phi-3 'longrope' switches frequencies for the whole pass once it is longer than the original context (8 here):
    rows beyond it run alone, the causal cut is off. Negative control: the padded batch gives other values."""
    import dataclasses

    import transformers
    from zoo_models import _llama_like, bpe_tokenizer

    torch.manual_seed(0)
    config = transformers.Phi3Config(**{**_llama_like(), "max_position_embeddings": 64,
                                        "original_max_position_embeddings": 8, "rope_parameters": {
                                            "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                            "long_factor": [4.0, 8.0, 16.0, 32.0],
                                            "original_max_position_embeddings": 8}})
    model, tokenizer = transformers.Phi3ForCausalLM(config).eval(), bpe_tokenizer()
    gradiend = get_gradiend_model(model, GradiendConfig(feature_classes=CLASSES, encoder_activation="identity",
                                                        source="diff"))
    collator = GradiendDataCollator(tokenizer, gradiend.objective, CLASSES)
    assert (gradiend.engine.rules.batch_limit, gradiend.engine.cuts) == (7, False)
    data = varied_rows()  # inputs of 1 to 17 tokens
    expected = read_outs(model, tokenizer, gradiend, data, nll=collated_nll)
    got = gradiend.encode_rows(collator(data))[:, 0]
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))
    gradiend.engine.rules = dataclasses.replace(gradiend.engine.rules, batch_limit=None, pack_limit=None)
    wrong = gradiend.encode_rows(collator(data))[:, 0]
    assert (wrong - expected).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_left_padded_batches_run_row_by_row(kind):
    """A batch padded on the left cannot be cut after its longest row: unpacked, its rows run alone, same values (a
    padded pass would shift the positions of the shorter rows)."""
    _, gradiend, collator = wrap(kind, encoder_activation="identity")
    gradiend.engine.packing = False  # packing takes the kept tokens from either side
    batch = collator(varied_rows())
    left = {k: v.clone() for k, v in batch.items()}
    for side in SIDES:
        for i, n in enumerate(batch[f"{side}_attention_mask"].sum(1).tolist()):
            for key in ("input_ids", "attention_mask", "labels"):
                left[f"{side}_{key}"][i] = batch[f"{side}_{key}"][i].roll(batch[f"{side}_{key}"].shape[1] - n)
    assert not torch.equal(left["alternative_attention_mask"], batch["alternative_attention_mask"])
    torch.testing.assert_close(gradiend.encode_rows(left), gradiend.encode_rows(batch), rtol=1e-4, atol=1e-6)


# --- real-length text: rows of 250+ tokens ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_rows_of_real_length_equal_the_naive_oracle(kind):
    """Two rows of 250+ kept tokens (more than a lane of 128 each) and a short one: gradients (the training step) and
    per-row encodings (evaluation) against plain per-row autograd. Models of max_position_embeddings 512."""
    model, tokenizer, gradiend, collator = zoo_wrap(kind)
    filler = " ".join(["the nurse said that the doctor went home and it was good"] * 24)
    data = [dict(rows()[0], masked=f"{filler} and [MASK] was in her room"),
            dict(rows()[0], masked=f"the doctor said that {filler} and then [MASK] went home", alternative="zyxwv"),
            rows()[1]]
    batch = collator(data)
    assert sorted(batch["alternative_attention_mask"].sum(1).tolist())[-2] >= 250
    got = gradiend.encode_rows(batch)[:, 0]
    expected = read_outs(model, tokenizer, gradiend, data)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))
    names = gradiend.bottleneck.names
    grads = gradiend.engine.compute(batch, ("factual", "alternative"))
    for side in SIDES:
        assert_gradients_close(grads[side], naive_gradients(model, tokenizer, gradiend.objective, data, side, names))
    gradiend(**batch)  # a training step's body


# --- where forward-mode AD is not available: one backward pass per row ----------------------------------------------
class _NoForwardGelu(torch.autograd.Function):
    """GELU as a custom autograd.Function without a jvp (like Bloom's BloomGelu)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.nn.functional.gelu(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            return torch.autograd.grad(torch.nn.functional.gelu(x), x, grad)[0]


@pytest.mark.parametrize("kind", ["bloom", "gpt2-custom-gelu"])
def test_forward_mode_failure_falls_back_to_per_row_backward_passes_logged_once(kind, caplog):
    import logging

    if kind == "bloom":
        model, tokenizer, gradiend, collator = zoo_wrap("bloom")
    else:
        model, gradiend, collator = wrap("gpt2", encoder_activation="identity", source="diff")
        tokenizer = tokenizer_for("gpt2")
        for block in model.transformer.h:
            block.mlp.act.forward = _NoForwardGelu.apply
    data = varied_rows()
    expected = read_outs(model, tokenizer, gradiend, data)
    with caplog.at_level(logging.WARNING, logger="gradiend_hf.gradients"):
        first = gradiend.encode_rows(collator(data))[:, 0]
        second = gradiend.encode_rows(collator(data[:3]))[:, 0]
    assert gradiend.engine.forward_mode is False
    assert len([r for r in caplog.records if "fall back to one backward pass per row" in r.message]) == 1
    for got, want in ((first, expected), (second, expected[:3])):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * float(want.abs().max()))


def test_forward_mode_is_kept_where_it_works():
    _, gradiend, collator = wrap("gpt2", encoder_activation="identity")
    gradiend.encode_rows(collator(rows()))
    assert gradiend.engine.forward_mode is True


def test_an_error_of_the_rows_themselves_is_raised_not_hidden_by_the_fallback():
    _, gradiend, collator = wrap("gpt2", encoder_activation="identity")
    gradiend.get_base_model().transformer.register_forward_pre_hook(
        lambda module, args: (_ for _ in ()).throw(RuntimeError("broken base")))
    with pytest.raises(RuntimeError, match="broken base"):
        gradiend.encode_rows(collator(rows()))
    assert gradiend.engine.forward_mode is None  # not marked: the fallback failed the same way


# --- parameters the model uses under torch.no_grad (RoFormer's sinusoidal position table) --------------------------
def test_a_parameter_used_under_no_grad_has_zero_gradient_and_no_tangent():
    """RoFormer computes its position table (selected by default) under no_grad: its gradient is zero (the engine's
    buffer is zero-filled, not left stale) and forward mode carries no tangent through it."""
    model, tokenizer, gradiend, collator = zoo_wrap("roformer")
    name = "roformer.encoder.embed_positions.weight"
    assert name in gradiend.bottleneck.names
    gradiend.engine.buffer("alternative")[name].fill_(float("nan"))  # as if left over from elsewhere
    grads = gradiend.engine.compute(collator(varied_rows()), ("alternative",))["alternative"]
    assert torch.equal(grads[name], torch.zeros_like(grads[name]))
    with torch.no_grad():  # the table's encoder weights large, so a tangent through it would show
        gradiend.bottleneck.encoder(name).normal_(0, 1.0)
    expected = read_outs(model, tokenizer, gradiend, varied_rows())
    got = gradiend.encode_rows(collator(varied_rows()))[:, 0]
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5 * float(expected.abs().max()))


def test_tangents_stop_in_no_grad_blocks_as_gradients_do():
    from torch.autograd import forward_ad

    from gradiend_hf.forward_mode import NoGradStopsTangents

    w, v = torch.tensor([2.0, 3.0]), torch.tensor([1.0, 1.0])

    def f(x):
        with torch.no_grad():
            frozen = x * 10
        return (x * x).sum() + frozen.sum()

    with torch.enable_grad(), forward_ad.dual_level(), NoGradStopsTangents():
        _, tangent = forward_ad.unpack_dual(f(forward_ad.make_dual(w, v)))
    assert float(tangent) == float((2 * w * v).sum())  # d/dx of x*x only; the no_grad term adds nothing
