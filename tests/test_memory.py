"""The worker's heap settings: repeated metric evaluations stop faulting pages in."""

import platform
import subprocess
import sys

import pytest

# Repeated collapse_metrics calls on the digits-sized problem of bench/train.py, after a
# warm-up; prints the page faults per call.
FAULTS_PER_CALL = """
import resource, sys, torch
from worker.memory import retain_freed_memory
from worker.nc.metrics import collapse_metrics
if sys.argv[1] == "retain":
    assert retain_freed_memory()
generator = torch.Generator().manual_seed(0)
labels = torch.arange(1437) % 10
features = torch.randn(10, 128, generator=generator)[labels]
features += torch.randn(1437, 128, generator=generator)
classifier = torch.randn(10, 128, generator=generator)
def evaluate():
    collapse_metrics(features, labels, classifier, None, 10)
    scratch = [torch.ones(2**20) for _ in range(3)]  # what a training epoch allocates between calls
for _ in range(20):
    evaluate()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    evaluate()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 50)
"""


def faults_per_call(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL, mode],
                            capture_output=True, text=True, check=True)
    return float(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_retained_heap_serves_repeated_evaluations_without_page_faults():
    # Each call allocates ~3 MiB of float64 buffers; without the settings glibc may
    # return them to the kernel between calls (hundreds of faults per call, or none,
    # depending on its adaptive thresholds), so only the retained case is asserted.
    assert faults_per_call("retain") < 50  # a fresh 1.5 MiB buffer alone faults 370 times


def test_pool_processes_apply_the_settings():
    from celery.signals import worker_process_init

    from worker import tasks

    receivers = [receiver() for _, receiver in worker_process_init.receivers]
    assert tasks.prepare_pool_process in receivers
