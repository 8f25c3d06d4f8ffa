"""A UFM problem as the descent sees it: objective, manifolds and preconditioner.

This is pymanopt's `Problem`: what `worker.nc.descent.minimize` needs to know of the
problem, and nothing of how a lab posed it (`UFMProblem`).
"""

from dataclasses import dataclass

import torch

from worker.nc.deep_ufm import deep_objective
from worker.nc.manifolds import Euclidean, Manifold, Point, RowSphere
from worker.nc.objectives import (
    HessianAt,
    Objective,
    normalized_hessian,
    normalized_objective,
    regularized_hessian,
    regularized_objective,
    smooth_loss_objective,
)
from worker.nc.preconditioner import Preconditioner, class_coupling, feature_step_scale
from worker.nc.ufm_problem import UFMProblem


@dataclass(frozen=True)
class Formulation:
    """The objective, and its Hessian, on a product of manifolds, one per block of the point, and the
    preconditioner that measures the descent's steps.

    The feature rows are usually one per sample. A merged formulation (worker.nc.merging)
    has one per class instead, standing for the class's n_k samples: the objective
    weighs row k n_k times, and so does the feature manifold's metric, which makes its
    descent that of the full problem on points whose features are collapsed.
    """

    objective: Objective
    hessian: HessianAt  # the objective's Euclidean Hessian
    manifolds: list[Manifold]
    preconditioner: Preconditioner
    labels: torch.Tensor  # the class of each feature row
    sample_rows: torch.Tensor | None = None  # merged: the feature row of each sample
    tied: bool = False  # points [W, (b)]: each class's feature row is its classifier row (merged only)

    def expand(self, point: Point) -> Point:
        """The full problem's point: each feature row repeated for the samples it stands for."""
        if self.tied:
            point = untie(point)
        if self.sample_rows is None:
            return point
        return [point[0], point[1].index_select(0, self.sample_rows), *point[2:]]


def untie(point: Point) -> Point:
    """The merged point (or tangent vector) that a tied one ([W, (b)]) stands for: [W, W, (b)]."""
    return [point[0], point[0], *point[1:]]


def class_labels(problem: UFMProblem, device: torch.device) -> torch.Tensor:
    """The class of each sample: k repeated n_k times, k = 0..K-1."""
    counts = torch.tensor(problem.class_counts, device=device)
    return torch.arange(problem.num_classes, device=device).repeat_interleave(counts)


def formulate(
    problem: UFMProblem,
    labels: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    sample_rows: torch.Tensor | None = None,
) -> Formulation:
    """`problem` with a feature row of class labels[j] for every j.

    `row_weights` (float64, one per row) and `sample_rows` make a merged formulation:
    row j stands for row_weights[j] samples, and sample i is row sample_rows[i].
    """
    if problem.layers > 1:
        objective, hessian = deep_objective(problem, labels)
    elif problem.loss != "cross_entropy":
        objective, hessian = smooth_loss_objective(problem, labels, row_weights)
    elif problem.normalization == "normalized":
        objective = normalized_objective(problem, labels, row_weights)
        hessian = normalized_hessian(problem, labels, row_weights)
    else:
        objective = regularized_objective(problem, labels)
        hessian = regularized_hessian(problem, labels)
    if problem.normalization == "normalized":
        manifolds: list[Manifold] = [RowSphere(), RowSphere(row_weights)]
    else:
        manifolds = [Euclidean(), Euclidean()]
    hidden_layers = problem.layers - 1
    manifolds += [Euclidean()] * (problem.bias + hidden_layers)
    preconditioner = Preconditioner(
        [1.0, feature_step_scale(problem)] + [1.0] * (problem.bias + hidden_layers),
        manifolds,
        labels,
        problem.num_classes,
        class_coupling(problem),
        row_weights,
    )
    return Formulation(objective, hessian, manifolds, preconditioner, labels, sample_rows)
