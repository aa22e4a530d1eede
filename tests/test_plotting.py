"""Plots draw exactly the numbers they are given and save readable PNGs."""

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from gradiend_hf import Edit
from itertools import combinations

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from gradiend_hf.evaluation.decoder import DecoderEvaluation, learning_rate_ladder, score_columns
from gradiend_hf.evaluation.encoder import summarise
from gradiend_hf.plotting import compact, plot_decoder, plot_encoder, plot_training

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


def wide_grid(rates, factors=(1.0, -1.0, 0.0), base_lms: float = 0.5, spread: float = 0.01) -> DecoderEvaluation:
    """A decoder grid over `rates` x `factors` with P(class) moving by `spread` (relative) per unit of ff x lr."""
    rows = [dict(feature_factor=0.0, learning_rate=0.0, is_base=True, skipped=False, lms=base_lms)]
    rows += [dict(feature_factor=ff, learning_rate=lr, is_base=False, skipped=False,
                  lms=base_lms * (1 - 0.001 * abs(lr))) for ff in factors for lr in rates]
    frame = pd.DataFrame(rows)
    frame["p_female"] = 0.016 * np.exp(spread * frame["feature_factor"] * np.tanh(frame["learning_rate"]))
    frame["p_male"] = 0.016 * np.exp(-spread * frame["feature_factor"] * np.tanh(frame["learning_rate"]))
    for c in CLASSES:
        for d in CLASSES:
            frame[f"p_{c}@{d}"] = frame[f"p_{c}"]
    frame["balance_product"] = 4 * frame["p_female"] * frame["p_male"]
    return DecoderEvaluation(grid=score_columns(frame, CLASSES), feature_classes=CLASSES, lms_ratio=0.99,
                             base_lms=base_lms)


def drawn_tick_labels(figure: Figure) -> list:
    """Every tick label the drawn figure shows (visible, with text), from all axes, twins included."""
    FigureCanvasAgg(figure).draw()  # lays the figure out (constrained layout) and places the labels
    return [label for axis in figure.axes for which in ("x", "y") if getattr(axis, f"{which}axis").get_visible()
            for minor in (False, True) for label in getattr(axis, f"get_{which}ticklabels")(minor=minor)
            if label.get_visible() and label.get_text()]


LADDER = learning_rate_ladder()
GRIDS = {
    "both signs, 1e-3 to 100": (wide_grid([-r for r in LADDER] + LADDER), 13),
    "the default ladder": (wide_grid(LADDER), 6),
    "three rates, narrow P range, base LMS 0": (wide_grid([0.01, 0.1, 1.0], base_lms=0.0, spread=0.1), 3),
    "seven feature factors": (wide_grid(LADDER, factors=(3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0)), 6),
    "both signs, 1e-8 to 1e6 (labels thinned)": (wide_grid([s * 10.0 ** e for s in (1, -1) for e in range(-8, 7)]),
                                                 31),
}


@pytest.mark.parametrize("name", list(GRIDS))
def test_decoder_plot_tick_labels_are_compact_and_never_overlap(name):
    """Labels of a log/symlog grid used to be mathtext (10^-1, -10^2) squeezed into a fixed width: with rates of
    both signs they ran into each other. Now no two drawn labels of the figure overlap, and each is short."""
    evaluation, ticks = GRIDS[name]
    figure = plot_decoder(evaluation, [Edit(1.0, 1.0, goal="female")])
    labels = drawn_tick_labels(figure)
    assert labels
    for label in labels:
        text = label.get_text()
        assert "$" not in text and len(text) <= 8, text  # 0.01585, -1e-3: no mathtext (10^-3, 1.58x10^-2)
    for axis in figure.axes:  # the labels of one axis name different values
        for which in ("x", "y"):
            texts = [t.get_text() for minor in (False, True)
                     for t in getattr(axis, f"get_{which}ticklabels")(minor=minor) if t.get_text()]
            assert len(texts) == len(set(texts)), (which, texts)
    boxes = [(label.get_text(), label.get_window_extent()) for label in labels]
    overlapping = [(a, b) for (a, box_a), (b, box_b) in combinations(boxes, 2) if box_a.overlaps(box_b)]
    assert not overlapping, overlapping
    first = figure.axes[0]
    shown = [t.get_text() for t in first.get_xticklabels() if t.get_text()]
    assert shown and set(shown) <= {compact(t) for t in first.get_xticks()}  # labels name their ticks
    assert len(first.get_xticks()) == ticks  # one tick per decade (and 0 between the signs)
    y_labels = [t.get_text() for t in first.get_yticklabels(minor=True) + first.get_yticklabels() if t.get_text()]
    assert y_labels, "the P(class) axis must be labelled even within one decade"


def test_decoder_figure_grows_with_the_grid_and_labels_read_plainly():
    wide, _ = GRIDS["both signs, 1e-3 to 100"]
    narrow, _ = GRIDS["the default ladder"]
    assert plot_decoder(wide).get_figwidth() > plot_decoder(narrow).get_figwidth()
    seven, _ = GRIDS["seven feature factors"]
    assert plot_decoder(seven).get_figwidth() > plot_decoder(narrow).get_figwidth()  # one panel per factor
    assert [compact(v) for v in (0.0, 1e-3, 0.002, 0.01, 0.5, 1.0, 10.0, 100.0, -100.0, 2000.0, 0.016, -1e-3)] == [
        "0", "1e-3", "2e-3", "0.01", "0.5", "1", "10", "100", "-100", "2e3", "0.016", "-1e-3"]
    figure = plot_decoder(wide)
    shown = [t.get_text() for t in figure.axes[0].get_xticklabels() if t.get_text()]
    assert shown == ["-100", "-10", "-1", "-0.1", "-0.01", "-1e-3", "0", "1e-3", "0.01", "0.1", "1", "10", "100"]
    assert [a.get_title() for a in figure.axes[:3]] == ["feature factor +1", "feature factor 0", "feature factor -1"]


def test_decoder_plot_without_a_base_lms_draws_no_ratio():
    evaluation, _ = GRIDS["three rates, narrow P range, base LMS 0"]
    figure = plot_decoder(evaluation)
    twins = [axis for axis in figure.axes if axis.get_ylabel().startswith("LMS")]
    assert twins and "not drawn (the base's LMS is 0)" in twins[-1].get_ylabel()
    assert all(not line.get_label().startswith("LMS") for axis in figure.axes for line in axis.lines)


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
