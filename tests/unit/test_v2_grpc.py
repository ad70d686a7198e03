"""The gRPC inference service (app/api/v2_grpc.py) on a real grpc.aio server in this process,
with the platform's in-process services (no Ray), spoken to by tritonclient.grpc: auth from
metadata, errors as status codes. Inference on a served model: tests/integration/test_grpc.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.support import in_process_context

from app.api.v2_grpc import UNARY_RPCS, UNIMPLEMENTED, InferenceService
from app.bootstrap import prepare
from app.serving.v2_proto import add_servicer_to_server
from app.settings import load_settings


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home), http={"max_body_bytes": 4096})
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, jobs=None)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    async def serve() -> None:
        server = grpc.aio.server()
        add_servicer_to_server(InferenceService(ctx), server)  # as Serve's proxy registers it: requests as bytes
        holder["port"] = server.add_insecure_port("127.0.0.1:0")
        holder["server"] = server
        await server.start()
        started.set()
        await server.wait_for_termination()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    assert started.wait(30)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{holder['port']}")
    client.port = holder["port"]
    yield client, {"authorization": f"Bearer {prepared.admin_token}"}
    client.close()
    stopping = asyncio.run_coroutine_threadsafe(holder["server"].stop(0), loop)
    with contextlib.suppress(concurrent.futures.TimeoutError):  # on a loaded machine; the thread is a daemon
        stopping.result(30)
        thread.join(30)
    ctx.store.dispose()


def _fails(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as err:
        call(*args, **kwargs)
    return err.value


def test_the_gateway_has_a_method_per_unary_rpc():
    import inspect

    from deployments.gateway import Gateway

    assert "ModelConfig" in UNIMPLEMENTED and "ModelStreamInfer" not in UNARY_RPCS
    for name in UNARY_RPCS:
        method = getattr(Gateway.func_or_class, name)
        assert method.__name__ == name and "grpc_context" in inspect.signature(method).parameters  # what Serve passes


def test_other_rpcs_are_unimplemented(served):
    client, auth = served
    err = _fails(client.get_model_config, "iris", headers=auth)
    assert err.status() == "StatusCode.UNIMPLEMENTED" and "ModelInfer" in err.message()


def test_requests_that_are_not_messages_are_invalid(served):
    import grpc as grpc_lib

    client, auth = served
    channel = grpc_lib.insecure_channel(client._channel._channel.target().decode())
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc_lib.RpcError) as err:
        call(b"\xff\xff\xff", metadata=(("authorization", "Bearer x"),))
    assert err.value.code() == grpc_lib.StatusCode.UNAUTHENTICATED  # the token is checked first
    with pytest.raises(grpc_lib.RpcError) as err:
        call(b"\xff\xff\xff", metadata=tuple(auth.items()))
    assert err.value.code() == grpc_lib.StatusCode.INVALID_ARGUMENT and "not a valid ModelInferRequest" in err.value.details()
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")  # not registered
    with pytest.raises(grpc_lib.RpcError) as err:
        list(stream(iter([b""]), metadata=tuple(auth.items()), timeout=10))
    assert err.value.code() == grpc_lib.StatusCode.UNIMPLEMENTED
    channel.close()


def test_health_needs_no_token_and_metadata_does(served):
    client, auth = served
    assert client.is_server_live() and client.is_server_ready()
    err = _fails(client.get_server_metadata)
    assert err.status() == "StatusCode.UNAUTHENTICATED" and "missing bearer token" in err.message()
    err = _fails(client.get_server_metadata, headers={"authorization": "Basic abc"})
    assert err.status() == "StatusCode.UNAUTHENTICATED"
    assert client.get_server_metadata(headers=auth).name == "matih-ml"


def test_unknown_models_are_not_found_and_not_ready(served):
    client, auth = served
    assert not client.is_model_ready("no-such-model", headers=auth)
    err = _fails(client.get_model_metadata, "no-such-model", headers=auth)
    assert err.status() == "StatusCode.NOT_FOUND" and err.message().startswith("not_found: model 'no-such-model'")
    inp = grpcclient.InferInput("X", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    assert _fails(client.infer, "no-such-model", [inp], headers=auth).status() == "StatusCode.NOT_FOUND"
    err = _fails(client.infer, "iris", [inp], model_version="03", headers=auth)
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "not a model version" in err.message()


def test_bad_and_oversized_requests(served):
    client, auth = served
    bad = grpcclient.InferInput("X", [1, 3], "FP32")
    bad.set_data_from_numpy(np.ones((1, 3), np.float32))
    bad.set_shape([1, 4])  # 12 bytes for a [1, 4] FP32 tensor
    err = _fails(client.infer, "iris", [bad], headers=auth)
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and "needs 16" in err.message()
    big = grpcclient.InferInput("X", [300, 4], "FP32")
    big.set_data_from_numpy(np.ones((300, 4), np.float32))  # 4800 bytes > http.max_body_bytes 4096
    err = _fails(client.infer, "iris", [big], headers=auth)
    assert err.status() == "StatusCode.RESOURCE_EXHAUSTED" and "http.max_body_bytes" in err.message()


def test_the_triton_runtime_over_grpc_maps_remote_failures(served, tmp_path):
    """The triton runtime with protocol grpc against this real gRPC server (no model is
    registered here: serving one is tests/integration/test_grpc.py)."""
    from app.errors import DependencyUnavailable, NotFound
    from app.runtimes.triton import TritonModelRuntime

    client, auth = served
    settings = load_settings("local", matih_home=str(tmp_path), runtimes={"triton": {"allowed_hosts": ["127.0.0.1"]}})
    config = {"url": f"127.0.0.1:{client.port}", "protocol": "grpc", "model_name": "no-such-model",
              "headers": {"Authorization": auth["authorization"]}, "timeout_s": 10}
    with pytest.raises(NotFound) as err:
        TritonModelRuntime(config, settings).load(None, {})
    assert "NOT_FOUND" in err.value.message and "config.model_name" in err.value.message
    with pytest.raises(DependencyUnavailable, match="refused the credentials"):
        TritonModelRuntime({**config, "headers": {"authorization": "Bearer wrong"}}, settings).load(None, {})
    with pytest.raises(DependencyUnavailable, match="could not be reached"):
        TritonModelRuntime({**config, "url": "127.0.0.1:9", "timeout_s": 2}, settings).load(None, {})
