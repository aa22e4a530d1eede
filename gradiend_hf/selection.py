"""Which base parameters a GRADIEND adapter reads and edits."""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn


def output_embedding_parameters(model: nn.Module) -> set[int]:
    """Storage pointers of the LM head's weights: anything sharing them is tied to the head."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {p.data_ptr() for p in head.parameters()}


def backbone_prefix(model: nn.Module) -> str:
    """Name prefix of the backbone (`bert.`, `model.`, `transformer.` ...); '' if the model has none."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix + "."
    return ""


def compile_pattern(field: str, pattern: object) -> re.Pattern:
    """A parameter-name pattern as a regular expression (matched with re.search), or an error that names the field
    and the pattern; a shell glob such as '*attention*' (not a regular expression) gets its regex form as the fix."""
    if not isinstance(pattern, str):
        raise ValueError(f"{field} holds {pattern!r}; it must be a list of regular expressions (strings).")
    try:
        return re.compile(pattern)
    except re.error as error:
        hint = re.sub(r"(?<!\.)\*", ".*", pattern) if "*" in pattern else None
        raise ValueError(
            f"{field} pattern {pattern!r} is not a valid regular expression ({error}). Patterns are matched with "
            "re.search against parameter names" + (f"; for a shell-style wildcard write {hint!r}." if hint else ".")
        ) from None


def select_parameters(
    model: nn.Module,
    target_parameters: Optional[list[str]] = None,
    exclude_parameters: Optional[list[str]] = None,
) -> list[str]:
    """Names of the floating-point base parameters selected by the patterns (regular expressions, `re.search`).

    Without `target_parameters`: every backbone parameter (embeddings included), but neither the LM head nor
    a parameter tied to it, because an edit there would also move the output layer.
    """
    named = list(model.named_parameters())
    if target_parameters:
        patterns = [compile_pattern("target_parameters", p) for p in target_parameters]
        chosen = [n for n, p in named if any(r.search(n) for r in patterns)]
    else:
        prefix = backbone_prefix(model)
        tied = output_embedding_parameters(model)
        chosen = [n for n, p in named if n.startswith(prefix) and p.data_ptr() not in tied]
    if exclude_parameters:
        patterns = [compile_pattern("exclude_parameters", p) for p in exclude_parameters]
        chosen = [n for n in chosen if not any(r.search(n) for r in patterns)]
    params = dict(named)
    chosen = [n for n in chosen if params[n].dtype.is_floating_point]
    if not chosen:
        examples = ", ".join(n for n, _ in named[:6])
        raise ValueError(
            f"No base parameter matches target_parameters={target_parameters!r} / exclude_parameters="
            f"{exclude_parameters!r}. Parameter names look like: {examples} ..."
        )
    return chosen


def parameter_dict(model: nn.Module, names: list[str]) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    return {n: params[n] for n in names}
