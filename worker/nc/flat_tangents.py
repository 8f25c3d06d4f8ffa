"""Tangent vectors of a point as one flat vector, with the manifolds' metric as weights.

Methods that keep many tangent vectors and take many inner products of them (Lanczos in
worker.nc.curvature, L-BFGS's memory in worker.nc.lbfgs) work on one flat vector per
tangent: an inner product is then one weighted dot product, not one call per block.

The metric's weights are one per entry, or one number where every entry has the same
weight (the tied phase's point, every class balanced): the inner product is then a
scaled dot product, without the pass that weighs one of the vectors first, which in
L-BFGS's loop costs more than the dot product itself (the vectors come from memory, not
cache).
"""

from collections.abc import Sequence

import torch

from worker.nc.manifolds import Manifold, Point, RowSphere

# A flat tangent vector's weights in the metric: one per entry, or the one they all share.
Weights = torch.Tensor | float


class FlatTangents:
    """The blocks of a point's tangent vectors as one flat vector, and back; `metric`
    weighs each entry as the manifolds' inner product does (a `RowSphere` row of weight
    m_j counts m_j times)."""

    def __init__(self, point: Point, manifolds: list[Manifold]):
        self.shapes = [block.shape for block in point]
        self.sizes = [block.numel() for block in point]
        self.size = sum(self.sizes)
        self.device = point[0].device
        self.metric = shared_weight_or_all(
            torch.cat(
                [
                    (
                        manifold.row_weights[:, None].expand(block.shape).reshape(-1)
                        if isinstance(manifold, RowSphere) and manifold.row_weights is not None
                        else torch.ones(block.numel(), dtype=torch.float64, device=block.device)
                    )
                    for manifold, block in zip(manifolds, point)
                ]
            )
        )

    def flatten(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """The blocks as one flat vector: a view of the block where there is only one (a tied point,
        worker.nc.merging), a copy otherwise."""
        if len(blocks) == 1:
            return blocks[0].reshape(-1)
        return torch.cat([block.reshape(-1) for block in blocks])

    def block_constants(self, values: Sequence[float]) -> Weights:
        """The weights that are values[b] on the entries of block b."""
        return shared_weight_or_all(
            torch.cat(
                [
                    torch.full((size,), value, dtype=torch.float64, device=self.device)
                    for size, value in zip(self.sizes, values)
                ]
            )
        )

    def inner(self, first: torch.Tensor, second: torch.Tensor) -> float:
        return metric_dot(first, second, self.metric)

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of `flat`: writing to a block writes to `flat`."""
        if len(self.shapes) == 1:
            return [flat.view(self.shapes[0])]
        return [piece.view(shape) for piece, shape in zip(torch.split(flat, self.sizes), self.shapes)]


def shared_weight_or_all(weights: torch.Tensor) -> Weights:
    """`weights`, or the one number all of them equal."""
    first = float(weights[0])
    return first if bool((weights == first).all()) else weights


def metric_dot(first: torch.Tensor, second: torch.Tensor, metric: Weights) -> float:
    """The inner product of two flat tangent vectors in the metric whose weights are `metric`."""
    if isinstance(metric, float):
        return metric * float(torch.dot(first, second))
    return float(torch.dot(first, metric * second))
