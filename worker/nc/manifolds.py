"""Small manifold objects for the UFM solvers, in the style of pymanopt.

Yaras et al. (NeurIPS 2022) pose the normalized unconstrained feature model on a product
of spheres: every classifier row w_k and every feature h_i has unit norm. A matrix whose
rows each lie on the unit sphere is a `RowSphere` point; the free bias is `Euclidean`.
Tangent vectors are represented in the ambient space (same shape as the point), so the
solver can difference iterates and gradients directly for its Barzilai-Borwein steps.

The feature block is the largest array the solver touches (N x d), so these operations
make one pass over it and allocate at most their result: `project` works in place.
"""

import torch


class RowSphere:
    """Matrices whose rows each have unit Euclidean norm (a product of spheres S^{d-1})."""

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

    def project(self, point: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """The vector itself: every vector is tangent here."""
        return vector

    def retract(self, point: torch.Tensor, tangent: torch.Tensor, step_size: float = 1.0):
        return torch.add(point, tangent, alpha=step_size)

    def random(self, shape, generator: torch.Generator) -> torch.Tensor:
        """Standard Gaussian entries in float64, drawn on the generator's device."""
        return torch.randn(shape, generator=generator, dtype=torch.float64, device=generator.device)


def row_dots(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """<first_i, second_i> for every row i, as a batched matrix product.

    Unlike (first * second).sum(dim=1) it never materializes the elementwise product, an
    extra array as large as the inputs.
    """
    return torch.bmm(first.unsqueeze(1), second.unsqueeze(2)).flatten()
