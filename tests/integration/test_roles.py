"""Roles: viewer < predictor < developer < admin, with tokens an admin issues."""

import pytest


@pytest.fixture(scope="module")
def tokens(platform):
    out = {}
    with platform.client() as c:
        for role in ("viewer", "predictor", "developer"):
            r = c.post("/v1/tokens", json={"name": f"{role}-bot", "role": role})
            assert r.status_code == 201, r.text
            out[role] = r.json()["token"]
    return out


GOOD = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


def test_viewer_reads_but_cannot_predict(platform, iris, tokens):
    with platform.client(tokens["viewer"]) as c:
        assert c.get("/v1/endpoints").status_code == 200
        assert c.get(f"/v1/jobs/{iris['job_id']}").status_code == 200
        r = c.post("/v1/endpoints/iris/predict", json=GOOD)
        assert r.status_code == 403 and r.json()["code"] == "permission_denied"


def test_predictor_predicts_but_cannot_change_endpoints(platform, iris, tokens):
    with platform.client(tokens["predictor"]) as c:
        assert c.post("/v1/endpoints/iris/predict", json=GOOD).status_code == 200
        assert c.post("/v1/endpoints", json={"name": "p", "target": "iris@champion"}).status_code == 403
        assert c.delete("/v1/endpoints/iris").status_code == 403
    with platform.client() as c:
        assert c.get("/v1/endpoints/iris").status_code == 200


def test_developer_manages_endpoints_but_not_tokens_or_audit(platform, iris, tokens):
    with platform.client(tokens["developer"]) as c:
        r = c.post("/v1/endpoints", json={"name": "dev-ep", "target": "iris@champion"})
        assert r.status_code == 201 and r.json()["created_by"] == "developer-bot"
        assert c.delete("/v1/endpoints/dev-ep").status_code == 204
        assert c.get("/v1/audit").status_code == 403
        assert c.post("/v1/tokens", json={"name": "x", "role": "admin"}).status_code == 403


def test_admin_sees_who_did_what_and_revokes(platform, iris, tokens):
    with platform.client() as c:
        items = c.get("/v1/audit", params={"resource_type": "endpoint"}).json()["items"]
        assert ("endpoint.delete", "developer-bot") in {(i["action"], i["actor"]) for i in items}
        r = c.post("/v1/tokens", json={"name": "short-lived", "role": "predictor"})
        token_id, token = r.json()["id"], r.json()["token"]
        assert c.delete(f"/v1/tokens/{token_id}").status_code == 204
        _ = c.post("/v1/tokens", json={"name": "bad role", "role": "root"})
        assert _.status_code == 422
    import time

    time.sleep(platform.settings.auth.cache_ttl_s + 0.5)  # the gateway trusts a lookup this long
    with platform.client(token) as c:
        assert c.post("/v1/endpoints/iris/predict", json=GOOD).status_code == 401
