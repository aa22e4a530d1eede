"""How many tokens a model takes, and checking rows against it before any model pass.

A model with a learned absolute position table (BERT, RoBERTa, GPT-2, ALBERT, DistilBERT, OPT, ...) fails deep inside
torch on a longer input ("The expanded size of the tensor (204) must match ... (64)", or an IndexError); a model with
rotary/relative/ALiBi positions (Llama, Mistral, GPT-NeoX, Funnel, DeBERTa-v2) has no such limit and is not limited
here. The limit is read off the model itself (its position table, sized by the config's max_position_embeddings /
n_positions / ...), not off the tokenizer, whose model_max_length is often absent or a placeholder.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from torch import nn

from .data import GradiendDataCollator, RowTooLongError

LIMIT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_positions", "n_ctx", "max_sequence_length",
                    "seq_length")


def _config_sizes(model: nn.Module) -> set[int]:
    config = getattr(model, "config", None)
    sizes = set()
    for name in LIMIT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            sizes.add(value)
    return sizes


def _usable(module: nn.Embedding) -> tuple[int, int]:
    """(table rows, usable positions). OPT/BART tables carry an `offset` of rows never used as positions; a table
    with a padding_idx p (RoBERTa family) numbers positions from p + 1, so p + 1 rows are never reached."""
    offset = getattr(module, "offset", 0)
    offset = offset if isinstance(offset, int) and not isinstance(offset, bool) else 0
    if module.padding_idx is not None:
        offset = max(offset, module.padding_idx + 1)
    return module.num_embeddings, module.num_embeddings - offset


def max_positions(model: nn.Module) -> Optional[int]:
    """The most tokens one input row may have, or None when the model has no position table (rotary etc.).

    A position table is an nn.Embedding other than the token embeddings whose size (with or without its offset) is
    one of the config's limits, or whose name says it holds positions ('position', 'wpe')."""
    sizes = _config_sizes(model)
    try:
        tokens = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        tokens = None
    limits = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Embedding) or module is tokens:
            continue
        rows, usable = _usable(module)
        leaf = name.rsplit(".", 1)[-1].lower()
        if rows in sizes or usable in sizes or "position" in leaf or leaf == "wpe":
            limits.append(usable)
    return min(limits) if limits else None


def collator_for(model: nn.Module, tokenizer: Any, objective: str, feature_classes: Optional[Sequence[str]] = None,
                 truncation: str = "error") -> GradiendDataCollator:
    """A collator that knows the model's limit: over-long rows are refused by name (or cut, truncation='left')."""
    return GradiendDataCollator(tokenizer, objective, feature_classes, max_length=max_positions(model),
                                truncation=truncation)


def _chunk(rows: Any, start: int, stop: int) -> list[Mapping[str, Any]]:
    """rows[start:stop] as a list of dicts (a datasets.Dataset slice is a dict of columns: read column-wise, fast)."""
    part = rows[start:stop]
    if isinstance(part, Mapping):
        names = list(part)
        return [dict(zip(names, values)) for values in zip(*(part[n] for n in names))]
    return list(part)


def check_rows(rows: Sequence[Mapping[str, Any]], collate: Any, chunk: int = 256) -> None:
    """Collate every row once (no model pass) so that an over-long row fails now, named by its index in `rows` (a list
    of dicts or a datasets.Dataset), instead of after hours of training or in the middle of an evaluation. A collator
    without a limit (or not a GradiendDataCollator) has nothing to check."""
    if getattr(collate, "max_length", None) is None:
        return
    for start in range(0, len(rows), chunk):
        try:
            collate(_chunk(rows, start, start + chunk))
        except RowTooLongError as error:
            raise error.at(start) from None
