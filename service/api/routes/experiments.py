"""/experiments/{id}: submit, inspect, label, cancel, and read the metric history (JSON, CSV, PNG)."""

from typing import Annotated

from fastapi import Body, HTTPException, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from service import idempotency, jobs, plots, scheduler, workers
from service.api.admission import check_priority, check_queued_quota
from service.api.deps import (
    CallerDep,
    IdempotencyKeyHeader,
    SessionDep,
    api_router,
    get_or_404,
    metric_names,
    not_found,
    submitted_headers,
)
from service.api.formats import (
    CSV_RESPONSES,
    PNG_RESPONSES,
    Format,
    PlotHeight,
    PlotWidth,
    csv_response,
    json_bytes,
    revalidated_json,
    wants_csv,
    with_documents,
)
from service.api.problems import InvalidField, problem_responses
from service.db import get_autocommit_engine, get_engine
from service.dispatch import get_dispatcher
from service.models import INTEGER_MAX, Experiment
from service.schemas import (
    MAX_TAGS,
    TERMINAL_STATUSES,
    ExperimentOut,
    ExperimentPatch,
    LabelledSubmission,
    MetricHistory,
    Submission,
)
from service.search import export, queries
from service.search.fields import STEP_UNITS, history_key
from service.settings import get_settings

router = api_router("/experiments", "experiments")
NOT_FOUND = problem_responses(404)


def _get_or_404(session, experiment_id: str) -> Experiment:
    return get_or_404(session, Experiment, experiment_id)


@router.post("", status_code=202, response_model=ExperimentOut, responses=problem_responses(400, 403, 429))
async def submit(
    submission: Annotated[Submission, Body()], caller: CallerDep, idempotency_key: IdempotencyKeyHeader = None
) -> Response:
    """A spec, bare or as ``{"spec": ..., "name": ..., "tags": {...}, "priority": 0}``; recorded with the key's owner.

    A priority above 0 is for admins (403); a submit past the owner's queued quota is a 429 and stores nothing.

    Run in the event loop, as the status read: storing it takes a fraction of a
    millisecond. Without an idempotency key that is one INSERT, its own transaction; with
    one, the key's INSERT and the experiment's are one transaction. The job's message is
    sent after the response, by the dispatcher.
    """
    labelled = submission if isinstance(submission, LabelledSubmission) else LabelledSubmission(spec=submission)
    check_priority(caller, labelled.priority)
    request = labelled.model_dump(mode="json")
    keyed = idempotency.keyed(caller.owner, idempotency_key, "/experiments", request)
    engine = get_engine() if keyed else get_autocommit_engine()
    settings = get_settings()
    with engine.connect() as connection:
        check_queued_quota(connection, caller.owner, 1, settings)
        submitted = jobs.submit(
            connection, request["spec"], caller.owner, labelled.name, labelled.tags, keyed, labelled.priority
        )
        # A new experiment is answered as it was stored; a replay as it is now.
        item = submitted.stored or queries.resource(connection, submitted.id)
        if item is None:
            raise not_found(Experiment, submitted.id)
        workers.say_why_waiting(connection, [item], settings)
        scheduler.say_place(connection, [item], settings)
    get_dispatcher().send(*submitted.experiments)
    return Response(
        json_bytes(with_documents(item)),
        status_code=202,
        headers=submitted_headers(submitted, "/experiments"),
        media_type="application/json",
    )


@router.get("/{experiment_id}", response_model=ExperimentOut, responses=NOT_FOUND)
async def read(experiment_id: str, request: Request) -> Response:
    """The status poll: one indexed SELECT of the response's columns, written by orjson; with an
    ETag, so that a poll with ``If-None-Match`` gets a bodiless 304 while nothing changed.

    Run in the event loop: a primary-key read takes a fraction of a millisecond, less than
    handing the request to a thread and back.
    """
    with get_autocommit_engine().connect() as connection:
        item = queries.resource(connection, experiment_id)
        if item is None:
            raise not_found(Experiment, experiment_id)
        workers.say_why_waiting(connection, [item], get_settings())
        scheduler.say_place(connection, [item], get_settings())
    return revalidated_json(request, json_bytes(with_documents(item)), final=False)


@router.patch("/{experiment_id}", response_model=ExperimentOut, responses={**NOT_FOUND, **problem_responses(400)})
def relabel(experiment_id: str, patch: ExperimentPatch, session: SessionDep) -> Experiment:
    """Rename (``"name": null`` clears it) and retag: tags are merged in, a null value removes that tag."""
    experiment = _get_or_404(session, experiment_id)
    if "name" in patch.model_fields_set:
        experiment.name = patch.name
    if patch.tags:
        tags = {**experiment.tags, **patch.tags}
        tags = {key: value for key, value in tags.items() if value is not None}
        if len(tags) > MAX_TAGS:
            raise InvalidField("tags", f"at most {MAX_TAGS} tags; this would make {len(tags)}")
        experiment.tags = tags
    session.commit()
    return experiment


@router.get("/{experiment_id}/metrics", response_model=MetricHistory, responses={**CSV_RESPONSES, **NOT_FOUND})
async def metric_history(
    experiment_id: str,
    request: Request,
    format: Format = None,
    after: Annotated[
        int, Query(ge=-1, le=INTEGER_MAX, description="only the rows with a later step: a live tail")
    ] = -1,
):
    with get_autocommit_engine().connect() as connection:  # in the event loop, as the status read
        if wants_csv(request, format):
            if queries.status(connection, experiment_id) is None:
                raise not_found(Experiment, experiment_id)
            rows = queries.history(connection, experiment_id, after)
            return csv_response(export.history(rows), f"{experiment_id}-metrics")
        found = queries.history_json(connection, experiment_id, after)
    if found is None:
        raise not_found(Experiment, experiment_id)
    status, body = found
    # A finished experiment's history does not change again: clients may keep it.
    return revalidated_json(request, body, final=status in TERMINAL_STATUSES)


@router.get("/{experiment_id}/metrics.png", response_class=Response, responses={**PNG_RESPONSES, **NOT_FOUND})
async def metric_history_png(
    experiment_id: str,
    session: SessionDep,
    metric: Annotated[str, Query(max_length=2000, description="comma-separated history metrics")] = "nc1",
    width: PlotWidth = 800,
    height: PlotHeight = 500,
) -> Response:
    """The history as a plot: one line per metric over the steps (iterations or epochs)."""
    metrics = metric_names(metric, "metric", history_key)
    if not metrics:
        raise InvalidField("metric", "name at least one history metric, e.g. nc1")
    experiment = await run_in_threadpool(_get_or_404, session, experiment_id)
    rows = await run_in_threadpool(queries.history, session, experiment_id)
    title = experiment.name or f"{experiment.kind} {experiment.id[:8]}"
    png = await run_in_threadpool(plots.history_png, rows, metrics, title, STEP_UNITS[experiment.kind], width, height)
    return Response(png, media_type="image/png")


@router.post(
    "/{experiment_id}/cancel",
    response_model=ExperimentOut,
    responses={
        202: {"description": "running: asked to stop, within seconds", "model": ExperimentOut},
        **NOT_FOUND,
        **problem_responses(409),
    },
)
def cancel(experiment_id: str, session: SessionDep, response: Response) -> Experiment:
    experiment = _get_or_404(session, experiment_id)
    if experiment.status in TERMINAL_STATUSES:
        raise HTTPException(409, f"experiment {experiment_id} is already {experiment.status}")
    canceled = jobs.cancel(session, experiment_id)
    assert canceled is not None  # read above, and experiments are never deleted
    # A running job stops cooperatively within seconds; until then it reports cancel_requested.
    response.status_code = 202 if canceled.status == "running" else 200
    return canceled
