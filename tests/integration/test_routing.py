"""The one predict path on the real cluster: request ids issued at Serve's ingress (one
X-Request-Id, the server's), and endpoint changes pushed to the Gateway replicas through the
RegistryCache's change feed, well inside the cache's TTL."""

from __future__ import annotations

import time

import pytest

from app.predlog.ids import is_request_id

pytestmark = pytest.mark.integration

ROW = [5.1, 3.5, 1.4, 0.2]


def test_the_ingress_issues_one_request_id(platform, iris):
    with platform.client() as c:
        r = c.post("/v1/endpoints/iris/predict", json={"instances": [ROW]}, headers={"X-Request-Id": "client-abc"})
        assert r.status_code == 200, r.text
        ids = r.headers.get_list("x-request-id")
        body = r.json()
        assert ids == [body["request_id"]] and is_request_id(body["request_id"]), (ids, body)
        assert body["client_request_id"] == "client-abc"
        r = c.post("/v1/endpoints/iris/predict", json={"instances": [ROW]})
        assert r.headers.get_list("x-request-id") == [r.json()["request_id"]] and "client_request_id" not in r.json()
        v2 = c.post("/v2/models/iris/infer", json={"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 4],
                                                              "data": ROW}]})
        assert v2.status_code == 200, v2.text
        assert v2.headers.get_list("x-request-id") == [v2.json()["parameters"]["request_id"]]


def test_an_endpoint_change_reaches_the_gateway_within_a_second(platform, iris):
    """The row is changed in the metadata store behind the Gateway's back (as another replica
    would) and announced on the feed; the replica's cached row (trusted for
    serving.resolve_ttl_s = 2 s) must go at once."""
    import ray

    from actors import NAMESPACE
    from app.serving.routing import endpoint_key
    from app.store import MetadataStore

    assert platform.settings.serving.resolve_ttl_s >= 2
    with platform.client() as c:
        assert c.post("/v1/endpoints", json={"name": "pushed", "target": "iris@champion"}).status_code == 201
        two = {"instances": [ROW, ROW]}
        assert c.post("/v1/endpoints/pushed/predict", json=two).status_code == 200
        time.sleep(platform.settings.serving.resolve_ttl_s + 0.2)  # the cached row expires ...
        assert c.post("/v1/endpoints/pushed/predict", json=two).status_code == 200  # ... and is read again now
        t0 = time.monotonic()
        store = MetadataStore(platform.settings.database_url)
        store.update_endpoint("pushed", {"config": {"max_rows": 1}}, "test")
        cache = ray.get_actor("registry_cache", namespace=NAMESPACE)
        ray.get(cache.invalidate.remote(endpoint_key("pushed")))
        seen = None
        while time.monotonic() - t0 < 1.0:
            r = c.post("/v1/endpoints/pushed/predict", json=two)
            if r.status_code == 422:
                seen = time.monotonic() - t0
                break
            time.sleep(0.02)
        assert seen is not None, "the change did not reach the Gateway within 1 s (its cached row lives 2 s)"
        store.dispose()
