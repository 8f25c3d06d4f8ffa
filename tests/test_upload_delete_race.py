"""An upload deleted while an analysis that reads it is being submitted: one of the two transactions waits for the
other, so either the delete is refused (409) and the analysis stays queued with its file, or the upload goes (204)
and the submit is refused (422 on its source); never an analysis queued on a deleted file. Of two deletes at once,
one deletes and the other finds nothing (404).

Each order is forced: one transaction is held just before its commit (after its audit row, its last write), and
the other is shown to wait for it. On both databases: PostgreSQL waits on the upload row's lock, SQLite on its
write lock."""

import threading
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import analysis, audit, jobs
from service.audit import Actor
from service.db import get_engine
from service.models import Experiment, Upload
from service.schemas import LabelledSubmission
from tests.conftest import fresh_pg_database, in_process_api
from tests.test_uploads import GOOD, upload

SHOWN_WAITING = 0.5  # seconds a transaction is watched waiting for the held one


@pytest.fixture(params=["sqlite", "postgresql"])
def lab(request, tmp_path):
    if request.param == "sqlite":
        with in_process_api(tmp_path / "data") as api:
            yield api
        return
    with fresh_pg_database(request.getfixturevalue("pg_admin")) as url, in_process_api(tmp_path / "data", url) as api:
        yield api


class HeldBeforeCommit:
    """audit.record, holding the transaction that writes the row of `action` until `release` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, action: str):
        self.reached, self.release = threading.Event(), threading.Event()
        record = audit.record

        def held(connection, entry: dict) -> None:
            record(connection, entry)
            if entry["action"] == action:
                self.reached.set()
                assert self.release.wait(30)

        monkeypatch.setattr(audit, "record", held)


@pytest.fixture
def hold(monkeypatch) -> Iterator[Callable[[str], HeldBeforeCommit]]:
    """hold(action): a HeldBeforeCommit, released at the test's end whether it passed or not (a failed test must
    not leave a transaction held under the database's teardown)."""
    holds: list[HeldBeforeCommit] = []

    def make(action: str) -> HeldBeforeCommit:
        holds.append(HeldBeforeCommit(monkeypatch, action))
        return holds[-1]

    yield make
    for held in holds:
        held.release.set()


class InThread:
    """call() in a thread of its own; `result()` is what it returned, or raises what it raised."""

    def __init__(self, call: Callable):
        self.outcome: list = []

        def run() -> None:
            try:
                self.outcome.append((True, call()))
            except Exception as exc:  # handed to result()
                self.outcome.append((False, exc))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def waiting_after(self, seconds: float) -> bool:
        self.thread.join(seconds)
        return self.thread.is_alive()

    def result(self):
        self.thread.join(30)
        assert not self.thread.is_alive()
        returned, value = self.outcome[0]
        if not returned:
            raise value
        return value


def uploaded(lab) -> str:
    response = upload(lab, GOOD)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def analyses_and_uploads(lab) -> tuple[int, int]:
    with Session(get_engine()) as session:
        count = session.scalar(select(func.count()).select_from(Experiment).where(Experiment.kind == "analysis"))
        return count, session.scalar(select(func.count()).select_from(Upload))


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/experiments", lambda upload_id: {"kind": "analysis", "source": {"upload": upload_id}}, "source.upload"),
        (
            "/sweeps",
            lambda upload_id: {"base": {"kind": "analysis", "source": {"upload": upload_id}}},
            "members[0].source.upload",
        ),
    ],
    ids=["experiment", "sweep"],
)
def test_a_submit_while_a_delete_commits_waits_for_it_and_is_refused(monkeypatch, lab, hold, path, body, field):
    upload_id = uploaded(lab)
    delete = hold("upload.delete")
    deleting = InThread(lambda: lab.client.delete(f"/uploads/{upload_id}"))
    assert delete.reached.wait(30)
    # Watched only once it has found the upload: a submit still on its way there (a slow machine) would find the
    # upload gone after the release, a refusal for another reason than the one under test.
    found, resolve = threading.Event(), analysis.resolve

    def resolved(session, spec: dict) -> dict:
        resolution = resolve(session, spec)
        found.set()
        return resolution

    monkeypatch.setattr(analysis, "resolve", resolved)
    submitting = InThread(lambda: lab.client.post(path, json=body(upload_id)))
    assert found.wait(30)
    assert submitting.waiting_after(SHOWN_WAITING)  # it found the upload, and waits to store its analysis
    delete.release.set()

    assert deleting.result().status_code == 204
    refused = submitting.result()
    assert refused.status_code == 422, refused.text
    (error,) = refused.json()["errors"]
    assert error["field"] == field and f"upload {upload_id!r} was deleted" in error["message"]
    assert analyses_and_uploads(lab) == (0, 0)


def test_a_delete_while_a_submit_commits_waits_for_it_and_is_refused(lab, hold):
    upload_id = uploaded(lab)
    spec = LabelledSubmission.model_validate({"spec": {"kind": "analysis", "source": {"upload": upload_id}}})
    with Session(get_engine()) as session:
        resolved = analysis.resolve(session, spec.model_dump(mode="json")["spec"])
    submit = hold("experiment.submit")

    def store() -> str:
        with get_engine().connect() as connection:
            return jobs.submit(connection, resolved, actor=Actor(None, "test")).id

    # The submit goes straight to jobs.submit, in a thread: held there, it would hold the API's event loop too.
    submitting = InThread(store)
    assert submit.reached.wait(30)
    deleting = InThread(lambda: lab.client.delete(f"/uploads/{upload_id}"))
    assert deleting.waiting_after(SHOWN_WAITING)
    submit.release.set()

    experiment_id = submitting.result()
    conflict = deleting.result()
    assert conflict.status_code == 409 and experiment_id in conflict.json()["detail"]
    assert analyses_and_uploads(lab) == (1, 1)
    assert lab.client.get(f"/uploads/{upload_id}").status_code == 200


def test_two_deletes_at_once_delete_once_and_the_other_finds_nothing(lab, hold):
    upload_id = uploaded(lab)
    first = hold("upload.delete")
    deleting = InThread(lambda: lab.client.delete(f"/uploads/{upload_id}"))
    assert first.reached.wait(30)
    again = InThread(lambda: lab.client.delete(f"/uploads/{upload_id}"))
    assert again.waiting_after(SHOWN_WAITING)
    first.release.set()

    assert deleting.result().status_code == 204
    missing = again.result()
    assert missing.status_code == 404, missing.text
    assert analyses_and_uploads(lab) == (0, 0)
