"""The dashboard: server-rendered pages under /ui, on the same queries as the JSON API; no build step.

Each page is a thin route: it reads through service/search/queries.py (as /experiments,
/experiments/aggregate and /sweeps do) and renders a Jinja2 template of
service/templates, autoescaped (names, tags and errors are user text). Plots are the
API's own PNG endpoints, which the browser loads with the key's cookie; the CSV links
are the API's CSV exports. A few lines of JavaScript (ui.js) refresh the status of
queued and running experiments.

With NCLAB_API_KEYS set, a page asked for without a valid key sends the browser to the
sign-in form, which keeps the key in a cookie (HttpOnly, SameSite=Strict) that the API
accepts as it accepts the Authorization header.
"""

import json
import math
from collections import Counter
from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy import select

from service import jobs, permissions, scheduler
from service.api.audit_trail import record_refusal
from service.api.deps import UI_KEY_COOKIE, SessionDep, actor_of, caller_of_key
from service.db import get_autocommit_engine
from service.identity import Caller
from service.models import Experiment, Sweep
from service.schemas import STATUSES, TERMINAL_STATUSES, LabelPatch
from service.search import queries
from service.search.fields import SPEC_FIELDS, STEP_UNITS, UnknownField, numeric_result_key
from service.search.language import FilterError, parse_fields, parse_optional_filter, parse_optional_order_by
from service.settings import get_settings

HERE = Path(__file__).resolve().parent.parent.parent
templates = Jinja2Templates(directory=HERE / "templates")

PAGE_SIZES = (25, 50, 100, 500)
# The experiments table: heading, the field it sorts by (filter language), and how to read it from a row.
COLUMNS = [
    ("name", "name"),
    ("owner", "owner"),
    ("kind", "kind"),
    ("dataset", "spec.dataset"),
    ("architecture", "spec.architecture"),
    ("normalization", "spec.normalization"),
    ("K", "spec.K"),
    ("d", "spec.d"),
    ("status", "status"),
    ("nc1", "result.nc1"),
    ("nc2_etf_w", "result.nc2_etf_w"),
    ("test_accuracy", "result.test_accuracy"),
    ("created", "created_at"),
]
# The experiment page's charts: history metrics drawn together.
CHARTS = {
    "ufm": ["nc1", "nc2_etf_m,nc2_etf_w", "nc3,nc3_etf", "loss", "accuracy"],
    "analysis": ["nc1,test_nc1", "nc2_etf_m,nc2_etf_w", "nc3,nc3_etf", "loss,test_loss", "accuracy,test_accuracy"],
    "train": [
        "nc1,test_nc1",
        "nc2_etf_m,nc2_etf_w",
        "nc3,nc3_etf",
        "train_loss,loss,test_loss",
        "train_accuracy,accuracy,test_accuracy",
    ],
}
HISTORY_ROWS_SHOWN = 200
WhereText = Annotated[str, Query(max_length=20_000)]


class NeedsSignIn(Exception):
    """A dashboard page asked for without a valid key (keys are configured)."""


def signed_in(request: Request) -> Caller:
    """The caller the key cookie names, kept in the request's state for the pages (their header, their buttons)."""
    caller = caller_of_key(request.cookies.get(UI_KEY_COOKIE, ""))
    if caller is None:
        raise NeedsSignIn()
    request.state.caller = caller
    return caller


router = APIRouter(prefix="/ui", include_in_schema=False)
signed_in_router = APIRouter(prefix="/ui", include_in_schema=False, dependencies=[Depends(signed_in)])


def number(value) -> str:
    """A float with four significant digits; integers and text as they are."""
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def link(path: str, **params) -> str:
    """``path`` with the non-empty ``params`` as its query string."""
    query = urlencode({key: value for key, value in params.items() if value not in (None, "")})
    return f"{path}?{query}" if query else path


templates.env.filters["number"] = number
templates.env.globals["link"] = link
templates.env.globals["may"] = permissions.may  # a page offers only what the signed-in caller may do


def render(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    """The page, with the signed-in caller (None on the sign-in form) as ``caller``."""
    context["caller"] = getattr(request.state, "caller", None)
    return templates.TemplateResponse(request, template, context, status_code=status_code)


def _documents(item: dict) -> dict:
    """An item of queries.search / queries.resource with its JSON documents parsed."""
    return {**item, **{key: orjson.loads(item[key]) if item[key] else None for key in queries.DOCUMENT_KEYS}}


@router.get("/login")
def login_form(request: Request, next: str = "/ui") -> HTMLResponse:
    return render(request, "login.html", next=_local(next), error=None)


@router.post("/login")
def login(request: Request, key: Annotated[str, Form(max_length=1000)], next: Annotated[str, Form()] = "/ui"):
    if caller_of_key(key) is None:
        record_refusal(request, 401, "dashboard sign-in with an unknown API key")
        return render(request, "login.html", status_code=401, next=_local(next), error="unknown API key")
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(UI_KEY_COOKIE, key, httponly=True, samesite="strict", max_age=30 * 24 * 3600)
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(UI_KEY_COOKIE)
    return response


def _local(path: str) -> str:
    """Only a path of this site: a sign-in must not send the browser elsewhere."""
    return path if path.startswith("/ui") and not path.startswith("//") else "/ui"


@signed_in_router.get("")
def experiments(
    request: Request,
    session: SessionDep,
    where: WhereText = "",
    order_by: Annotated[str, Query(max_length=2000)] = "",
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> HTMLResponse:
    """The experiments: a filter, sortable columns, cursor pages, a CSV link for the filter."""
    error = None
    page = queries.Page([], None)
    try:
        page = queries.search(session, parse_optional_filter(where), parse_optional_order_by(order_by), limit, cursor)
    except FilterError as exc:
        error = str(exc)
    rows = [_documents(item) for item in page.items]
    return render(
        request,
        "experiments.html",
        status_code=422 if error else 200,
        rows=rows,
        columns=COLUMNS,
        where=where,
        order_by=order_by,
        limit=limit,
        page_sizes=PAGE_SIZES,
        error=error,
        next_cursor=page.next_cursor,
        first_page=cursor is None,
        terminal=TERMINAL_STATUSES,
    )


# What the labels form's POST sends back when it refused the labels (the redirect's query string).
LabelsError = Annotated[str | None, Query(max_length=1000)]


@signed_in_router.get("/experiments/{experiment_id}")
def experiment(request: Request, experiment_id: str, labels_error: LabelsError = None) -> HTMLResponse:
    with get_autocommit_engine().connect() as connection:
        item = queries.resource(connection, experiment_id)
        history = queries.history(connection, experiment_id) if item else []
        if item is not None:
            scheduler.say_place(connection, [item], get_settings())
    if item is None:
        return render(request, "missing.html", status_code=404, what=f"no experiment with id {experiment_id!r}")
    item = _documents(item)
    keys = sorted({key for row in history for key in row} - {"step"}, key=_history_order)
    return render(
        request,
        "experiment.html",
        experiment=item,
        charts=CHARTS[item["spec"]["kind"]],
        history=history[:HISTORY_ROWS_SHOWN],
        history_size=len(history),
        history_keys=keys,
        step_unit=STEP_UNITS[item["spec"]["kind"]],
        terminal=TERMINAL_STATUSES,
        labels_error=labels_error,
        spec_json=json.dumps(item["spec"], indent=2),
        result_json=json.dumps(item["result"], indent=2) if item["result"] is not None else None,
    )


def _history_order(key: str) -> tuple:
    """Training figures first, then the catalogue, then its test-set copies."""
    first = ("epoch", "lr", "train_loss", "train_accuracy", "loss", "accuracy", "cross_entropy", "grad_norm")
    return (0, first.index(key)) if key in first else (2 if key.startswith("test_") else 1, key)


@signed_in_router.post("/experiments/{experiment_id}/cancel", name="experiment.cancel")
def cancel(request: Request, experiment_id: str, session: SessionDep) -> RedirectResponse:
    """Cancel a queued experiment at once, ask a running one to stop; a finished one is left as it is.

    The roles' rule is the API's: a reader, or a member on another's work, gets its 403.
    """
    caller = request.state.caller
    owner = session.scalar(select(Experiment.owner).where(Experiment.id == experiment_id))
    if owner is not None:
        permissions.check(caller, "experiment.cancel", experiment_id, owner)
        jobs.cancel(session, experiment_id, actor_of(request, caller))
    return RedirectResponse(f"/ui/experiments/{experiment_id}", status_code=303)


LabelsForm = Annotated[str, Form(max_length=20_000)]


@signed_in_router.post("/experiments/{experiment_id}/labels", name="experiment.relabel")
def relabel(
    request: Request, experiment_id: str, session: SessionDep, name: LabelsForm = "", tags: LabelsForm = ""
) -> RedirectResponse:
    """The labels form: the experiment's name (blank clears it) and its tags as they should be, by the roles'
    rule, as PATCH /experiments/{id} relabels it."""
    page = f"/ui/experiments/{experiment_id}"
    experiment = session.get(Experiment, experiment_id)
    if experiment is not None:
        permissions.check(request.state.caller, "experiment.relabel", experiment_id, experiment.owner)
        return _relabel(request, session, experiment, name, tags, page)
    return RedirectResponse(page, status_code=303)


@signed_in_router.post("/sweeps/{sweep_id}/labels", name="sweep.relabel")
def relabel_sweep(
    request: Request, sweep_id: str, session: SessionDep, name: LabelsForm = "", tags: LabelsForm = ""
) -> RedirectResponse:
    """The sweep's labels form: as PATCH /sweeps/{id}, the sweep's and its members' labels."""
    page = f"/ui/sweeps/{sweep_id}"
    sweep = session.get(Sweep, sweep_id)
    if sweep is not None:
        permissions.check(request.state.caller, "sweep.relabel", sweep_id, sweep.owner)
        return _relabel(request, session, sweep, name, tags, page)
    return RedirectResponse(page, status_code=303)


def _relabel(
    request: Request, session, target: Experiment | Sweep, name: str, tags_text: str, page: str
) -> RedirectResponse:
    """Apply the form's labels: the tags it lists replace the target's (a tag left out is removed). A label
    the API would refuse comes back to the page as its error, changing nothing."""
    try:
        tags = _parse_tags(tags_text)
        patch = LabelPatch(name=name.strip() or None, tags={**dict.fromkeys(target.tags), **tags})
        actor = actor_of(request, request.state.caller)
        if isinstance(target, Sweep):
            jobs.relabel_sweep(session, target, patch, actor)
        else:
            jobs.relabel(session, target, patch, actor)
    except (ValueError, jobs.TooManyTags) as exc:  # pydantic's ValidationError is a ValueError
        return RedirectResponse(link(page, labels_error=_first_line(exc)), status_code=303)
    return RedirectResponse(page, status_code=303)


def _parse_tags(text: str) -> dict[str, str]:
    """``key=value`` per line (blank lines skipped)."""
    tags = {}
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"tags, line {number}: write key=value")
            tags[key.strip()] = value.strip()
    return tags


def _first_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        return f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
    return str(exc)


@signed_in_router.post("/sweeps/{sweep_id}/cancel", name="sweep.cancel")
def cancel_sweep(request: Request, sweep_id: str, session: SessionDep) -> RedirectResponse:
    """Cancel every unfinished member, by the roles' rule, as POST /sweeps/{id}/cancel does."""
    caller = request.state.caller
    owner = session.scalar(select(Sweep.owner).where(Sweep.id == sweep_id))
    if owner is not None:
        permissions.check(caller, "sweep.cancel", sweep_id, owner)
        jobs.cancel_sweep(session, sweep_id, actor_of(request, caller))
    return RedirectResponse(f"/ui/sweeps/{sweep_id}", status_code=303)


@signed_in_router.get("/compare")
def compare(
    request: Request,
    session: SessionDep,
    where: WhereText = "",
    group_by: Annotated[str, Query(max_length=2000)] = "spec.normalization",
    metric: Annotated[str, Query(max_length=100)] = "nc1",
) -> HTMLResponse:
    """The aggregate table of the metric's final values per group, and its curves over the steps."""
    error, items = None, []
    try:
        groups = parse_fields(group_by, "group_by")
        items = queries.aggregate(session, parse_optional_filter(where), groups, [numeric_result_key(metric)])
    except (FilterError, UnknownField) as exc:
        error = str(exc)
    curves = link("/experiments/curves.png", where=where, group_by=group_by, metric=metric, width=900, height=500)
    return render(
        request,
        "compare.html",
        status_code=422 if error else 200,
        where=where,
        group_by=group_by,
        metric=metric,
        items=items,
        error=error,
        curves=curves if not error else None,
    )


@signed_in_router.get("/sweeps")
def sweeps(request: Request, session: SessionDep, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> HTMLResponse:
    rows = session.scalars(select(Sweep).order_by(Sweep.created_at.desc(), Sweep.id.desc()).limit(limit)).all()
    return render(request, "sweeps.html", sweeps=rows, limit=limit)


@signed_in_router.get("/sweeps/{sweep_id}")
def sweep(request: Request, session: SessionDep, sweep_id: str, labels_error: LabelsError = None) -> HTMLResponse:
    found = session.get(Sweep, sweep_id)
    if found is None:
        return render(request, "missing.html", status_code=404, what=f"no sweep with id {sweep_id!r}")
    members = session.execute(
        select(Experiment.id, Experiment.status, Experiment.progress, Experiment.spec, Experiment.result_nc1)
        .where(Experiment.sweep == sweep_id)
        .order_by(Experiment.created_at, Experiment.id)
    ).all()
    tally = Counter(member.status for member in members)
    counts = {status: tally[status] for status in STATUSES}
    varied = _varied_fields(found.definition)
    where = f"sweep = '{sweep_id}'"
    return render(
        request,
        "sweep.html",
        sweep=found,
        members=members,
        counts=counts,
        varied=varied,
        compare=link("/ui/compare", where=where, group_by=",".join(f"spec.{f}" for f in varied)),
        curves=link(
            "/experiments/curves.png",
            where=where,
            width=900,
            height=500,
            group_by=",".join(f"spec.{f}" for f in varied),
            metric="nc1",
        ),
        terminal=TERMINAL_STATUSES,
        unfinished=sum(counts[status] for status in STATUSES if status not in TERMINAL_STATUSES),
        labels_error=labels_error,
    )


def _varied_fields(definition: dict) -> list[str]:
    """What the sweep's arms differ in: its variants' and grid's fields, less the seed (averaged over)."""
    fields = [field for variant in definition.get("variants", []) for field in variant]
    fields += list(definition.get("grid", {}))
    return [field for field in dict.fromkeys(fields) if field != "seed" and f"spec.{field}" in SPEC_FIELDS]


def install(app: FastAPI) -> None:
    """The pages, their static files, / as their entry, and the sign-in redirect."""

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/ui", status_code=307)

    @app.exception_handler(NeedsSignIn)
    def sign_in_first(request: Request, _exc: NeedsSignIn) -> RedirectResponse:
        return RedirectResponse(link("/ui/login", next=request.url.path), status_code=303)

    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.include_router(router)
    app.include_router(signed_in_router)
