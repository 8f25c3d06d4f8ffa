"""The worker: Celery tasks (worker/tasks.py) around the science engine (worker/nc).

OpenMP keeps PyTorch's defaults: threads that sleep at once while they wait
(OMP_WAIT_POLICY=PASSIVE) double a CPU training epoch, on a quiet host and a busy one
alike (bench/openmp_wait.py, docs/operations.md).
"""
