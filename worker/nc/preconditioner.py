"""The metric in which the UFM descent measures its steps.

Steps go along -P grad, for a symmetric positive definite P that puts the blocks of the
point on an equal footing (`feature_step_scale`) and, on the normalized problem with
many classes, moves each classifier row together with the features of its class
(`class_coupling`). The descent also needs P's quadratic forms, and P^-1's, to measure
its Barzilai-Borwein steps in the same metric.
"""

from collections.abc import Sequence

import torch

from worker.nc.manifolds import Manifold, Point, flat_dot
from worker.nc.ufm_problem import UFMProblem

# A sum of coefficients times 0-dim device tensors, to be evaluated on the host.
Terms = list[tuple[float, torch.Tensor]]


def host_floats(*sums: Terms) -> list[float]:
    """Each sum as a host float, in one transfer (one synchronization on a GPU)."""
    values = iter(torch.stack([tensor for terms in sums for _, tensor in terms]).tolist())
    return [sum(coefficient * next(values) for coefficient, _ in terms) for terms in sums]


class Preconditioner:
    """The metric of the descent, which steps along -P grad: P = D + c B B^T.

    D multiplies each block's gradient by a constant (`feature_step_scale` for the
    features, 1 for the classifier and the bias). B B^T couples each classifier row
    with the features of its class: B maps a K x d array U to the blocks (U, rows
    U_{y_i}, no bias), so B^T g = g_W + (sum of g_{h_i} over class k) is the gradient
    along moving classifier row k and its class's features together. Once the features
    have collapsed onto their classifier rows, that joint motion is what is left to
    optimize (arranging the rows into an ETF), and D alone takes it in short steps: the
    classifier row and its features pull against each other. P is symmetric positive
    definite for c >= 0, so -P grad is a descent direction, and B^T D^-1 B is diagonal
    (1/D_W + n_k/D_H for class k), which makes P^-1 cheap by the Woodbury identity.

    Everything is measured in the manifolds' metric, and B^T is the adjoint in it: a
    feature row that stands for m_j samples (`row_weights`) counts m_j times in each
    class sum, and n_k is the sum of its class's weights.

    Every quadratic form comes as `Terms`, a sum of coefficients times 0-dim tensors
    on the blocks' device, so that the caller can read all of an iteration's numbers
    in one transfer and combine them on the host: on small problems each arithmetic
    operation on a 0-dim tensor costs as much as an operation on the whole point.
    """

    def __init__(
        self,
        scales: Sequence[float],
        manifolds: Sequence[Manifold],
        labels: torch.Tensor,
        num_classes: int,
        coupling: float,
        row_weights: torch.Tensor | None = None,
    ):
        self.scales, self.manifolds, self.labels = scales, manifolds, labels
        self.coupling = coupling
        self.row_weights = None if row_weights is None else row_weights[:, None]
        if coupling:  # B couples the first two blocks, the classifier and the features
            counts = torch.bincount(labels, weights=row_weights, minlength=num_classes)
            joint_inverse_scale = 1 / scales[0] + counts.to(torch.float64) / scales[1]
            self.woodbury_weights = (coupling / (1 + coupling * joint_inverse_scale))[:, None]

    def direction(
        self,
        point: Point,
        grads: list[torch.Tensor],
        grad_norms_sq: list[torch.Tensor],
        out: list[torch.Tensor],
    ) -> Terms:
        """Write P grad, projected onto the tangent space at `point`, into the arrays `out`.

        `grad_norms_sq` are the blocks' <g_b, g_b>. Returns the slope <grad, P grad>,
        which the projection leaves unchanged since grad is tangent already.
        """
        slope = list(zip(self.scales, grad_norms_sq))
        joint = self.apply(point, grads, out)
        if joint is not None:
            slope.append((self.coupling, flat_dot(joint, joint)))
        return slope

    def apply(self, point: Point, vectors: list[torch.Tensor], out: list[torch.Tensor]) -> torch.Tensor | None:
        """Write P v into the arrays `out`, its coupled blocks projected onto the tangent space at `point`
        (where v is tangent, all of it is). Returns B^T v where P couples (`_joint`), else None."""
        if not self.coupling:
            for direction, vector, scale in zip(out, vectors, self.scales):
                torch.mul(vector, scale, out=direction)
            return None
        joint = self._joint(vectors)
        coupled = torch.mul(joint, self.coupling)
        torch.add(coupled, vectors[0], alpha=self.scales[0], out=out[0])
        torch.index_select(coupled, 0, self.labels, out=out[1])
        for manifold, block, direction in zip(self.manifolds, point, out[:2]):
            manifold.project(block, direction)
        out[1].add_(vectors[1], alpha=self.scales[1])  # tangent already where v is: added after projecting
        for direction, vector, scale in zip(out[2:], vectors[2:], self.scales[2:]):
            torch.mul(vector, scale, out=direction)
        return joint

    def block_scales(self) -> Sequence[float] | None:
        """P's constant on each block where P is diagonal (no coupling), else None."""
        return None if self.coupling else self.scales

    def norm_sq(self, vectors: list[torch.Tensor]) -> Terms:
        """<v, P v>."""
        terms = [(scale, manifold.inner(v, v)) for manifold, v, scale in zip(self.manifolds, vectors, self.scales)]
        if self.coupling:
            joint = self._joint(vectors)
            terms.append((self.coupling, flat_dot(joint, joint)))
        return terms

    def inverse_norm_sq(self, vectors: list[torch.Tensor]) -> Terms:
        """<v, P^-1 v> = <v, D^-1 v> - <t, (c / (1 + c B^T D^-1 B)) t>, t = B^T D^-1 v."""
        terms = [(1 / scale, manifold.inner(v, v)) for manifold, v, scale in zip(self.manifolds, vectors, self.scales)]
        if self.coupling:
            joint = self._joint(vectors, weights=[1 / scale for scale in self.scales])
            terms.append((-1.0, flat_dot(joint, self.woodbury_weights * joint)))
        return terms

    def _joint(self, blocks: list[torch.Tensor], weights: Sequence[float] = (1.0, 1.0)) -> torch.Tensor:
        """B^T of (weights[0] blocks[0], weights[1] blocks[1]): a K x d array."""
        joint = torch.mul(blocks[0], weights[0])
        features = blocks[1] if self.row_weights is None else blocks[1] * self.row_weights
        return joint.index_add_(0, self.labels, features, alpha=weights[1])


def feature_step_scale(problem: UFMProblem) -> float:
    """How much longer a step the feature block H takes than the classifier block W.

    Normalized: each feature row carries 1/N of the loss and each classifier row the
    loss of a whole class, so the curvature along a feature row is about n times
    smaller; scaling its step by n puts the blocks on the same footing. With unequal
    counts the mean count N/K stands in for n: a classifier row's curvature sums over
    the samples of every class, not only its own. Regularized: the decay lambda_h, not
    the 1/N-weighted loss, sets the curvature along a feature row, so the steps are not
    scaled. docs/solver.md gives the measurements behind each choice.
    """
    if problem.normalization == "regularized":
        return 1.0
    return problem.num_samples / problem.num_classes


def class_coupling(problem: UFMProblem) -> float:
    """The weight c of the class coupling in `Preconditioner`: 0 (off) up to K = 10,
    rising linearly to 0.5 at K = 30 and staying there.

    Normalized only: the regularized problem heads for W = H = 0 or an ETF without
    first settling its features on their class's direction. At K = 10 any coupling
    costs iterations, and from K = 20 on c = 0.5 saves them (docs/solver.md), hence the
    ramp.
    """
    if problem.normalization == "regularized":
        return 0.0
    return 0.5 * min(max((problem.num_classes - 10) / 20, 0.0), 1.0)
