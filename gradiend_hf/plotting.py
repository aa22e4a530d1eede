"""Figures people look at: training convergence, encoder distributions, and the decoder grid with the chosen edits.

Every function returns a matplotlib Figure (object API, no global pyplot state) and saves a PNG when given a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter

from .atomic import write_file_atomically
from .edit import Edit
from .evaluation.decoder import DecoderEvaluation
from .evaluation.encoder import NEUTRAL, EncoderEvaluation

PathLike = Union[str, Path, None]
COLOURS = ["#c0392b", "#2471a3", "#7f8c8d", "#27ae60", "#8e44ad"]


def save_figure(figure: Figure, path: PathLike) -> Figure:
    if path is not None:
        suffix = Path(path).suffix.lstrip(".") or "png"
        write_file_atomically(path, lambda tmp: figure.savefig(tmp, format=suffix, dpi=130, bbox_inches="tight"))
    return figure


def plot_training(log_history: Sequence[Mapping], feature_classes: Sequence[str], path: PathLike = None) -> Figure:
    """Correlation and per-class mean h over steps (evaluations), and the training loss (trainer.state.log_history)."""
    evals = pd.DataFrame([r for r in log_history if "eval_correlation" in r])
    losses = pd.DataFrame([r for r in log_history if "loss" in r and "step" in r])
    figure = Figure(figsize=(11, 4))
    left, right = figure.subplots(1, 2)
    if len(evals):
        left.plot(evals["step"], evals["eval_correlation"], "k-o", label="correlation", markersize=4)
        for colour, c in zip(COLOURS, feature_classes):
            if f"eval_mean_h_{c}" in evals:
                left.plot(
                    evals["step"], evals[f"eval_mean_h_{c}"], "-s", color=colour, label=f"mean h ({c})", markersize=3
                )
        best = evals.loc[evals["eval_correlation"].abs().idxmax()]
        left.axvline(best["step"], color="grey", linestyle=":", label=f"best step {int(best['step'])}")
    left.axhline(0, color="lightgrey", linewidth=0.8)
    left.set(xlabel="step", ylabel="value", title="Encoder on validation rows", ylim=(-1.05, 1.05))
    left.legend(fontsize=8, loc="lower right")
    if len(losses):
        right.plot(losses["step"], losses["loss"], color="#34495e")
        right.set_yscale("log")
    right.set(xlabel="step", ylabel="reconstruction MSE", title="Training loss")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_encoder(evaluation: EncoderEvaluation, feature_classes: Sequence[str], path: PathLike = None) -> Figure:
    """Distribution of the feature neuron h per class (and neutral rows): should sit near +1, -1 and 0."""
    frame = evaluation.frame
    groups = [c for c in [*feature_classes, NEUTRAL] if (frame["label_class"] == c).any()]
    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    bins = np.linspace(-1, 1, 41)
    for colour, group in zip(COLOURS, groups):
        values = frame.loc[frame["label_class"] == group, "h"]
        axis.hist(
            values, bins=bins, alpha=0.55, color=colour, label=f"{group} (n={len(values)}, mean {values.mean():+.2f})"
        )
    axis.set(xlabel="feature neuron h", ylabel="rows",
             title=f"Encoder: correlation {evaluation.correlation:.3f}, "
                   f"neutral mean |h| {evaluation.neutral_mean_abs_h:.2f}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def compact(value: float, digits: int = 2) -> str:
    """A tick label as short as it can be: 0, 0.01, 0.5, 10, 100, 1e-3, -2e3, 0.016 (no mathtext, no '+0')."""
    if value == 0:
        return "0"
    if 1e-2 <= abs(value) < 1e3:
        text = f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{max(digits, 3)}g}"
    else:
        text = f"{value:.{digits}g}" if "e" in f"{value:.{digits}g}" else f"{value:.0e}"
    mantissa, _, exponent = text.partition("e")
    return mantissa if not exponent else f"{mantissa}e{int(exponent)}"


class DistinctFormatter(Formatter):
    """Tick labels made by `compact` with the fewest significant digits (2 to 8) that keep every label of the axis
    distinct: ticks 0.0158, 0.0159, 0.016 on a narrow log axis are not all written 0.016."""

    def __call__(self, value: float, pos: Optional[int] = None) -> str:
        return compact(value)

    def format_ticks(self, values: Sequence[float]) -> list[str]:
        labels: list[str] = []
        for digits in range(2, 9):
            labels = [compact(v, digits) for v in values]
            if len(set(labels)) == len(labels):
                break
        return labels


def learning_rate_ticks(rates: Sequence[float]) -> list[float]:
    """Major ticks of a symlog learning-rate axis: the powers of ten within the grid's range (both signs), and 0 when
    the grid has rates of both signs or 0 itself."""
    rates = [float(r) for r in rates]
    ticks: set[float] = set()
    for sign in (1, -1):
        side = [abs(r) for r in rates if r * sign > 0]
        if side:
            low, high = int(np.floor(np.log10(min(side)) + 1e-9)), int(np.ceil(np.log10(max(side)) - 1e-9))
            ticks.update(sign * 10.0 ** e for e in range(low, high + 1))
    if 0 in rates or (min(rates, default=0) < 0 < max(rates, default=0)):
        ticks.add(0.0)
    return sorted(ticks)


PANEL_TICK_INCHES = 0.42  # horizontal room one learning-rate tick label needs (a label such as -1e-3 at 8 pt)


def decoder_panel_width(ticks: int) -> float:
    """Inches of one feature-factor panel: wider for a grid spanning more decades, so its labels do not collide."""
    return float(min(max(4.2, PANEL_TICK_INCHES * ticks + 1.6), 11.0))


def plot_decoder(
    evaluation: DecoderEvaluation, edits: Optional[Iterable[Edit]] = None, path: PathLike = None
) -> Figure:
    """P(class) (log scale) and LMS across the learning-rate grid, one panel per feature factor, chosen edits
    starred.

    Readable at any grid size: each panel is as wide as its decades need (decoder_panel_width), tick labels are
    compact (1e-3, 0.01, 100: `compact`) and thinned to every second or third decade if a panel would still be too
    narrow, and matplotlib's constrained layout places titles, labels and the legend without overlaps."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

    grid = evaluation.grid[~evaluation.grid["skipped"] & ~evaluation.grid["is_base"]]
    base = evaluation.grid[evaluation.grid["is_base"]].iloc[0]
    factors = sorted(grid["feature_factor"].unique(), reverse=True)
    ticks = learning_rate_ticks(grid["learning_rate"].unique())
    width = decoder_panel_width(len(ticks))
    step = int(np.ceil(len(ticks) * PANEL_TICK_INCHES / max(width - 1.6, PANEL_TICK_INCHES)))
    labelled = set(ticks[::-1][::max(step, 1)])  # every step-th decade, counted from the largest rate
    figure = Figure(figsize=(width * max(len(factors), 1), 4.8), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, max(len(factors), 1), sharex=True, sharey=True))
    has_lms = evaluation.base_lms > 0
    ratios = grid["lms"] / evaluation.base_lms if has_lms else grid["lms"] * np.nan
    lms_low = min(evaluation.lms_ratio - 0.02, float(ratios.min()) - 0.01) if has_lms and len(ratios) else 0.9
    goals: dict[tuple, list[str]] = {}
    for edit in edits or []:
        if edit.learning_rate != 0:
            goals.setdefault((edit.feature_factor, edit.learning_rate), []).append(edit.goal or "edit")
    handles = []
    for i, (axis, ff) in enumerate(zip(axes, factors)):
        part = grid[grid["feature_factor"] == ff].sort_values("learning_rate")
        for colour, c in zip(COLOURS, evaluation.feature_classes):
            handles += axis.plot(
                part["learning_rate"], part[f"p_{c}"], "-o", color=colour, markersize=3, label=f"P({c})"
            )
            axis.axhline(base[f"p_{c}"], color=colour, linestyle=":", linewidth=0.9)
        axis.set_xscale("symlog", linthresh=min((abs(t) for t in ticks if t), default=1e-3))
        axis.set_yscale("log")
        axis.xaxis.set_major_locator(FixedLocator(ticks))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda x, _: compact(x) if x in labelled else ""))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.tick_params(labelsize=8)
        axis.set(xlabel="learning rate", title=f"feature factor {'+' if ff > 0 else ''}{compact(ff)}")
        lms_axis = axis.twinx()
        if has_lms:
            handles += lms_axis.plot(part["learning_rate"], ratios.loc[part.index], "--", color="black",
                                     linewidth=1, label="LMS / base LMS")
            lms_axis.axhline(evaluation.lms_ratio, color="grey", linestyle="-.", linewidth=0.8)
            lms_axis.set_ylim(lms_low, 1.01 + 0.02 * (1 - lms_low))
        lms_axis.yaxis.set_major_locator(MaxNLocator(6))
        lms_axis.yaxis.set_major_formatter(DistinctFormatter())
        lms_axis.tick_params(labelsize=8)
        if i == len(factors) - 1:
            lms_axis.set_ylabel(f"LMS / base LMS (dash-dot: {evaluation.lms_ratio})" if has_lms else
                                "LMS / base LMS: not drawn (the base's LMS is 0)")
        else:
            lms_axis.tick_params(labelright=False)
        if not has_lms:
            lms_axis.set_yticks([])
        for (edit_ff, lr), names in goals.items():
            hit = part[part["learning_rate"] == lr]
            if edit_ff != ff or hit.empty:
                continue
            for colour, c in zip(COLOURS, evaluation.feature_classes):
                axis.plot(
                    hit["learning_rate"], hit[f"p_{c}"], "*", color=colour, markersize=15, markeredgecolor="black"
                )
            axis.annotate(", ".join(names),
                          (lr, float(hit[[f"p_{c}" for c in evaluation.feature_classes]].max(axis=1).iloc[0])),
                          textcoords="offset points", xytext=(-10, 10), fontsize=8, ha="right")
    if len(grid):  # the grid's range plus 4% on each side (in symlog space); an LMS axis without data adds nothing
        transform = axes[0].xaxis.get_transform()
        ends = transform.transform(np.array([grid["learning_rate"].min(), grid["learning_rate"].max()], dtype=float))
        span = float(ends[1] - ends[0]) or max(abs(float(ends[0])), 1e-3)  # one rate: a span around it
        pad = 0.04 * span
        axes[0].set_xlim(*transform.inverted().transform(np.array([ends[0] - pad, ends[1] + pad])))
    low, high = axes[0].get_ylim()  # shared: P(class) over all panels
    few_decades = np.log10(high / low) < 1.5 if low > 0 else False
    axes[0].yaxis.set_major_formatter(DistinctFormatter())
    # within a decade or so the log axis has no major tick to label: label the minor ticks (2, 3, ... x 10^k)
    axes[0].yaxis.set_minor_formatter(DistinctFormatter() if few_decades else NullFormatter())
    axes[0].tick_params(axis="y", which="both", labelsize=8)
    axes[0].set_ylabel("mean P(class) at the feature position")
    unique = {h.get_label(): h for h in handles}
    figure.legend(unique.values(), unique.keys(), loc="outside lower center", ncol=max(len(unique), 1), fontsize=8,
                  frameon=False)
    figure.suptitle("Decoder grid (dotted: base model; stars: chosen edits)", fontsize=10)
    return save_figure(figure, path)


# --- comparison figures (gradiend_hf.comparison) ----------------------------------------------------------------------
from matplotlib import colormaps  # noqa: E402

from .comparison import FeatureLocation, Overlap  # noqa: E402

MODULE_COLOURS = {
    "attention": "#2471a3", "mlp": "#c0392b", "embeddings": "#27ae60", "norm": "#8e44ad", "other": "#7f8c8d"
}


def heatmap(figure: Figure, axis, frame: pd.DataFrame, vmin: float, vmax: float, cmap: str, title: str,
             fmt: str = "{:.2f}", zero: Optional[str] = None):
    """imshow of a labelled frame with every cell's number written in it (NaN cells grey, marked '–')."""
    values = frame.to_numpy(dtype=float)
    image = axis.imshow(values, vmin=vmin, vmax=vmax, cmap=colormaps[cmap].with_extremes(bad="#e5e5e5"), aspect="auto")
    long_labels = max((len(str(c)) for c in frame.columns), default=0) > 4
    axis.set_xticks(range(values.shape[1]), [str(c) for c in frame.columns], rotation=35 if long_labels else 0,
                    ha="right" if long_labels else "center", fontsize=8)
    axis.set_yticks(range(values.shape[0]), [str(i) for i in frame.index], fontsize=8)
    box = axis.get_position()  # cell size in points decides the font size of the numbers
    cell_width = 72 * box.width * figure.get_figwidth() / max(values.shape[1], 1)
    cell_height = 72 * box.height * figure.get_figheight() / max(values.shape[0], 1)
    size = max(5.5, min(10.0, cell_width / 3.6, cell_height * 0.5))
    for (i, j), value in np.ndenumerate(values):
        if np.isnan(value):
            text, colour = "–", "black"
        else:
            red, green, blue, _ = image.cmap(image.norm(value))
            colour = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            text = zero if zero is not None and value == 0 else fmt.format(value)
            if text.startswith("-") and not any(c in "123456789" for c in text):
                text = text[1:]  # '-0.00' reads as a sign where there is none
        axis.text(j, i, text, ha="center", va="center", fontsize=size, color=colour)
    axis.set_title(title, fontsize=10)
    colourbar = figure.colorbar(image, ax=axis, shrink=0.85)
    if "%" in fmt:
        colourbar.ax.yaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    return image


def matrix_size(n: int, panels: int = 1) -> tuple[float, float]:
    side = max(3.2, 0.75 * n + 1.6)
    return (side * 1.25 * panels, side)


def plot_overlap(matrix: Union[Overlap, pd.DataFrame], path: PathLike = None, title: Optional[str] = None) -> Figure:
    """Heatmap(s) of top-k overlap with the value in every cell: an `Overlap` draws |A∩B|/min and Jaccard side by
    side, a single DataFrame draws just that matrix (0 to 1)."""
    if isinstance(matrix, Overlap):
        frames = [(matrix.overlap, "|A∩B| / min(|A|, |B|)"), (matrix.jaccard, "Jaccard |A∩B| / |A∪B|")]
        k = f"{matrix.k:g}" if isinstance(matrix.k, float) else str(matrix.k)
        title = title or f"Top-k overlap ({matrix.by}, k = {k}; sizes {', '.join(str(int(s)) for s in matrix.sizes)})"
    else:
        frames = [(matrix, "overlap")]
    figure = Figure(figsize=matrix_size(len(frames[0][0]), len(frames)))
    axes = np.atleast_1d(figure.subplots(1, len(frames)))
    for axis, (frame, name) in zip(axes, frames):
        heatmap(figure, axis, frame, 0.0, 1.0, "viridis", name)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_cosine(
    matrix: pd.DataFrame, path: PathLike = None, title: str = "Cosine similarity of decoder vectors"
) -> Figure:
    """Heatmap of a `decoder_cosine` matrix (-1 to 1, diverging colours) with the value in every cell."""
    figure = Figure(figsize=matrix_size(len(matrix)))
    heatmap(figure, figure.subplots(), matrix, -1.0, 1.0, "RdBu_r", title)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_feature_location(location: Union[FeatureLocation, pd.DataFrame], path: PathLike = None,
                          title: Optional[str] = None) -> Figure:
    """Where a feature lives: share of weight mass per layer as bars stacked by module type (left) and the
    layer x module-type table as an annotated heatmap (right). Takes a `FeatureLocation` or its `.table`."""
    table = location.table if isinstance(location, FeatureLocation) else location
    if title is None and isinstance(location, FeatureLocation):
        title = f"Where the feature lives: share of {'|w|' if location.measure == 'abs' else 'w²'} mass ({location.by})"
    rows = len(table.index)
    figure = Figure(figsize=(12, max(3.2, 0.34 * rows + 1.8)))
    bars, heat = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.15]})
    positions = np.arange(rows)
    left = np.zeros(rows)
    for module in table.columns:
        shares = table[module].to_numpy(dtype=float)
        bars.barh(positions, shares, left=left, color=MODULE_COLOURS.get(module, "#34495e"), height=0.75,
                  label=f"{module} ({shares.sum():.1%})")
        left += shares
    for y, total in zip(positions, left):
        bars.text(total, y, f" {total:.1%}", va="center", fontsize=7)
    bars.set_yticks(positions, [str(i) for i in table.index], fontsize=8)
    bars.set_ylim(rows - 0.5, -0.5)
    bars.set_xlim(0, max(float(left.max()) * 1.2, 0.05) if rows else 1)
    bars.xaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    bars.set(xlabel="share of mass", title="Per layer (stacked by module type)")
    bars.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.5 / max(figure.get_figheight() - 1.5, 1.0)),
                ncol=len(table.columns), frameon=False)
    heatmap(figure, heat, table, 0.0, max(float(np.nanmax(table.to_numpy(dtype=float))) if table.size else 1.0, 1e-12),
             "YlOrRd", "Layer x module type", fmt="{:.1%}", zero="·")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)
