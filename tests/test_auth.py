"""NCLAB_API_KEYS: named keys record who submitted; bare keys are 'anonymous'; health stays open."""

import pytest

SPEC = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}


def test_named_keys_record_the_owner_bare_keys_are_anonymous_and_no_key_is_401(api_with):
    client = api_with(NCLAB_API_KEYS="alice:alice-key, bob:bob-key,lab-bare-key").client
    refused = client.get("/experiments")
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["www-authenticate"] == "Bearer"
    assert client.get("/experiments", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/experiments", headers={"Authorization": "Bearer alice"}).status_code == 401
    assert client.get("/experiments/aggregate").status_code == 401
    assert client.get("/healthz").status_code == 200

    def submit(headers: dict) -> dict:
        response = client.post("/experiments", json=SPEC, headers=headers)
        assert response.status_code == 202, response.text
        return response.json()

    by_alice = submit({"Authorization": "Bearer alice-key"})
    by_bob = submit({"X-API-Key": "bob-key"})
    by_bare = submit({"Authorization": "Bearer lab-bare-key"})
    assert (by_alice["owner"], by_bob["owner"], by_bare["owner"]) == ("alice", "bob", "anonymous")

    listed = client.get("/experiments", params={"where": "owner = 'alice'"},
                        headers={"Authorization": "Bearer bob-key"})
    assert [item["id"] for item in listed.json()["items"]] == [by_alice["id"]]
    counts = client.get("/experiments/aggregate", params={"group_by": "owner"},
                        headers={"Authorization": "Bearer lab-bare-key"}).json()["items"]
    assert {item["group"]["owner"]: item["count"] for item in counts} == {"alice": 1, "anonymous": 1, "bob": 1}


def test_key_entries_name_owner_and_role_and_a_malformed_entry_is_named():
    from service.identity import InvalidKeyEntry, parse_entries
    from service.settings import Settings

    callers = parse_entries("alice:a-key:admin, bob:b-key\nwall:w-key:reader,bare-key")
    assert callers == {
        "a-key": ("alice", "admin"),
        "b-key": ("bob", "member"),
        "w-key": ("wall", "reader"),
        "bare-key": ("anonymous", "member"),
    }
    with pytest.raises(InvalidKeyEntry, match="'alice:a-key:root'"):
        parse_entries("alice:a-key:root")
    with pytest.raises(ValueError, match="alice:"):
        Settings(api_keys="alice:")
