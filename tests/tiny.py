"""Tiny in-process models and tokenizers (trained here, nothing downloaded) for fast tests."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AlbertConfig,
    AlbertForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
)

WORDS = "the a nurse doctor said that she he was in her his room results were good bad it they went home and".split()
CORPUS = [
    "the nurse said that she was in her room",
    "the doctor said that he was in his room",
    "she said the results were good",
    "he said the results were bad",
    "they went home and it was good",
    "the nurse and the doctor went home",
] * 20 + ["abcdefghijklmnopqrstuvwxyz zyxwvutsrqponmlkjihgfedcba"]  # every letter also as a word-inner piece


@functools.lru_cache(maxsize=None)
def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer with [CLS]/[SEP]/[MASK]; unseen words split into several pieces."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    alphabet = list("abcdefghijklmnopqrstuvwxyz.,")
    tok.train_from_iterator(
        CORPUS, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials, initial_alphabet=alphabet)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@functools.lru_cache(maxsize=None)
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer: word-initial tokens carry the leading space (' she')."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _small(**extra):
    return dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, **extra)


def tiny_model(kind: str, seed: int = 0, hidden: int = 16):
    """A freshly initialised tiny model of the given architecture, in eval mode."""
    torch.manual_seed(seed)
    wp, bpe = wordpiece_tokenizer(), bpe_tokenizer()
    if kind == "bert":
        model = BertForMaskedLM(
            BertConfig(vocab_size=len(wp), max_position_embeddings=64, **{**_small(), "hidden_size": hidden})
        )
    elif kind == "distilbert":
        model = DistilBertForMaskedLM(
            DistilBertConfig(
                vocab_size=len(wp), dim=hidden, hidden_dim=24, n_layers=2, n_heads=2, max_position_embeddings=64
            )
        )
    elif kind == "roberta":
        model = RobertaForMaskedLM(
            RobertaConfig(vocab_size=len(wp), max_position_embeddings=72, pad_token_id=wp.pad_token_id, **_small())
        )
    elif kind == "albert":
        model = AlbertForMaskedLM(
            AlbertConfig(vocab_size=len(wp), embedding_size=8, max_position_embeddings=64, **_small())
        )
    elif kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(bpe), n_embd=hidden, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
            )
        )
    elif kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(bpe),
                num_key_value_heads=1,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=0,
                max_position_embeddings=64,
                **{**_small(), "hidden_size": hidden},
            )
        )
    else:
        raise ValueError(kind)
    return model.eval()


MASKED = ("bert", "distilbert", "roberta", "albert")
CAUSAL = ("gpt2", "llama")


def tokenizer_for(kind: str) -> PreTrainedTokenizerFast:
    return wordpiece_tokenizer() if kind in MASKED else bpe_tokenizer()


def rows(factual_first: bool = True) -> list[dict]:
    """Rows of one transition (female -> male), including multi-token words ('zyxwv' is unseen in the corpus)."""
    data = [
        ("the nurse said that [MASK] was in her room", "she", "he"),
        ("[MASK] said the results were good", "she", "he"),
        ("the doctor said that [MASK] went home", "she", "zyxwv"),
        ("the nurse said that [MASK] was good", "qrstu", "he"),
    ]
    return [
        dict(masked=m, factual=f, alternative=a, factual_class="female", alternative_class="male") for m, f, a in data
    ]
