"""Heatmaps of a suite's comparison (suite_comparison.py): encoders on each other's rows, decoder mass per layer, and
each pair's edits on every class. Overlap and cosine matrices are drawn by plotting.plot_overlap / plot_cosine.

Every function returns a matplotlib Figure (object API, no pyplot state) and saves a PNG when given a path.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .plotting import PathLike, heatmap, matrix_size, save_figure
from .suite_comparison import CrossEncoding, EditProbabilities


def plot_cross_encoding(cross: CrossEncoding, path: PathLike = None) -> Figure:
    """Left: Pearson r of each encoder (rows) with each data pair's labels (columns). Right: mean h of each encoder on
    each class of each data pair (columns 'data: class'): does the black-white neuron also fire for asian-white?"""
    means = cross.means.assign(column=cross.means["data"] + ": " + cross.means["class"])
    table = means.pivot(index="encoder", columns="column", values="mean_h")
    table = table.reindex(index=cross.correlation.index, columns=list(dict.fromkeys(means["column"])))
    width, height = matrix_size(max(len(cross.correlation), 2))
    figure = Figure(figsize=(width + 0.6 * table.shape[1] + 2, height))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [max(cross.correlation.shape[1], 1),
                                                                       max(table.shape[1], 1)]})
    heatmap(figure, left, cross.correlation, -1.0, 1.0, "RdBu_r", "Correlation of h with the data pair's labels")
    left.set(xlabel="rows of pair", ylabel="encoder of pair")
    heatmap(figure, right, table, -1.0, 1.0, "RdBu_r", "Mean h per class")
    right.set(xlabel="rows of pair: class")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_layers(by_layer: pd.DataFrame, path: PathLike = None,
                title: str = "Where each pair's feature lives: share of |decoder| mass per layer") -> Figure:
    """Layers (rows) x pairs (columns) of the decoder's mass share (DecoderComparison.by_layer)."""
    figure = Figure(figsize=(2.2 + 1.3 * max(by_layer.shape[1], 1), max(3.0, 0.34 * len(by_layer) + 1.6)))
    top = float(np.nanmax(by_layer.to_numpy(dtype=float))) if by_layer.size else 1.0
    heatmap(figure, figure.subplots(), by_layer, 0.0, max(top, 1e-12), "YlOrRd", title, fmt="{:.1%}", zero="·")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_edit_probabilities(probabilities: EditProbabilities, path: PathLike = None) -> Figure:
    """One panel per (pair, edit), base first: mean P(class) (columns) on the rows of each class (rows). An edit
    that strengthens one class of its pair shows that column rising on every row class, and the third class's column
    shows what the pair's edit does to a class it was not trained on."""
    frame = probabilities.frame
    pairs = list(dict.fromkeys(frame["pair"]))
    edits = {pair: list(dict.fromkeys(frame.loc[frame["pair"] == pair, "edit"])) for pair in pairs}
    columns = max(len(e) for e in edits.values())
    n = len(probabilities.classes)
    side = max(2.6, 0.55 * n + 1.4)
    figure = Figure(figsize=(side * 1.3 * columns, side * len(pairs)))
    axes = np.atleast_2d(figure.subplots(len(pairs), columns, squeeze=False))
    top = float(frame["p"].max()) if len(frame) else 1.0
    for i, pair in enumerate(pairs):
        for j in range(columns):
            axis = axes[i, j]
            if j >= len(edits[pair]):
                axis.set_axis_off()
                continue
            edit = edits[pair][j]
            heatmap(figure, axis, probabilities.table(pair, edit), 0.0, max(top, 1e-12), "viridis",
                     f"{pair}: {edit}", fmt="{:.3g}")
            axis.set(xlabel="P(class)", ylabel="rows of class" if j == 0 else None)
    figure.suptitle("P(class) on the rows of each class, under each pair's edits", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)
