"""A tiny Open Inference Protocol (V2 REST) server for tests and benchmarks: one model that
classifies iris-like rows by two thresholds, with an adjustable delay per call and share of
failing calls (HTTP 500). The platform's triton runtime (tritonclient.http) calls it like a
Triton server, so a test gets a model that is slow or fails on demand: a shadow that sleeps,
a canary with a 10x error rate or 20 ms more latency.

    server = V2Server(delay_s=0.02, fail_rate=0.0)
    config = {"url": f"127.0.0.1:{server.port}", "model_name": server.model}
    ...
    server.close()
"""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"


class V2Server:
    def __init__(self, *, delay_s: float = 0.0, fail_rate: float = 0.0, model: str = "iris", seed: int = 0):
        self.delay_s = delay_s
        self.fail_rate = fail_rate
        self.model = model
        self.calls = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, doc: dict) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - http.server's name
                parts = self.path.strip("/").split("/")
                if parts[:2] == ["v2", "health"]:
                    return self._send(200, {})
                if len(parts) >= 3 and parts[:2] == ["v2", "models"] and parts[2] == owner.model:
                    if parts[-1] == "ready":
                        return self._send(200, {})
                    return self._send(200, {
                        "name": owner.model, "versions": ["1"], "platform": "test",
                        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
                        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
                    })
                return self._send(404, {"error": f"no model at {self.path}"})

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                parts = self.path.strip("/").split("/")
                if len(parts) < 4 or parts[2] != owner.model or parts[-1] != "infer":
                    return self._send(404, {"error": f"no model at {self.path}"})
                head_len = self.headers.get(HEADER_LENGTH)
                head = json.loads(raw[: int(head_len)] if head_len else raw)
                inp = head["inputs"][0]
                shape = inp["shape"]
                if head_len:
                    x = np.frombuffer(raw[int(head_len):], dtype=np.float32).reshape(shape)
                else:
                    x = np.asarray(inp["data"], dtype=np.float32).reshape(shape)
                with owner._lock:
                    owner.calls += 1
                    fail = owner._rng.random() < owner.fail_rate
                if owner.delay_s:
                    time.sleep(owner.delay_s)
                if fail:
                    return self._send(500, {"error": "injected failure"})
                label = (x[:, 2] > 2.5).astype(np.int64) + (x[:, 3] > 1.7).astype(np.int64)
                proba = np.eye(3, dtype=np.float32)[label]
                wanted = [o["name"] for o in head.get("outputs") or []] or ["label", "probabilities"]
                outputs = []
                if "label" in wanted:
                    outputs.append({"name": "label", "datatype": "INT64", "shape": [len(label)],
                                    "data": label.tolist()})
                if "probabilities" in wanted:
                    outputs.append({"name": "probabilities", "datatype": "FP32", "shape": list(proba.shape),
                                    "data": proba.ravel().tolist()})
                return self._send(200, {"model_name": owner.model, "model_version": "1", "outputs": outputs})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="v2server", daemon=True)
        self._thread.start()

    @property
    def config(self) -> dict:
        """The triton runtime's endpoint config for this server."""
        return {"url": f"127.0.0.1:{self.port}", "model_name": self.model, "timeout_s": 10}

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
