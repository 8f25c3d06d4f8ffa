"""/metrics in Prometheus's format: requests per route (prometheus-fastapi-instrumentator)
and the jobs as the database sees them, read at each scrape.

- ``nclab_jobs{status}``: experiments per status;
- ``nclab_queue_depth{queue}``: the queued experiments of each queue, and
  ``nclab_queue_consumers{queue}``: the pool processes of the live workers that serve it
  (service/workers.py), for every queue, so that "jobs wait and nobody serves them" is an alert;
- ``nclab_job_duration_seconds{kind}``: a histogram of finished jobs' run times
  (started_at to finished_at), its buckets counted by the database;
- ``nclab_database_up``: 0 when the scrape could not read them.
With ``nclab api --workers N`` each process counts its own requests (set
PROMETHEUS_MULTIPROC_DIR to add them up); the job figures are the same from any process.
"""

import logging
from collections import Counter

from fastapi import Depends, FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator, routing
from sqlalchemy import Float, case, cast, func, select

from service import workers
from service.api.deps import require_api_key
from service.db import get_sessionmaker
from service.models import Experiment
from service.schemas import QUEUES, STATUSES, TERMINAL_STATUSES
from service.settings import get_settings

log = logging.getLogger("nclab.metrics")

DURATION_BUCKETS = (1, 10, 60, 300, 1800, 3600, 4 * 3600, 24 * 3600)


def _seconds_between(dialect: str, start, end):
    if dialect == "postgresql":
        return func.extract("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


class JobCollector(Collector):
    def collect(self):
        up = GaugeMetricFamily("nclab_database_up", "1 when this scrape could read the jobs from the database")
        try:
            counts, depths, consumers, durations = self._read()
        except Exception:
            log.exception("could not read the jobs for /metrics")
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("nclab_jobs", "experiments per status", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        depth = GaugeMetricFamily("nclab_queue_depth", "experiments waiting for a worker", labels=["queue"])
        served = GaugeMetricFamily(
            "nclab_queue_consumers", "pool processes of the live workers that serve the queue", labels=["queue"]
        )
        for queue in QUEUES:
            depth.add_metric([queue], depths.get(queue, 0))
            served.add_metric([queue], consumers.get(queue, 0))
        yield depth
        yield served
        histogram = HistogramMetricFamily("nclab_job_duration_seconds", "run time of finished jobs", labels=["kind"])
        for kind, total, seconds, cumulative in durations:
            buckets = [(str(float(bound)), count) for bound, count in zip(DURATION_BUCKETS, cumulative)]
            histogram.add_metric([kind], [*buckets, ("+Inf", total)], sum_value=seconds or 0.0)
        yield histogram

    def _read(self):
        with get_sessionmaker()() as session:
            # One scan for both: experiments per status, and the queued ones per queue.
            counts: Counter[str] = Counter()
            depths: Counter[str] = Counter()
            by_status_and_queue = select(Experiment.status, Experiment.queue, func.count()).group_by(
                Experiment.status, Experiment.queue
            )
            for status, queue, count in session.execute(by_status_and_queue):
                counts[status] += count
                if status == "queued":
                    depths[queue] += count
            consumers = workers.consumers(session, get_settings())
            duration = cast(
                _seconds_between(session.get_bind().dialect.name, Experiment.started_at, Experiment.finished_at), Float
            )
            query = (
                select(
                    Experiment.kind,
                    func.count(),
                    func.sum(duration),
                    *(func.sum(case((duration <= bound, 1), else_=0)) for bound in DURATION_BUCKETS),
                )
                .where(
                    Experiment.status.in_(TERMINAL_STATUSES),
                    Experiment.started_at.is_not(None),
                    Experiment.finished_at.is_not(None),
                )
                .group_by(Experiment.kind)
            )
            durations = [
                (kind, total, seconds, list(buckets)) for kind, total, seconds, *buckets in session.execute(query)
            ]
        return counts, depths, consumers, durations


def _flatten_routes_once() -> None:
    """Keep the instrumentator's flattened route list instead of rebuilding it for every request.

    It names each request's route by walking the app's routes, and on FastAPI >= 0.137 that
    walk rebuilds every included router's route contexts (dependants, type adapters): a
    tenth of a status poll's time under py-spy. The routes are fixed once the app serves.
    """
    flatten = routing._effective_routes
    if getattr(flatten, "flattens_once", False):  # an earlier app already installed it
        return
    flattened: dict[tuple[int, int], list] = {}

    def once(routes: list) -> list:
        key = (id(routes), len(routes))
        if key not in flattened:
            flattened[key] = flatten(routes)
        return flattened[key]

    # A marker for the check above; mypy knows no attributes of a function but its own.
    once.flattens_once = True  # type: ignore[attr-defined]
    routing._effective_routes = once


def install(app: FastAPI) -> None:
    """Instrument the app's routes and serve /metrics (behind the API key, like every route but health)."""
    _flatten_routes_once()
    registry = CollectorRegistry()
    registry.register(JobCollector())
    instrumentator = Instrumentator(excluded_handlers=["/metrics"], registry=registry)
    instrumentator.instrument(app).expose(app, include_in_schema=False, dependencies=[Depends(require_api_key)])
