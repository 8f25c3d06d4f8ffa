"""The FastAPI application: routes, problem+json errors, and the reconciler on a timer."""

import asyncio
import logging
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service import idempotency, jobs, scheduler
from service.api import audit_trail, metrics, problems
from service.api.guards import RequestGuard
from service.api.routes import artifacts, audit, docs, experiments, health, identity, search, sweeps, ui, uploads
from service.db import get_sessionmaker
from service.dispatch import get_dispatcher
from service.lifetime import die_with_parent, is_spawned_child
from service.queue import enqueue, enqueue_many
from service.schemas import QUEUES
from service.settings import get_settings

log = logging.getLogger("nclab.reconciler")


def reconcile_once() -> None:
    settings = get_settings()
    with get_sessionmaker()() as session:
        jobs.reconcile(session, settings, enqueue)
        if settings.scheduler == "fair":
            # The fallback for every cue a round may have missed: a slot freed by a worker that died,
            # a worker that started, a job re-queued above.
            scheduler.run_rounds(session, QUEUES, settings, enqueue_many)
        idempotency.forget_expired(session)


async def reconcile_forever(interval: float) -> None:
    while True:
        try:
            await run_in_threadpool(reconcile_once)
        except Exception:
            # The next round retries; a database blip must not kill the loop.
            log.exception("reconcile failed")
        await asyncio.sleep(interval)


@asynccontextmanager
async def lifespan(_app: FastAPI):
    if is_spawned_child():  # a worker of `nclab api --workers N`: it ends with its supervisor
        die_with_parent()
    get_settings().key_ring.callers()  # the keys file read now: one that cannot be read or parsed stops the API
    # As many threads for blocking routes as the pool has connections (settings.api_connections).
    to_thread.current_default_thread_limiter().total_tokens = get_settings().api_connections
    reconciler = asyncio.create_task(reconcile_forever(get_settings().reconcile_interval))
    yield
    reconciler.cancel()
    await run_in_threadpool(get_dispatcher().close)  # what was submitted is sent before the process ends


def create_app() -> FastAPI:
    app = FastAPI(
        title="nclab",
        version="1",
        summary="Neural-collapse experiments on demand",
        lifespan=lifespan,
        # Served by routes/docs.py instead, behind the API key.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    problems.install(app)
    audit_trail.install(app)
    app.add_middleware(
        RequestGuard, max_body_bytes=get_settings().max_body_bytes, max_upload_bytes=get_settings().max_upload_bytes
    )
    metrics.install(app)
    app.include_router(health.router)
    app.include_router(docs.router)
    app.include_router(search.router)  # first: /experiments/aggregate is not an experiment's id
    app.include_router(experiments.router)
    app.include_router(artifacts.router)
    app.include_router(sweeps.router)
    app.include_router(uploads.router)
    app.include_router(identity.router)
    app.include_router(audit.router)
    ui.install(app)
    return app


app = create_app()
