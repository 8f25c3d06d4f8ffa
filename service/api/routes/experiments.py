"""/experiments: submit, inspect, list, cancel, and read the metric history."""

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Response
from sqlalchemy import and_, or_, select

from service import jobs
from service.api.deps import SessionDep, require_api_key
from service.models import Experiment, MetricRow
from service.queue import enqueue
from service.schemas import TERMINAL_STATUSES, ExperimentList, ExperimentOut, ExperimentSpec, MetricHistory, Status

router = APIRouter(prefix="/experiments", tags=["experiments"], dependencies=[Depends(require_api_key)])


def _get_or_404(session, experiment_id: str) -> Experiment:
    experiment = session.get(Experiment, experiment_id)
    if experiment is None:
        raise HTTPException(404, f"no experiment with id {experiment_id!r}")
    return experiment


@router.post("", status_code=202, response_model=ExperimentOut)
def submit(spec: Annotated[ExperimentSpec, Body()], session: SessionDep, response: Response) -> Experiment:
    experiment = jobs.create(session, spec.model_dump(mode="json"))
    jobs.send(session, experiment.id, enqueue)
    response.headers["Location"] = f"/experiments/{experiment.id}"
    session.refresh(experiment)
    return experiment


@router.get("/{experiment_id}", response_model=ExperimentOut)
def read(experiment_id: str, session: SessionDep) -> Experiment:
    return _get_or_404(session, experiment_id)


@router.get("/{experiment_id}/metrics", response_model=MetricHistory)
def metric_history(experiment_id: str, session: SessionDep) -> MetricHistory:
    _get_or_404(session, experiment_id)
    rows = session.scalars(
        select(MetricRow).where(MetricRow.experiment_id == experiment_id).order_by(MetricRow.step)
    )
    return MetricHistory(items=[{"step": row.step, **row.values} for row in rows])


@router.post("/{experiment_id}/cancel", response_model=ExperimentOut)
def cancel(experiment_id: str, session: SessionDep, response: Response) -> Experiment:
    experiment = _get_or_404(session, experiment_id)
    if experiment.status in TERMINAL_STATUSES:
        raise HTTPException(409, f"experiment {experiment_id} is already {experiment.status}")
    experiment = jobs.cancel(session, experiment_id)
    # A running job stops cooperatively within seconds; until then it reports cancel_requested.
    response.status_code = 202 if experiment.status == "running" else 200
    return experiment


def _encode_cursor(experiment: Experiment) -> str:
    raw = json.dumps([experiment.created_at.isoformat(), experiment.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created_at, experiment_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return datetime.fromisoformat(created_at), str(experiment_id)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise HTTPException(422, "cursor: not a cursor returned by this API") from exc


@router.get("", response_model=ExperimentList)
def list_experiments(
    session: SessionDep,
    kind: Literal["ufm", "train"] | None = None,
    status: Status | None = None,
    normalization: Literal["normalized", "regularized", "none"] | None = None,
    K: Annotated[int | None, Query(ge=1)] = None,
    d: Annotated[int | None, Query(ge=1)] = None,
    dataset: str | None = None,
    architecture: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> ExperimentList:
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    filters = {
        Experiment.kind: kind, Experiment.status: status, Experiment.normalization: normalization,
        Experiment.num_classes: K, Experiment.dim: d, Experiment.dataset: dataset,
        Experiment.architecture: architecture,
    }
    query = select(Experiment).where(*(column == value for column, value in filters.items() if value is not None))
    if cursor is not None:
        created_at, experiment_id = _decode_cursor(cursor)
        query = query.where(or_(
            Experiment.created_at < created_at,
            and_(Experiment.created_at == created_at, Experiment.id < experiment_id),
        ))
    query = query.order_by(Experiment.created_at.desc(), Experiment.id.desc()).limit(limit + 1)
    page = session.scalars(query).all()
    next_cursor = _encode_cursor(page[limit - 1]) if len(page) > limit else None
    return ExperimentList(items=page[:limit], next_cursor=next_cursor)
