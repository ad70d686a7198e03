"""``matih-ml``: the command line. It talks to a running platform over HTTP, with the admin
token from MATIH_ADMIN_TOKEN / --token, or the file the local profile wrote."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

import httpx

from app.errors import ConfigError

DEMO_JOB = {
    "name": "iris-logreg",
    "framework": "sklearn",
    "estimator": "sklearn.linear_model.LogisticRegression",
    "hyperparameters": {"max_iter": 300},
    "dataset": {"uri": "builtin://iris", "target": "target"},
    "register_as": "iris",
}


class Client:
    def __init__(self, url: str, token: str | None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201, 202, 204)) -> Any:
        resp = self.http.request(method, path, json=body)
        data = resp.json() if resp.content and resp.headers.get("content-type", "").startswith("application/json") else None
        if resp.status_code not in ok:
            msg = data.get("error") if isinstance(data, dict) else resp.text
            raise SystemExit(f"{method} {path} -> {resp.status_code}: {msg}")
        return data

    def wait_job(self, job_id: str, timeout_s: float = 600, echo=None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            job = self.call("GET", f"/v1/jobs/{job_id}")
            stage = (job["status"], job["progress"].get("stage"))
            if echo and stage != last:
                echo(f"  job {job_id[:8]}: {job['status']}" + (f" ({stage[1]})" if stage[1] else ""))
                last = stage
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.5)
        raise SystemExit(f"job {job_id} did not finish within {timeout_s:.0f}s")


def _settings():
    from app.settings import load_settings

    try:
        return load_settings()
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


def _client(args) -> Client:
    token = args.token or os.environ.get("MATIH_TOKEN")
    if not token:
        from app.auth import read_admin_token

        token = read_admin_token(_settings())
    url = args.url or os.environ.get("MATIH_URL") or f"http://127.0.0.1:{_settings().http_port}"
    return Client(url, token)


def cmd_init(args) -> int:
    from app.bootstrap import prepare

    settings = _settings()
    prepared = prepare(settings)
    print(f"profile {settings.profile}; state in {settings.matih_home}")
    print(f"metadata store: {settings.database_url.split('@')[-1]}")
    print(f"MLflow: {settings.mlflow_tracking_uri}")
    if prepared.admin_token_file is None and prepared.admin_token:
        print("admin token: from MATIH_ADMIN_TOKEN")
    return 0


def serve_config_for(settings, config_path: str) -> dict[str, Any]:
    """``config_path`` (serve_config.yaml) with the HTTP host, port and request timeout of the
    profile (Serve's ``request_timeout_s`` is the one the Gateway answers 504 just before), and
    the gRPC port and servicer of the Open Inference Protocol over gRPC."""
    import yaml

    from app.api.v2_grpc import SERVICER_FUNCTION

    with open(config_path) as fh:
        config = yaml.safe_load(fh) or {}
    config.setdefault("http_options", {}).update(
        host=settings.http.host, port=settings.http_port, request_timeout_s=settings.http.request_timeout_s
    )
    grpc_options = config.setdefault("grpc_options", {})
    grpc_options.update(port=settings.grpc_port, request_timeout_s=settings.http.request_timeout_s)
    servicers = grpc_options.setdefault("grpc_servicer_functions", [])
    if SERVICER_FUNCTION not in servicers:
        servicers.append(SERVICER_FUNCTION)
    return config


def cmd_up(args) -> int:
    import yaml

    cmd_init(args)
    settings = _settings()
    config = serve_config_for(settings, args.config)
    path = settings.matih_home / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    host, port = settings.http.host, settings.http_port
    if host in ("0.0.0.0", "::", ""):
        print(f"HTTP API on every interface, port {port} (profile {settings.profile}: http.host {host!r}); "
              "put TLS in front of it, see 'Securing a cluster' in docs/configuration.md")
    else:
        print(f"HTTP API on http://{host}:{port} only (profile {settings.profile}: http.host {host!r})")
    from app.serving.ingress import apply_cluster_env, mode_in_effect

    env = apply_cluster_env(settings)  # Serve's ingress mode: read by every process of the cluster serve run starts
    print(f"ingress: {mode_in_effect()} (http.ingress.mode {settings.http.ingress.mode!r}; "
          f"{', '.join(f'{k}={v}' for k, v in env.items())})")
    print(f"Open Inference Protocol over gRPC on port {settings.grpc_port} (grpc_port)")
    serve = shutil.which("serve") or os.path.join(os.path.dirname(sys.executable), "serve")
    argv = [serve, "run", str(path)]
    print("starting:", " ".join(argv), flush=True)
    os.execv(serve, argv)
    return 0  # not reached


def cmd_ray_env(args) -> int:
    """``export`` lines for the environment of ``ray start`` on every node of an existing cluster."""
    import shlex

    from app.serving.ingress import cluster_env

    for key, value in cluster_env(_settings()).items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def cmd_status(args) -> int:
    c = _client(args)
    ready = c.http.get("/ready").json()
    print(json.dumps({"ready": ready, "info": c.call("GET", "/v1/info")}, indent=2))
    return 0 if ready.get("ready") else 1


def _parse_instances(text: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--instances is not JSON: {exc}") from None
    return value if value and isinstance(value[0], (list, dict)) else [value]


def cmd_predict(args) -> int:
    c = _client(args)
    out = c.call("POST", f"/v1/endpoints/{args.endpoint}/predict", {"instances": _parse_instances(args.instances)})
    print(json.dumps(out, indent=2))
    return 0


def cmd_demo(args) -> int:
    c = _client(args)
    if args.which == "loop":
        from app.monitoring.demo import free_name, run_loop_demo

        name = free_name(c)
        out = run_loop_demo(c, _settings().matih_home / "data" / name, name=name)
        print(f"closed loop in {out['seconds']:.0f}s: {out['trigger']['status']}")
        return 0 if out["trigger"]["status"] == "promoted" else 1
    say = print
    say("1. platform health")
    say("  " + json.dumps(c.call("GET", "/health")))
    say(f"2. submit training job {DEMO_JOB['name']} ({DEMO_JOB['estimator']} on {DEMO_JOB['dataset']['uri']})")
    job_id = c.call("POST", "/v1/training/jobs", DEMO_JOB)["job_id"]
    say(f"  job_id {job_id}")
    say("3. wait for it")
    job = c.wait_job(job_id, echo=say)
    if job["status"] != "succeeded":
        say(job.get("logs") or "")
        raise SystemExit(f"training job {job['status']}: {job.get('error')}")
    res = job["result"]
    say(f"  registered {res['model_name']} version {res['model_version']}; metrics {json.dumps(res['metrics'])}; "
        f"ONNX max |diff| {res['onnx_max_abs_diff']:.2e}")
    say("4. endpoint iris -> iris@champion")
    existing = c.http.get("/v1/endpoints/iris")
    if existing.status_code == 404:
        c.call("POST", "/v1/endpoints", {"name": "iris", "target": "iris@champion"})
        say("  created")
    else:
        say("  exists already")
    say("5. predict")
    out = c.call("POST", "/v1/endpoints/iris/predict", {"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]})
    say("  " + json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="matih-ml", description="MATIH ML command line")
    p.add_argument("--url", help="platform URL (default $MATIH_URL or http://127.0.0.1:<http_port>)")
    p.add_argument("--token", help="bearer token (default $MATIH_TOKEN, then the admin token)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("init", help="migrate the stores and create the admin token; print where things are")
    up = sub.add_parser(
        "up", help="init, then `serve run` on serve_config.yaml with the profile's http.host and http_port"
    )
    up.add_argument("--config", default="serve_config.yaml")
    sub.add_parser("ray-env", help="the environment `ray start` needs on each node for the profile's ingress mode")
    sub.add_parser("status", help="readiness of each dependency and platform info")
    pr = sub.add_parser("predict", help="predict with an endpoint")
    pr.add_argument("endpoint")
    pr.add_argument("instances", help='JSON: one row [..] or rows [[..], ..]')
    demo = sub.add_parser("demo", help="quickstart: train iris, create an endpoint, predict; loop: drift -> alert -> "
                          "retrain -> gate -> canary -> promotion end to end; each prints its steps")
    demo.add_argument("which", nargs="?", choices=("quickstart", "loop"), default="quickstart")
    args = p.parse_args(argv)
    handler = {"init": cmd_init, "up": cmd_up, "ray-env": cmd_ray_env, "status": cmd_status, "predict": cmd_predict, "demo": cmd_demo}
    return handler[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
