"""Tangent vectors of a point as one flat vector, with the manifolds' metric as weights.

Methods that keep many tangent vectors and take many inner products of them (Lanczos in
worker.nc.curvature, L-BFGS's memory in worker.nc.lbfgs) work on one flat vector per
tangent: an inner product is then one weighted dot product, not one call per block.
"""

from collections.abc import Sequence

import torch

from worker.nc.manifolds import Manifold, Point, RowSphere


class FlatTangents:
    """The blocks of a point's tangent vectors as one flat vector, and back; `metric`
    weighs each entry as the manifolds' inner product does (a `RowSphere` row of weight
    m_j counts m_j times)."""

    def __init__(self, point: Point, manifolds: list[Manifold]):
        self.shapes = [block.shape for block in point]
        self.sizes = [block.numel() for block in point]
        self.size = sum(self.sizes)
        self.metric = torch.cat(
            [
                (
                    manifold.row_weights[:, None].expand(block.shape).reshape(-1)
                    if isinstance(manifold, RowSphere) and manifold.row_weights is not None
                    else torch.ones(block.numel(), dtype=torch.float64, device=block.device)
                )
                for manifold, block in zip(manifolds, point)
            ]
        )

    def flatten(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """The blocks as one flat vector: a view of the block where there is only one (a tied point,
        worker.nc.merging), a copy otherwise."""
        if len(blocks) == 1:
            return blocks[0].reshape(-1)
        return torch.cat([block.reshape(-1) for block in blocks])

    def block_constants(self, values: Sequence[float]) -> torch.Tensor:
        """The flat vector whose entries in block b are values[b]."""
        return torch.cat(
            [
                torch.full((size,), value, dtype=self.metric.dtype, device=self.metric.device)
                for size, value in zip(self.sizes, values)
            ]
        )

    def inner(self, first: torch.Tensor, second: torch.Tensor) -> float:
        return metric_dot(first, second, self.metric)

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of `flat`: writing to a block writes to `flat`."""
        return [piece.view(shape) for piece, shape in zip(torch.split(flat, self.sizes), self.shapes)]


def metric_dot(first: torch.Tensor, second: torch.Tensor, metric: torch.Tensor) -> float:
    """The inner product of two flat tangent vectors in the metric whose weights are `metric`."""
    return float(torch.dot(first, metric * second))
