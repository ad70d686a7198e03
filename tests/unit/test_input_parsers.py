"""The one version parser and the one page-token parser, and every route that uses them:
bad versions and page tokens are a 422 naming the field, never a 500 (found by fuzzing)."""

from __future__ import annotations

import base64
import json

import pytest
from fastapi.testclient import TestClient

from tests.support import NoJobs, in_process_context

from app.errors import InvalidInput
from app.names import parse_version
from app.pagination import (
    MAX_TOKEN_CHARS,
    decode_page_token,
    encode_page_token,
    int_field,
    mlflow_page_token,
    str_field,
    time_field,
)
from app.registry.targets import parse_target
from app.serving.loader import parse_model_id

# int() refuses "²" although str.isdigit() takes it; "١" (Arabic-Indic one) int() reads as 1.
BAD_VERSIONS = ["²", "١", "+1", " 1", "1 ", "1\n", "01", "0", "-1", "", "1.0", "1e3", "1234567890", "v1", "１"]


def _b64(value, altchars=None) -> str:
    return base64.b64encode(json.dumps(value).encode(), altchars=altchars).decode()


@pytest.mark.parametrize("good,canonical", [("1", "1"), ("42", "42"), (7, "7"), ("999999999", "999999999")])
def test_versions_in_their_one_spelling_pass(good, canonical):
    assert parse_version(good) == canonical


@pytest.mark.parametrize("bad", [*BAD_VERSIONS, True, None, 1.0, 0, -3])
def test_every_other_version_spelling_is_invalid_input_naming_the_field(bad):
    with pytest.raises(InvalidInput) as err:
        parse_version(bad)
    assert err.value.details["field"] == "version" and err.value.code == "invalid_input"


@pytest.mark.parametrize("bad", ["²", "01", "1\n"])
def test_targets_and_model_ids_use_the_same_version_rule(bad):
    with pytest.raises(InvalidInput):
        parse_target(f"iris/{bad}")
    with pytest.raises(InvalidInput):
        parse_model_id(f"iris/{bad}")
    with pytest.raises(InvalidInput):
        parse_target("iris@champion\n")
    assert parse_model_id("native:iris/3#abc") == ("native", "iris", "3")


def test_page_tokens_round_trip():
    token = encode_page_token("2026-01-02T03:04:05.123456", "job-1")
    at, job_id = decode_page_token(token, time_field, str_field)
    assert at.year == 2026 and job_id == "job-1"
    assert decode_page_token(encode_page_token(17), int_field) == (17,)
    assert decode_page_token(None, str_field) is None and decode_page_token("", str_field) is None


@pytest.mark.parametrize(
    "token,fields",
    [
        ("é", (str_field,)),  # non-ASCII: base64 raised a bare ValueError before
        ("ﾟ", (str_field,)),
        ("not-a-token", (str_field,)),
        ("%%%%", (str_field,)),
        ("A" * (MAX_TOKEN_CHARS + 4), (str_field,)),
        (base64.urlsafe_b64encode(b"\xff\xfe").decode(), (str_field,)),  # not UTF-8
        (_b64({"offset": 1}, b"-_"), (str_field,)),  # not a list
        (_b64([], b"-_"), (str_field,)),  # no key: key[0] was an IndexError
        (_b64(["a", "b"], b"-_"), (str_field,)),
        (_b64([1], b"-_"), (str_field,)),
        (_b64(["yesterday", "j"], b"-_"), (time_field, str_field)),  # fromisoformat raised ValueError
        (_b64(["2026-01-01", 5], b"-_"), (time_field, str_field)),
        (_b64(["x"], b"-_"), (int_field,)),  # int("x") raised ValueError
        (_b64([2**70], b"-_"), (int_field,)),  # past the database's integer range
        (_b64([-1], b"-_"), (int_field,)),
        (_b64([True], b"-_"), (int_field,)),
        (_b64(["a" * 300], b"-_"), (str_field,)),
    ],
)
def test_malformed_page_tokens_are_invalid_page_token(token, fields):
    with pytest.raises(InvalidInput) as err:
        decode_page_token(token, *fields)
    assert err.value.code == "invalid_page_token" and err.value.details == {"field": "page_token"}
    assert len(err.value.message) < 400  # the token is not echoed at length


def test_mlflow_page_tokens_pass_unchanged_when_they_hold_an_offset():
    from mlflow.utils.search_utils import SearchUtils

    token = SearchUtils.create_page_token(50).decode()
    assert mlflow_page_token(token) == token
    assert mlflow_page_token(None) is None and mlflow_page_token("") is None


@pytest.mark.parametrize(
    "token",
    [
        "é",  # MLflow's parser let the ValueError of base64 escape
        _b64([]),  # MLflow called .get on a list
        _b64({"offset": [1]}),  # int([1]) raised TypeError
        _b64({"offset": "5"}),
        _b64({"offset": 10**30}),  # overflows SQLite's OFFSET
        _b64({"offset": -1}),  # PostgreSQL refuses a negative OFFSET
        _b64({"offset": 0}),
        _b64({"offset": True}),
        _b64({"offset": 1}, b"-_").replace("=", "") + "~",
    ],
)
def test_malformed_mlflow_page_tokens_are_invalid_page_token(token):
    with pytest.raises(InvalidInput) as err:
        mlflow_page_token(token)
    assert err.value.code == "invalid_page_token"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from app.api.app import create_app
    from app.bootstrap import prepare
    from app.settings import load_settings

    settings = load_settings("local", matih_home=str(tmp_path_factory.mktemp("home")))
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, NoJobs())
    c = TestClient(create_app(ctx))
    c.headers["Authorization"] = f"Bearer {prepared.admin_token}"
    assert c.post("/v1/models", json={"name": "m"}).status_code == 201
    yield c
    ctx.store.dispose()


LISTS = ["/v1/models", "/v1/models/m/versions", "/v1/experiments", "/v1/experiments/0/runs", "/v1/jobs",
         "/v1/endpoints", "/v1/audit", "/v1/training/jobs", "/v1/batch/jobs"]


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("token", ["é", _b64([]), _b64({"offset": 10**30}), _b64(["x", "y", "z"], b"-_")])
def test_every_list_route_answers_a_bad_page_token_with_422(client, path, token):
    r = client.get(path, params={"page_token": token})
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_page_token" and r.json()["details"]["field"] == "page_token"


@pytest.mark.parametrize("path", LISTS)
def test_every_list_route_takes_its_own_next_page_token(client, path):
    r = client.get(path, params={"limit": 1})
    assert r.status_code == 200, r.text
    token = r.json()["next_page_token"]
    if token:
        assert client.get(path, params={"limit": 1, "page_token": token}).status_code == 200


@pytest.mark.parametrize("bad", ["²", "١", "01", "+1"])
@pytest.mark.parametrize(
    "method,path,body",
    [
        ("GET", "/v1/models/m/versions/{v}", None),
        ("PATCH", "/v1/models/m/versions/{v}", {"description": "x"}),
        ("POST", "/v1/models/m/versions/{v}/stage", {"stage": "staging"}),
        ("POST", "/v1/models/m/versions/{v}/approve", {}),
        ("POST", "/v1/models/m/versions/{v}/trust", None),
        ("POST", "/v1/models/m/versions/{v}/convert", None),
        ("GET", "/v1/models/m/versions/{v}/card", None),
        ("PUT", "/v1/models/m/aliases/fav", {"version": "{v}"}),
        ("GET", "/v2/models/m/versions/{v}", None),
        ("GET", "/v2/models/m/versions/{v}/ready", None),
        ("POST", "/v2/models/m/versions/{v}/infer", {"inputs": []}),
    ],
)
def test_every_version_route_answers_a_bad_version_with_422(client, bad, method, path, body):
    if body is not None:
        body = json.loads(json.dumps(body).replace("{v}", bad.replace("\\", "\\\\")))
    r = client.request(method, path.replace("{v}", bad), json=body)
    assert r.status_code == 422, r.text
    assert r.json()["details"]["field"] == "version"


def test_compare_refuses_a_bad_version(client):
    r = client.get("/v1/models/m/compare", params={"versions": "1,²"})
    assert r.status_code == 422 and r.json()["details"]["field"] == "version"
