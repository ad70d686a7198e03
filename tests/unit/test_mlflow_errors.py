"""MLflow's refusals reach the caller as what they are: its 400 as 422 ``registry_rejected``,
its 401/403 as 403 ``registry_permission_denied``, never as 404. Over HTTP against a tiny real
server that answers every MLflow REST call as an MLflow server with auth would."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from app.errors import Conflict, DependencyUnavailable, NotFound, RegistryForbidden, RegistryRejected
from app.registry.mlflow_registry import ModelRegistry, mlflow_error
from app.settings import load_settings


class _Answer(BaseHTTPRequestHandler):
    status = 403
    body: dict | str = {"error_code": "PERMISSION_DENIED", "message": "Permission denied for model 'm'"}

    def _reply(self):
        body = self.body if isinstance(self.body, str) else json.dumps(self.body)
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json" if not isinstance(self.body, str) else "text/plain")
        self.end_headers()
        self.wfile.write(body.encode())

    do_GET = do_POST = do_PATCH = do_DELETE = _reply

    def log_message(self, *args):
        pass


@pytest.fixture
def mlflow_answering(tmp_path):
    servers = []

    def start(status: int, body):
        handler = type("H", (_Answer,), {"status": status, "body": body})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        settings = load_settings("local", matih_home=str(tmp_path),
                                 mlflow_tracking_uri=f"http://127.0.0.1:{server.server_address[1]}")
        return settings

    yield start
    for s in servers:
        s.shutdown()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (403, {"error_code": "PERMISSION_DENIED", "message": "Permission denied"}, RegistryForbidden),
        (401, {"error_code": "UNAUTHENTICATED", "message": "You are not authenticated"}, RegistryForbidden),
        (401, "You are not authenticated. Please see the docs", RegistryForbidden),  # MLflow basic-auth's plain body
        (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "Model 'm' does not exist or is invalid"},
         RegistryRejected),
        (400, {"error_code": "BAD_REQUEST", "message": "bad"}, RegistryRejected),
        (404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Registered Model with name=m not found"}, NotFound),
        # the one 400 that means "not found": MLflow's answer for a missing alias
        (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "Registered model alias production not found."},
         NotFound),
    ],
)
def test_registry_service_maps_mlflow_refusals(mlflow_answering, status, body, expected):
    from app.registry.service import RegistryService

    settings = mlflow_answering(status, body)
    registry = ModelRegistry(settings, serving=True)
    svc = RegistryService(settings, registry)
    with pytest.raises(expected) as err:
        svc.get_model("m")
    assert not (expected is not NotFound and isinstance(err.value, NotFound))
    with pytest.raises(expected):  # alias resolution (serving path) too
        registry.resolve("m/1", use_cache=False)


def test_the_api_answers_403_and_422_with_their_own_codes(mlflow_answering, tmp_path):
    from app.api.app import create_app
    from app.auth import ensure_admin_token
    from app.store import MetadataStore
    from tests.support import in_process_context

    class _NoJobs:
        async def notify(self):
            pass

        async def cancel(self, job_id, actor):
            raise AssertionError

    for status, body, http, code in [
        (403, {"error_code": "PERMISSION_DENIED", "message": "Permission denied"}, 403, "registry_permission_denied"),
        (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "does not exist"}, 422, "registry_rejected"),
    ]:
        settings = mlflow_answering(status, body)
        settings.matih_home.mkdir(parents=True, exist_ok=True)
        MetadataStore(settings.database_url).migrate()  # what bootstrap.prepare does, less MLflow's setup
        token, _ = ensure_admin_token(settings)
        ctx = in_process_context(settings, token, _NoJobs())
        client = TestClient(create_app(ctx))
        client.headers["Authorization"] = f"Bearer {token}"
        r = client.get("/v1/models/m")
        assert r.status_code == http and r.json()["code"] == code, r.text
        r = client.get("/v1/models/m/versions/1")
        assert r.status_code == http and r.json()["code"] == code, r.text
        ctx.store.dispose()


def test_mlflow_error_codes_map_by_code_before_message():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, PERMISSION_DENIED, RESOURCE_ALREADY_EXISTS

    assert isinstance(mlflow_error(MlflowException("x already exists", error_code=RESOURCE_ALREADY_EXISTS), "m"),
                      Conflict)
    assert isinstance(mlflow_error(MlflowException("not found", error_code=PERMISSION_DENIED), "m"),
                      RegistryForbidden)
    assert isinstance(mlflow_error(MlflowException("Model not found", error_code=INTERNAL_ERROR), "m"), NotFound)
    assert isinstance(mlflow_error(MlflowException("boom", error_code=INTERNAL_ERROR), "m"), DependencyUnavailable)
    assert isinstance(mlflow_error(ConnectionError("refused"), "m"), DependencyUnavailable)
