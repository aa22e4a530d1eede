"""Evaluating a GRADIEND adapter: the encoder (does h separate the classes?) and the decoder (which edit?)."""

from .decoder import DecoderEvaluation, evaluate_decoder, learning_rate_ladder
from .encoder import EncoderEvaluation, encode_dataset, encoder_metrics, evaluate_encoder, neutral_rows, row_labels

__all__ = [
    "DecoderEvaluation",
    "EncoderEvaluation",
    "encode_dataset",
    "encoder_metrics",
    "evaluate_decoder",
    "evaluate_encoder",
    "learning_rate_ladder",
    "neutral_rows",
    "row_labels",
]
