"""NCLAB_API_KEYS: when set, /experiments needs a key; health endpoints stay open."""

import httpx

from tests.support import free_port, wait_ready


def test_api_keys_guard_experiments_but_not_health(processes):
    processes.env["NCLAB_API_KEYS"] = "lab-a-key, lab-b-key"
    port = free_port()
    api = processes.start("api", "--host", "127.0.0.1", "--port", str(port), name="api")
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, api)
    with httpx.Client(base_url=base_url) as client:
        refused = client.get("/experiments")
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert client.get("/experiments", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/experiments", headers={"Authorization": "Bearer lab-b-key"}).status_code == 200
        assert client.get("/experiments", headers={"X-API-Key": "lab-a-key"}).status_code == 200
        assert client.get("/healthz").status_code == 200
