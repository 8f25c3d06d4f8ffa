"""How much arithmetic a UFM evaluation does, and what a small problem does differently.

Below about SMALL_WORK multiply-adds per matrix product (N d K: the N x d features times
the K x d classifier), what an iteration costs is set by the overhead of each call rather
than by the products: a second CPU thread then costs more in synchronization than it
saves (`threads_for`), and merging collapsed features more than the smaller products
save (worker.nc.merging). docs/solver.md gives the timings.
"""

import contextlib
from collections.abc import Iterator

import torch

from worker.nc.ufm_problem import UFMProblem

SMALL_WORK = 2**20


def work_per_product(problem: UFMProblem) -> int:
    """Multiply-adds per matrix product of an evaluation: N d K."""
    return problem.num_samples * problem.dim * problem.num_classes


@contextlib.contextmanager
def threads_for(work: int, device: torch.device) -> Iterator[None]:
    """Run a small problem (`work` multiply-adds per matrix product) on one CPU thread,
    and restore torch's setting afterwards."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or work >= SMALL_WORK or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
