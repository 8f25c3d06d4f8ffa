"""The Celery app as both sides see it: the API sends by task name, the worker consumes.

Configured as docs/lifecycle.md ("Celery settings") says: JSON only, late acks, reject on worker loss, prefetch 1.
The database is the source of truth, so task results are not stored in Celery.
"""

import sqlite3
from collections.abc import Sequence
from queue import Empty

from celery import Celery
from kombu.transport import sqlalchemy as sqlalchemy_transport
from sqlalchemy.exc import IntegrityError, OperationalError

from service.settings import get_settings

RUN_EXPERIMENT = "nclab.run_experiment"


class EmbeddedChannel(sqlalchemy_transport.Channel):
    """kombu's SQLAlchemy channel, safe where two processes first use a queue at once, and
    cheap to poll while nothing changes.

    A poll of an empty queue asks again only once the file has changed since the last
    one found it empty: SQLite's ``data_version``, read on a connection of the channel's
    own that never writes, changes with every commit that wrote something, from any
    process. kombu's own poll (the queue's row, a write lock, the query) kept an idle
    `nclab serve` worker at about 4% of a core, ten times a second for each queue.

    On first use a process creates the tables (on a fresh file) and each queue's row, by
    looking and then creating, under a lock that only its own threads share. Two
    processes doing so at once, as `nclab serve`'s worker starting while the API sends
    the first submit, both find nothing, and the second's CREATE TABLE or INSERT fails:
    that killed the worker, and with it `nclab serve`. What the loser meant to create
    exists by then, so it looks again: once for a queue's row, and for the tables once
    more than there are tables, since each failure means the other process created one.
    """

    def __init__(self, *args, **kwargs):
        self._changes: sqlite3.Connection | None = None  # opened on the first poll
        self._empty_at: dict[str, int] = {}  # queue -> data_version when a poll last found it empty
        super().__init__(*args, **kwargs)

    def _open(self):
        for _ in range(len(sqlalchemy_transport.metadata.tables)):  # the tables, declared by now
            try:
                return super()._open()
            except OperationalError:  # "table ... already exists": created since create_all looked
                pass
        return super()._open()

    def _get_or_create(self, queue):
        try:
            return super()._get_or_create(queue)
        except IntegrityError:  # the queue's row was inserted since this process looked
            self.session.rollback()
            return super()._get_or_create(queue)

    def _get(self, queue, timeout=None):  # kombu passes no timeout to this transport
        if self._changes is None:
            self._changes = sqlite3.connect(
                self.session.bind.url.database, isolation_level=None, check_same_thread=False
            )
        # Read before the poll: a commit after this read changes it, so the next poll looks.
        version = self._changes.execute("PRAGMA data_version").fetchone()[0]
        if self._empty_at.get(queue) == version:
            raise Empty()
        try:
            return super()._get(queue)
        except Empty:
            self._empty_at[queue] = version
            raise

    def close(self):
        if self._changes is not None:
            self._changes.close()
        super().close()


class EmbeddedQueue(sqlalchemy_transport.Transport):
    """The embedded mode's queue: kombu's SQLAlchemy transport on SQLite, polled ten times a second.

    Its default, once a second, made every job wait up to a second after its submit and
    after the job before it. The interval cannot be passed as a transport option: this
    transport hands its options to create_engine, which refuses it.
    """

    Channel = EmbeddedChannel
    polling_interval = 0.1


def make_celery_app() -> Celery:
    settings = get_settings()
    # The worker imports its tasks by module name; the API process never does (no torch).
    if settings.broker_url:
        app = Celery("nclab", broker=settings.broker_url, include=["worker.tasks"])
    else:
        app = Celery("nclab", broker=f"sqlite:///{settings.embedded_queue_path}", include=["worker.tasks"])
        app.conf.broker_transport = f"{__name__}:EmbeddedQueue"
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        # A broker outage must not hang a POST: the row is committed first and the
        # reconciler re-sends what could not be sent.
        broker_connection_timeout=3,
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5},
    )
    # By name, so that the API (which never imports the worker) does not load it.
    app.steps["consumer"].add("worker.recovery:ResendQueuedOnConnect")
    app.steps["worker"].add("worker.presence:Presence")
    return app


celery_app = make_celery_app()


def enqueue(experiment_id: str, queue: str) -> None:
    celery_app.send_task(RUN_EXPERIMENT, args=[experiment_id], queue=queue)


def enqueue_many(outgoing: Sequence[tuple[str, str]]) -> None:
    """One message per (experiment id, queue), all written in one round trip (a Redis pipeline): half the cost
    of one by one."""
    with celery_app.producer_or_acquire() as producer, producer.batch():
        for experiment_id, queue in outgoing:
            celery_app.send_task(RUN_EXPERIMENT, args=[experiment_id], queue=queue, producer=producer)
