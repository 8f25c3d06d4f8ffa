"""PNG plots of histories and curves, drawn with matplotlib's Agg backend in the API process.

NC metrics fall over orders of magnitude on the way to collapse, so their axis is
logarithmic; accuracies, losses and learning rates are drawn on a linear one.
"""

import io

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # after choosing the backend
from matplotlib.ticker import MaxNLocator

DPI = 100


def log_scale(metric: str) -> bool:
    return metric.startswith("nc") or metric in ("grad_norm", "optimality_gap")


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _axes(width: int, height: int, title: str, step_unit: str, metric_label: str, logarithmic: bool):
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(step_unit)
    axes.set_ylabel(metric_label)
    if logarithmic:
        axes.set_yscale("log")
    axes.grid(True, which="major", alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole iterations or epochs
    return figure, axes


def history_png(
    rows: list[dict], metrics: list[str], title: str, step_unit: str, width: int = 800, height: int = 500
) -> bytes:
    """One line per metric over the experiment's steps."""
    logarithmic = all(log_scale(m) for m in metrics)
    figure, axes = _axes(width, height, title, step_unit, ", ".join(metrics), logarithmic)
    for metric in metrics:
        points = [(row["step"], row[metric]) for row in rows if row.get(metric) is not None]
        if logarithmic:
            points = [(step, value) for step, value in points if value > 0]
        axes.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=metric)
    axes.legend()
    return _png(figure)


def curves_png(items: list[dict], metric: str, step_unit: str, width: int = 800, height: int = 500) -> bytes:
    """One line per group: the mean over its experiments, with a shaded band of ± one std."""
    logarithmic = log_scale(metric)
    figure, axes = _axes(width, height, f"{metric}: mean ± std over experiments", step_unit, metric, logarithmic)
    for item in items:
        label = ", ".join(str(value) for value in item["group"].values()) or "all"  # the legend's title names them
        points = [p for p in item["points"] if p["mean"] is not None and (not logarithmic or p["mean"] > 0)]
        steps = [p["step"] for p in points]
        means = [p["mean"] for p in points]
        spreads = [p["std"] or 0.0 for p in points]
        lower = [m - s for m, s in zip(means, spreads)]
        if logarithmic:
            # A band reaching zero or below has no place on a log axis: clip it at the smallest value seen.
            lower = [max(low, p["min"]) if low <= 0 else low for low, p in zip(lower, points)]
        (line,) = axes.plot(steps, means, label=label)
        axes.fill_between(steps, lower, [m + s for m, s in zip(means, spreads)], color=line.get_color(), alpha=0.2)
    if items:
        axes.legend(title=", ".join(items[0]["group"]) or None)
    return _png(figure)
