"""PNG plots of histories and curves, drawn with matplotlib's Agg backend in the API process.

NC metrics fall over orders of magnitude on the way to collapse, so their axis is
logarithmic; accuracies, losses and learning rates are drawn on a linear one. Legends sit
below the axes, off the data they name.
"""

import io
from typing import TYPE_CHECKING

from service.schemas import TrainSpec, UFMSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100


def log_scale(metric: str) -> bool:
    return metric.startswith("nc") or metric in ("grad_norm", "optimality_gap")


def _png(figure: "Figure") -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _axes(width: int, height: int, title: str, step_unit: str, metric_label: str, logarithmic: bool):
    # Imported on the first plot, not with the API: most API processes never draw one, and importing matplotlib
    # cost each of them a third of a second of its start. A Figure draws with the Agg canvas; no backend is chosen.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

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


def _legend_beside(figure: "Figure", axes) -> None:
    """The legend outside the axes, below them in two columns: the constrained layout
    shortens the axes to make room, so that no curve runs under it."""
    handles, labels = axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(2, len(labels)), fontsize="small")


def group_label(group: dict) -> str:
    """A group's legend entry: `field=value` for each field of the group that its members
    use, "all" for the one group of everything.

    A field that only some settings use (the specs' FIELD_OWNERS: logit_scale, normalized
    only) is left out where the group's own value of that setting does not use it: a
    regularized arm is not labelled with the logit scale it ignores.
    """
    used = [name for name in group if not _unused_in(name, group)]
    return ", ".join(f"{name.removeprefix('spec.')}={group[name]}" for name in used) or "all"


def _unused_in(name: str, group: dict) -> bool:
    field = name.removeprefix("spec.")
    for spec_model in (UFMSpec, TrainSpec):
        owner_and_allowed = spec_model.FIELD_OWNERS.get(field)
        if owner_and_allowed is None:
            continue
        owner, allowed = owner_and_allowed
        if f"spec.{owner}" in group and group[f"spec.{owner}"] not in allowed:
            return True
    return False


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
    _legend_beside(figure, axes)
    return _png(figure)


def curves_png(items: list[dict], metric: str, step_unit: str, width: int = 800, height: int = 500) -> bytes:
    """One line per group: the mean over its experiments, with a shaded band of ± one std."""
    return _png(curves_figure(items, metric, step_unit, width, height))


def curves_figure(items: list[dict], metric: str, step_unit: str, width: int = 800, height: int = 500) -> "Figure":
    """The figure of `curves_png`."""
    logarithmic = log_scale(metric)
    figure, axes = _axes(width, height, f"{metric}: mean ± std over experiments", step_unit, metric, logarithmic)
    for item in items:
        label = group_label(item["group"])
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
        _legend_beside(figure, axes)
    return figure
