"""Lab-wide comparison: search, aggregate and curves over the experiments, as JSON, CSV or PNG.

Thin: parse the parameters (service/search/language.py), run the query
(service/search/queries.py), and shape the answer. Declared before /experiments/{id} so
that 'aggregate', 'curves' and 'search' are not taken for ids.
"""

from collections.abc import Sequence
from typing import Annotated, Literal

from fastapi import Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from service import plots, workers
from service.api.deps import SessionDep, api_router, metric_names
from service.api.formats import (
    CSV_RESPONSES,
    PNG_RESPONSES,
    Format,
    PlotHeight,
    PlotWidth,
    csv_response,
    json_response,
    wants_csv,
    with_documents,
)
from service.api.problems import InvalidField, problem_responses
from service.db import get_sessionmaker
from service.schemas import ExperimentList, SearchRequest, Status
from service.search import export, queries
from service.search.fields import STEP_UNITS, history_key, lookup, numeric_result_key
from service.search.language import (
    Compare,
    Filter,
    OrderKey,
    conjunction,
    parse_fields,
    parse_optional_filter,
    parse_optional_order_by,
)
from service.settings import get_settings

router = api_router("/experiments", "comparison")

Where = Annotated[str | None, Query(max_length=20_000, description='a filter, e.g. "spec.K = 10 and result.nc1 < 0.1"')]
GroupBy = Annotated[
    str | None, Query(max_length=2000, description="comma-separated fields, e.g. spec.normalization,spec.logit_scale")
]
Metrics = Annotated[
    str | None, Query(max_length=2000, description="comma-separated result keys, e.g. nc1,test_accuracy")
]


def _filter(where: str | None, legacy: Sequence[Filter] = ()) -> Filter | None:
    parsed = parse_optional_filter(where)
    return conjunction([*legacy, *([parsed] if parsed else [])])


def _order(order_by: str | list[str] | None) -> list[OrderKey] | None:
    return parse_optional_order_by(",".join(order_by) if isinstance(order_by, list) else order_by)


def _export(tree: Filter | None, order: list[OrderKey] | None) -> StreamingResponse:
    """Every match as CSV, read in batches by a session of the stream's own (it outlives the request's)."""

    def chunks():
        with get_sessionmaker()() as session:
            yield from export.experiments(queries.stream(session, tree, order, export.EXPORT_COLUMNS))

    return csv_response(chunks(), "experiments")


def _page(session, request: Request, format: str | None, tree, order, limit: int, cursor: str | None):
    if wants_csv(request, format):
        # A CSV export is the whole match, not a page: it streams in constant memory.
        return _export(tree, order)
    page = queries.search(session, tree, order, limit, cursor)
    items = workers.say_why_waiting(session.connection(), page.items, get_settings())
    for item in items:
        item["place"] = None  # a queued experiment's place is read for one at a time (GET /experiments/{id})
    return json_response({"items": [with_documents(item) for item in items], "next_cursor": page.next_cursor})


@router.get("", response_model=ExperimentList, responses=CSV_RESPONSES)
def list_experiments(
    session: SessionDep,
    request: Request,
    where: Where = None,
    order_by: Annotated[str | None, Query(max_length=2000, description="e.g. result.nc1,-created_at")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
    format: Format = None,
    kind: Literal["ufm", "train", "analysis"] | None = None,
    status: Status | None = None,
    normalization: Literal["normalized", "regularized", "none"] | None = None,
    K: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    d: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    dataset: str | None = None,
    architecture: str | None = None,
):
    """Search: newest first unless ``order_by`` says otherwise; pass ``next_cursor`` back as
    ``cursor`` for the next page. ``where`` takes the filter language; the equality
    parameters (kind, status, ..., K, d) still work and are combined with it."""
    legacy = {
        "kind": kind,
        "status": status,
        "spec.normalization": normalization,
        "spec.K": K,
        "spec.d": d,
        "spec.dataset": dataset,
        "spec.architecture": architecture,
    }
    equalities = [Compare(lookup(name), "=", value) for name, value in legacy.items() if value is not None]
    return _page(session, request, format, _filter(where, equalities), _order(order_by), limit, cursor)


@router.post("/search", response_model=ExperimentList, responses={**CSV_RESPONSES, **problem_responses(400)})
def search(body: SearchRequest, session: SessionDep, request: Request, format: Format = None):
    """The same search with its parameters in a JSON body, for filters too long for a URL."""
    return _page(session, request, format, _filter(body.where), _order(body.order_by), body.limit, body.cursor)


@router.get("/aggregate", responses=CSV_RESPONSES)
def aggregate(
    session: SessionDep,
    request: Request,
    where: Where = None,
    group_by: GroupBy = None,
    metrics: Metrics = None,
    format: Format = None,
):
    """Per group: ``count``, and per metric n, mean, std (sample), min, max, median; computed in the database."""
    tree, groups = _filter(where), parse_fields(group_by, "group_by")
    # Each metric once (nc1 and result.nc1 are one): every repeat would add six columns, and
    # enough of them pass the databases' limits (1,664 on PostgreSQL, 2,000 on SQLite).
    keys = list(dict.fromkeys(metric_names(metrics, "metrics", numeric_result_key)))
    items = queries.aggregate(session, tree, groups, keys)
    if wants_csv(request, format):
        return csv_response(export.aggregate(items, [g.name for g in groups], keys), "aggregate")
    return {"items": items}


def _curves(session, where: str | None, group_by: str | None, metric: str):
    tree, groups = _filter(where), parse_fields(group_by, "group_by")
    keys = metric_names(metric, "metric", history_key)
    if len(keys) != 1:
        raise InvalidField("metric", f"curves take one history metric, e.g. nc1; {len(keys)} given")
    (key,) = keys
    return tree, groups, key, queries.curves(session, tree, groups, key)


@router.get("/curves", responses=CSV_RESPONSES)
def curves(
    session: SessionDep,
    request: Request,
    metric: Annotated[str, Query(max_length=100, description="a history metric, e.g. nc1")],
    where: Where = None,
    group_by: GroupBy = None,
    format: Format = None,
):
    """Per group and per history step: n, mean, std, min, max of the metric over the experiments."""
    _tree, groups, _key, items = _curves(session, where, group_by, metric)
    if wants_csv(request, format):
        return csv_response(export.curves(items, [g.name for g in groups]), "curves")
    return {"items": items}


def _step_unit(kinds: set[str]) -> str:
    units = {STEP_UNITS[kind] for kind in kinds}
    return units.pop() if len(units) == 1 else "step"


@router.get("/curves.png", response_class=Response, responses=PNG_RESPONSES)
async def curves_png(
    session: SessionDep,
    metric: Annotated[str, Query(max_length=100, description="a history metric, e.g. nc1")],
    where: Where = None,
    group_by: GroupBy = None,
    width: PlotWidth = 800,
    height: PlotHeight = 500,
) -> Response:
    """The curves as a plot: one line per group, the mean with a shaded band of ± one std."""
    tree, _groups, key, items = await run_in_threadpool(_curves, session, where, group_by, metric)
    unit = _step_unit(await run_in_threadpool(queries.step_units, session, tree))
    png = await run_in_threadpool(plots.curves_png, items, key, unit, width, height)
    return Response(png, media_type="image/png")
