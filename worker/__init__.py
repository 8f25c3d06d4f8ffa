"""The worker: Celery tasks (worker/tasks.py) around the science engine (worker/nc).

OpenMP's threads wait for each other by spinning, by default. On a machine busier than its
cores (a shared host, a worker beside the API, a test suite) a spinning thread holds the core
that the thread it waits for needs: a training epoch that takes 0.5 s on 2 threads took 2 to
34 s with another process busy (docs/operations.md). Waiting threads that sleep instead cost
little; an operator's own OMP_WAIT_POLICY is kept. Set here, before torch loads OpenMP.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
