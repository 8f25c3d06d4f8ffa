"""Small manifold objects for the UFM solvers, in the style of pymanopt.

Yaras et al. (NeurIPS 2022) pose the normalized unconstrained feature model on a product
of spheres: every classifier row w_k and every feature h_i has unit norm. A matrix whose
rows each lie on the unit sphere is a `RowSphere` point; the free bias is `Euclidean`.
Tangent vectors are represented in the ambient space (same shape as the point), so the
solver can difference iterates and gradients directly for its Barzilai-Borwein steps.

Each manifold carries its metric (`inner`). A `RowSphere` may give its rows weights:
row j then stands for m_j identical rows of a larger point, and the metric counts it
m_j times, so that a solver run on the small point takes exactly the steps it would
take on the large one (the UFM solver merges a class's collapsed features this way).

The feature block is the largest array the solver touches (N x d), so these operations
make one pass over it and allocate at most their result: `project` works in place.
"""

import torch


class RowSphere:
    """Matrices whose rows each have unit Euclidean norm (a product of spheres S^{d-1}).

    `row_weights` (one positive number per row, or None for all ones) weighs row j's
    share of the metric: <u, v> = sum_j m_j <u_j, v_j>.
    """

    def __init__(self, row_weights: torch.Tensor | None = None):
        self.row_weights = None if row_weights is None else row_weights.to(torch.float64)

    def inner(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The metric, as a 0-dim tensor on the points' device."""
        if self.row_weights is None:
            return flat_dot(first, second)
        return torch.dot(row_dots(first, second), self.row_weights)

    def euclidean_to_riemannian_gradient(self, point, euclidean_gradient) -> torch.Tensor:
        """The gradient in this metric: the Euclidean one divided by the row weights, and
        projected. In place, like `project`."""
        if self.row_weights is not None:
            euclidean_gradient.div_(self.row_weights[:, None])
        return self.project(point, euclidean_gradient)

    def project(self, point: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """Project an ambient vector onto the tangent space: g - <g, x> x, row by row.

        In place: `vector` is overwritten with its projection and returned.
        """
        return vector.addcmul_(point, row_dots(vector, point)[:, None], value=-1)

    def retract(self, point: torch.Tensor, tangent: torch.Tensor, step_size: float = 1.0):
        """Step `step_size * tangent`, then normalize each row back onto the sphere."""
        moved = torch.add(point, tangent, alpha=step_size)
        return moved.div_(torch.linalg.vector_norm(moved, dim=1, keepdim=True))

    def random(self, shape, generator: torch.Generator) -> torch.Tensor:
        """Rows uniformly distributed on the sphere (normalized standard Gaussians).

        Drawn in float64 on the generator's device, so a seed gives the same point
        whichever device the solver later moves it to.
        """
        gaussian = torch.randn(
            shape, generator=generator, dtype=torch.float64, device=generator.device
        )
        return gaussian / gaussian.norm(dim=1, keepdim=True)


class Euclidean:
    """Unconstrained matrices or vectors: the tangent space is the whole space."""

    def inner(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return flat_dot(first, second)

    def euclidean_to_riemannian_gradient(self, point, euclidean_gradient) -> torch.Tensor:
        return euclidean_gradient

    def project(self, point: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """The vector itself: every vector is tangent here."""
        return vector

    def retract(self, point: torch.Tensor, tangent: torch.Tensor, step_size: float = 1.0):
        return torch.add(point, tangent, alpha=step_size)

    def random(self, shape, generator: torch.Generator) -> torch.Tensor:
        """Standard Gaussian entries in float64, drawn on the generator's device."""
        return torch.randn(shape, generator=generator, dtype=torch.float64, device=generator.device)


def flat_dot(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return torch.vdot(first.reshape(-1), second.reshape(-1))


def row_dots(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """<first_i, second_i> for every row i, as a batched matrix product.

    Unlike (first * second).sum(dim=1) it never materializes the elementwise product, an
    extra array as large as the inputs.
    """
    return torch.bmm(first.unsqueeze(1), second.unsqueeze(2)).flatten()
