"""New experiments' messages, sent by one thread per process, many per round, each to its queue.

A submit (an experiment, or a sweep's members) commits its rows and returns; this thread
then sends messages. Under the fair scheduler (NCLAB_SCHEDULER=fair, service/scheduler.py)
a round is a scheduling round of each of the new jobs' queues: it sends the jobs that the
free slots get, which need not be the new ones. Under ``fifo`` a round sends the new jobs
themselves, in arrival order. The row is
the outbox: until its send is recorded (``sent_at``), the reconciler treats the job as
never sent, so a broker outage, or a process killed between the commit and the send,
delays a job but never loses it. Sending off the request path takes the broker's round
trip and the ``sent_at`` update out of every submit; under load, the submits that
arrive during one round go out together in the next, over one broker connection and
with one UPDATE.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable
from functools import lru_cache

from service import jobs, scheduler
from service.db import get_sessionmaker
from service.jobs import Outgoing
from service.queue import enqueue_many
from service.settings import get_settings

log = logging.getLogger("nclab.dispatch")

MAX_ROUND = 500
# How long a round waits for company after its first id: under load, long enough for a
# few submits to join it; for a job that runs for seconds, an unnoticeable delay.
LINGER_SECONDS = 0.02
_CLOSE = object()


class Dispatcher:
    """Sends the messages handed to it, in rounds of whatever arrived meanwhile, on a thread of its own."""

    def __init__(self, send_round: Callable[[list[Outgoing]], None]):
        self._send_round = send_round
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def send(self, *outgoing: Outgoing) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="nclab-dispatch", daemon=True)
                    self._thread.start()
        for message in outgoing:
            self._pending.put(message)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is pending, then stop the thread (a later ``send`` starts a new one)."""
        with self._start_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._pending.put(_CLOSE)
            thread.join(timeout)

    def _run(self) -> None:
        closing = False
        while not closing:
            batch = [self._pending.get()]
            time.sleep(LINGER_SECONDS)
            while len(batch) < MAX_ROUND and not self._pending.empty():
                batch.append(self._pending.get())
            closing = _CLOSE in batch
            messages = [item for item in batch if item is not _CLOSE]
            if not messages:
                continue
            try:
                self._send_round(messages)
            except Exception:
                # The rows stay unsent: the reconciler's next round sends them.
                log.exception("a round of %d items failed; the reconciler will send them", len(messages))


def send_round(outgoing: list[Outgoing]) -> None:
    """FIFO: send the new jobs themselves."""
    with get_sessionmaker()() as session:
        if not jobs.send_many(session, outgoing, enqueue_many):
            log.warning("the broker refused %d new jobs; the reconciler will send them", len(outgoing))


def schedule_round(outgoing: list[Outgoing]) -> None:
    """Fair: a scheduling round of each of the new jobs' queues."""
    queues = dict.fromkeys(message.queue for message in outgoing)
    with get_sessionmaker()() as session:
        scheduler.run_rounds(session, queues, get_settings(), enqueue_many)


@lru_cache
def get_dispatcher() -> Dispatcher:
    return Dispatcher(schedule_round if get_settings().scheduler == "fair" else send_round)
