"""Roles (issue 24): a reader only reads, a member changes only its own work, an admin everything;
/me; NCLAB_API_KEYS_FILE read again when it changes, without a restart."""

import logging
import os
import time

import pytest

from tests.support import eventually

SPEC = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}
SWEEP = {"base": SPEC, "grid": {"seed": [0, 1]}}
KEYS = "alice:alice-key, bob:bob-key, wall:wall-key:reader, root:root-key:admin"


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


ALICE, BOB, WALL, ROOT = auth("alice-key"), auth("bob-key"), auth("wall-key"), auth("root-key")


def refused(response, detail: str) -> None:
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"] == detail


@pytest.fixture
def lab(api_with):
    return api_with(NCLAB_API_KEYS=KEYS).client


def test_me_names_the_owner_and_the_role(lab, api_with):
    assert lab.get("/me", headers=ALICE).json() == {"owner": "alice", "role": "member"}
    assert lab.get("/me", headers=WALL).json() == {"owner": "wall", "role": "reader"}
    assert lab.get("/me", headers=ROOT).json() == {"owner": "root", "role": "admin"}
    assert lab.get("/me", headers=auth("nobody")).status_code == 401


def test_without_keys_everyone_is_the_anonymous_admin(api_with):
    client = api_with().client
    assert client.get("/me").json() == {"owner": "anonymous", "role": "admin"}
    assert client.get("/audit").status_code == 200


def test_a_reader_reads_and_changes_nothing(lab):
    experiment = lab.post("/experiments", json={"spec": SPEC, "name": "mine"}, headers=ALICE).json()
    sweep = lab.post("/sweeps", json=SWEEP, headers=ALICE).json()

    refused(lab.post("/experiments", json=SPEC, headers=WALL),
            "wall (reader) may not submit experiments: a reader only reads")
    refused(lab.post("/sweeps", json=SWEEP, headers=WALL), "wall (reader) may not submit sweeps: a reader only reads")
    refused(lab.post(f"/experiments/{experiment['id']}/cancel", headers=WALL),
            f"wall (reader) may not cancel experiment {experiment['id']}: a reader only reads")
    refused(lab.patch(f"/experiments/{experiment['id']}", json={"name": "theirs"}, headers=WALL),
            f"wall (reader) may not relabel experiment {experiment['id']}: a reader only reads")
    refused(lab.post(f"/sweeps/{sweep['id']}/cancel", headers=WALL),
            f"wall (reader) may not cancel sweep {sweep['id']}: a reader only reads")
    refused(lab.patch(f"/sweeps/{sweep['id']}", json={"tags": {"a": "b"}}, headers=WALL),
            f"wall (reader) may not relabel sweep {sweep['id']}: a reader only reads")

    listed = lab.get("/experiments", headers=WALL).json()["items"]
    assert len(listed) == 3  # the experiment and the sweep's two: nothing more was stored
    assert all(item["status"] == "queued" for item in listed)
    assert lab.get(f"/experiments/{experiment['id']}", headers=WALL).json()["name"] == "mine"
    assert lab.get(f"/sweeps/{sweep['id']}", headers=WALL).json()["status_counts"]["queued"] == 2


def test_a_member_changes_its_own_work_only_and_an_admin_anyones(lab):
    experiment = lab.post("/experiments", json=SPEC, headers=ALICE).json()["id"]
    sweep = lab.post("/sweeps", json=SWEEP, headers=ALICE).json()["id"]

    refused(lab.post(f"/experiments/{experiment}/cancel", headers=BOB),
            f"bob (member) may not cancel experiment {experiment}: it is alice's")
    refused(lab.patch(f"/experiments/{experiment}", json={"name": "bob's now"}, headers=BOB),
            f"bob (member) may not relabel experiment {experiment}: it is alice's")
    refused(lab.post(f"/sweeps/{sweep}/cancel", headers=BOB),
            f"bob (member) may not cancel sweep {sweep}: it is alice's")
    refused(lab.patch(f"/sweeps/{sweep}", json={"name": "bob's"}, headers=BOB),
            f"bob (member) may not relabel sweep {sweep}: it is alice's")
    refused(lab.get("/audit", headers=BOB), "bob (member) may not read the audit: only an admin may")
    assert lab.get(f"/experiments/{experiment}", headers=BOB).json()["status"] == "queued"
    assert lab.get(f"/sweeps/{sweep}", headers=BOB).json()["status_counts"]["queued"] == 2

    relabelled = lab.patch(f"/experiments/{experiment}", json={"name": "hers", "tags": {"fig": "2"}}, headers=ALICE)
    assert relabelled.status_code == 200 and relabelled.json()["name"] == "hers"
    assert lab.post(f"/experiments/{experiment}/cancel", headers=ALICE).json()["status"] == "canceled"
    assert lab.patch(f"/sweeps/{sweep}", json={"tags": {"fig": "3"}}, headers=ALICE).json()["tags"] == {"fig": "3"}

    bobs = lab.post("/experiments", json=SPEC, headers=BOB).json()["id"]
    assert lab.patch(f"/experiments/{bobs}", json={"name": "root's label"}, headers=ROOT).json()["name"] \
        == "root's label"
    assert lab.post(f"/experiments/{bobs}/cancel", headers=ROOT).json()["status"] == "canceled"
    assert lab.post(f"/sweeps/{sweep}/cancel", headers=ROOT).json()["status_counts"]["canceled"] == 2


def test_the_openapi_document_declares_403_where_it_can_be_answered(lab):
    paths = lab.get("/openapi.json", headers=ALICE).json()["paths"]
    for path, method in (("/experiments", "post"), ("/experiments/{experiment_id}", "patch"),
                         ("/experiments/{experiment_id}/cancel", "post"), ("/sweeps", "post"),
                         ("/sweeps/{sweep_id}", "patch"), ("/sweeps/{sweep_id}/cancel", "post"), ("/audit", "get")):
        assert "403" in paths[path][method]["responses"], (path, method)
    assert "403" not in paths["/experiments/{experiment_id}"]["get"]["responses"]


def write(path, text: str) -> None:
    """The file's new text, with a modification time of its own (a second later than the last)."""
    before = path.stat().st_mtime if path.exists() else time.time() - 10
    path.write_text(text)
    os.utime(path, (before + 1, before + 1))


def answered_within(client, key: str, expected: int, seconds: float = 10) -> None:
    """Wait until /me answers ``expected`` for the key. How often the ring looks at the file is
    test_the_keys_file_is_looked_at_no_more_than_once_a_second's to check; the margin here is for a
    loaded machine, where one request may take a second."""
    eventually(lambda: client.get("/me", headers=auth(key)).status_code == expected, timeout=seconds,
               message=f"{key}: /me answering {expected}")


def test_a_key_added_to_the_keys_file_works_and_a_removed_one_is_refused_without_a_restart(
    api_with, tmp_path, caplog
):
    keys_file = tmp_path / "keys"
    write(keys_file, "# the lab's keys\nalice:alice-key\n\n")
    client = api_with(NCLAB_API_KEYS="root:root-key:admin", NCLAB_API_KEYS_FILE=str(keys_file)).client
    assert client.get("/me", headers=ALICE).json() == {"owner": "alice", "role": "member"}
    assert client.get("/me", headers=ROOT).json()["role"] == "admin"  # NCLAB_API_KEYS's, beside the file's
    assert client.get("/me", headers=WALL).status_code == 401

    write(keys_file, "alice:alice-key\nwall:wall-key:reader  # the screen in the hall\n")
    answered_within(client, "wall-key", 200)
    assert client.get("/me", headers=WALL).json() == {"owner": "wall", "role": "reader"}

    write(keys_file, "wall:wall-key:reader\n")  # alice's key revoked
    answered_within(client, "alice-key", 401)

    # A file that no longer parses leaves the keys read before in force, and the log says why.
    with caplog.at_level(logging.ERROR, logger="nclab.api_keys"):
        write(keys_file, "wall:wall-key:reader\nbob:bob-key:root\n")
        time.sleep(1.2)
        assert client.get("/me", headers=WALL).status_code == 200
        assert client.get("/me", headers=BOB).status_code == 401
    assert any("line 2" in record.getMessage() and "bob:bob-key:root" in record.getMessage()
               for record in caplog.records)
    write(keys_file, "wall:wall-key:reader\nbob:bob-key\n")
    answered_within(client, "bob-key", 200)


def test_an_empty_keys_file_still_needs_a_key_and_a_bad_one_stops_the_start(tmp_path, api_with):
    from service.settings import Settings

    empty = tmp_path / "empty"
    empty.write_text("# no keys yet\n")
    ring = Settings(api_keys_file=empty).key_ring
    assert ring.authenticating and ring.callers() == {}

    bad = tmp_path / "bad"
    bad.write_text("alice:alice-key\n\nalice:\n")
    with pytest.raises(ValueError, match="line 3"):
        api_with(NCLAB_API_KEYS_FILE=str(bad))  # the app's start-up reads it
    with pytest.raises(ValueError, match="cannot read the keys file"):
        Settings(api_keys_file=tmp_path / "missing").key_ring.callers()


def test_the_keys_file_is_looked_at_no_more_than_once_a_second(tmp_path, monkeypatch):
    from service import api_keys

    keys_file = tmp_path / "keys"
    keys_file.write_text("alice:alice-key\n")
    ring = api_keys.KeyRing("", keys_file)
    looks = []
    signature = api_keys.KeyRing._signature
    monkeypatch.setattr(api_keys.KeyRing, "_signature", staticmethod(lambda file: looks.append(1) or signature(file)))
    start = time.monotonic()
    while time.monotonic() - start < 2.5:
        assert ring.callers()["alice-key"].owner == "alice"
    assert 2 <= len(looks) <= 3
