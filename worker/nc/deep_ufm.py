"""The deep unconstrained feature model: layers between the free features and the classifier.

With `layers` = L > 1 the logits of sample i are W f(V_{L-1} ... f(V_1 h_i)) (+ b): the
features h_i (rows of H, N x d) are free as in the one-layer model, V_1..V_{L-1} are d x d
layers, f the identity ("linear") or the ReLU, and each block has its own weight decay
(Sukenik, Mondelli & Lampert, NeurIPS 2023; for linear layers Dang, Tran, Osher,
Tran-The, Ho & Nguyen, ICML 2023). The point is [W, H, (b), V_1, ..., V_{L-1}].

The objective, its gradient and its Hessian-vector products are torch's autograd on the
forward pass, in float64: the closed-form derivatives of worker.nc.objectives are for
the one-layer model, whose speed matters at K = 1000.
"""

from collections.abc import Callable

import torch
from torch.nn import functional as F

from worker.nc.manifolds import Point
from worker.nc.objectives import HessianAt, Objective, smooth_loss
from worker.nc.ufm_problem import UFMProblem


def layer_features(problem: UFMProblem, point: Point) -> list[torch.Tensor]:
    """The features at every layer: H, then f(V_1 H), ..., the last the classifier's input."""
    features = [point[1]]
    for weights in hidden_layers(problem, point):
        pre_activations = features[-1] @ weights.T
        features.append(F.relu(pre_activations) if problem.layer_activation == "relu" else pre_activations)
    return features


def hidden_layers(problem: UFMProblem, point: Point) -> list[torch.Tensor]:
    """V_1, ..., V_{L-1}: the blocks after W, H and the bias."""
    return list(point[2 + problem.bias :])


def deep_objective(problem: UFMProblem, labels: torch.Tensor) -> tuple[Objective, HessianAt]:
    """The mean loss of the deep model's logits plus (decay / 2) ||block||^2 on every block,
    with its gradient and Hessian by autograd."""
    decays = problem.decays
    loss = None if problem.loss == "cross_entropy" else smooth_loss(problem, labels)

    def value(blocks: list[torch.Tensor]) -> torch.Tensor:
        logits = layer_features(problem, blocks)[-1] @ blocks[0].T
        if problem.bias:
            logits = logits + blocks[2]
        data_term = F.cross_entropy(logits, labels) if loss is None else loss.losses(logits).mean()
        return data_term + sum(decay / 2 * block.square().sum() for decay, block in zip(decays, blocks))

    def evaluate(point: Point) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [block.detach().requires_grad_() for block in point]
        with torch.enable_grad():
            total = value(leaves)
            grads = torch.autograd.grad(total, leaves)
        return total.detach(), list(grads)

    def hessian_at(point: Point) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
        def hvp(vector: list[torch.Tensor]) -> list[torch.Tensor]:
            _, products = torch.autograd.functional.hvp(
                lambda *blocks: value(list(blocks)), tuple(point), tuple(vector)
            )
            return list(products)

        return hvp

    return evaluate, hessian_at
