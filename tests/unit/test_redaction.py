"""Credentials never leave in what the platform shows: /ready, /v1/info, error bodies,
endpoint rows in the API and the audit log."""

import json

import pytest

from app import errors as E
from app.api.errors import error_response
from app.redaction import keep_redacted, redact
from app.store import redacted_endpoint


@pytest.mark.parametrize("text, shown", [
    ("http://alice:s3cret@mlflow:5000", "http://alice:***@mlflow:5000"),
    ("postgresql+psycopg://matih:p%40ss@db:5432/matih", "postgresql+psycopg://matih:***@db:5432/matih"),
    ("API request to http://u:pw@h/api/2.0/x failed", "API request to http://u:***@h/api/2.0/x failed"),
    ("http://u:p@ss@host/x", "http://u:***@host/x"),
    ("https://h/x?token=abc&page=2#top", "https://h/x?token=***&page=2#top"),
    ("s3://b/k?X-Amz-Signature=zz&X-Amz-Credential=AK", "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***"),
    ("https://bob@h/x", "https://bob@h/x"),  # a user name alone is not a credential
    ("sqlite:////var/lib/matih/matih.db", "sqlite:////var/lib/matih/matih.db"),
    ("no uri: a:b@c", "no uri: a:b@c"),
])
def test_redact(text, shown):
    assert redact(text) == shown


def test_error_bodies_hide_credentials_in_messages_and_details():
    exc = E.DependencyUnavailable("MLflow is unavailable at http://alice:s3cret@mlflow:5000: refused",
                                  details={"uri": "redis://:hunter2@cache:6379/0", "n": 1})
    body = json.loads(error_response(exc).body)
    assert "s3cret" not in json.dumps(body) and "hunter2" not in json.dumps(body)
    assert body["error"] == "MLflow is unavailable at http://alice:***@mlflow:5000: refused"
    assert body["details"]["uri"] == "redis://:***@cache:6379/0" and body["details"]["n"] == 1


TRITON = {"url": "https://svc:t0ken@triton:8000/v2", "model_name": "m",
          "headers": {"Authorization": "Bearer abc"}}


def test_redacted_endpoint_hides_headers_and_url_credentials():
    row = {"name": "e", "target": "m@champion", "runtime": "triton", "config": TRITON}
    shown = redacted_endpoint(row)
    assert shown["config"] == {"url": "https://svc:***@triton:8000/v2", "model_name": "m",
                               "headers": {"Authorization": "***"}}
    assert row["config"] == TRITON  # the stored row is untouched


def test_store_audit_and_answers_hide_credentials_but_serving_reads_them(store):
    store.create_endpoint("remote", "m@champion", "triton", TRITON, "admin")
    assert store.get_endpoint("remote")["config"] == TRITON  # the serving path needs them
    # a client sends back the config as GET showed it, changing only the model name
    shown = redacted_endpoint(store.get_endpoint("remote"))["config"]
    store.update_endpoint("remote", {"config": {**shown, "model_name": "m2"}}, "admin")
    assert store.get_endpoint("remote")["config"] == {**TRITON, "model_name": "m2"}
    store.delete_endpoint("remote", "admin")
    items, _ = store.list_audit(resource_type="endpoint")
    dumped = json.dumps(items)
    assert "t0ken" not in dumped and "Bearer abc" not in dumped
    assert "https://svc:***@triton:8000/v2" in dumped and len(items) == 3


def test_keep_redacted_takes_new_values_as_sent():
    old = {"url": "https://svc:t0ken@triton/v2", "headers": {"A": "1", "B": "2"}}
    new = {"url": "https://svc:other@triton/v2", "headers": {"A": "***", "C": "***"}}
    assert keep_redacted(new, old) == {"url": "https://svc:other@triton/v2", "headers": {"A": "1", "C": "***"}}


def test_ready_and_info_hide_the_mlflow_password(tmp_path):
    """An MLflow URI with user:password@ whose server answers 404 to everything: /ready shows
    MLflow down, naming the server without its password."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from fastapi.testclient import TestClient

    from app.api.app import ApiContext, create_app
    from app.auth import Authenticator
    from app.registry.mlflow_registry import ModelRegistry
    from app.settings import load_settings
    from app.store import MetadataStore

    class NotMlflow(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://alice:s3cret@127.0.0.1:{server.server_port}"
    # a generous probe limit: the 404 comes at once, but a first MLflow call on a busy machine is slow
    settings = load_settings("local", matih_home=str(tmp_path), mlflow_tracking_uri=uri, admin_token="adm",
                             serving={"mlflow_timeout_s": 60})
    store = MetadataStore(settings.database_url)
    store.migrate()
    ctx = ApiContext(settings=settings, store=store, registry=ModelRegistry(settings, serving=True),
                     authenticator=Authenticator(settings, store, "adm"), predictor=None, jobs=None)
    try:
        client = TestClient(create_app(ctx))
        r = client.get("/ready")
        mlflow = r.json()["dependencies"]["mlflow"]
        assert mlflow["status"] == "down" and f"alice:***@127.0.0.1:{server.server_port}" in mlflow["error"], mlflow
        assert "s3cret" not in r.text
        r = client.get("/v1/info", headers={"Authorization": "Bearer adm"})
        assert r.json()["integrations"]["mlflow"]["tracking_uri"] == f"http://alice:***@127.0.0.1:{server.server_port}"
    finally:
        store.dispose()
        server.shutdown()


def test_job_errors_and_logs_are_stored_without_credentials(store):
    job = store.create_job("training", "j", {"x": 1}, "admin")
    store.transition_job(job["job_id"], "running")
    store.update_job_progress(job["job_id"], {"stage": "fit"}, log="connecting to postgresql://u:pg-pa55@db/m")
    store.transition_job(job["job_id"], "failed", error="MLflow at http://a:mlf-pa55@mlflow:5000 refused")
    got = store.get_job(job["job_id"], with_logs=True)
    assert got["error"] == "MLflow at http://a:***@mlflow:5000 refused"
    assert "postgresql://u:***@db/m" in got["logs"] and "pa55" not in json.dumps(got)
