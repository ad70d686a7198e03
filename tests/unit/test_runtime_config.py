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


# -- the triton runtime's confinement -------------------------------------------------------------
def _triton_settings(tmp_path, **triton):
    return load_settings("local", matih_home=str(tmp_path), runtimes={"triton": triton})


@pytest.mark.parametrize(
    "url,allowed",
    [
        ("triton.ml:8000", True),
        ("http://TRITON.ML:8000/base/path", True),
        ("triton.ml:8001", False),  # the entry names a port
        ("triton.ml", False),  # port 80
        ("10.0.0.1:1234", True),  # host-only entry: any port
        ("https://10.0.0.1", True),
        ("[::1]:8000", True),
        ("[::1]:9000", False),
        ("user:pw@triton.ml:8000", True),
        ("triton.ml:8000@evil.example", False),  # the host is what follows the userinfo
        ("evil.example#@triton.ml:8000", False),  # the host is what precedes a fragment
        ("evil.example", False),
        ("169.254.169.254", False),
        ("10.0.0.10", False),
    ],
)
def test_triton_reaches_only_allowed_hosts(tmp_path, url, allowed):
    from app.runtimes.triton import TritonModelRuntime

    settings = _triton_settings(tmp_path, allowed_hosts=["Triton.ML:8000", "10.0.0.1", "[::1]:8000"])
    if allowed:
        assert TritonModelRuntime({"url": url}, settings).config.url == url
        return
    with pytest.raises(InvalidInput) as err:
        TritonModelRuntime({"url": url}, settings)
    assert err.value.code == "host_not_allowed" and err.value.details["field"] == "config.url"
    assert "runtimes.triton.allowed_hosts" in err.value.message


def test_triton_over_grpc_follows_the_same_host_rules(tmp_path):
    from app.runtimes.triton import TritonModelRuntime

    settings = _triton_settings(tmp_path, allowed_hosts=["triton.ml:8001", "tls.ml:443"])
    rt = TritonModelRuntime({"url": "triton.ml:8001", "protocol": "grpc", "headers": {"Authorization": "x"}}, settings)
    assert rt._headers == {"authorization": "x"}  # gRPC metadata keys are lower case
    assert TritonModelRuntime({"url": "tls.ml", "protocol": "grpc"}, settings)  # gRPC's default port: 443
    with pytest.raises(InvalidInput) as err:
        TritonModelRuntime({"url": "tls.ml", "protocol": "http"}, settings)  # port 80
    assert err.value.code == "host_not_allowed"
    with pytest.raises(InvalidInput, match="without a path"):
        TritonModelRuntime({"url": "triton.ml:8001/v2", "protocol": "grpc"}, settings)
    with pytest.raises(InvalidInput) as err:
        parse_endpoint_config("triton", {"url": "t:8001", "protocol": "websocket"})
    assert err.value.details["field"] == "config.protocol"


@pytest.mark.parametrize("url", ["localhost\\@evil", "a b:80", "host:99999", "x" * 2000 + "!", "[zz::1]:80"])
def test_triton_urls_that_are_not_plain_hosts_are_refused(tmp_path, url):
    from app.runtimes.triton import TritonModelRuntime

    with pytest.raises(InvalidInput) as err:
        TritonModelRuntime({"url": url}, _triton_settings(tmp_path, allowed_hosts=["localhost", "host"]))
    assert err.value.details["field"] == "config.url" and err.value.code == "invalid_input"


def test_by_default_every_remote_url_is_refused_and_timeouts_are_bounded(tmp_path):
    from app.runtimes.triton import TritonModelRuntime

    for settings in (None, load_settings("local", matih_home=str(tmp_path))):
        with pytest.raises(InvalidInput, match="it is empty, so every remote URL is refused"):
            TritonModelRuntime({"url": "127.0.0.1:8000"}, settings)
    settings = _triton_settings(tmp_path, allowed_hosts=["127.0.0.1"], max_timeout_s=20)
    assert TritonModelRuntime({"url": "127.0.0.1:8000", "timeout_s": 20}, settings)._timeout == 20
    with pytest.raises(InvalidInput) as err:
        TritonModelRuntime({"url": "127.0.0.1:8000", "timeout_s": 21}, settings)
    assert err.value.details["field"] == "config.timeout_s" and "runtimes.triton.max_timeout_s" in err.value.message


@pytest.mark.parametrize("entry", ["http://triton:8000", "triton:8000/v2", "user@triton", "triton:http", ""])
def test_allowed_hosts_entries_are_hosts(tmp_path, entry):
    from app.errors import ConfigError

    with pytest.raises(ConfigError, match="runtimes.triton.allowed_hosts"):
        _triton_settings(tmp_path, allowed_hosts=[entry])


@pytest.mark.parametrize(
    "raised,cls,status",
    [
        ("InferenceServerException:404", "NotFound", 404),
        ("InferenceServerException:400", "InvalidInput", 422),
        ("InferenceServerException:401", "DependencyUnavailable", 503),
        ("InferenceServerException:500", "ModelError", 500),
        ("InferenceServerException:503", "DependencyUnavailable", 503),
        ("OSError", "DependencyUnavailable", 503),
        # tritonclient.grpc's statuses (config.protocol grpc)
        ("InferenceServerException:StatusCode.NOT_FOUND", "NotFound", 404),
        ("InferenceServerException:StatusCode.INVALID_ARGUMENT", "InvalidInput", 422),
        ("InferenceServerException:StatusCode.UNAUTHENTICATED", "DependencyUnavailable", 503),
        ("InferenceServerException:StatusCode.INTERNAL", "ModelError", 500),
        ("InferenceServerException:StatusCode.UNAVAILABLE", "DependencyUnavailable", 503),
        ("InferenceServerException:StatusCode.DEADLINE_EXCEEDED", "DependencyUnavailable", 503),
        ("InferenceServerException:StatusCode.RESOURCE_EXHAUSTED", "DependencyUnavailable", 503),
    ],
)
def test_a_remote_error_is_summarized_not_reflected(tmp_path, raised, cls, status):
    """A hostile or leaky server's text (here a fake banner) never reaches the API caller."""
    from tritonclient.utils import InferenceServerException

    from app.api.errors import STATUS_BY_ERROR
    from app.runtimes.triton import TritonModelRuntime

    settings = _triton_settings(tmp_path, allowed_hosts=["127.0.0.1"])
    protocol = "grpc" if "StatusCode" in raised else "http"
    rt = TritonModelRuntime(
        {"url": "http://user:pa55@127.0.0.1:8000", "model_name": "iris", "protocol": protocol}, settings
    )
    leak = "SSH-2.0-OpenSSH_9.6 internal-secret"

    def remote():
        if raised == "OSError":
            raise OSError(f"bad status line {leak!r}")
        raise InferenceServerException(msg=leak, status=raised.split(":", 1)[1])

    with pytest.raises(Exception) as err:
        rt._call("inference", remote)
    exc = err.value
    assert type(exc).__name__ == cls and next(s for c, s in STATUS_BY_ERROR if isinstance(exc, c)) == status
    assert "internal-secret" not in exc.message and "SSH" not in exc.message
    assert "***@127.0.0.1:8000" in exc.message and "inference" in exc.message and "pa55" not in exc.message
    if raised.endswith("404"):
        assert "config.model_name" in exc.message


def test_endpoint_creation_refuses_a_host_that_is_not_allowed(api):
    client, _ = api  # default settings: runtimes.triton.allowed_hosts is empty
    r = client.post("/v1/endpoints", json={"name": "remote", "target": "iris@champion", "runtime": "triton",
                                           "config": {"url": "169.254.169.254:80", "model_name": "iris"}})
    assert r.status_code == 422 and r.json()["code"] == "host_not_allowed"
    assert r.json()["details"] == {"field": "config.url", "setting": "runtimes.triton.allowed_hosts"}
    assert "config.url" in r.json()["error"] and "runtimes.triton.allowed_hosts" in r.json()["error"]
    assert client.get("/v1/endpoints/remote").status_code == 404


def test_placement_defaults_onnx_on_cpu_to_the_gateway_and_refuses_it_for_code_running_runtimes():
    from app.serving.endpoint_config import parse_endpoint_config, serves_in_gateway

    assert serves_in_gateway("onnx", None, inline_onnx=True)
    assert not serves_in_gateway("onnx", None, inline_onnx=False)
    assert not serves_in_gateway("onnx", {"device": "gpu"}, inline_onnx=True)
    assert not serves_in_gateway("native", None, inline_onnx=True)
    assert not serves_in_gateway("onnx", {"placement": "model_server"}, inline_onnx=True)
    assert serves_in_gateway("onnx", {"placement": "gateway"}, inline_onnx=False)
    assert parse_endpoint_config("onnx", {"placement": "gateway"}).options.placement == "gateway"
    for runtime, config in (("native", {"placement": "gateway"}), ("onnx", {"placement": "gateway", "device": "gpu"})):
        with pytest.raises(InvalidInput) as err:
            parse_endpoint_config(runtime, config)
        assert err.value.details["field"] == "config.placement"
    with pytest.raises(InvalidInput):
        parse_endpoint_config("onnx", {"placement": "sidecar"})
