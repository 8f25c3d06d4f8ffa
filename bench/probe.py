"""A hostile-request probe: start the service, send it ~250 kinds of hostile requests, classify every answer.

    .venv/bin/python bench/probe.py [--modes embedded,production] [--base-dir DIR] [--logs DIR]

For each mode it starts the service itself on free ports, from the checkout in --base-dir
(default: this repository; the servers run with that directory as cwd and PYTHONPATH, so an
older worktree can be probed with this script), with NCLAB_API_KEYS set so that auth is on:

- embedded: ``python -m service.cli serve`` with NCLAB_DATA_DIR a temporary directory;
- production: ``python -m service.cli api --workers 2`` and ``python -m service.cli worker`` on a
  scratch PostgreSQL database (created on --postgres, dropped afterwards) and a redis-server of
  its own on a free port.

Every kind is one request, or a short sequence, with the answer it should get:

- ``ok()``: a 2xx/3xx;
- ``refuse(field, *statuses)``: a 4xx ``application/problem+json`` (422 unless statuses are
  given); a 422 must name a field in ``errors[].field``, the given one when there is one;
- ``either(field)``: a 2xx, or a refusal as ``refuse(field)`` (values a fix may take or refuse);
- ``handled()``: anything below 500: a success, a 4xx problem, or a dashboard page (HTML);
- ``csv_without_formulas(marker)``: a 2xx CSV holding the planted rows (``marker``) in which no text cell starts
  with a spreadsheet formula trigger (= + - @ tab CR) unless it is a number.

An answer is OK or a FINDING: a 5xx, a dropped connection, an error without a problem+json
body, an input accepted that should be refused (or one refused that should be accepted), a
422 that names no field or another field, an unneutralised formula cell. Experiments that a
kind got accepted must then run: once every kind has been sent, the probe waits (at most
--settle seconds) for them, and one that failed in the worker makes its kind a finding. The
CSV kinds and the read-backs (do stored hostile values break later reads?) run after that.

It prints a table per mode (kind, status, verdict), a summary line per mode ("N kinds, M
findings"), and exits 1 when there are findings.
"""

import argparse
import base64
import contextlib
import csv
import html
import io
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

REPO = Path(__file__).resolve().parent.parent
# service/settings.py splits each entry at its last ':' (owner:key); a bare key is "anonymous"'s.
API_KEYS = "alice:key-a,bob:key-b"
KEY, OTHER_KEY = "key-a", "key-b"
TIMEOUT = 20.0  # seconds, every request
PROBLEM_JSON = "application/problem+json"
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")

# ---------------------------------------------------------------------------------------------
# Requests, expectations, cases


NO_BODY = object()


@dataclass(frozen=True)
class Req:
    method: str
    path: str  # may name captured values: "/experiments/{exp}"
    params: dict | list | None = None
    body: object = NO_BODY  # sent as JSON (json.dumps: big ints, NaN/Infinity tokens, \\ud800 escapes)
    content: bytes | str | None = None  # sent as it is
    headers: dict = field(default_factory=dict)
    key: str | None = KEY  # sent as "Authorization: Bearer <key>", or as the dashboard's cookie
    cookie: bool = False
    raw: bytes | None = None  # the whole HTTP/1.1 request, over a socket of its own
    capture: tuple[str, str] | None = None  # (name, regex): a value of the answer, for later paths


@dataclass(frozen=True)
class Expect:
    success: bool  # a 2xx/3xx is right
    refusal: bool  # a 4xx problem is right
    statuses: tuple[int, ...] = (422,)  # the refusals that are right
    field_name: str | None = None  # what a 422 must name (a substring of one errors[].field)
    csv_marker: str | None = None  # a success must be CSV holding this, without formula cells


ANY_4XX = tuple(range(400, 500))


def ok() -> Expect:
    return Expect(True, False)


def refuse(name: str | None = None, *statuses: int) -> Expect:
    return Expect(False, True, statuses or (422,), name)


def either(name: str | None = None) -> Expect:
    return Expect(True, True, (422,), name)


def handled() -> Expect:
    """Anything but a server error: a success, a 4xx problem, or a dashboard page."""
    return Expect(True, True, ANY_4XX)


def csv_without_formulas(marker: str) -> Expect:
    return Expect(True, False, csv_marker=marker)


@dataclass(frozen=True)
class Case:
    name: str
    steps: tuple[tuple[Req, Expect], ...]


def case(name: str, req: Req, expect: Expect) -> Case:
    return Case(name, ((req, expect),))


# ---------------------------------------------------------------------------------------------
# The hostile inputs

TINY = {"kind": "ufm", "K": 2, "d": 2, "n_per_class": 1, "max_iters": 5}
REGULARIZED = {**TINY, "normalization": "regularized"}
TRAIN = {"kind": "train", "dataset": "gaussian", "K": 2, "d": 2, "epochs": 1, "batch_size": 4, "mlp_depth": 1,
         "mlp_width": 2, "gaussian_dim": 2, "gaussian_train_per_class": 2, "gaussian_test_per_class": 2}
DROP = object()
BIG = {"2^31": 2**31, "2^63": 2**63, "2^64": 2**64, "-2^63-1": -2**63 - 1}
NAN, INF = float("nan"), float("inf")
NUL, SURROGATE = "a\x00b", "\ud800"
# Names and tag values a spreadsheet would run; the last has its formula after a CR, where a row could break.
FORMULAS = ['=HYPERLINK("http://x.example")', "+1+1", "-1+1", "@SUM(1)", "\t=1+1", "\r=1+1", "x\r=SUM(2+2)"]
CSV_WHERE = "tags.probe = 'csv'"


def with_(spec: dict, /, **changes) -> dict:
    merged = {**spec, **changes}
    return {key: value for key, value in merged.items() if value is not DROP}


def cursor(state) -> str:
    return base64.urlsafe_b64encode(json.dumps(state).encode()).decode().rstrip("=")


def raw_request(method: str, path: str, *header_lines: str, body: bytes = b"") -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: probe", "Connection: close", *header_lines]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def parens(depth: int) -> str:
    return "(" * depth + "name = 'x'" + ")" * depth


def chain(word: str, terms: int) -> str:
    return f" {word} ".join(["id='x'"] * terms)


# A filter may be 20,000 characters long: these all fit but the 3000-term chain, which must be refused as too long.
DEEP_FILTERS = {
    "100 nested parentheses": parens(100),
    "400 nested parentheses": parens(400),
    "5000 nested parentheses": parens(5000),
    "3000 chained not": "not " * 3000 + "name = 'x'",
    "1900-term or-chain": chain("or", 1900),
}
WHERE_ROUTES = {
    "GET /experiments": (lambda w: Req("GET", "/experiments", params={"where": w}), either("where")),
    "POST /experiments/search": (lambda w: Req("POST", "/experiments/search", body={"where": w}), either("where")),
    "GET /experiments/aggregate": (lambda w: Req("GET", "/experiments/aggregate",
                                                 params={"where": w, "group_by": "kind", "metrics": "nc1"}),
                                   either("where")),
    "GET /experiments/curves": (lambda w: Req("GET", "/experiments/curves", params={"where": w, "metric": "nc1"}),
                                either("where")),
    "GET /experiments/curves.png": (lambda w: Req("GET", "/experiments/curves.png",
                                                  params={"where": w, "metric": "nc1"}), either("where")),
    "GET /ui": (lambda w: Req("GET", "/ui", params={"where": w}, cookie=True), handled()),
    "GET /ui/compare": (lambda w: Req("GET", "/ui/compare", params={"where": w}, cookie=True), handled()),
}


def spec_cases() -> list[Case]:
    """Every spec field with wrong types, out-of-range and huge values, non-finite numbers; POST /experiments."""
    ufm = [
        ("kind missing", with_(TINY, kind=DROP), refuse("kind")),
        ("K 1e308", with_(TINY, K=1e308), refuse()),
        ("K 2^63", with_(TINY, K=2**63), refuse()),
        ("K -2^63-1", with_(TINY, K=-2**63 - 1), refuse("K")),
        ("d 2^64", with_(TINY, d=2**64), refuse()),
        ("n_per_class [2^63, 1]", with_(TINY, n_per_class=[2**63, 1]), refuse("n_per_class")),
        ("n_per_class 100,000 counts", with_(TINY, n_per_class=[1] * 100_000), refuse("n_per_class")),
        ("logit_scale NaN", with_(TINY, logit_scale=NAN), refuse("logit_scale")),
        ("logit_scale 1e308", with_(TINY, logit_scale=1e308), refuse("logit_scale")),
        ("tol -Infinity", with_(TINY, tol=-INF), refuse("tol")),
        ("tol 1e308", with_(TINY, tol=1e308), either("tol")),
        ("max_iters 2^63", with_(TINY, max_iters=2**63), refuse("max_iters")),
        ("checkpoint_every 2^64", with_(TINY, checkpoint_every=2**64), either("checkpoint_every")),
        ("checkpoint_every 1e308", with_(TINY, checkpoint_every=1e308), either("checkpoint_every")),
        ("seed 2^31-1", with_(TINY, seed=2**31 - 1), ok()),
        ("seed 2^63-1", with_(TINY, seed=2**63 - 1), either("seed")),
        *((f"seed {label}", with_(TINY, seed=value), either("seed") if value > 0 else refuse("seed"))
          for label, value in BIG.items()),
        ("seed 1e308", with_(TINY, seed=1e308), either("seed")),
        ("bias 'maybe'", with_(TINY, bias="maybe"), refuse("bias")),
        ("regularized lambda_w 1e-300", with_(REGULARIZED, lambda_w=1e-300), refuse("lambda_w")),
        ("regularized lambda_w 1e308", with_(REGULARIZED, lambda_w=1e308), either("lambda_w")),
        ("unknown field", with_(TINY, foo=1), refuse("foo")),
        ("field name with NUL", with_(TINY, **{"K\x00": 2}), refuse()),
        ("field name a lone surrogate", with_(TINY, **{SURROGATE: 2}), refuse()),
    ]
    train = [
        ("dataset 'mnist' without its files", with_(TRAIN, dataset="mnist", K=DROP), refuse("dataset")),
        ("dataset path traversal", with_(TRAIN, dataset="../../etc/passwd"), refuse("dataset")),
        ("dataset with NUL", with_(TRAIN, dataset=NUL), refuse("dataset")),
        ("K 2^63", with_(TRAIN, K=2**63), refuse("K")),
        ("lr NaN", with_(TRAIN, lr=NAN), refuse("lr")),
        ("gaussian_dim 2^63", with_(TRAIN, gaussian_dim=2**63), refuse("gaussian_dim")),
        ("gaussian_train_per_class 2^63", with_(TRAIN, gaussian_train_per_class=2**63), refuse()),
        ("gaussian_noise Infinity", with_(TRAIN, gaussian_noise=INF), refuse("gaussian_noise")),
        ("memory estimate over NCLAB_MAX_JOB_BYTES",
         with_(TRAIN, K=1000, d=16384, mlp_width=16384, mlp_depth=32, gaussian_train_per_class=1000), refuse()),
        ("seed 2^64", with_(TRAIN, seed=2**64), either("seed")),
    ]
    cases = [case(f"spec ufm: {label}", Req("POST", "/experiments", body=spec), expect) for label, spec, expect in ufm]
    cases += [case(f"spec train: {label}", Req("POST", "/experiments", body=spec), expect)
              for label, spec, expect in train]
    tiny = json.dumps(TINY)
    texts = [  # numbers json.dumps cannot write
        ("tol 1e-400 (underflows to 0)", tiny.replace("}", ', "tol": 1e-400}'), refuse("tol")),
        ("tol 1e400 (overflows to inf)", tiny.replace("}", ', "tol": 1e400}'), refuse("tol")),
        ("seed with 5000 digits", tiny.replace("}", ', "seed": 1' + "0" * 5000 + "}"), refuse(None, 400, 422)),
    ]
    cases += [case(f"spec ufm: {label}", Req("POST", "/experiments", content=text,
                                              headers={"Content-Type": "application/json"}), expect)
              for label, text, expect in texts]
    return cases


def body_cases() -> list[Case]:
    """Bodies that are not a spec: broken JSON, other content types, huge and deep bodies; POST /experiments."""
    json_type = {"Content-Type": "application/json"}
    tiny = json.dumps(TINY)
    broken = refuse(None, 400, 415, 422)
    bodies = [
        ("malformed JSON", '{"kind": "ufm",', json_type, broken),
        ("empty body", "", json_type, broken),
        ("an array", "[]", json_type, broken),
        ("invalid UTF-8", b'{"kind": "\xff\xfe"}', json_type, broken),
        ("text/plain", tiny, {"Content-Type": "text/plain"}, broken),
        ("form-urlencoded", "kind=ufm&K=2&d=2&n_per_class=1", {"Content-Type": "application/x-www-form-urlencoded"},
         broken),
        ("multipart", "--b\r\nContent-Disposition: form-data; name=\"kind\"\r\n\r\nufm\r\n--b--\r\n",
         {"Content-Type": "multipart/form-data; boundary=b"}, broken),
        ("no content type", tiny, {}, handled()),
        ("100,000 nested arrays", tiny[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", json_type, broken),
        ("body over 1 MiB", tiny[:-1] + ', "pad": "' + "x" * (1 << 20) + '"}', json_type, refuse(None, 413)),
        ("900 KB name", json.dumps({"spec": TINY, "name": "x" * 900_000}), json_type, refuse("name")),
    ]
    cases = [case(f"body: {label}", Req("POST", "/experiments", content=content, headers=headers), expect)
             for label, content, headers, expect in bodies]
    chunked = [(tiny[:-1] + ', "pad": "' + "x" * (2 << 20) + '"}').encode()]  # an iterable: sent chunked
    cases.append(case("body: chunked, over 1 MiB", Req("POST", "/experiments", content=chunked, headers=json_type),
                      refuse(None, 413)))
    return cases


def label_cases() -> list[Case]:
    """Names and tags: NUL, lone surrogates, limits; on POST /experiments (labelled) and PATCH."""
    submit = [
        ("name ''", {"name": ""}, refuse("name")),
        ("name of 201 characters", {"name": "x" * 201}, refuse("name")),
        ("name with NUL", {"name": NUL}, refuse("name")),
        ("name a lone surrogate", {"name": SURROGATE}, either("name")),
        ("name with RTL override, emoji, ESC", {"name": "\U0001f9ea\u202eevil\x1b[31m"}, ok()),
        ("tag key with NUL", {"tags": {"a\x00": "x"}}, refuse("tags")),
        ("tag key a lone surrogate", {"tags": {SURROGATE: "x"}}, refuse("tags")),
        ("tag key of 65 characters", {"tags": {"a" * 65: "x"}}, refuse("tags")),
        ("tag value with NUL", {"tags": {"t": NUL}}, refuse("tags")),
        ("tag value a lone surrogate", {"tags": {"t": SURROGATE}}, either("tags")),
        ("tag value null", {"tags": {"t": None}}, refuse("tags")),
        ("33 tags", {"tags": {f"t{i}": "x" for i in range(33)}}, refuse("tags")),
    ]
    cases = [case(f"label: {label}", Req("POST", "/experiments", body={"spec": TINY, **extra}), expect)
             for label, extra, expect in submit]
    patch = [
        ("name with NUL", {"name": NUL}, refuse("name")),
        ("name a lone surrogate", {"name": SURROGATE}, either("name")),
        ("tag value with NUL", {"tags": {"t": NUL}}, refuse("tags")),
        ("tag value a lone surrogate", {"tags": {"t": SURROGATE}}, either("tags")),
        ("tag key a lone surrogate", {"tags": {SURROGATE: "x"}}, refuse("tags")),
        ("33 tags merged in", {"tags": {f"t{i}": "x" for i in range(33)}}, refuse("tags")),
        ("an array", [], refuse()),
        ("name null", {"name": None}, ok()),
    ]
    cases += [case(f"PATCH: {label}", Req("PATCH", "/experiments/{exp}", body=body), expect)
              for label, body, expect in patch]
    cases += [
        case("PATCH: malformed JSON", Req("PATCH", "/experiments/{exp}", content="{",
                                          headers={"Content-Type": "application/json"}), refuse(None, 400, 422)),
        case("PATCH: 100,000 nested arrays", Req("PATCH", "/experiments/{exp}", content="[" * 100_000 + "]" * 100_000,
                                                 headers={"Content-Type": "application/json"}),
             refuse(None, 400, 422)),
        case("PATCH: unknown id", Req("PATCH", "/experiments/nope", body={"name": "x"}), refuse(None, 404)),
        case("PATCH: renames to a formula (for the CSV kinds)",
             Req("PATCH", "/experiments/{exp}", body={"name": "=1+1", "tags": {"probe": "csv", "x": "=1+1"}}), ok()),
    ]
    return cases


def sweep_cases() -> list[Case]:
    sweep = {"name": "probe", "base": TINY, "grid": {"seed": [0, 1]}}
    bodies = [
        ("empty grid list", with_(sweep, grid={"seed": []}), refuse("grid")),
        ("one of two grid lists empty", with_(sweep, grid={"seed": [0], "max_iters": []}), refuse("grid")),
        ("empty variants", with_(sweep, variants=[]), refuse("variants")),
        ("grid of 1001 seeds", with_(sweep, grid={"seed": list(range(1001))}), refuse("grid")),
        ("grid of 2^1000 members", with_(sweep, grid={f"k{i}": [0, 1] for i in range(1000)}), refuse("grid")),
        ("grid value with NUL", with_(sweep, grid={"normalization": [NUL]}), refuse("normalization")),
        ("grid key a lone surrogate", with_(sweep, grid={SURROGATE: [1]}), refuse()),
        ("grid seeds [2^31]", with_(sweep, grid={"seed": [2**31]}), either("seed")),
        ("grid seeds [2^64]", with_(sweep, grid={"seed": [2**64]}), either("seed")),
        ("base seed 2^63", with_(sweep, base=with_(TINY, seed=2**63), grid={}), either("seed")),
        ("member 1 invalid", with_(sweep, grid={}, variants=[{}, {"d": 0}]), refuse("members[1]")),
        ("name with NUL", with_(sweep, name=NUL), refuse("name")),
        ("name a lone surrogate", with_(sweep, name=SURROGATE), either("name")),
        ("tag value with NUL", with_(sweep, tags={"t": NUL}), refuse("tags")),
    ]
    cases = [case("sweep: valid, 2 members",
                  Req("POST", "/sweeps", body=sweep, capture=("sweep", r'"id":\s*"([0-9a-f-]{36})"')), ok())]
    cases += [case(f"sweep: {label}", Req("POST", "/sweeps", body=body), expect) for label, body, expect in bodies]
    cases += [
        case("sweep: 100,000 nested arrays", Req("POST", "/sweeps", content="[" * 100_000 + "]" * 100_000,
                                                 headers={"Content-Type": "application/json"}),
             refuse(None, 400, 422)),
        case("sweep: GET a 10,000-character id", Req("GET", "/sweeps/" + "a" * 10_000), refuse(None, 404, 414, 422)),
        case("sweep: list, cursor garbage", Req("GET", "/sweeps", params={"cursor": "nope"}), refuse("cursor")),
    ]
    return cases


def filter_cases() -> list[Case]:
    """Deep filters on every where route, then literals, orders, groups, metrics, limits and cursors."""
    cases = [case(f"deep filter: {label} on {route}", make(where), expect)
             for label, where in DEEP_FILTERS.items() for route, (make, expect) in WHERE_ROUTES.items()]
    cases += [
        case("deep filter: 1700-term and-chain on GET /experiments",
             Req("GET", "/experiments", params={"where": chain("and", 1700)}), either("where")),
        case("deep filter: 3000-term or-chain (over 20,000 characters) on GET /experiments",
             Req("GET", "/experiments", params={"where": chain("or", 3000)}), refuse("where")),
        case("deep filter: 3000-term or-chain (over 20,000 characters) on POST /experiments/search",
             Req("POST", "/experiments/search", body={"where": chain("or", 3000)}), refuse("where")),
    ]
    wheres = [
        ("syntax error", "((", refuse("where")),
        ("SQL after a literal", "name = 'x'; drop table experiments", refuse("where")),
        ("quote doubling", "name = 'x'' or ''1''=''1'", ok()),
        ("NUL in a literal", "name = '\x00'", refuse("where")),
        ("integer 2^63", "spec.seed = 9223372036854775808", either("where")),
        ("integer of 5000 digits", "spec.seed = 1" + "0" * 5000, either("where")),
        ("float 1e400", "progress < 1e400", either("where")),
        ("in-list of 5000 values", "spec.K in (" + ",".join(["1"] * 5000) + ")", either("where")),
        ("in-list of 1000 values over 2^63", "spec.seed in (" + ",".join(["9223372036854775808"] * 1000) + ")",
         either("where")),
        ("datetime year 1 at +23:59", "created_at > '0001-01-01T00:00:00+23:59'", either("where")),
        ("datetime year 9999 at -23:59", "created_at < '9999-12-31T23:59:59-23:59'", either("where")),
        ("over 20,000 characters", "name = '" + "x" * 20_000 + "'", refuse("where")),
    ]
    cases += [case(f"filter: {label}", Req("GET", "/experiments", params={"where": where}), expect)
              for label, where, expect in wheres]
    search = [
        ("where NUL in a literal", {"where": "name = '\x00'"}, refuse("where")),
        ("where a lone surrogate in a literal", {"where": f"name = '{SURROGATE}'"}, either("where")),
        ("where a lone surrogate outside a literal", {"where": SURROGATE}, refuse("where")),
        ("order_by [1]", {"order_by": [1]}, refuse("order_by")),
        ("order_by NUL", {"order_by": "name\x00"}, refuse("order_by")),
        ("order_by a lone surrogate", {"order_by": SURROGATE}, refuse("order_by")),
        ("limit 2^63", {"limit": 2**63}, refuse("limit")),
        ("limit 1e308", {"limit": 1e308}, refuse("limit")),
    ]
    cases += [case(f"search body: {label}", Req("POST", "/experiments/search", body=body), expect)
              for label, body, expect in search]
    params = [
        ("order_by unknown field", {"order_by": "nope"}, refuse()),
        ("order_by 250 keys", {"order_by": ",".join(["spec.K"] * 250)}, either("order_by")),
        ("order_by NUL", {"order_by": "\x00"}, refuse("order_by")),
        ("limit 'x'", {"limit": "x"}, refuse("limit")),
        ("limit 2^63", {"limit": 2**63}, refuse("limit")),
        ("K 2^31", {"K": 2**31}, refuse("K")),
        ("where given twice", [("where", "kind = 'ufm'"), ("where", "kind = 'train'")], refuse("where")),
        ("unknown parameter", {"foo": "1"}, refuse("foo")),
        ("cursor garbage", {"cursor": "!!!"}, refuse("cursor")),
        ("cursor of 10,000 characters", {"cursor": "A" * 10_000}, refuse("cursor")),
        ("cursor at year 1, +23:59",
         {"cursor": cursor({"order": "-created_at", "after": ["0001-01-01T00:00:00+23:59"], "id": "x"})},
         either("cursor")),
        ("cursor with text for a number", {"order_by": "result.nc1",
                                           "cursor": cursor({"order": "result.nc1", "after": ["abc"], "id": "x"})},
         either("cursor")),
        ("cursor with 2^70 for a number", {"order_by": "result.nc1",
                                           "cursor": cursor({"order": "result.nc1", "after": [2**70], "id": "x"})},
         either("cursor")),
        ("cursor with an object for a number", {"order_by": "result.nc1", "cursor": cursor(
            {"order": "result.nc1", "after": [{"a": 1}], "id": "x"})}, either("cursor")),
        ("cursor with a naive datetime", {"cursor": cursor(
            {"order": "-created_at", "after": ["2020-01-01T00:00:00"], "id": "x"})}, either("cursor")),
        ("cursor with an object for the id", {"cursor": cursor(
            {"order": "-created_at", "after": ["2020-01-01T00:00:00+00:00"], "id": {"a": 1}})}, either("cursor")),
    ]
    cases += [case(f"list: {label}", Req("GET", "/experiments", params=query), expect)
              for label, query, expect in params]
    aggregate = [
        ("group_by unknown", {"group_by": "nope"}, refuse()),
        ("group_by NUL", {"group_by": "kind\x00"}, refuse("group_by")),
        ("group_by 300 fields", {"group_by": ",".join(["kind"] * 300)}, either("group_by")),
        ("metrics unknown", {"metrics": "nope"}, refuse("metrics")),
        ("metrics 400 names", {"metrics": ",".join(["nc1"] * 400)}, either("metrics")),
    ]
    cases += [case(f"aggregate: {label}", Req("GET", "/experiments/aggregate", params=query), expect)
              for label, query, expect in aggregate]
    curves = [
        ("curves: metric ''", "/experiments/curves", {"metric": ""}, refuse("metric")),
        ("curves: two metrics", "/experiments/curves", {"metric": "nc1,loss"}, refuse("metric")),
        ("curves.png: two metrics", "/experiments/curves.png", {"metric": "nc1,loss"}, refuse("metric")),
        ("curves.png: width 0", "/experiments/curves.png", {"metric": "nc1", "width": 0}, refuse("width")),
        ("curves.png: height 2^63", "/experiments/curves.png", {"metric": "nc1", "height": 2**63}, refuse("height")),
    ]
    cases += [case(label, Req("GET", path, params=query), expect) for label, path, query, expect in curves]
    ui = [
        ("compare, two metrics", "/ui/compare", {"metric": "nc1,loss"}),
        ("compare, metric unknown", "/ui/compare", {"metric": "nope"}),
        ("compare, metric of 101 characters", "/ui/compare", {"metric": "x" * 101}),
        ("list, cursor garbage", "/ui", {"cursor": "!!!"}),
        ("list, order_by unknown", "/ui", {"order_by": "nope"}),
        ("list, cursor with a naive datetime", "/ui",
         {"cursor": cursor({"order": "-created_at", "after": ["2020-01-01T00:00:00"], "id": "x"})}),
    ]
    cases += [case(f"dashboard: {label}", Req("GET", path, params=query, cookie=True), handled())
              for label, path, query in ui]
    return cases


def path_cases() -> list[Case]:
    """Bad ids and paths, methods, history and plot parameters."""
    missing = refuse(None, 404, 422)
    paths = [
        ("GET an unknown id", "GET", "/experiments/nope", missing),
        ("GET a 10,000-character id", "GET", "/experiments/" + "a" * 10_000, refuse(None, 404, 414, 422)),
        ("GET path traversal", "GET", "/experiments/..%2F..%2Fetc%2Fpasswd", missing),
        ("GET an id with NUL", "GET", "/experiments/%00", missing),
        ("GET an id of invalid UTF-8", "GET", "/experiments/%ED%A0%80%FF", missing),
        ("metrics after 2^31", "GET", "/experiments/{exp}/metrics?after=2147483648", refuse("after")),
        ("metrics.png metric unknown", "GET", "/experiments/{exp}/metrics.png?metric=nope", refuse("metric")),
        ("a where of invalid UTF-8", "GET", "/experiments?where=name%20%3D%20%27%FF%FE%27", handled()),
        ("PUT /experiments", "PUT", "/experiments", refuse(None, 405)),
        ("DELETE an experiment", "DELETE", "/experiments/{exp}", refuse(None, 405)),
        ("an unknown route", "GET", "/nope", refuse(None, 404)),
    ]
    cases = [case(f"path: {label}", Req(method, path), expect) for label, method, path, expect in paths]
    cases += [
        case("path: If-None-Match of 8 KB", Req("GET", "/experiments/{exp}", headers={"If-None-Match": "x" * 8192}),
             ok()),
        case("dashboard: a 10,000-character experiment id", Req("GET", "/ui/experiments/" + "a" * 10_000, cookie=True),
             handled()),
        case("dashboard: an experiment id of invalid UTF-8", Req("GET", "/ui/experiments/%ED%A0%80", cookie=True),
             handled()),
        case("dashboard: cancel an unknown id", Req("POST", "/ui/experiments/nope/cancel", cookie=True), handled()),
    ]
    raw = [
        ("raw: a 100 KB query string (longer than httpx sends)",
         raw_request("GET", "/experiments?where=" + "x" * 100_000, "Authorization: Bearer key-a"), handled()),
        ("raw: Content-Length 'abc'", raw_request("POST", "/experiments", "Authorization: Bearer key-a",
                                                   "Content-Type: application/json", "Content-Length: abc"),
         refuse(None, 400)),
        ("raw: two different Content-Lengths",
         raw_request("POST", "/experiments", "Authorization: Bearer key-a", "Content-Type: application/json",
                     "Content-Length: 2", "Content-Length: 3", body=b"{}"), refuse(None, 400)),
        ("raw: a bad chunk size",
         raw_request("POST", "/experiments", "Authorization: Bearer key-a", "Content-Type: application/json",
                     "Transfer-Encoding: chunked", body=b"zz\r\n{}\r\n0\r\n\r\n"), refuse(None, 400)),
    ]
    cases += [case(label, Req("POST", "/experiments", raw=request, key=None), expect) for label, request, expect in raw]
    return cases


def auth_cases() -> list[Case]:
    denied = refuse(None, 401)
    headers = [
        ("no key", {}, denied),
        ("an unknown key", {"Authorization": "Bearer nope"}, denied),
        ("the key without a scheme", {"Authorization": KEY}, denied),
        ("Bearer and nothing", {"Authorization": "Bearer"}, denied),
        ("X-API-Key", {"X-API-Key": KEY}, ok()),
        ("an unknown X-API-Key beside a good Bearer", {"X-API-Key": "nope", "Authorization": f"Bearer {KEY}"},
         handled()),
    ]
    cases = [case(f"auth: {label}", Req("GET", "/experiments", headers=extra, key=None), expect)
             for label, extra, expect in headers]
    cases += [
        case("auth: the key in the query string", Req("GET", "/experiments", params={"api_key": KEY}, key=None),
             refuse(None, 401, 422)),
        case("auth: a key with NUL", Req("GET", "/experiments", key=None, raw=raw_request(
            "GET", "/experiments", f"Authorization: Bearer {KEY}\x00")), refuse(None, 400, 401)),
        *(case(f"auth: {path} without a key", Req("GET", path, key=None), denied)
          for path in ("/openapi.json", "/metrics")),
        case("auth: /healthz without a key", Req("GET", "/healthz", key=None), ok()),
        case("auth: sign in with a key with NUL", Req("POST", "/ui/login", key=None, content="key=key-a%00",
                                                      headers={"Content-Type": "application/x-www-form-urlencoded"}),
             handled()),
        case("auth: sign in with a 2000-character key",
             Req("POST", "/ui/login", key=None, content="key=" + "k" * 2000,
                 headers={"Content-Type": "application/x-www-form-urlencoded"}), handled()),
    ]
    return cases


def idempotency_cases() -> list[Case]:
    def keyed(key, body=TINY, path="/experiments", api_key=KEY):
        return Req("POST", path, body=body, headers={"Idempotency-Key": key}, key=api_key)

    other = with_(TINY, seed=1)
    header = "Idempotency-Key"
    return [
        case("idempotency: empty key", keyed(""), refuse(header)),
        case("idempotency: non-ASCII", Req("POST", "/experiments", body=TINY,
                                           headers={header: "k\xe9".encode("latin-1")}), refuse(header)),
        case("idempotency: a key with NUL", Req("POST", "/experiments", key=None, raw=raw_request(
            "POST", "/experiments", f"Authorization: Bearer {KEY}", "Idempotency-Key: a\x00b",
            "Content-Type: application/json", f"Content-Length: {len(json.dumps(TINY))}",
            body=json.dumps(TINY).encode())), refuse(None, 400, 422)),
        Case("idempotency: replay", ((keyed("probe-replay"), ok()), (keyed("probe-replay"), ok()))),
        Case("idempotency: same key, another body",
             ((keyed("probe-other"), ok()), (keyed("probe-other", other), refuse(header)))),
        Case("idempotency: same key, another route",
             ((keyed("probe-route"), ok()),
              (keyed("probe-route", {"base": TINY, "grid": {"seed": [0]}}, "/sweeps"), refuse(header)))),
        Case("idempotency: same key, another owner",
             ((keyed("probe-owner"), ok()), (keyed("probe-owner", api_key=OTHER_KEY), ok()))),
        Case("idempotency: a refused body does not use up the key",
             ((keyed("probe-refused", with_(TINY, K=1)), refuse("K")), (keyed("probe-refused"), ok()))),
        Case("idempotency: a seed of 2^31 does not use up the key",
             ((keyed("probe-seed", with_(TINY, seed=2**31)), either("seed")),
              (keyed("probe-seed", with_(TINY, seed=2**31)), either("seed")))),
    ]


def planted_cases() -> list[Case]:
    """Experiments whose name and tag are spreadsheet formulas: the CSV kinds look for them."""
    return [case(f"plant: name and tag {formula!r}", Req("POST", "/experiments", body={
        "spec": TINY, "name": formula, "tags": {"probe": "csv", "x": formula}}), ok()) for formula in FORMULAS]


def csv_cases() -> list[Case]:
    where = {"where": CSV_WHERE}
    clean = csv_without_formulas("HYPERLINK")
    exports = [
        ("list ?format=csv", Req("GET", "/experiments", params={**where, "format": "csv"})),
        ("list, Accept: text/csv", Req("GET", "/experiments", params=where, headers={"Accept": "text/csv"})),
        ("search ?format=csv", Req("POST", "/experiments/search", params={"format": "csv"}, body=where)),
        ("aggregate group_by=name", Req("GET", "/experiments/aggregate",
                                        params={**where, "group_by": "name", "format": "csv"})),
        ("aggregate group_by=tags.x", Req("GET", "/experiments/aggregate",
                                          params={**where, "group_by": "tags.x", "format": "csv"})),
        ("curves group_by=name", Req("GET", "/experiments/curves",
                                     params={**where, "group_by": "name", "metric": "nc1", "format": "csv"})),
        ("every experiment", Req("GET", "/experiments", params={"format": "csv"})),
    ]
    cases = [case(f"csv: {label}", req, clean) for label, req in exports]
    cases.append(Case("csv: the dashboard's CSV link", (
        (Req("GET", "/ui", params=where, cookie=True, capture=("csv_link", r'id="csv" href="([^"]+)"')), handled()),
        (Req("GET", "{csv_link}", cookie=True), clean))))
    return cases


def read_back_cases() -> list[Case]:
    """Whatever hostile values were stored must not break a later read."""
    reads = [
        ("GET /experiments?limit=500", Req("GET", "/experiments", params={"limit": 500}), ok()),
        ("GET /experiments ordered by spec.seed", Req("GET", "/experiments", params={"order_by": "-spec.seed"}), ok()),
        ("GET /sweeps?limit=100", Req("GET", "/sweeps", params={"limit": 100}), ok()),
        ("aggregate group_by=spec.seed", Req("GET", "/experiments/aggregate",
                                             params={"group_by": "spec.seed,name", "metrics": "nc1"}), ok()),
        ("curves group_by=spec.seed", Req("GET", "/experiments/curves",
                                          params={"group_by": "spec.seed", "metric": "nc1"}), ok()),
        ("dashboard /ui?limit=500", Req("GET", "/ui", params={"limit": 500}, cookie=True), handled()),
        ("dashboard /ui/experiments/{exp}", Req("GET", "/ui/experiments/{exp}", cookie=True), handled()),
        ("dashboard /ui/sweeps/{sweep}", Req("GET", "/ui/sweeps/{sweep}", cookie=True), handled()),
        ("dashboard /ui/compare group_by=name", Req("GET", "/ui/compare", params={"group_by": "name,spec.seed"},
                                                    cookie=True), handled()),
    ]
    return [case(f"read back: {label}", req, expect) for label, req, expect in reads]


FIXTURE = case("fixture: a valid experiment",
               Req("POST", "/experiments", body={"spec": TINY, "name": "probe fixture"},
                   capture=("exp", r'"id":\s*"([0-9a-f-]{36})"')), ok())
CASES = [FIXTURE, *spec_cases(), *body_cases(), *label_cases(), *sweep_cases(), *filter_cases(), *path_cases(),
         *auth_cases(), *idempotency_cases(), *planted_cases()]
AFTER_SETTLE = [*csv_cases(), *read_back_cases()]
assert len({c.name for c in CASES + AFTER_SETTLE}) == len(CASES + AFTER_SETTLE), "kind names must be unique"

# ---------------------------------------------------------------------------------------------
# Sending and classifying


@dataclass
class Answer:
    status: int
    content_type: str
    text: str


@dataclass
class Result:
    status: str  # what came back, per step: "422" or "202,422"
    finding: str | None  # None: OK
    skipped: str | None = None  # a value it needed was never captured


def send(client: httpx.Client, req: Req, values: dict) -> Answer:
    if req.raw is not None:
        return send_raw(client.base_url, req.raw)
    headers = list(req.headers.items())
    if req.key is not None:
        headers.append(("Cookie", f"nclab_api_key={req.key}") if req.cookie else
                       ("Authorization", f"Bearer {req.key}"))
    content = req.content
    if req.body is not NO_BODY:
        content = json.dumps(req.body)
        headers.append(("Content-Type", "application/json"))
    client.cookies.clear()  # a sign-in's cookie must not authenticate the next kind
    response = client.request(req.method, req.path.format(**values), params=req.params, content=content,
                              headers=headers)
    return Answer(response.status_code, response.headers.get("content-type", ""), response.text)


def send_raw(base_url: httpx.URL, request: bytes) -> Answer:
    """A request httpx will not write (NUL in a header, framing errors), and its answer read until the server closes."""
    with socket.create_connection((base_url.host, base_url.port), timeout=TIMEOUT) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    if not head:
        raise ConnectionError("the server closed the connection without an answer")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return Answer(int(status_line.split()[1]), headers.get("content-type", ""), body.decode("utf-8", "replace"))


def problem_of(answer: Answer) -> dict | None:
    if not answer.content_type.startswith(PROBLEM_JSON):
        return None
    try:
        body = json.loads(answer.text)
    except ValueError:
        return None
    return body if isinstance(body, dict) and "status" in body and "detail" in body else None


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def formula_cells(text: str) -> list[str]:
    return [value for row in csv.reader(io.StringIO(text, newline="")) for value in row
            if value.startswith(FORMULA_TRIGGERS) and not _number(value)]


def classify(expect: Expect, answer: Answer) -> str | None:
    """None when the answer is the expected kind of answer, else the finding."""
    problem = problem_of(answer)
    detail = f": {problem['detail'][:150]!r}" if problem else f" ({answer.content_type or 'no content type'})"
    if answer.status >= 500:
        return f"{answer.status}{'' if problem else ' with a non-problem body'}{detail}"
    if answer.status < 400:
        if not expect.success:
            return "accepted; should be refused"
        if expect.csv_marker is not None:
            if "text/csv" not in answer.content_type or expect.csv_marker not in answer.text:
                return f"not CSV holding the planted rows ({answer.content_type})"
            formulas = formula_cells(answer.text)
            if formulas:
                return f"{len(formulas)} unneutralised formula cells, e.g. {formulas[:3]!r}"
        return None
    if not expect.refusal:
        return f"refused; should be accepted{detail}"
    if problem is None:
        return None if expect.statuses == ANY_4XX and "text/html" in answer.content_type else (
            f"{answer.status} with a non-problem body{detail}: {answer.text[:80]!r}")
    if answer.status not in expect.statuses:
        return f"{answer.status}, expected {'/'.join(map(str, expect.statuses))}{detail}"
    if answer.status == 422:
        named = [str(error.get("field")) for error in problem.get("errors") or [] if error.get("field")]
        if not named:
            return f"422 names no field{detail}"
        if expect.field_name and not any(expect.field_name.lower() in name.lower() for name in named):
            return f"422 names {named}, not {expect.field_name}{detail}"
    return None


def run_case(client: httpx.Client, kind: Case, values: dict, created: dict) -> Result:
    statuses = []
    for req, expect in kind.steps:
        try:
            answer = send(client, req, values)
        except KeyError as missing:
            return Result(",".join(statuses) or "-", None, skipped=f"needs {missing}, never captured")
        except (httpx.HTTPError, OSError) as exc:
            statuses.append("ERR")
            return Result(",".join(statuses), f"dropped: {type(exc).__name__}: {str(exc)[:80]}")
        statuses.append(str(answer.status))
        if req.capture and answer.status < 400 and (match := re.search(req.capture[1], answer.text)):
            values[req.capture[0]] = html.unescape(match[1])
        if req.method == "POST" and req.path in ("/experiments", "/sweeps") and answer.status < 300:
            body = json.loads(answer.text)
            created.setdefault(kind.name, []).extend(body["members"] if "members" in body else [body["id"]])
        finding = classify(expect, answer)
        if finding:
            return Result(",".join(statuses), finding)
    return Result(",".join(statuses), None)


def settle(client: httpx.Client, created: dict, results: dict, seconds: float) -> None:
    """Wait for the experiments the kinds got accepted; one that failed makes its kind a finding."""
    owner = {experiment: name for name, ids in created.items() for experiment in ids}
    ids = list(owner)
    deadline = time.monotonic() + seconds
    while True:
        items = []
        for start in range(0, len(ids), 200):
            quoted = ",".join(f"'{experiment}'" for experiment in ids[start:start + 200])
            response = client.post("/experiments/search", json={"where": f"id in ({quoted})", "limit": 500},
                                   headers={"Authorization": f"Bearer {KEY}"})
            response.raise_for_status()
            items += response.json()["items"]
        unfinished = [item for item in items if item["status"] in ("queued", "running")]
        if not unfinished or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(f"settled: {len(items) - len(unfinished)} of {len(ids)} accepted experiments finished", flush=True)
    for item in items:
        if item["status"] == "failed":
            result = results[owner[item["id"]]]
            error = " ".join(line.strip() for line in (item["error"] or "").split("Traceback")[0].splitlines())
            failed = f"accepted, then failed in the worker: {error[:300]}"
            result.finding = f"{result.finding}; {failed}" if result.finding else failed


# ---------------------------------------------------------------------------------------------
# Starting the service


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...), or None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def family(pid: int) -> dict[int, str]:
    """A process and its descendants, each with its start time (so that a reused pid is never taken for it)."""
    stats = {int(path.name): _stat(int(path.name)) for path in Path("/proc").glob("[0-9]*")}
    if not stats.get(pid):
        return {}
    found, frontier = {pid: stats[pid][19]}, [pid]
    while frontier:
        frontier = [child for child, stat in stats.items() if stat and int(stat[1]) in frontier]
        found.update((child, stats[child][19]) for child in frontier)
    return found


class Processes:
    """The processes this probe starts, each in a session of its own, with its output in the logs folder."""

    def __init__(self, base_dir: Path, logs: Path, env: dict):
        self.base_dir, self.logs, self.env, self.started = base_dir, logs, env, []

    def start(self, name: str, *argv: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(argv, cwd=self.base_dir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.started.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.started):
            members = family(process.pid) if process.poll() is None else {}
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=15)
            # The embedded worker has a session of its own: nothing this probe started may outlive it.
            for pid, started in members.items():
                if (_stat(pid) or [None] * 20)[19] == started:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            process.wait()


def service_env(base_dir: Path, data_dir: Path, **settings: str) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("NCLAB_")}
    env.update(PYTHONPATH=str(base_dir), NCLAB_DATA_DIR=str(data_dir), NCLAB_API_KEYS=API_KEYS, **settings)
    imported = subprocess.run([sys.executable, "-c", "import service; print(service.__file__)"], cwd=base_dir, env=env,
                              capture_output=True, text=True, check=True).stdout.strip()
    if not Path(imported).resolve().is_relative_to(base_dir.resolve()):
        raise SystemExit(f"the servers would import {imported}, not the code in {base_dir}")
    return env


def wait_ready(base_url: str, processes: list[subprocess.Popen], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in processes):
            raise SystemExit("a server process exited while starting: see its log")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"{base_url} was not ready within {seconds} s")


@contextlib.contextmanager
def embedded(base_dir: Path, logs: Path):
    with tempfile.TemporaryDirectory(prefix="probe-data-") as data_dir:
        processes = Processes(base_dir, logs, service_env(base_dir, Path(data_dir)))
        port = free_port()
        try:
            server = processes.start("embedded-serve", sys.executable, "-m", "service.cli", "serve", "--port",
                                     str(port))
            wait_ready(f"http://127.0.0.1:{port}", [server])
            yield f"http://127.0.0.1:{port}", [server]
        finally:
            processes.stop()


@contextlib.contextmanager
def production(base_dir: Path, logs: Path, postgres: str):
    import psycopg

    database = f"probe_{secrets.token_hex(4)}"
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    database_url = urlsplit(postgres)._replace(scheme="postgresql+psycopg", path=f"/{database}").geturl()
    try:
        with tempfile.TemporaryDirectory(prefix="probe-data-") as data_dir:
            redis_port, port = free_port(), free_port()
            env = service_env(base_dir, Path(data_dir), NCLAB_DATABASE_URL=database_url,
                              NCLAB_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0")
            processes = Processes(base_dir, logs, env)
            try:
                redis = processes.start("redis", "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                        "--save", "", "--appendonly", "no")
                api = processes.start("production-api", sys.executable, "-m", "service.cli", "api", "--port", str(port),
                                      "--workers", "2")
                # Both queues, training on the CPU: the accepted train jobs must run to show a worker failure.
                worker = processes.start("production-worker", sys.executable, "-m", "service.cli", "worker",
                                         "--queues", "cpu,gpu", "--allow-cpu")
                wait_ready(f"http://127.0.0.1:{port}", [redis, api, worker])
                yield f"http://127.0.0.1:{port}", [redis, api, worker]
            finally:
                processes.stop()
    finally:
        with psycopg.connect(postgres, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


# ---------------------------------------------------------------------------------------------
# One mode, the table, the command line


def run_all(client: httpx.Client, processes: list[subprocess.Popen], settle_seconds: float) -> dict[str, Result]:
    """Every kind in order, the accepted experiments settled before AFTER_SETTLE; stops if a server process exits."""
    results: dict[str, Result] = {}
    values: dict[str, str] = {}
    created: dict[str, list[str]] = {}
    for phase in (CASES, AFTER_SETTLE):
        if phase is AFTER_SETTLE:
            settle(client, created, results, settle_seconds)
        for kind in phase:
            results[kind.name] = run_case(client, kind, values, created)
            if any(process.poll() is not None for process in processes):
                results[kind.name].finding = (results[kind.name].finding or "") + "; then a server process exited"
                return results
    return results


def probe(mode: str, base_url: str, processes: list[subprocess.Popen], settle_seconds: float) -> int:
    # A connection per request: a server that closes one after an error must not fail the next kind.
    with httpx.Client(base_url=base_url, timeout=TIMEOUT, follow_redirects=False,
                      limits=httpx.Limits(max_keepalive_connections=0)) as client:
        results = run_all(client, processes, settle_seconds)
    width = max(len(name) for name in results)
    print(f"\n== {mode} ({base_url})")
    print(f"{'kind':<{width}}  {'status':<9}  verdict")
    for name, result in results.items():
        verdict = f"FINDING: {result.finding}" if result.finding else f"skipped: {result.skipped}" if result.skipped \
            else "OK"
        print(f"{name:<{width}}  {result.status:<9}  {verdict}")
    findings = sum(result.finding is not None for result in results.values())
    print(f"{mode}: {len(results)} kinds, {findings} findings", flush=True)
    return findings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="embedded,production", help="comma-separated: embedded, production")
    parser.add_argument("--base-dir", type=Path, default=REPO, help="the checkout whose service is probed")
    parser.add_argument("--logs", type=Path, help="keep the servers' logs here (default: a temporary folder)")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="PostgreSQL to create the scratch database on (production)")
    parser.add_argument("--settle", type=float, default=120, help="seconds to wait for accepted experiments")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not set(modes) <= {"embedded", "production"}:
        parser.error(f"--modes takes embedded and/or production, not {args.modes!r}")
    base_dir = args.base_dir.resolve()
    findings = 0
    with contextlib.ExitStack() as stack:
        logs = args.logs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="probe-logs-")))
        logs.mkdir(parents=True, exist_ok=True)
        for mode in modes:
            service = embedded(base_dir, logs) if mode == "embedded" else production(base_dir, logs, args.postgres)
            with service as (base_url, processes):
                findings += probe(mode, base_url, processes, args.settle)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
