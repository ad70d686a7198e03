"""POST /v1/endpoints/{name}/feedback through the in-process app (no Ray): roles, 404, limits,
per-row results, and a fuzz pass in which no body gets a 5xx."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from app.api import app as app_module
from app.api.app import create_app
from app.bootstrap import prepare
from app.predlog.feedback import FeedbackStore
from app.predlog.ids import new_request_id
from app.settings import load_settings
from app.store import MetadataStore
from tests.support import NoJobs, in_process_context
from tests.unit.test_feedback import log_rows, write_log

ROUTER = "app.api.feedback:router"
EP = "churn"
URL = f"/v1/endpoints/{EP}/feedback"


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home), predlog={"feedback_max_rows": 50})
    prepared = prepare(settings)
    store = MetadataStore(settings.database_url)
    store.create_endpoint(EP, "churn@champion", "onnx", {}, "admin")
    ctx = in_process_context(settings, prepared.admin_token, NoJobs())
    saved = list(app_module.ROUTERS)
    if ROUTER not in app_module.ROUTERS:  # until the Gateway's list names it
        app_module.ROUTERS.append(ROUTER)
    try:
        app = create_app(ctx)
    finally:
        app_module.ROUTERS[:] = saved
    client = TestClient(app)
    tokens = {}
    for role in ("viewer", "predictor"):
        _, tokens[role] = store.create_token(f"t-{role}", role, "admin")
    client.headers["Authorization"] = f"Bearer {tokens['predictor']}"
    yield settings, store, client, tokens
    store.dispose()


def test_feedback_route_accepts_rejects_and_marks_per_row(platform):
    settings, store, client, _ = platform
    logged = new_request_id(time.time() - 3600)
    write_log(settings.predlog.root, log_rows(logged, 2))
    recent = new_request_id()
    stale = new_request_id(time.time() - 3600)
    body = [
        {"request_id": logged, "instance": 1, "label": "yes", "timestamp": "2026-12-02T10:00:00Z"},
        {"request_id": recent, "reward": 1.0},
        {"request_id": stale, "label": "no"},
        {"request_id": logged, "value": "x"},
    ]
    r = client.post(URL, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["accepted"] == 2 and out["rejected"] == 2
    assert out["results"][0] == {"index": 0, "request_id": logged, "status": "accepted"}
    assert out["results"][1] == {"index": 1, "request_id": recent, "status": "accepted", "pending": True}
    assert out["results"][2]["status"] == "rejected" and "unknown request id" in out["results"][2]["error"]
    assert out["results"][3]["error"].startswith("value:")

    again = client.post(URL, json=[{"request_id": logged, "instance": 1, "label": "no"}]).json()
    assert again["results"][0]["superseded"] is True
    history = FeedbackStore(store).history(EP, logged)
    assert [h["label"] for h in history] == ["yes", "no"] and history[0]["actor"] == "t-predictor"
    audit = [a for a in store.list_audit(limit=1000)[0] if a["action"] == "feedback.record"]
    assert audit[0]["after"]["superseded"] == 1 and audit[0]["actor"] == "t-predictor"


def test_feedback_route_roles_404_and_limits(platform):
    settings, _, client, tokens = platform
    row = [{"request_id": new_request_id(), "label": 1}]
    viewer = client.post(URL, json=row, headers={"Authorization": f"Bearer {tokens['viewer']}"})
    assert viewer.status_code == 403
    assert client.post(URL, json=row, headers={"Authorization": "Bearer nope"}).status_code == 401
    missing = client.post("/v1/endpoints/ghost/feedback", json=row)
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    empty = client.post(URL, json=[])
    assert empty.status_code == 422 and "empty" in empty.json()["error"]
    over = client.post(URL, json=row * 51)
    assert over.status_code == 422 and "at most 50" in over.json()["error"] and "feedback_max_rows" in over.json()["error"]
    assert client.post(URL, json=row * 50).status_code == 200


def test_feedback_route_in_openapi(platform):
    _, _, client, _ = platform
    op = client.get("/openapi.json").json()["paths"]["/v1/endpoints/{name}/feedback"]["post"]
    assert op["summary"] and op["description"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["type"] == "array" and schema["maxItems"] == 50 and "request_id" in schema["items"]["properties"]


MALFORMED = [
    b"", b"not json", b"{", b"[1,", b"\xff\xfe", b"null", b"1", b'"a"', b"true", b"{}",
    b'{"feedback": []}', b"[]", json.dumps([{"request_id": "a"}] * 51).encode(), b"[[[[[[[[[[]]]]]]]]]]" * 3,
    b"[" * 5000 + b"]" * 5000,
]


@pytest.mark.parametrize("body", MALFORMED)
def test_malformed_bodies_are_4xx(platform, body):
    _, _, client, _ = platform
    r = client.post(URL, content=body, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (body[:40], r.status_code, r.text)
    assert r.json()["code"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
row_like = st.fixed_dictionaries(
    {},
    optional={
        "request_id": st.one_of(st.just(new_request_id()), st.text(max_size=70), json_values),
        "instance": st.one_of(st.integers(), json_values),
        "label": json_values,
        "value": st.one_of(st.floats(), json_values),
        "reward": st.one_of(st.floats(), json_values),
        "timestamp": st.one_of(st.floats(), st.integers(), st.text(max_size=30), st.datetimes().map(str), json_values),
    },
)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(json_values, st.lists(st.one_of(row_like, json_values), max_size=60)))
def test_fuzzed_bodies_never_5xx(platform, body):
    _, _, client, _ = platform
    r = client.post(URL, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (body, r.text)
    valid_shape = isinstance(body, list) and 1 <= len(body) <= 50
    assert (r.status_code == 200) == valid_shape, (body, r.status_code, r.text)
    if valid_shape:
        out = r.json()
        assert len(out["results"]) == len(body) and out["accepted"] + out["rejected"] == len(body)
