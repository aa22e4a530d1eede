"""Tiny random models of many transformers architectures for the zoo test (test_zoo.py), built offline in-process.

Each is 2 layers with a small hidden size and the tiny tokenizers' vocabulary (tiny.py: WordPiece for masked LMs, BPE
for causal LMs), initialised at std 0.1 (not 0.02) so that padding, positions and attention patterns change the losses
visibly. Windowed architectures get windows (4 tokens) shorter than the test rows, so the window really cuts.
"""

from __future__ import annotations

from typing import Callable

import torch
import transformers
from tiny import bpe_tokenizer, wordpiece_tokenizer

STD = 0.1
WINDOW = 4  # sliding / local attention window (tokens): shorter than most zoo rows (ModernBERT: +-4 around a token)


def _causal(**extra) -> dict:
    vocab = len(bpe_tokenizer())
    return dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)


def _masked(**extra) -> dict:
    tok = wordpiece_tokenizer()
    return dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **extra)


def _llama_like(**extra) -> dict:
    """The usual decoder fields (Llama naming)."""
    return _causal(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=48, max_position_embeddings=512, initializer_range=STD, **extra)


def _bert_like(**extra) -> dict:
    """The usual encoder fields (BERT naming)."""
    return _masked(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                   max_position_embeddings=512, initializer_range=STD, **extra)


# name -> (objective, model class name, config class name, config fields)
SPECS: dict[str, tuple[str, str, str, Callable[[], dict]]] = {
    # --- causal LMs ----------------------------------------------------------------------------------------------
    "llama": ("causal", "LlamaForCausalLM", "LlamaConfig", lambda: _llama_like()),
    "qwen2": ("causal", "Qwen2ForCausalLM", "Qwen2Config",
              lambda: _llama_like(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("causal", "Qwen3ForCausalLM", "Qwen3Config",
              lambda: _llama_like(head_dim=8, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "gemma": ("causal", "GemmaForCausalLM", "GemmaConfig", lambda: _llama_like(head_dim=8)),
    "gemma2": ("causal", "Gemma2ForCausalLM", "Gemma2Config",
               lambda: _llama_like(head_dim=8, sliding_window=WINDOW,
                                   layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("causal", "Gemma3ForCausalLM", "Gemma3TextConfig",
               lambda: _llama_like(head_dim=8, sliding_window=WINDOW,
                                   layer_types=["sliding_attention", "full_attention"])),
    "mistral": ("causal", "MistralForCausalLM", "MistralConfig", lambda: _llama_like(sliding_window=WINDOW)),
    "phi3": ("causal", "Phi3ForCausalLM", "Phi3Config", lambda: _llama_like(sliding_window=WINDOW)),
    "starcoder2": ("causal", "Starcoder2ForCausalLM", "Starcoder2Config", lambda: _llama_like(sliding_window=WINDOW)),
    "olmo2": ("causal", "Olmo2ForCausalLM", "Olmo2Config", lambda: _llama_like()),
    "stablelm": ("causal", "StableLmForCausalLM", "StableLmConfig", lambda: _llama_like()),
    "cohere": ("causal", "CohereForCausalLM", "CohereConfig", lambda: _llama_like()),
    "granite": ("causal", "GraniteForCausalLM", "GraniteConfig", lambda: _llama_like()),
    "gpt_neox": ("causal", "GPTNeoXForCausalLM", "GPTNeoXConfig",
                 lambda: _causal(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                 max_position_embeddings=512, initializer_range=STD)),
    "gpt2": ("causal", "GPT2LMHeadModel", "GPT2Config",
             lambda: _causal(n_embd=32, n_layer=2, n_head=4, n_positions=512, initializer_range=STD)),
    "gptj": ("causal", "GPTJForCausalLM", "GPTJConfig",
             lambda: _causal(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=512, initializer_range=STD)),
    "opt": ("causal", "OPTForCausalLM", "OPTConfig",
            lambda: _causal(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                            max_position_embeddings=512, init_std=STD, word_embed_proj_dim=32)),
    "bloom": ("causal", "BloomForCausalLM", "BloomConfig",
              lambda: _causal(hidden_size=32, n_layer=2, n_head=4, initializer_range=STD)),
    "falcon": ("causal", "FalconForCausalLM", "FalconConfig",
               lambda: _causal(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, initializer_range=STD,
                               max_position_embeddings=512)),
    "falcon-alibi": ("causal", "FalconForCausalLM", "FalconConfig",
                     lambda: _causal(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                                     initializer_range=STD, max_position_embeddings=512)),
    "mamba": ("causal", "MambaForCausalLM", "MambaConfig",
              lambda: _causal(hidden_size=32, num_hidden_layers=2, state_size=8, initializer_range=STD,
                              use_cache=False)),
    # --- masked LMs ----------------------------------------------------------------------------------------------
    "bert": ("masked", "BertForMaskedLM", "BertConfig", lambda: _bert_like()),
    "roberta": ("masked", "RobertaForMaskedLM", "RobertaConfig", lambda: _bert_like()),
    "xlm-roberta": ("masked", "XLMRobertaForMaskedLM", "XLMRobertaConfig", lambda: _bert_like()),
    "electra": ("masked", "ElectraForMaskedLM", "ElectraConfig", lambda: _bert_like(embedding_size=16)),
    "roformer": ("masked", "RoFormerForMaskedLM", "RoFormerConfig", lambda: _bert_like(embedding_size=32)),
    "convbert": ("masked", "ConvBertForMaskedLM", "ConvBertConfig",
                 lambda: _bert_like(embedding_size=32, conv_kernel_size=3)),
    "mpnet": ("masked", "MPNetForMaskedLM", "MPNetConfig", lambda: _bert_like()),  # its encoder always uses 32 buckets
    "deberta-v2": ("masked", "DebertaV2ForMaskedLM", "DebertaV2Config",
                   lambda: _bert_like(relative_attention=True, position_buckets=8, max_relative_positions=16,
                                      pos_att_type=["p2c", "c2p"], position_biased_input=False)),
    "albert": ("masked", "AlbertForMaskedLM", "AlbertConfig", lambda: _bert_like(embedding_size=16)),
    "distilbert": ("masked", "DistilBertForMaskedLM", "DistilBertConfig",
                   lambda: _masked(dim=32, hidden_dim=48, n_layers=2, n_heads=4, max_position_embeddings=512,
                                   initializer_range=STD)),
    "modernbert": ("masked", "ModernBertForMaskedLM", "ModernBertConfig",
                   lambda: _masked(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                   max_position_embeddings=512, initializer_range=STD, local_attention=2 * WINDOW,
                                   layer_types=["full_attention", "sliding_attention"],
                                   cls_token_id=wordpiece_tokenizer().cls_token_id,
                                   sep_token_id=wordpiece_tokenizer().sep_token_id,
                                   bos_token_id=wordpiece_tokenizer().cls_token_id,
                                   eos_token_id=wordpiece_tokenizer().sep_token_id)),
    "funnel": ("masked", "FunnelForMaskedLM", "FunnelConfig",
               lambda: _masked(d_model=32, n_head=4, d_head=8, d_inner=48, block_sizes=[1, 1], num_decoder_layers=1,
                               initializer_std=STD)),
    # --- more families (not in the issue's list): the rules' conservative paths (layout.py) are exact for them too ---
    "gpt_neo": ("causal", "GPTNeoForCausalLM", "GPTNeoConfig",  # local attention layers
                lambda: _causal(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                window_size=WINDOW, max_position_embeddings=512, initializer_range=STD)),
    "cohere2": ("causal", "Cohere2ForCausalLM", "Cohere2Config",
                lambda: _llama_like(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
    "mixtral": ("causal", "MixtralForCausalLM", "MixtralConfig",
                lambda: _llama_like(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("causal", "Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                  lambda: _llama_like(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=16)),
    "phi": ("causal", "PhiForCausalLM", "PhiConfig", lambda: _llama_like()),
    "olmo": ("causal", "OlmoForCausalLM", "OlmoConfig", lambda: _llama_like()),
    "nemotron": ("causal", "NemotronForCausalLM", "NemotronConfig", lambda: _llama_like()),
    "smollm3": ("causal", "SmolLM3ForCausalLM", "SmolLM3Config", lambda: _llama_like()),
    "persimmon": ("causal", "PersimmonForCausalLM", "PersimmonConfig",
                  lambda: {k: v for k, v in _llama_like().items() if k != "num_key_value_heads"}),
    "mpt": ("causal", "MptForCausalLM", "MptConfig",  # ALiBi
            lambda: _causal(d_model=32, n_heads=4, n_layers=2, max_seq_len=512, initializer_range=STD)),
    "codegen": ("causal", "CodeGenForCausalLM", "CodeGenConfig",
                lambda: _causal(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=512, initializer_range=STD)),
    "gpt_bigcode": ("causal", "GPTBigCodeForCausalLM", "GPTBigCodeConfig",
                    lambda: _causal(n_embd=32, n_layer=2, n_head=4, n_positions=512, initializer_range=STD)),
    "xglm": ("causal", "XGLMForCausalLM", "XGLMConfig",
             lambda: _causal(d_model=32, num_layers=2, attention_heads=4, ffn_dim=48, max_position_embeddings=512,
                             init_std=STD)),
    "biogpt": ("causal", "BioGptForCausalLM", "BioGptConfig",
               lambda: {**_bert_like(), **_causal()}),
    "ctrl": ("causal", "CTRLLMHeadModel", "CTRLConfig",
             lambda: _causal(n_embd=32, n_layer=2, n_head=4, dff=48, n_positions=512, initializer_range=STD)),
    "camembert": ("masked", "CamembertForMaskedLM", "CamembertConfig", lambda: _bert_like()),
    "roberta-prelayernorm": ("masked", "RobertaPreLayerNormForMaskedLM", "RobertaPreLayerNormConfig",
                             lambda: _bert_like()),
    "data2vec-text": ("masked", "Data2VecTextForMaskedLM", "Data2VecTextConfig", lambda: _bert_like()),
    "xmod": ("masked", "XmodForMaskedLM", "XmodConfig",
             lambda: _bert_like(languages=["en_XX"], default_language="en_XX")),
    "megatron-bert": ("masked", "MegatronBertForMaskedLM", "MegatronBertConfig", lambda: _bert_like()),
    "ernie": ("masked", "ErnieForMaskedLM", "ErnieConfig", lambda: _bert_like()),
    "rembert": ("masked", "RemBertForMaskedLM", "RemBertConfig",
                lambda: _bert_like(input_embedding_size=16, output_embedding_size=16)),
    "mobilebert": ("masked", "MobileBertForMaskedLM", "MobileBertConfig",
                   lambda: _bert_like(embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                                      num_feedforward_networks=1)),
    "squeezebert": ("masked", "SqueezeBertForMaskedLM", "SqueezeBertConfig", lambda: _bert_like(embedding_size=32)),
    "deberta": ("masked", "DebertaForMaskedLM", "DebertaConfig",
                lambda: _bert_like(relative_attention=True, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
                                   position_biased_input=False)),
    "eurobert": ("masked", "EuroBertForMaskedLM", "EuroBertConfig", lambda: {**_llama_like(), **_masked()}),
    "esm": ("masked", "EsmForMaskedLM", "EsmConfig", lambda: _bert_like(mask_token_id=4)),
    "xlm": ("masked", "XLMWithLMHeadModel", "XLMConfig",
            lambda: _masked(emb_dim=32, n_layers=2, n_heads=4, max_position_embeddings=512, mask_token_id=4)),
    "big_bird": ("masked", "BigBirdForMaskedLM", "BigBirdConfig", lambda: _bert_like()),  # block-sparse from 704 on
    "longformer": ("masked", "LongformerForMaskedLM", "LongformerConfig", lambda: _bert_like(attention_window=WINDOW)),
    "fnet": ("masked", "FNetForMaskedLM", "FNetConfig",  # Fourier mixing over the whole (padded) sequence
             lambda: {k: v for k, v in _bert_like().items() if k != "num_attention_heads"}),
    "mra": ("masked", "MraForMaskedLM", "MraConfig", lambda: _bert_like()),
    "yoso": ("masked", "YosoForMaskedLM", "YosoConfig", lambda: _bert_like()),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """A fresh tiny model of architecture `name` (a SPECS key) with the attention implementation transformers picks by
    default, in eval mode (no dropout)."""
    _, model_class, config_class, fields = SPECS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**fields())
    model = getattr(transformers, model_class)(config)
    return model.eval()


def tokenizer_of(name: str):
    return wordpiece_tokenizer() if SPECS[name][0] == "masked" else bpe_tokenizer()
