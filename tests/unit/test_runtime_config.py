"""Typed runtime configs: each runtime's ``Config`` checks an endpoint's config when the
endpoint is created or changed (a 422 naming ``config.<field>``), and only the runtime's own
options go into the multiplexed model id."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.support import in_process_context

from app.api.app import create_app
from app.bootstrap import prepare
from app.errors import InvalidInput
from app.registry.mlflow_registry import ResolvedModel
from app.runtimes.base import RUNTIMES, RuntimeConfig, get_runtime_class
from app.serving.endpoint_config import ENDPOINT_KEYS, parse_endpoint_config
from app.serving.loader import model_id_for
from app.settings import load_settings

IRIS = ResolvedModel("iris", "3")


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_every_runtime_declares_a_documented_config_that_refuses_unknown_keys(name):
    cls = get_runtime_class(name)
    assert issubclass(cls.Config, RuntimeConfig) and cls.Config.model_config["extra"] == "forbid"
    assert all(f.description for f in cls.Config.model_fields.values()), "every option says what it does"
    assert not ENDPOINT_KEYS & set(cls.Config.model_fields), "device and max_rows belong to the endpoint"
    with pytest.raises(InvalidInput) as err:
        required = {"url": "triton:8000"} if "url" in cls.Config.model_fields else {}
        parse_endpoint_config(name, {**required, "no_such_option": 1})
    assert err.value.details["field"] == "config.no_such_option"
    assert f"not an option of the {name} runtime" in err.value.message and "max_rows" in err.value.message


@pytest.mark.parametrize(
    "runtime,config,field,fragment",
    [
        ("onnx", {"intra_op_threads": -1}, "config.intra_op_threads", "greater than or equal to 0"),
        ("onnx", {"inter_op_threads": "many"}, "config.inter_op_threads", "valid integer"),
        ("onnx", {"max_rows": 0}, "config.max_rows", "greater than 0"),
        ("onnx", {"device": "tpu"}, "config.device", "'cpu' or 'gpu'"),
        ("native", {"intra_op_threads": 1.5}, "config.intra_op_threads", "valid integer"),
        ("triton", {}, "config.url", "required by the triton runtime"),
        ("triton", {"model_name": "iris"}, "config.url", "host:port"),
        ("triton", {"url": " "}, "config.url", "host:port"),
        ("triton", {"url": "file:///etc/passwd"}, "config.url", "http:// or https://"),
        ("triton", {"url": "t:8000", "timeout_s": 0}, "config.timeout_s", "greater than 0"),
        ("triton", {"url": "t:8000", "headers": {"Authorization": 7}}, "config.headers.Authorization", "valid string"),
        ("triton", {"url": "t:8000", "headers": "Bearer x"}, "config.headers", "valid dictionary"),
    ],
)
def test_bad_options_name_the_field(runtime, config, field, fragment):
    with pytest.raises(InvalidInput) as err:
        parse_endpoint_config(runtime, config)
    assert err.value.details["field"] == field and fragment in err.value.message


def test_credentials_never_appear_in_a_config_error_or_repr():
    secret = {"Authorization": "Bearer s3cr3t"}
    with pytest.raises(InvalidInput) as err:
        parse_endpoint_config("triton", {"url": "t:8000", "headers": {**secret, "X-Other": ["s3cr3t"]}})
    assert "s3cr3t" not in err.value.message and "s3cr3t" not in repr(err.value.details)
    parsed = parse_endpoint_config("triton", {"url": "t:8000", "headers": secret})
    assert parsed.runtime.headers == secret and "s3cr3t" not in repr(parsed)


def test_only_the_runtime_config_is_part_of_the_model_id():
    assert model_id_for(IRIS) == "iris/3"
    # endpoint options and default values open no separate runtime
    assert model_id_for(IRIS, "onnx", {"device": "gpu", "max_rows": 10}) == "iris/3"
    assert model_id_for(IRIS, "onnx", {"intra_op_threads": None}) == "iris/3"
    threads = model_id_for(IRIS, "onnx", {"intra_op_threads": 2})
    assert threads.startswith("iris/3#") and threads == model_id_for(IRIS, "onnx", {"intra_op_threads": 2, "max_rows": 5})
    assert threads != model_id_for(IRIS, "onnx", {"intra_op_threads": 3})
    assert model_id_for(IRIS, "native") == "native:iris/3"
    remote = {"url": "t:8000", "model_name": "iris"}
    a = model_id_for(IRIS, "triton", remote)
    assert a.startswith("triton:iris/3#")
    assert a == model_id_for(IRIS, "triton", {**remote, "timeout_s": 30.0, "device": "cpu"})
    assert a != model_id_for(IRIS, "triton", {**remote, "headers": {"Authorization": "Bearer other"}})
    with pytest.raises(InvalidInput, match="config.intra_op_threads"):  # a stored bad config fails as a 422
        model_id_for(IRIS, "triton", {**remote, "intra_op_threads": 1})


def test_a_runtime_takes_its_defaults_from_settings_unless_the_config_sets_them(tmp_path):
    from app.runtimes.onnx import OnnxModelRuntime

    settings = load_settings("local", matih_home=str(tmp_path), serving={"onnx_intra_op_threads": 3})
    assert OnnxModelRuntime({}, settings).serving_default(None, "onnx_intra_op_threads") == 3
    rt = OnnxModelRuntime({"intra_op_threads": 2}, settings)
    assert rt.serving_default(rt.config.intra_op_threads, "onnx_intra_op_threads") == 2
    with pytest.raises(InvalidInput, match="config.intra_op_threads"):
        OnnxModelRuntime({"intra_op_threads": -1})


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home))
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, jobs=None)
    client = TestClient(create_app(ctx))
    client.headers["Authorization"] = f"Bearer {prepared.admin_token}"
    yield client, ctx
    ctx.store.dispose()


def test_endpoint_create_and_update_check_the_config_at_once(api):
    client, ctx = api
    r = client.post("/v1/endpoints", json={"name": "bad", "target": "iris@champion", "config": {"intra_op_thread": 2}})
    assert r.status_code == 422 and r.json()["details"]["field"] == "config.intra_op_thread"
    r = client.post("/v1/endpoints", json={"name": "bad", "target": "iris@champion", "runtime": "triton"})
    assert r.status_code == 422 and r.json()["details"]["field"] == "config.url"
    assert client.get("/v1/endpoints/bad").status_code == 404  # nothing stored

    ctx.store.create_endpoint("ep", "iris@champion", "onnx", {"intra_op_threads": 1}, "admin")
    r = client.put("/v1/endpoints/ep", json={"config": {"max_rows": -5}})
    assert r.status_code == 422 and r.json()["details"]["field"] == "config.max_rows"
    # a new runtime is checked against the stored config, and a new config against the stored runtime
    r = client.put("/v1/endpoints/ep", json={"runtime": "triton"})
    assert r.status_code == 422 and r.json()["details"]["field"] in ("config.url", "config.intra_op_threads")
    r = client.put("/v1/endpoints/ep", json={"config": {"url": "t:8000"}})
    assert r.status_code == 422 and r.json()["details"]["field"] == "config.url"
    assert ctx.store.get_endpoint("ep")["config"] == {"intra_op_threads": 1}  # unchanged
    r = client.put("/v1/endpoints/ep", json={"config": {"intra_op_threads": 2, "max_rows": 100}})
    assert r.status_code == 200 and r.json()["config"] == {"intra_op_threads": 2, "max_rows": 100}
