"""Evaluating a GRADIEND adapter: the encoder (does h separate the classes?), the decoder (which edit?) and standard
bias benchmarks (CrowS-Pairs, StereoSet, BBQ, Winogender) on any LM or edit."""

from .benchmarks import (BBQResult, CrowsPairsResult, StereoSetResult, WinogenderResult, bbq, crows_pairs, stereoset,
                         winogender)
from .decoder import DecoderEvaluation, evaluate_decoder, learning_rate_ladder
from .encoder import EncoderEvaluation, encode_dataset, encoder_metrics, evaluate_encoder, neutral_rows, row_labels

__all__ = [
    "BBQResult",
    "CrowsPairsResult",
    "StereoSetResult",
    "WinogenderResult",
    "bbq",
    "crows_pairs",
    "stereoset",
    "winogender",
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
