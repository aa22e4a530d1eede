"""Evaluating a GRADIEND adapter: the encoder (does h separate the classes?) and, later, the decoder."""

from .encoder import encode_dataset, encoder_metrics, row_labels

__all__ = ["encode_dataset", "encoder_metrics", "row_labels"]
