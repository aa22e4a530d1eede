"""Plots draw exactly the numbers they are given and save readable PNGs."""

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from gradiend_hf import Edit
from gradiend_hf.evaluation.decoder import DecoderEvaluation, score_columns
from gradiend_hf.evaluation.encoder import summarise
from gradiend_hf.plotting import plot_decoder, plot_encoder, plot_training

CLASSES = ["female", "male"]


def grid() -> DecoderEvaluation:
    rows = [dict(feature_factor=0.0, learning_rate=0.0, is_base=True, skipped=False, lms=0.5)]
    for ff in (1.0, -1.0):
        for lr in (0.1, 1.0, 10.0):
            rows.append(dict(feature_factor=ff, learning_rate=lr, is_base=False, skipped=False, lms=0.5 - 0.001 * lr))
    frame = pd.DataFrame(rows)
    frame["p_female"] = 0.1 + 0.01 * frame["feature_factor"] * frame["learning_rate"]
    frame["p_male"] = 0.1 - 0.01 * frame["feature_factor"] * frame["learning_rate"]
    for c in CLASSES:
        for d in CLASSES:
            frame[f"p_{c}@{d}"] = frame[f"p_{c}"]
    frame["balance_product"] = 4 * frame["p_female"] * frame["p_male"]
    return DecoderEvaluation(grid=score_columns(frame, CLASSES), feature_classes=CLASSES, lms_ratio=0.99, base_lms=0.5)


def test_decoder_plot_draws_the_grid_and_marks_edits(tmp_path):
    evaluation = grid()
    figure = plot_decoder(evaluation, [Edit(1.0, 1.0, goal="female")], tmp_path / "decoder.png")
    assert isinstance(figure, Figure) and (tmp_path / "decoder.png").stat().st_size > 10_000
    first = figure.axes[0]
    assert first.get_title() == "feature factor +1"
    np.testing.assert_allclose(first.lines[0].get_ydata(), [0.101, 0.11, 0.2])  # P(female) for ff=+1 at lr 0.1, 1, 10
    stars = [line for line in first.lines if line.get_marker() == "*"]
    assert [float(s.get_xdata()[0]) for s in stars] == [1.0, 1.0]


def test_encoder_plot_histograms_every_group(tmp_path):
    frame = pd.DataFrame(dict(masked=["[MASK] x"] * 4, factual=["he", "she", "the", "he"],
                              alternative=["she", "he", "the", "her"],
                              factual_class=["male", "female", "neutral", "male"],
                              alternative_class=["female", "male", "neutral", "female"],
                              h=[0.9, -0.8, 0.05, 0.7]))
    figure = plot_encoder(summarise(frame, CLASSES, "alternative"), CLASSES, tmp_path / "encoder.png")
    counts = [int(sum(p.get_height() for p in container)) for container in figure.axes[0].containers]
    assert counts == [2, 1, 1]  # female (h of 'she'/'her' alternatives), male, neutral


def test_training_plot_follows_the_log_history(tmp_path):
    history = [{"step": 10, "loss": 0.5},
               {"step": 10, "eval_correlation": 0.2, "eval_mean_h_female": 0.1, "eval_mean_h_male": -0.1},
               {"step": 20, "loss": 0.25},
               {"step": 20, "eval_correlation": 0.9, "eval_mean_h_female": 0.8, "eval_mean_h_male": -0.7}]
    figure = plot_training(history, CLASSES, tmp_path / "training.png")
    left, right = figure.axes
    np.testing.assert_allclose(left.lines[0].get_ydata(), [0.2, 0.9])
    np.testing.assert_allclose(right.lines[0].get_ydata(), [0.5, 0.25])
    assert (tmp_path / "training.png").is_file()
