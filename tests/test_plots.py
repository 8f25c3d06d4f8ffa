"""The plots' legends: beside the axes, and naming each group by the fields it uses."""

import io

import pytest

from service import plots


@pytest.mark.parametrize(
    ("group", "label"),
    [
        ({"spec.normalization": "regularized", "spec.logit_scale": 10.0}, "normalization=regularized"),
        ({"spec.normalization": "normalized", "spec.logit_scale": 10.0}, "normalization=normalized, logit_scale=10.0"),
        ({"spec.logit_scale": 5.0}, "logit_scale=5.0"),  # the setting is not in the group: kept
        ({"spec.loss": "mse", "spec.label_smoothing": None}, "loss=mse"),
        ({"spec.optimizer": "adam", "spec.momentum": 0.9, "tags.arm": "b"}, "optimizer=adam, tags.arm=b"),
        ({}, "all"),
    ],
)
def test_a_group_is_labelled_only_with_the_fields_it_uses(group, label):
    assert plots.group_label(group) == label


def curve(group: dict, scale: float) -> dict:
    points = [{"step": step, "mean": scale / (step + 1), "std": 0.0, "min": 0.0} for step in range(20)]
    return {"group": group, "points": points}


def test_the_legend_lies_beside_the_curves_not_on_them():
    items = [curve({"spec.normalization": name}, scale) for name, scale in (("normalized", 1.0), ("none", 2.0))]
    figure = plots.curves_figure(items, "nc1", "epoch")
    figure.savefig(io.BytesIO(), format="png")  # lays the figure out as curves_png does
    axes = figure.axes[0]
    legend = figure.legends[0]
    legend_box = legend.get_window_extent()
    axes_box = axes.get_window_extent()
    assert legend_box.y1 < axes_box.y0  # wholly below the data area
    assert legend_box.y0 >= figure.bbox.y0  # and inside the image
    texts = [text.get_text() for text in legend.get_texts()]
    assert texts == ["normalization=normalized", "normalization=none"]
