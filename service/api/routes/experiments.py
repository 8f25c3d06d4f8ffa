"""/experiments/{id}: submit, inspect, label, cancel, and read the metric history (JSON, CSV, PNG)."""

from typing import Annotated

from fastapi import Body, HTTPException, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service import analysis, idempotency, jobs, permissions, plots, scheduler, workers
from service.api.admission import check_queued_quota
from service.api.deps import (
    ActorDep,
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
from service.audit import Actor
from service.db import get_autocommit_engine, get_engine
from service.dispatch import get_dispatcher
from service.identity import Caller
from service.models import INTEGER_MAX, Artifact, Experiment
from service.schemas import (
    MAX_TAGS,
    TERMINAL_STATUSES,
    TRAINING_FEATURES,
    TRAINING_MODEL,
    ExperimentOut,
    LabelledSubmission,
    LabelPatch,
    MetricHistory,
    Submission,
)
from service.search import export, queries
from service.search.fields import STEP_UNITS, history_key
from service.settings import get_settings

router = api_router("/experiments", "experiments")
NOT_FOUND = problem_responses(404)
FORBIDDEN = problem_responses(403)


def _get_or_404(session, experiment_id: str) -> Experiment:
    return get_or_404(session, Experiment, experiment_id)


@router.post(
    "",
    name="experiment.submit",
    status_code=202,
    response_model=ExperimentOut,
    responses=problem_responses(400, 403, 429),
)
async def submit(
    submission: Annotated[Submission, Body()],
    caller: CallerDep,
    actor: ActorDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """A spec, bare or as ``{"spec": ..., "name": ..., "tags": {...}, "priority": 0}``; recorded with the key's owner.

    A priority above 0 is for admins (403); a submit past the owner's queued quota is a 429 and stores nothing.

    Run in the event loop, as the status read: storing it takes a fraction of a
    millisecond. The experiment's INSERT, its audit row's and the idempotency key's (if
    any) are one transaction. The job's message is sent after the response, by the dispatcher.
    """
    permissions.check(caller, "experiment.submit")
    labelled = submission if isinstance(submission, LabelledSubmission) else LabelledSubmission(spec=submission)
    field_prefix = "spec." if isinstance(submission, LabelledSubmission) else ""
    return await _queue(labelled, caller, actor, idempotency_key, field_prefix)


async def _queue(
    labelled: LabelledSubmission, caller: Caller, actor: Actor, idempotency_key: str | None, field_prefix: str
) -> Response:
    """Store a validated submission and answer 202 with it; its message is sent after the response."""
    permissions.check_priority(caller, "experiment.submit", labelled.priority)
    request = labelled.model_dump(mode="json")
    keyed = idempotency.keyed(caller.owner, idempotency_key, "/experiments", request)
    settings = get_settings()
    with get_engine().connect() as connection:
        check_queued_quota(connection, caller.owner, 1, settings)
        if request["spec"]["kind"] == "analysis":
            request["spec"] = await run_in_threadpool(_resolved, request["spec"], field_prefix)
        try:
            submitted = jobs.submit(
                connection, request["spec"], caller.owner, labelled.name, labelled.tags, keyed, actor, labelled.priority
            )
        except analysis.UploadDeleted as exc:
            raise InvalidField(field_prefix + exc.field, exc.message) from None
        # A new experiment is answered as it was stored; a replay as it is now.
        item = submitted.stored or queries.resource(connection, submitted.id)
        if item is None:
            raise not_found(Experiment, submitted.id)
        workers.say_why_waiting(connection, [item], settings)
        # Its place (a count over the owner's queued jobs) is a poll's answer, not the submit's: a submit
        # counting its owner's queue cost a sweep-sized queue a third of the submit rate.
        item["place"] = None
    get_dispatcher().send(*submitted.experiments)
    return Response(
        json_bytes(with_documents(item)),
        status_code=202,
        headers=submitted_headers(submitted, "/experiments"),
        media_type="application/json",
    )


@router.post(
    "/{experiment_id}/reanalyze",
    name="experiment.reanalyze",
    status_code=202,
    response_model=ExperimentOut,
    responses={**NOT_FOUND, **problem_responses(403, 409, 429)},
)
async def reanalyze(experiment_id: str, caller: CallerDep, actor: ActorDep) -> Response:
    """A new analysis experiment: the catalogue of a training run's saved features (``save_features``) with
    today's metric code, judged by its network's final classifier, as the run measured its last epoch.

    Its source names the run (``spec.source.experiment``) and it carries the run's tags plus
    ``reanalysis_of: <id>``, so ``tags.reanalysis_of = '<id>'`` finds every reanalysis of a run. A run that kept
    no features is a 409.
    """
    permissions.check(caller, "experiment.submit")
    with Session(get_engine()) as session:
        run = _get_or_404(session, experiment_id)
        kept = {name for (name,) in session.execute(select(Artifact.name).where(Artifact.experiment_id == run.id))}
    if run.kind != "train" or TRAINING_FEATURES not in kept:
        raise HTTPException(
            409,
            f"experiment {experiment_id} kept no {TRAINING_FEATURES}: only a training run with save_features "
            "can be reanalysed",
        )
    spec = {
        "kind": "analysis",
        "source": {
            "experiment": run.id,
            "artifact": TRAINING_FEATURES,
            "model": TRAINING_MODEL if TRAINING_MODEL in kept else None,
        },
        "K": run.num_classes,
        "logit_scale": run.logit_scale if run.normalization == "normalized" else 1.0,
        "normalize_classifier": run.normalization == "normalized",
        "dataset": run.dataset,
        "architecture": run.architecture,
        "epoch": run.epochs,
    }
    tags = {**run.tags, "reanalysis_of": run.id}
    if len(tags) > MAX_TAGS:
        raise InvalidField("tags", f"the run has {len(run.tags)} tags: with reanalysis_of, more than {MAX_TAGS}")
    labelled = LabelledSubmission.model_validate(
        {"spec": spec, "name": f"reanalysis of {run.name or run.id}", "tags": tags}
    )
    return await _queue(labelled, caller, actor, None, "spec.")


def _resolved(spec: dict, prefix: str) -> dict:
    """An analysis's spec with its source's K and d, or a 422 naming the field (``source.upload``, ...)."""
    with Session(get_engine()) as session:
        try:
            return analysis.resolve(session, spec)
        except analysis.InvalidSource as exc:
            raise InvalidField(prefix + exc.field, exc.message) from None


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


@router.patch(
    "/{experiment_id}",
    name="experiment.relabel",
    response_model=ExperimentOut,
    responses={**NOT_FOUND, **FORBIDDEN, **problem_responses(400)},
)
def relabel(
    experiment_id: str, patch: LabelPatch, session: SessionDep, caller: CallerDep, actor: ActorDep
) -> Experiment:
    """Rename (``"name": null`` clears it) and retag: tags are merged in, a null value removes that tag.

    Its owner's members and the admins may; the change and its audit row are one commit.
    """
    experiment = _get_or_404(session, experiment_id)
    permissions.check(caller, "experiment.relabel", experiment_id, experiment.owner)
    try:
        jobs.relabel(session, experiment, patch, actor)
    except jobs.TooManyTags as exc:
        raise InvalidField("tags", str(exc)) from None
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
    name="experiment.cancel",
    response_model=ExperimentOut,
    responses={
        202: {"description": "running: asked to stop, within seconds", "model": ExperimentOut},
        **NOT_FOUND,
        **FORBIDDEN,
        **problem_responses(409),
    },
)
def cancel(
    experiment_id: str, session: SessionDep, response: Response, caller: CallerDep, actor: ActorDep
) -> Experiment:
    """Its owner's members and the admins may; the change and its audit row are one commit."""
    experiment = _get_or_404(session, experiment_id)
    permissions.check(caller, "experiment.cancel", experiment_id, experiment.owner)
    if experiment.status in TERMINAL_STATUSES:
        raise HTTPException(409, f"experiment {experiment_id} is already {experiment.status}")
    canceled = jobs.cancel(session, experiment_id, actor)
    assert canceled is not None  # read above, and experiments are never deleted
    # A running job stops cooperatively within seconds; until then it reports cancel_requested.
    response.status_code = 202 if canceled.status == "running" else 200
    return canceled
