"""gradiend_hf: GRADIEND (gradient-based feature learning and model rewriting) as a Hugging Face adapter."""

from .bottleneck import Bottleneck
from .config import GradiendConfig, GradiendType
from .data import GradiendDataCollator
from .edit import Edit
from .evaluation import DecoderEvaluation, EncoderEvaluation, evaluate_decoder, evaluate_encoder
from .model import GradiendModel, get_gradiend_model
from . import peft_integration  # noqa: F401 - registers the GRADIEND type with PEFT (PeftModel/transformers loading)
from .seeds import SeedSearch, train_seeds
from .trainer import GradiendTrainer, GradiendTrainingArguments

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
