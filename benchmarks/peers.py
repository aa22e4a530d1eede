"""Peer debiasing methods, run beside GRADIEND on the same model and benchmarks (benchmarks/debiasing.py).

- LEACE (Belrose et al. 2023, PyPI `concept-erasure`): the least-squares concept eraser, fitted on the hidden state
  the LM head reads at the position that predicts a gendered word (the [MASK] of a masked LM, the token before it for
  a causal LM), labelled with the row's class; applied to every position as a forward pre-hook on the LM head, so no
  weight changes and no copy of the model.
- CDA (counterfactual data augmentation, as in Bias Bench: Meade et al. 2022): a short further pre-training of the base
  on text in which every gendered word is swapped for its counterpart, together with the original text (two-sided),
  with transformers' Trainer. This one needs its own copy of the weights: it is a fine-tune.
"""

from __future__ import annotations

import contextlib
import copy
import re
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

# Gendered words and their counterparts (lower case; the swap keeps the first letter's case). 'her' maps to 'his'
# (possessive and object cannot be told apart without a parser; Bias Bench's lists make the same choice).
SWAPS = {
    "he": "she", "him": "her", "his": "her", "himself": "herself", "man": "woman", "men": "women", "boy": "girl",
    "boys": "girls", "father": "mother", "fathers": "mothers", "son": "daughter", "sons": "daughters",
    "brother": "sister", "brothers": "sisters", "husband": "wife", "husbands": "wives", "king": "queen",
    "kings": "queens", "mr": "mrs", "male": "female", "males": "females", "gentleman": "lady", "gentlemen": "ladies",
    "uncle": "aunt", "uncles": "aunts", "nephew": "niece", "nephews": "nieces", "grandfather": "grandmother",
    "grandson": "granddaughter", "boyfriend": "girlfriend", "actor": "actress", "actors": "actresses",
    "prince": "princess", "princes": "princesses", "emperor": "empress", "dad": "mom", "sir": "madam",
}
COUNTERPART = {**SWAPS, **{v: k for k, v in SWAPS.items() if v != "her"}, "her": "his"}
_WORD = re.compile(r"\b(" + "|".join(sorted(COUNTERPART, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def swap_gender(text: str) -> str:
    """Every gendered word of SWAPS replaced by its counterpart, keeping upper case first letters."""
    def counterpart(match: re.Match) -> str:
        word = match.group(0)
        other = COUNTERPART[word.lower()]
        return other.upper() if word.isupper() and len(word) > 1 else other.capitalize() if word[0].isupper() else other
    return _WORD.sub(counterpart, text)


# --- LEACE ----------------------------------------------------------------------------------------------------------
def prediction_states(model: nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]], causal: bool,
                      batch_size: int = 16) -> torch.Tensor:
    """The LM head's input at the position that predicts each row's [MASK] (one vector per row)."""
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    states = []
    try:
        for start in range(0, len(rows), batch_size):
            texts, positions = [], []
            for row in rows[start:start + batch_size]:
                before = row["masked"].split("[MASK]")[0]
                if causal:
                    ids = tokenizer(before.rstrip())["input_ids"]
                    texts.append(ids)
                    positions.append(len(ids) - 1)
                else:
                    ids = tokenizer(row["masked"].replace("[MASK]", tokenizer.mask_token))["input_ids"]
                    texts.append(ids)
                    positions.append(ids.index(tokenizer.mask_token_id))
            width = max(len(ids) for ids in texts)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in texts])
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in texts])
            captured.clear()
            with torch.no_grad():
                model(input_ids=input_ids, attention_mask=mask)
            hidden = captured[-1]
            states.append(hidden[torch.arange(len(texts)), torch.tensor(positions)].float())
    finally:
        handle.remove()
    return torch.cat(states)


def fit_leace(model: nn.Module, tokenizer: Any, rows: Sequence[Mapping[str, Any]], positive_class: str,
              causal: bool):
    """A concept_erasure.LeaceEraser for 'the row's class is positive_class' on the LM head's input."""
    from concept_erasure import LeaceEraser

    states = prediction_states(model, tokenizer, rows, causal)
    labels = torch.tensor([float(r["factual_class"] == positive_class) for r in rows]).unsqueeze(1)
    return LeaceEraser.fit(states, labels)


@contextlib.contextmanager
def leace_applied(model: nn.Module, eraser) -> Iterator[nn.Module]:
    """Inside the block the LM head reads every hidden state through the eraser (the weights are not touched)."""
    head = model.get_output_embeddings()

    def erase(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return (eraser(hidden.float()).to(hidden.dtype), *args[1:])

    handle = head.register_forward_pre_hook(erase)
    try:
        yield model
    finally:
        handle.remove()


# --- CDA ------------------------------------------------------------------------------------------------------------
def cda_texts(texts: Sequence[str]) -> list[str]:
    """Two-sided augmentation: each text that holds a gendered word, and its swapped counterpart."""
    out = []
    for text in texts:
        swapped = swap_gender(text)
        if swapped != text:
            out.extend([text, swapped])
    return out


def cda_finetune(model: nn.Module, tokenizer: Any, texts: Sequence[str], steps: int = 100, batch_size: int = 4,
                 block: int = 128, learning_rate: float = 2e-5, seed: int = 0, causal: bool = True) -> nn.Module:
    """A copy of `model` further pre-trained for `steps` steps on the two-sided CDA text (transformers' Trainer)."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tuned = copy.deepcopy(model)
    tuned.requires_grad_(True)
    tuned.train()
    augmented = cda_texts(texts)
    ids = [i for text in augmented for i in tokenizer(text)["input_ids"]]
    blocks = [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)]
    if not blocks:
        raise ValueError("No text with a gendered word to augment; pass more text.")
    data = Dataset.from_dict({"input_ids": blocks})
    scratch = tempfile.TemporaryDirectory(prefix="gradiend-cda-")  # Trainer wants a folder; nothing is saved
    args = TrainingArguments(
        output_dir=scratch.name, max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, save_strategy="no", report_to=[], seed=seed, logging_steps=max(steps // 5, 1),
        disable_tqdm=False, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=not causal)
    with scratch:
        Trainer(model=tuned, args=args, train_dataset=data, data_collator=collator).train()
    tuned.eval()
    tuned.requires_grad_(False)
    return tuned
