"""Fuzz the platform's own OpenAPI schema with schemathesis: every operation, with schema-valid
(positive) and schema-violating (negative) requests, the schema's examples, and a pass with the
path pinned to objects that exist so the generated values reach past the lookups. Any 5xx, and
any request the server drops, fails the test.

Bounded: ``MATIH_FUZZ_EXAMPLES`` examples per operation and mode (default 15), derandomized with
``MATIH_FUZZ_SEED`` (default 0) so a CI failure reproduces; the summary line printed at the end
gives operations, requests and 5xx found. Nothing outlives the test: every mutation addresses a
``fuzz-`` model or endpoint, jobs it queued are cancelled as they are accepted and again at the
end, and the models, endpoints and tokens it made are deleted.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from typing import Any

import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis.errors import HypothesisException  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

EXAMPLES = int(os.environ.get("MATIH_FUZZ_EXAMPLES", "15"))
SEED = int(os.environ.get("MATIH_FUZZ_SEED", "0"))
PREFIX = "fuzz-"
MODEL, ENDPOINT = "fuzz-model", "fuzz-ep"
# Operations that change nothing: these may address the shared fixtures' objects (iris).
_READ_ONLY = re.compile(
    r"^(GET |POST /v1/endpoints/\{name\}/predict$|POST /v2/models/\{model\}(/versions/\{version\})?/infer$)"
)
# Top-level body fields that name what a mutation creates: pinned to the fuzz- prefix.
_CREATED_NAMES = {"/v1/models": ("name",), "/v1/endpoints": ("name",), "/v1/training/jobs": ("register_as",)}
_NAME_PARAMS = ("name", "model")
# Known-bad spellings tried on every path parameter and page_token, once each, beside what
# Hypothesis generates: Unicode digits int() refuses or misreads, signs, spaces, leading zeros,
# non-ASCII, control characters, a very long value.
NASTY = ["²", "١", "+1", " 1", "01", "0", "-1", "1e3", "é", "\x00", "%", "..", "a" * 300]


def _key(case) -> str:
    return f"{case.operation.method.upper()} {case.operation.path}"


def _prefixed(value: Any) -> Any:
    return value if not isinstance(value, str) or value.startswith(PREFIX) else PREFIX + value


def _confine(case) -> None:
    """Keep a mutation on fuzz- objects: generated names get the prefix (a bad name stays bad)."""
    key = _key(case)
    if _READ_ONLY.match(key):
        return
    for param in _NAME_PARAMS:
        if param in (case.path_parameters or {}):
            case.path_parameters[param] = _prefixed(case.path_parameters[param])
    if isinstance(case.body, dict):
        for field in _CREATED_NAMES.get(case.operation.path, ()):
            if field in case.body:
                case.body[field] = _prefixed(case.body[field])


class _Fuzz:
    """Sends the cases, keeps the counts and the 5xx, and what must be undone."""

    def __init__(self, url: str, token: str):
        self.url = url
        self.auth = {"Authorization": f"Bearer {token}"}
        self.session = requests.Session()
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.failures: dict[tuple, str] = {}
        self.jobs: set[str] = set()
        self.tokens: set[str] = set()

    def send(self, case) -> None:
        _confine(case)
        key = _key(case)
        self.requests[key] += 1
        try:
            response = case.call(base_url=self.url, session=self.session, headers=self.auth, timeout=120)
        except (requests.ConnectionError, requests.Timeout) as exc:
            self._fail(case, key, "no response", repr(exc)[:300])
            return
        except (requests.RequestException, UnicodeError, ValueError):
            self.statuses[0] += 1  # the client cannot send it (e.g. a header outside latin-1): not the server's
            return
        self.statuses[response.status_code] += 1
        if response.status_code >= 500:
            self._fail(case, key, response.status_code, response.content[:300].decode("utf-8", "replace"))
        elif response.status_code in (201, 202):
            self._undo_later(case, response)

    def _fail(self, case, key: str, status, body: str) -> None:
        code = re.search(r'"code":\s*"([^"]+)"', body)
        self.failures.setdefault(
            (key, status, code[1] if code else body[:60]),
            f"{key} -> {status}: {body}\n  {case.as_curl_command(base_url=self.url)} "
            "-H 'Authorization: Bearer <admin token>'",
        )

    def _undo_later(self, case, response) -> None:
        try:
            body = response.json()
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        if body.get("job_id"):  # a queued job: cancel it now, before it takes the cluster's CPUs
            self.jobs.add(body["job_id"])
            self.session.post(f"{self.url}/v1/jobs/{body['job_id']}/cancel", headers=self.auth, timeout=60)
        if case.operation.path == "/v1/tokens" and body.get("id"):
            self.tokens.add(body["id"])

    def run(self, operation, mode: GenerationMode, **pinned: Any) -> None:
        @seed(SEED)
        @settings(
            max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED == 0,
            phases=[Phase.generate], suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode, **pinned))
        def fuzz(case) -> None:
            self.send(case)

        try:
            fuzz()
        except HypothesisException:
            pass  # e.g. no negative case exists for an operation without parameters

    def nasty(self, operation, pinned: dict[str, Any]) -> None:
        """Each NASTY value in each path parameter (the others pinned to objects that exist)
        and in ``page_token``."""
        variants = [{"path_parameters": {**pinned, p.name: v}} for p in operation.path_parameters for v in NASTY]
        if any(p.name == "page_token" for p in operation.query):
            variants += [{"path_parameters": pinned, "query": {"page_token": v}} for v in NASTY]
        for fixed in variants:
            @settings(max_examples=1, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(**fixed))
            def one(case) -> None:
                self.send(case)

            try:
                one()
            except HypothesisException:
                pass

    def examples(self, schema, operation) -> None:
        for strategy in schema.get_strategies_from_examples(operation):
            @settings(max_examples=1, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def example(case) -> None:
                self.send(case)

            try:
                example()
            except HypothesisException:
                pass


def _existing(operation, known: dict[str, str]) -> dict[str, Any]:
    """Path parameters naming objects that exist: the shared fixtures' (``known``: the iris
    job, its run and experiment) for read-only operations, the fuzz model and endpoint for
    mutations."""
    params = {p.name for p in operation.path_parameters}
    read_only = bool(_READ_ONLY.match(f"{operation.method.upper()} {operation.path}"))
    endpoint_path = operation.path.startswith("/v1/endpoints/")
    pinned: dict[str, Any] = {}
    for name in _NAME_PARAMS:
        if name in params:
            if endpoint_path:
                pinned[name] = "iris" if read_only else ENDPOINT
            else:
                pinned[name] = "iris" if read_only else MODEL
    if "version" in params:
        pinned["version"] = "1"
    for name in ("job_id", "run_id", "experiment_id"):
        if name in params and known.get(name) and (read_only or name != "job_id"):
            pinned[name] = known[name]
    return pinned


def _clean_up(platform, fuzz: _Fuzz, jobs_before: set[str]) -> None:
    with platform.client() as c:
        jobs, token = [], None
        while True:
            page = c.get("/v1/jobs", params={"limit": 500, **({"page_token": token} if token else {})}).json()
            jobs += page["items"]
            token = page["next_page_token"]
            if not token:
                break
        for job in jobs:
            started_here = job["job_id"] in fuzz.jobs or job["job_id"] not in jobs_before
            if started_here and job["status"] in ("queued", "running"):
                c.post(f"/v1/jobs/{job['job_id']}/cancel")
        for ep in c.get("/v1/endpoints", params={"limit": 500}).json()["items"]:
            if ep["name"].startswith(PREFIX):
                c.delete(f"/v1/endpoints/{ep['name']}")
        for model in c.get("/v1/models", params={"limit": 500}).json()["items"]:
            if model["name"].startswith(PREFIX):
                c.delete(f"/v1/models/{model['name']}")
        for token_id in fuzz.tokens:
            c.delete(f"/v1/tokens/{token_id}")
        left = [m["name"] for m in c.get("/v1/models", params={"limit": 500}).json()["items"]]
        left += [e["name"] for e in c.get("/v1/endpoints", params={"limit": 500}).json()["items"]]
        assert not [n for n in left if n.startswith(PREFIX)], f"fuzz objects left behind: {left}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            live = [j for j in c.get("/v1/jobs", params={"limit": 500}).json()["items"]
                    if j["job_id"] not in jobs_before and j["status"] in ("queued", "running")]
            if not live:
                return
            time.sleep(1)
        raise AssertionError(f"jobs the fuzz started are still live: {[(j['job_id'], j['status']) for j in live]}")


def test_fuzz_the_openapi_schema_finds_no_5xx(platform, iris, capsys):
    started = time.monotonic()
    with platform.client() as c:
        jobs_before = {j["job_id"] for j in c.get("/v1/jobs", params={"limit": 500}).json()["items"]}
        audit_before = c.get("/v1/audit", params={"limit": 1}).json()["items"][0]["id"]
        r = c.post(f"/v1/models/{MODEL}/versions", json={"job_id": iris["job_id"]})
        assert r.status_code == 201, r.text
        r = c.post("/v1/endpoints", json={"name": ENDPOINT, "target": f"{MODEL}/1"})
        assert r.status_code == 201, r.text
        run_id = (iris.get("result") or {}).get("run_id")
        run = c.get(f"/v1/runs/{run_id}").json() if run_id else {}
        known = {"job_id": iris["job_id"], "run_id": run_id, "experiment_id": run.get("experiment_id")}

    schema = schemathesis.openapi.from_url(f"{platform.url}/openapi.json", timeout=60)
    # Deletions last, so the objects the pinned passes address live until then.
    operations = sorted((result.ok() for result in schema.get_all_operations()), key=lambda o: o.method == "delete")
    fuzz = _Fuzz(platform.url, platform.admin_token)
    try:
        for operation in operations:
            fuzz.examples(schema, operation)
            fuzz.run(operation, GenerationMode.POSITIVE)
            fuzz.run(operation, GenerationMode.NEGATIVE)
            pinned = _existing(operation, known)
            if pinned:
                fuzz.run(operation, GenerationMode.POSITIVE, path_parameters=pinned)
                fuzz.run(operation, GenerationMode.NEGATIVE, path_parameters=pinned)
            fuzz.nasty(operation, pinned)
    finally:
        _clean_up(platform, fuzz, jobs_before)
    took = time.monotonic() - started
    with platform.client() as c:
        audit = c.get("/v1/audit", params={"limit": 1000}).json()["items"]
        audit_rows = sum(1 for a in audit if a["id"] > audit_before)
    summary = (
        f"fuzz: {len(operations)} operations, {sum(fuzz.requests.values())} requests "
        f"({EXAMPLES} examples per operation and mode, seed {SEED}), 5xx found: {len(fuzz.failures)}, "
        f"statuses {dict(sorted(fuzz.statuses.items()))}, {audit_rows} audit rows, {took:.0f}s"
    )
    with capsys.disabled():
        print("\n" + summary)
    labels = [f"{o.method.upper()} {o.path}" for o in operations]
    untouched = [label for label in labels if not fuzz.requests[label]]
    assert not untouched, f"operations never fuzzed: {untouched}"
    assert not fuzz.failures, summary + "\n" + "\n".join(fuzz.failures.values())

    with platform.client() as c:  # the platform still serves
        r = c.post("/v1/endpoints/iris/predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
        assert r.status_code == 200 and r.json()["predictions"] == [0], r.text
