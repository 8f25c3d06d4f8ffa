"""Uploads' housekeeping: listed newest first (by owner too), deleted by their owner or an admin, refused while
an unfinished analysis reads them; the file, its row and nothing else go, and the audit says who did it."""

import numpy as np

from tests.feature_files import safetensors_bytes, simplex_collapse
from tests.test_uploads import stored_uploads

FEATURES, LABELS, CLASSIFIER = simplex_collapse(num_classes=3, dim=5, per_class=4, noise=0.1)
GOOD = safetensors_bytes(features=FEATURES.astype(np.float32), labels=LABELS, classifier=CLASSIFIER)
OCTET = {"Content-Type": "application/octet-stream"}


def test_uploads_are_listed_newest_first_and_deleted_by_their_owner_once_no_unfinished_analysis_reads_them(
    api_with,
):
    lab = api_with(NCLAB_API_KEYS="alice:alice-key, bob:bob-key, wall:wall-key:reader, root:root-key:admin")
    alice, bob, wall, root = ({"Authorization": f"Bearer {name}-key"} for name in ("alice", "bob", "wall", "root"))
    first = lab.client.post("/uploads", content=GOOD, headers={**OCTET, **alice}).json()
    second = lab.client.post("/uploads", content=GOOD, headers={**OCTET, **alice}).json()
    theirs = lab.client.post("/uploads", content=GOOD, headers={**OCTET, **bob}).json()

    page = lab.client.get("/uploads", params={"limit": 2}, headers=wall).json()
    assert [item["id"] for item in page["items"]] == [theirs["id"], second["id"]]
    rest = lab.client.get("/uploads", params={"limit": 2, "cursor": page["next_cursor"]}, headers=wall).json()
    assert [item["id"] for item in rest["items"]] == [first["id"]] and rest["next_cursor"] is None
    assert rest["items"][0] == first
    owned = lab.client.get("/uploads", params={"owner": "alice"}, headers=wall).json()["items"]
    assert [item["id"] for item in owned] == [second["id"], first["id"]]
    assert lab.client.get("/uploads", params={"cursor": "nope"}, headers=wall).json()["errors"][0]["field"] == "cursor"

    submitted = lab.client.post(
        "/experiments", json={"kind": "analysis", "source": {"upload": [second["id"], first["id"]]}}, headers=alice
    )
    assert submitted.status_code == 202, submitted.text
    reading = submitted.json()
    conflict = lab.client.delete(f"/uploads/{first['id']}", headers=alice)
    assert conflict.status_code == 409 and reading["id"] in conflict.json()["detail"]
    for key, who in ((bob, "bob (member)"), (wall, "wall (reader)")):
        refused = lab.client.delete(f"/uploads/{first['id']}", headers=key)
        assert refused.status_code == 403 and refused.json()["detail"].startswith(f"{who} may not delete upload")
    assert lab.client.post(f"/experiments/{reading['id']}/cancel", headers=alice).status_code == 200

    assert lab.client.delete(f"/uploads/{first['id']}", headers=alice).status_code == 204
    assert lab.client.delete(f"/uploads/{theirs['id']}", headers=root).status_code == 204
    assert lab.client.get(f"/uploads/{first['id']}", headers=wall).status_code == 404
    assert lab.client.delete(f"/uploads/{first['id']}", headers=alice).status_code == 404
    assert sorted(stored_uploads(lab)) == [second["id"], second["id"]]  # its file and its row, no other
    deleted = lab.client.get("/audit", params={"where": "action = 'upload.delete'"}, headers=root).json()["items"]
    assert {(entry["owner"], entry["target"], entry["status"]) for entry in deleted} == {
        ("bob", first["id"], 403),
        ("wall", first["id"], 403),
        ("alice", first["id"], 204),
        ("root", theirs["id"], 204),
    }
