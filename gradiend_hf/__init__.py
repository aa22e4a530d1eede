"""gradiend_hf: GRADIEND (gradient-based feature learning and model rewriting) as a Hugging Face adapter.

The adapter itself (config, model, data collator, edits) and the PEFT registration load at import; training and
evaluation (Trainer, pandas, datasets) load on first use of their names, so `import gradiend_hf` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .bottleneck import Bottleneck
from .config import GradiendConfig, GradiendType
from .data import GradiendDataCollator
from .edit import Edit
from .model import GradiendModel, get_gradiend_model
from . import peft_integration  # noqa: F401 - registers the GRADIEND type with PEFT (PeftModel/transformers loading)

_LAZY = {
    "DecoderEvaluation": ".evaluation",
    "EncoderEvaluation": ".evaluation",
    "evaluate_decoder": ".evaluation",
    "evaluate_encoder": ".evaluation",
    "SeedSearch": ".seeds",
    "train_seeds": ".seeds",
    "GradiendTrainer": ".trainer",
    "GradiendTrainingArguments": ".trainer",
}

if TYPE_CHECKING:
    from .evaluation import DecoderEvaluation, EncoderEvaluation, evaluate_decoder, evaluate_encoder
    from .seeds import SeedSearch, train_seeds
    from .trainer import GradiendTrainer, GradiendTrainingArguments


def __getattr__(name: str) -> Any:
    """PEP 562: import the module behind a lazily exported name on first access."""
    if name not in _LAZY:
        raise AttributeError(f"module 'gradiend_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Bottleneck",
    "DecoderEvaluation",
    "EncoderEvaluation",
    "evaluate_decoder",
    "evaluate_encoder",
    "Edit",
    "GradiendConfig",
    "GradiendDataCollator",
    "GradiendModel",
    "GradiendTrainer",
    "GradiendTrainingArguments",
    "GradiendType",
    "get_gradiend_model",
    "SeedSearch",
    "train_seeds",
]
__version__ = "0.1.0"
