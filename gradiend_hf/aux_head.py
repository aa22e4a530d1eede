"""Auxiliary masked-prediction head: lets a causal LM's GRADIEND gradients see the text AFTER the feature word.

A decoder-only model predicts a word from its left context only, so for "[MASK] hurt herself." the plain causal
objective asks for -log P("She" | <start>) and the deciding word ("herself") never enters the gradient. The auxiliary
head fixes that without touching the model: the masked slot is filled with one added mask token (its embedding row
lives in the head; the base vocabulary and tokenizer stay as they are), the frozen backbone reads
left context + mask + right context, and a small linear classifier over the hidden states at and after the mask
predicts the feature class of the masked word. Positions after the mask see the mask and the right context, so the
head's -log P(class | whole sentence) depends on both sides; GRADIEND differentiates it w.r.t. the selected backbone
weights (the head itself is never edited). Evaluation and rewriting still use the model's real LM head.

Files (next to an adapter, or alone): `auxiliary_head.safetensors` + `auxiliary_head_config.json`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .objective import AUXILIARY_MASK_ID, AUXILIARY_MLM, CAUSAL_LM, resolve_objective
from .serialization import load_tensors, save_tensors

HEAD_WEIGHTS_NAME = "auxiliary_head.safetensors"
HEAD_CONFIG_NAME = "auxiliary_head_config.json"


@dataclass
class AuxiliaryHeadConfig:
    """What the head predicts and how it reads the backbone; saved as JSON beside the weights."""

    classes: list[str]
    hidden_size: int
    base_model_name_or_path: Optional[str] = None
    train_mask_embedding: bool = False
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"An auxiliary head needs at least two different classes, got {self.classes!r}.")


def backbone_of(base: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (LlamaModel, GPT2Model, ...): transformers' `base_model`."""
    backbone = getattr(base, "base_model", None)
    if backbone is None or backbone is base:
        raise ValueError(
            f"{type(base).__name__} exposes no separate backbone (`base_model`); the auxiliary head needs a "
            "transformers causal LM (a *ForCausalLM / *LMHeadModel class)."
        )
    return backbone


class AuxiliaryMaskedHead(nn.Module):
    """Mask-token embedding + linear classifier over [hidden at the mask ; mean hidden over the mask and after it]."""

    def __init__(self, config: AuxiliaryHeadConfig) -> None:
        super().__init__()
        self.head_config = config
        h = config.hidden_size
        self.mask_embedding = nn.Parameter(torch.zeros(h))
        self.classifier = nn.Linear(2 * h, len(config.classes))

    @property
    def classes(self) -> list[str]:
        return list(self.head_config.classes)

    def embed(self, base: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings with the head's mask vector at AUXILIARY_MASK_ID positions (no base row is read there)."""
        is_mask = input_ids == AUXILIARY_MASK_ID
        if not bool((is_mask.sum(dim=1) == 1).all()):
            raise ValueError(
                "Every row of an auxiliary-head input needs exactly one mask position; build inputs with "
                "GradiendDataCollator(tokenizer, 'auxiliary_mlm', feature_classes)."
            )
        embeds = base.get_input_embeddings()(input_ids.masked_fill(is_mask, 0))
        return torch.where(is_mask.unsqueeze(-1), self.mask_embedding.to(embeds.dtype), embeds)

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[hidden at the mask ; mean over the mask and every later real token] (rows x 2H), in float32."""
        hidden = hidden.float()
        width = input_ids.shape[1]
        mask_at = (input_ids == AUXILIARY_MASK_ID).long().argmax(dim=1)
        positions = torch.arange(width, device=input_ids.device)
        after = (positions.unsqueeze(0) >= mask_at.unsqueeze(1)) & attention_mask.bool()
        weights = after.float() / after.float().sum(dim=1, keepdim=True)
        at_mask = hidden[torch.arange(hidden.shape[0], device=hidden.device), mask_at]
        return torch.cat([at_mask, torch.einsum("bt,bth->bh", weights, hidden)], dim=1)

    def features(self, base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeds = self.embed(base, input_ids)
        hidden = backbone_of(base)(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return self.pool(hidden, input_ids, attention_mask)

    def forward(self, base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits, rows x classes."""
        return self.classifier(self.features(base, input_ids, attention_mask))

    # --- save / load -----------------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"mask_embedding": self.mask_embedding, "classifier.weight": self.classifier.weight,
                "classifier.bias": self.classifier.bias}

    def write_files(self, directory: Path) -> None:
        """Write the two head files into an existing folder (GradiendModel.save_pretrained calls this when staging)."""
        save_tensors(self.state_tensors(), directory / HEAD_WEIGHTS_NAME)
        (directory / HEAD_CONFIG_NAME).write_text(json.dumps(asdict(self.head_config), indent=2, sort_keys=True) + "\n",
                                                  encoding="utf-8")

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.write_files(directory)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "AuxiliaryMaskedHead":
        directory = Path(directory)
        config_file, weights_file = directory / HEAD_CONFIG_NAME, directory / HEAD_WEIGHTS_NAME
        if not config_file.is_file() or not weights_file.is_file():
            raise FileNotFoundError(
                f"No auxiliary head in {directory} (need {HEAD_CONFIG_NAME} and {HEAD_WEIGHTS_NAME}); train one with "
                "gradiend_hf.aux_head.train_auxiliary_head and save it with head.save_pretrained(folder)."
            )
        head = cls(AuxiliaryHeadConfig(**json.loads(config_file.read_text(encoding="utf-8"))))
        tensors = load_tensors(weights_file)
        expected = {k: tuple(v.shape) for k, v in head.state_tensors().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            raise ValueError(
                f"{weights_file} holds tensors {got}, but its config needs {expected}; the files are damaged."
            )
        with torch.no_grad():
            for key, tensor in head.state_tensors().items():
                tensor.copy_(tensors[key])
        return head


class AuxiliaryObjective(nn.Module):
    """base + head as one module whose forward gives (rows x 1 x classes) logits, so the gradient engine's loss
    (objective.row_losses) and forward-mode encodings (functional_call over `base.*` parameters) work unchanged."""

    def __init__(self, base: nn.Module, head: AuxiliaryMaskedHead) -> None:
        super().__init__()
        self.base = base
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.base, input_ids, attention_mask).unsqueeze(1)


def check_head_fits(
    base: nn.Module, head: AuxiliaryMaskedHead, feature_classes: Optional[Sequence[str]] = None
) -> None:
    """Clear errors when a head was made for another model size or another class pair."""
    hidden = base.get_input_embeddings().embedding_dim
    if head.head_config.hidden_size != hidden:
        raise ValueError(
            f"The auxiliary head reads hidden size {head.head_config.hidden_size}, but this base model has {hidden}; "
            f"it was made for {head.head_config.base_model_name_or_path or 'another model'}. "
            "Train a head for this base."
        )
    if feature_classes is not None and list(feature_classes) != head.classes:
        raise ValueError(
            f"The auxiliary head predicts the classes {head.classes}, but the adapter's feature_classes are "
            f"{list(feature_classes)}; train the head with feature_classes in the same order."
        )


def train_auxiliary_head(
    base: nn.Module,
    tokenizer: Any,
    rows: Any,
    feature_classes: Sequence[str],
    *,
    steps: int = 300,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 16,
    train_mask_embedding: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> AuxiliaryMaskedHead:
    """Train a head to predict each row's factual class from the whole masked sentence, the base frozen throughout.

    rows: GRADIEND rows (list of dicts, DataFrame or datasets.Dataset with `masked`, `factual_class`, ...); each
        distinct masked text counts once, labelled with its factual class. Use training rows only (no test leakage).
    train_mask_embedding: False (default) keeps the mask row at the mean input embedding, so the backbone's pooled
        features are computed once and only the classifier trains (seconds on a CPU); True also learns the mask row,
        which needs a backward pass through the frozen backbone every step.
    """
    from .data import GradiendDataCollator
    from .schema import prepare_rows

    if resolve_objective(base) != CAUSAL_LM:
        raise ValueError(
            f"The auxiliary head is for causal LMs; {type(base).__name__} is a masked LM, which already sees the right "
            "context: use GradiendConfig(objective='masked_lm')."
        )
    classes = list(feature_classes)
    data = prepare_rows(rows, classes, seed=seed, tokenizer=tokenizer)
    examples = list({r["masked"]: r for r in data if r["factual_class"] in classes}.values())
    if not any(r["masked"].split("[MASK]", 1)[1].strip() for r in examples):
        raise ValueError(
            "None of the rows has text after [MASK]: the auxiliary head only adds the right-hand context, and there is "
            "none. Use GradiendConfig(objective='causal_lm') for such data."
        )
    head = AuxiliaryMaskedHead(AuxiliaryHeadConfig(
        classes=classes, hidden_size=base.get_input_embeddings().embedding_dim,
        base_model_name_or_path=getattr(getattr(base, "config", None), "_name_or_path", None) or None,
        train_mask_embedding=train_mask_embedding,
    ))
    torch.manual_seed(seed)
    head.classifier.reset_parameters()
    device = base.get_input_embeddings().weight.device
    with torch.no_grad():
        head.mask_embedding.copy_(base.get_input_embeddings().weight.float().mean(dim=0))
    head.to(device)
    head.classifier.weight.data.zero_()  # start at uniform predictions
    head.classifier.bias.data.zero_()
    collate = GradiendDataCollator(tokenizer, AUXILIARY_MLM, classes)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    was_training = base.training
    base.requires_grad_(False)
    base.eval()
    try:
        return _fit(head, base, collate, examples, steps, learning_rate, weight_decay, batch_size, train_mask_embedding,
                    seed, progress)
    finally:
        for name, p in base.named_parameters():
            p.requires_grad_(flags[name])
        base.train(was_training)


def _batch(collate, chunk: Sequence[Mapping[str, Any]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = collate(list(chunk))
    return (batch["factual_input_ids"].to(device), batch["factual_attention_mask"].to(device),
            batch["factual_labels"][:, 0].to(device))


def _fit(head, base, collate, examples, steps, learning_rate, weight_decay, batch_size, train_mask_embedding, seed,
         progress) -> AuxiliaryMaskedHead:
    device = head.mask_embedding.device
    rng = random.Random(seed)
    head.mask_embedding.requires_grad_(train_mask_embedding)
    trainable = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)
    cached = None
    if not train_mask_embedding:  # the backbone's features never change: compute them once
        with torch.no_grad():
            parts = [_batch(collate, examples[i : i + batch_size], device) for i in range(0, len(examples), batch_size)]
            cached = (
                torch.cat([head.features(base, ids, att) for ids, att, _ in parts]),
                torch.cat([y for *_, y in parts]),
            )
    losses = []
    for _ in tqdm(range(steps), desc="auxiliary head", disable=not progress, leave=False):
        chosen = rng.sample(range(len(examples)), min(batch_size, len(examples)))
        if cached is not None:
            logits = head.classifier(cached[0][chosen])
            labels = cached[1][chosen]
        else:
            ids, att, labels = _batch(collate, [examples[i] for i in chosen], device)
            logits = head(base, ids, att)
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    optimizer.zero_grad(set_to_none=True)
    head.requires_grad_(False)
    with torch.no_grad():
        if cached is not None:
            accuracy = float((head.classifier(cached[0]).argmax(1) == cached[1]).float().mean())
        else:
            right = 0
            for i in range(0, len(examples), batch_size):
                ids, att, labels = _batch(collate, examples[i : i + batch_size], device)
                right += int((head(base, ids, att).argmax(1) == labels).sum())
            accuracy = right / len(examples)
    head.head_config.training = {"steps": steps, "learning_rate": learning_rate, "weight_decay": weight_decay,
                                 "batch_size": batch_size, "examples": len(examples), "seed": seed,
                                 "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
                                 "train_accuracy": accuracy}
    return head


@torch.no_grad()
def head_accuracy(base: nn.Module, tokenizer: Any, head: AuxiliaryMaskedHead, rows: Sequence[Mapping[str, Any]],
                  batch_size: int = 16) -> float:
    """Share of rows whose factual class the head predicts (a check on held-out rows that it learned the feature)."""
    from .data import GradiendDataCollator

    collate = GradiendDataCollator(tokenizer, AUXILIARY_MLM, head.classes)
    examples = [r for r in rows if r["factual_class"] in head.classes]
    device = head.mask_embedding.device
    right = 0
    for i in range(0, len(examples), batch_size):
        ids, att, labels = _batch(collate, examples[i : i + batch_size], device)
        right += int((head(base, ids, att).argmax(1) == labels).sum())
    return right / max(1, len(examples))
