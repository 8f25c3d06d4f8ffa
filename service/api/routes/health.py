"""Liveness and readiness."""

from fastapi import APIRouter
from sqlalchemy import text

from service.api.deps import SessionDep
from service.api.problems import problem, problem_responses
from service.queue import celery_app

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", responses=problem_responses(503))
def readyz(session: SessionDep):
    checks = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {exc.__class__.__name__}"
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {exc.__class__.__name__}"
    if all(state == "ok" for state in checks.values()):
        return {"status": "ready", "checks": checks}
    failing = ", ".join(f"{name} {state}" for name, state in checks.items() if state != "ok")
    return problem(503, f"not ready: {failing}", checks=checks)
