"""The auxiliary masked-prediction head for causal LMs (aux_head.py) against hand-written oracles on tiny models."""

import pytest
import torch
from test_core_gradients import assert_gradients_close
from tiny import rows, tiny_model, tokenizer_for

from gradiend_hf import GradiendConfig, GradiendDataCollator, GradiendModel, evaluate_decoder, get_gradiend_model
from gradiend_hf.aux_head import AuxiliaryMaskedHead, train_auxiliary_head
from gradiend_hf.data import MASK
from gradiend_hf.pruning import pre_prune

CLASSES = ["female", "male"]
AUX = "auxiliary_mlm"


def trained(kind: str, **options):
    base, tokenizer = tiny_model(kind), tokenizer_for(kind)
    head = train_auxiliary_head(base, tokenizer, rows(), CLASSES, steps=15, progress=False, **options)
    with torch.no_grad():  # a non-trivial mask row and classifier, so every oracle term matters
        head.mask_embedding.add_(torch.randn_like(head.mask_embedding))
        head.classifier.weight.add_(0.5 * torch.randn_like(head.classifier.weight))
    return base, tokenizer, head


def wrap(kind: str, **config):
    base, tokenizer, head = trained(kind)
    gradiend = get_gradiend_model(base, GradiendConfig(feature_classes=CLASSES, objective=AUX, **config),
                                  auxiliary_head=head)
    return base, tokenizer, head, gradiend, GradiendDataCollator(tokenizer, AUX, CLASSES)


def oracle_loss(base, tokenizer, head, masked: str, cls: str) -> torch.Tensor:
    """-log P_head(cls | sentence), from strings: embeddings, mask row, backbone, pooling and softmax written out."""
    left, right = masked.split(MASK)
    left_ids = tokenizer(left.rstrip())["input_ids"] if left.strip() else [tokenizer.bos_token_id]
    right_ids = tokenizer(right)["input_ids"]
    embed = base.get_input_embeddings()  # nn.Embedding: like the model, no gradient into a padding_idx row
    vectors = torch.cat([embed(torch.tensor(left_ids)), head.mask_embedding[None], embed(torch.tensor(right_ids))])
    hidden = base.base_model(inputs_embeds=vectors[None]).last_hidden_state[0]
    m = len(left_ids)
    features = torch.cat([hidden[m], hidden[m:].mean(dim=0)])
    logits = features @ head.classifier.weight.T + head.classifier.bias
    return -logits.log_softmax(-1)[CLASSES.index(cls)]


def oracle_gradients(base, tokenizer, head, data, side, names):
    params = dict(base.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    total = sum(oracle_loss(base, tokenizer, head, r["masked"], r[f"{side}_class"]) for r in data) / len(data)
    grads = torch.autograd.grad(total, [params[n] for n in names])
    for n in names:
        params[n].requires_grad_(False)
    return dict(zip(names, grads))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_engine_gradients_equal_naive_autograd_of_the_head_loss(kind):
    base, tokenizer, head, gradiend, collator = wrap(kind)
    data = rows()
    grads = gradiend.engine.compute(collator(data), ("factual", "alternative", "diff"))
    names = gradiend.bottleneck.names
    expected = {s: oracle_gradients(base, tokenizer, head, data, s, names) for s in ("factual", "alternative")}
    for side in ("factual", "alternative"):
        assert_gradients_close(grads[side], expected[side])
    assert_gradients_close(grads["diff"], {n: expected["factual"][n] - expected["alternative"][n] for n in names})


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_jvp_row_encodings_equal_the_oracle_gradient_read_out(kind):
    base, tokenizer, head, gradiend, collator = wrap(kind, encoder_activation="identity")
    data = rows()
    h = gradiend.encode_rows(collator(data))[:, 0]
    names = gradiend.bottleneck.names
    b = gradiend.bottleneck
    for i, row in enumerate(data):
        g = oracle_gradients(base, tokenizer, head, [row], "alternative", names)
        expected = sum((g[n] * b.to_full(n, b.encoder(n)[0].detach())).sum() for n in names) + b.encoder_bias[0]
        torch.testing.assert_close(h[i], expected.detach(), rtol=1e-4, atol=1e-6)


def test_right_context_changes_the_gradient_but_not_the_plain_causal_one():
    """The point of the head: two rows that differ only after the mask get different aux gradients."""
    _, tokenizer, _, gradiend, collator = wrap("llama")
    pair = [dict(masked=f"[MASK] said the results were {w}", factual="she", alternative="he", factual_class="female",
                 alternative_class="male") for w in ("good", "bad")]
    g = [{n: t.clone() for n, t in gradiend.engine.compute(collator([r]), ("alternative",))["alternative"].items()}
         for r in pair]
    assert any(not torch.allclose(g[0][n], g[1][n]) for n in g[0])
    causal = GradiendDataCollator(tokenizer, "causal_lm", CLASSES)(pair)
    assert torch.equal(causal["alternative_input_ids"][0], causal["alternative_input_ids"][1])


def test_collator_puts_left_mask_and_right_context_in():
    tokenizer = tokenizer_for("llama")
    collator = GradiendDataCollator(tokenizer, AUX, CLASSES)
    data = rows() + [dict(masked="the nurse said that [MASK] was good", factual="it", alternative="it",
                          factual_class="neutral", alternative_class="neutral")]
    batch = collator(data)
    for i, row in enumerate(data):
        left, right = row["masked"].split(MASK)
        ids = batch["factual_input_ids"][i][batch["factual_attention_mask"][i].bool()].tolist()
        start = tokenizer(left.rstrip())["input_ids"] if left.strip() else [tokenizer.bos_token_id]
        assert ids == start + [-1] + tokenizer(right)["input_ids"]
    assert torch.equal(batch["factual_input_ids"], batch["alternative_input_ids"])  # one forward serves both sides
    assert batch["factual_labels"][:, 0].tolist() == [0, 0, 0, 0, -100]
    assert batch["alternative_labels"][:, 0].tolist() == [1, 1, 1, 1, -100]


def test_head_training_keeps_the_base_frozen_and_the_engine_never_touches_the_head():
    base, tokenizer = tiny_model("llama"), tokenizer_for("llama")
    before = {n: p.detach().clone() for n, p in base.state_dict().items()}
    base.requires_grad_(False)
    base.model.layers[0].mlp.up_proj.weight.requires_grad_(True)  # the user's flags come back as they were
    head = train_auxiliary_head(base, tokenizer, rows(), CLASSES, steps=5, train_mask_embedding=True, progress=False)
    assert all(torch.equal(before[n], t) for n, t in base.state_dict().items())
    assert (base.model.layers[0].mlp.up_proj.weight.requires_grad
            and not base.model.layers[1].mlp.up_proj.weight.requires_grad)
    assert all(p.grad is None for p in base.parameters())
    mean_row = base.get_input_embeddings().weight.mean(dim=0)
    assert not torch.allclose(head.mask_embedding, mean_row)  # the mask row was trained
    head_before = {k: v.clone() for k, v in head.state_tensors().items()}
    base.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    gradiend = get_gradiend_model(base, GradiendConfig(feature_classes=CLASSES, objective=AUX), auxiliary_head=head)
    gradiend(**GradiendDataCollator(tokenizer, AUX, CLASSES)(rows()))
    assert all(p.grad is None and not p.requires_grad for p in head.parameters())
    assert all(torch.equal(head_before[k], v) for k, v in head.state_tensors().items())
    trainable = {id(p) for p in gradiend.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in gradiend.bottleneck.parameters()}


def test_frozen_mask_row_trains_only_the_classifier_and_learns_the_rows():
    base, tokenizer = tiny_model("gpt2"), tokenizer_for("gpt2")
    head = train_auxiliary_head(base, tokenizer, rows(), CLASSES, steps=60, learning_rate=1e-2, progress=False)
    torch.testing.assert_close(head.mask_embedding, base.get_input_embeddings().weight.mean(dim=0))
    assert head.head_config.training["train_accuracy"] == 1.0


def test_head_and_adapter_save_load_round_trip_exactly(tmp_path):
    base, tokenizer, head, gradiend, collator = wrap("llama")
    head.save_pretrained(tmp_path / "head")
    again = AuxiliaryMaskedHead.from_pretrained(tmp_path / "head")
    assert again.head_config == head.head_config
    assert all(torch.equal(again.state_tensors()[k], v) for k, v in head.state_tensors().items())
    batch = collator(rows())
    h = gradiend.encode_rows(batch)
    gradiend.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "auxiliary_head.safetensors").is_file()
    loaded = GradiendModel.from_pretrained(base, tmp_path / "adapter")
    assert loaded.objective == AUX and loaded.lm_objective == "causal_lm"
    assert torch.equal(loaded.encode_rows(batch), h)


def test_decoder_evaluation_and_merge_use_the_real_lm_head():
    base, tokenizer, head, gradiend, _ = wrap("gpt2")
    evaluation = evaluate_decoder(gradiend, rows(), tokenizer, neutral_texts=["the nurse went home", "it was good"],
                                  feature_factors=[1.0], learning_rates=[1e-2], progress=False)
    assert len(evaluation.grid) == 2  # the base and the one edit, both scored by the LM head
    plain = gradiend.merge_and_unload(feature_factor=1.0, learning_rate=1e-2)
    assert plain is base and plain.get_input_embeddings().num_embeddings == len(tokenizer)  # no row was added


def test_clear_errors():
    base, tokenizer, head = trained("llama")
    config = GradiendConfig(feature_classes=CLASSES, objective=AUX)
    with pytest.raises(ValueError, match="needs an auxiliary head"):
        get_gradiend_model(base, config)
    with pytest.raises(ValueError, match="objective='auxiliary_mlm'"):
        get_gradiend_model(base, GradiendConfig(feature_classes=CLASSES), auxiliary_head=head)
    with pytest.raises(ValueError, match="same order"):
        get_gradiend_model(base, GradiendConfig(feature_classes=CLASSES[::-1], objective=AUX), auxiliary_head=head)
    with pytest.raises(ValueError, match="hidden size"):
        get_gradiend_model(tiny_model("llama", hidden=8), config, auxiliary_head=head)
    with pytest.raises(ValueError, match="masked LM"):
        get_gradiend_model(tiny_model("bert"), config, auxiliary_head=head)
    with pytest.raises(ValueError, match="masked LM"):
        train_auxiliary_head(tiny_model("bert"), tokenizer_for("bert"), rows(), CLASSES, steps=1, progress=False)
    no_right = [dict(r, masked=r["masked"].split(MASK)[0] + MASK) for r in rows()]
    with pytest.raises(ValueError, match="text after"):
        train_auxiliary_head(base, tokenizer, no_right, CLASSES, steps=1, progress=False)
    with pytest.raises(ValueError, match="feature_classes"):
        GradiendDataCollator(tokenizer, AUX)
    with pytest.raises(FileNotFoundError, match="train_auxiliary_head"):
        AuxiliaryMaskedHead.from_pretrained("/nonexistent/head")
    with pytest.raises(ValueError, match="no auxiliary head is attached"):
        pre_prune(base, rows(), tokenizer, 0.5, config=config, rows=4)
