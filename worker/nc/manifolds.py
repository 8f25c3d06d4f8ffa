"""The manifolds that the blocks of a UFM point live on: small objects, as in pymanopt.

Yaras et al. (NeurIPS 2022) pose the normalized unconstrained feature model on a product
of spheres: every classifier row w_k and every feature h_i has unit norm. A matrix whose
rows each lie on the unit sphere is a `RowSphere` point; the regularized model's blocks
(Zhu et al., NeurIPS 2021) and the free bias are `Euclidean`. Tangent vectors are
represented in the ambient space (same shape as the point), so the descent can difference
iterates and gradients directly for its Barzilai-Borwein steps.

Each manifold carries its metric (`inner`). A `RowSphere` may give its rows weights:
row j then stands for m_j identical rows of a larger point, and the metric counts it
m_j times, so that a descent on the small point takes exactly the steps it would take on
the large one (worker.nc.merging merges a class's collapsed features this way).

The feature block is the largest array the solver touches (N x d), so these operations
make one pass over it and allocate at most their result: `project` works in place.
"""

from typing import Protocol

import torch

# A point of a product of manifolds: one block per manifold, [W, H] or [W, H, b].
Point = list[torch.Tensor]


class Manifold(Protocol):
    """What the descent asks of the manifold of one block of the point."""

    def inner(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The metric <first, second> of two tangent vectors, as a 0-dim tensor on their device."""

    def euclidean_to_riemannian_gradient(self, point: torch.Tensor, euclidean_gradient: torch.Tensor) -> torch.Tensor:
        """The gradient in this metric at `point`; may overwrite `euclidean_gradient`."""

    def euclidean_to_riemannian_hessian(
        self,
        point: torch.Tensor,
        euclidean_gradient: torch.Tensor,
        euclidean_hvp: torch.Tensor,
        tangent: torch.Tensor,
    ) -> torch.Tensor:
        """Hess f(x)[v] in this metric, from the Euclidean gradient at `point` and the
        Euclidean Hessian-vector product D^2 f(x)[v] along the tangent vector v; may
        overwrite `euclidean_hvp`."""

    def project(self, point: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """An ambient vector's projection onto the tangent space at `point`; may overwrite
        `vector`."""

    def retract(self, point: torch.Tensor, tangent: torch.Tensor, step_size: float = 1.0) -> torch.Tensor:
        """A new point on the manifold, close to point + step_size * tangent."""

    def random(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """A random point, in float64 on the generator's device, so that a seed gives the
        same point whichever device the solver later moves it to."""


class RowSphere:
    """Matrices whose rows each have unit Euclidean norm (a product of spheres S^{d-1}).

    `row_weights` (one positive number per row, or None for all ones) weighs row j's
    share of the metric: <u, v> = sum_j m_j <u_j, v_j>.
    """

    def __init__(self, row_weights: torch.Tensor | None = None):
        self.row_weights = None if row_weights is None else row_weights.to(torch.float64)

    def inner(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        if self.row_weights is None:
            return flat_dot(first, second)
        return torch.dot(row_dots(first, second), self.row_weights)

    def euclidean_to_riemannian_gradient(self, point: torch.Tensor, euclidean_gradient: torch.Tensor) -> torch.Tensor:
        """The Euclidean gradient divided by the row weights, and projected; in place."""
        if self.row_weights is not None:
            euclidean_gradient.div_(self.row_weights[:, None])
        return self.project(point, euclidean_gradient)

    def euclidean_to_riemannian_hessian(
        self,
        point: torch.Tensor,
        euclidean_gradient: torch.Tensor,
        euclidean_hvp: torch.Tensor,
        tangent: torch.Tensor,
    ) -> torch.Tensor:
        """P_x(D^2 f(x)[v]) - <x_j, grad_j> v_j row by row, with both Euclidean
        derivatives divided by the row weights: the projected Hessian plus the sphere's
        curvature term (the Weingarten map, Absil, Mahony & Trumer 2013)."""
        normal_parts = row_dots(point, euclidean_gradient)
        if self.row_weights is not None:
            euclidean_hvp = euclidean_hvp.div_(self.row_weights[:, None])
            normal_parts = normal_parts / self.row_weights
        return self.project(point, euclidean_hvp).addcmul_(tangent, normal_parts[:, None], value=-1)

    def project(self, point: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """g - <g, x> x, row by row, written over `vector`."""
        return vector.addcmul_(point, row_dots(vector, point)[:, None], value=-1)

    def retract(self, point: torch.Tensor, tangent: torch.Tensor, step_size: float = 1.0) -> torch.Tensor:
        """Step `step_size * tangent`, then normalize each row back onto the sphere."""
        moved = torch.add(point, tangent, alpha=step_size)
        return moved.div_(torch.linalg.vector_norm(moved, dim=1, keepdim=True))

    def random(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Rows uniformly distributed on the sphere (normalized standard Gaussians)."""
        gaussian = torch.randn(shape, generator=generator, dtype=torch.float64, device=generator.device)
        return gaussian / gaussian.norm(dim=1, keepdim=True)


class Euclidean:
    """Unconstrained matrices or vectors: the tangent space is the whole space."""

    def inner(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return flat_dot(first, second)

    def euclidean_to_riemannian_gradient(self, point: torch.Tensor, euclidean_gradient: torch.Tensor) -> torch.Tensor:
        return euclidean_gradient

    def euclidean_to_riemannian_hessian(
        self,
        point: torch.Tensor,
        euclidean_gradient: torch.Tensor,
        euclidean_hvp: torch.Tensor,
        tangent: torch.Tensor,
    ) -> torch.Tensor:
        return euclidean_hvp

    def project(self, point: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """The vector itself: every vector is tangent here."""
        return vector

    def retract(self, point: torch.Tensor, tangent: torch.Tensor, step_size: float = 1.0) -> torch.Tensor:
        return torch.add(point, tangent, alpha=step_size)

    def random(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Standard Gaussian entries."""
        return torch.randn(shape, generator=generator, dtype=torch.float64, device=generator.device)


def flat_dot(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The Euclidean inner product of two arrays of the same shape, as a 0-dim tensor."""
    return torch.vdot(first.reshape(-1), second.reshape(-1))


def row_dots(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """<first_i, second_i> for every row i, as a batched matrix product.

    Unlike (first * second).sum(dim=1) it never materializes the elementwise product, an
    extra array as large as the inputs.
    """
    return torch.bmm(first.unsqueeze(1), second.unsqueeze(2)).flatten()
