"""One set of input limits in both modes, checked by the API before the database sees the value.

Every integer of a spec lies in PostgreSQL's integer range (-2^31..2^31-1), and no string
the user gives holds a NUL character or a lone surrogate: each is a 422 naming the field,
on SQLite as on PostgreSQL, and nothing is stored. The API runs in-process, on each database.
"""

import json

import httpx
import pydantic
import pytest
from sqlalchemy.exc import DataError

from service.schemas import UFMSpec
from tests.support import answer_to_raised

PROBLEM_JSON = "application/problem+json"
SPEC = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}
GAUSSIAN = {"kind": "train", "dataset": "gaussian", "K": 3, "epochs": 1}
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
BEYOND_THE_RANGE = [INT_MAX + 1, 2**63, 2**64, INT_MIN - 1]


def _send(client: httpx.Client, method: str, path: str, body: dict) -> httpx.Response:
    """The body as JSON text with escapes: a lone surrogate can only travel as "\\ud800"."""
    return client.request(method, path, content=json.dumps(body), headers={"content-type": "application/json"})


def _refused(response: httpx.Response) -> dict:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    return response.json()


def _ids(client: httpx.Client, path: str) -> set[str]:
    return {item["id"] for item in client.get(path, params={"limit": 100}).json()["items"]}


@pytest.fixture
def unchanged(api_each_db):
    """The API's client; afterwards, no experiment or sweep was stored in between."""
    client = api_each_db.client
    experiments, sweeps = _ids(client, "/experiments"), _ids(client, "/sweeps")
    yield client
    assert _ids(client, "/experiments") == experiments and _ids(client, "/sweeps") == sweeps


@pytest.mark.parametrize("seed", BEYOND_THE_RANGE)
def test_a_seed_beyond_the_integer_range_is_422_naming_it(unchanged, seed):
    bare = _refused(_send(unchanged, "POST", "/experiments", {**SPEC, "seed": seed}))
    assert [error["field"] for error in bare["errors"]] == ["seed"]
    bound = "less than or equal to 2147483647" if seed > 0 else "greater than or equal to 0"  # seed's own bound
    assert bare["detail"] == f"seed: Input should be {bound}"
    labelled = _refused(_send(unchanged, "POST", "/experiments", {"spec": {**SPEC, "seed": seed}, "name": "s"}))
    assert [error["field"] for error in labelled["errors"]] == ["spec.seed"]


@pytest.mark.parametrize(("spec", "field", "rule"), [
    ({**SPEC, "checkpoint_every": 2**63}, "checkpoint_every", "less than or equal to 2147483647"),
    ({**SPEC, "n_per_class": [2, 2**31, 2]}, "n_per_class", "less than or equal to 2147483647"),
    ({**GAUSSIAN, "metrics_every": 2**31}, "metrics_every", "less than or equal to 2147483647"),
    ({**GAUSSIAN, "lr_schedule": "milestones", "lr_milestones": [1, 2**64]}, "lr_milestones",
     "less than or equal to 2147483647"),
    # The fields' own bounds still hold within the range.
    ({**SPEC, "K": 1}, "K", "greater than or equal to 2"),
    ({**GAUSSIAN, "batch_size": 8193}, "batch_size", "less than or equal to 8192"),
    ({**GAUSSIAN, "mlp_depth": 2**31}, "mlp_depth", "less than or equal to 32"),
])
def test_every_integer_field_is_held_to_the_range_and_its_own_bounds(unchanged, spec, field, rule):
    problem = _refused(_send(unchanged, "POST", "/experiments", spec))
    assert [error["field"] for error in problem["errors"]] == [field]
    assert problem["detail"] == f"{field}: Input should be {rule}"


@pytest.mark.parametrize("sweep", [
    {"base": {**SPEC, "seed": INT_MAX + 1}},
    {"base": SPEC, "grid": {"seed": [0, 2**63]}},
    {"base": SPEC, "grid": {"seed": [2**64]}},
    {"base": SPEC, "variants": [{}, {"seed": INT_MIN - 1}]},
])
def test_a_sweep_member_beyond_the_integer_range_is_422_naming_the_member_and_field(unchanged, sweep):
    problem = _refused(_send(unchanged, "POST", "/sweeps", sweep))
    [error] = problem["errors"]
    assert error["field"] in ("members[0].seed", "members[1].seed"), error
    assert "seed: Input should be" in problem["detail"]


NUL, SURROGATE = "\x00", "\ud800"
LABELLED = {"spec": SPEC}


@pytest.mark.parametrize("character", [NUL, SURROGATE])
@pytest.mark.parametrize(("path", "body", "field"), [
    ("/experiments", {**LABELLED, "name": "run {}"}, "name"),
    ("/experiments", {**LABELLED, "tags": {"paper": "fig{}"}}, "tags.paper"),
    ("/experiments", {**LABELLED, "tags": {"pa{}per": "fig1"}}, "tags.pa{}per.[key]"),
    ("/sweeps", {"base": SPEC, "name": "sweep {}"}, "name"),
    ("/sweeps", {"base": SPEC, "tags": {"paper": "fig{}"}}, "tags.paper"),
    # A base field no member uses (normalized members take no lambda_w) is still stored, in the sweep's definition.
    ("/sweeps", {"base": {**SPEC, "lambda_w": "{}"}}, "base.lambda_w"),
    ("/sweeps", {"base": {**SPEC, "{}": 1}}, "base.{}.[key]"),
    ("/sweeps", {"base": SPEC, "variants": [{"normalization": "normalized{}"}]}, "variants.0.normalization"),
    ("/sweeps", {"base": SPEC, "grid": {"normalization": ["regularized", "{}"]}}, "grid.normalization.1"),
])
def test_text_the_databases_cannot_store_is_422_naming_the_field(unchanged, path, body, field, character):
    body = json.loads(json.dumps(body).replace("{}", json.dumps(character)[1:-1]))
    problem = _refused(_send(unchanged, "POST", path, body))
    fields = [error["field"] for error in problem["errors"]]
    if field.endswith("[key]") and character == SURROGATE:
        # pydantic writes a key it cannot read as text with replacement characters; it is the key still.
        assert len(fields) == 1 and fields[0].startswith(field.split("{}")[0]) and fields[0].endswith("[key]"), fields
    else:
        assert fields == [field.replace("{}", character)]


@pytest.mark.parametrize("character", [NUL, SURROGATE])
def test_a_patch_with_text_the_databases_cannot_store_is_422_and_changes_nothing(api_each_db, character):
    client = api_each_db.client
    created = client.post("/experiments", json={**LABELLED, "name": "kept", "tags": {"paper": "fig1"}}).json()
    for patch, field in (({"name": f"new{character}"}, "name"), ({"tags": {"paper": f"fig{character}"}}, "tags.paper"),
                         ({"tags": {"ok": "yes", "paper": character}}, "tags.paper")):
        problem = _refused(_send(client, "PATCH", f"/experiments/{created['id']}", patch))
        assert [error["field"] for error in problem["errors"]] == [field]
    after = client.get(f"/experiments/{created['id']}").json()
    assert after["name"] == "kept" and after["tags"] == {"paper": "fig1"}


def test_a_grid_field_with_no_values_or_no_variants_is_422_not_an_empty_sweep(unchanged):
    problem = _refused(unchanged.post("/sweeps", json={"base": SPEC, "grid": {"seed": [], "K": [3]}}))
    assert [error["field"] for error in problem["errors"]] == ["grid.seed"]
    assert problem["detail"] == "grid.seed: List should have at least 1 item after validation, not 0"
    problem = _refused(unchanged.post("/sweeps", json={"base": SPEC, "variants": []}))
    assert [error["field"] for error in problem["errors"]] == ["variants"]


@pytest.mark.parametrize("model", ["UFMSpec", "TrainSpec"])
def test_the_json_schema_states_the_range_of_every_integer(model):
    from service.api.app import create_app

    schema = create_app().openapi()["components"]["schemas"][model]

    def integers(node):
        if isinstance(node, dict):
            if node.get("type") == "integer":
                yield node
            for value in node.values():
                yield from integers(value)
        elif isinstance(node, list):
            for value in node:
                yield from integers(value)

    found = list(integers(schema["properties"]))
    assert found and all(INT_MIN <= node["minimum"] and node["maximum"] <= INT_MAX for node in found), found


@pytest.mark.parametrize("error", [
    OverflowError("Python int too large to convert to SQLite INTEGER"),
    UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
    DataError("INSERT ...", {}, Exception("integer out of range")),
])
def test_a_value_only_the_database_refuses_is_a_422_problem_not_a_500(error):
    """The last line behind validation: what the database or its driver raises on a value it cannot store."""
    problem = _refused(answer_to_raised(error))
    assert problem["detail"].startswith("a value the database cannot take: ")


@pytest.mark.parametrize("field", ["lambda_w", "lambda_h", "lambda_b"])
def test_a_decay_beyond_1e6_is_a_422_naming_it(field):
    """1e308 used to be accepted and then crash the solver (the objective overflows at the start)."""
    with pytest.raises(pydantic.ValidationError) as refused:
        UFMSpec(kind="ufm", K=2, d=2, n_per_class=1, normalization="regularized", **{field: 1e308})
    assert [error["loc"] for error in refused.value.errors()] == [(field,)]
    assert "less than or equal to 1000000" in str(refused.value)
