"""Serving ensembles as a fan-out (app.ensembles.serving) without Ray: real tiny ONNX members
(logistic regressions on iris) run by the in-process LocalPredictor, through the
EnsembleRunner alone and through the REST and V2 routes of the API. A member that never
answers is a caller that waits on an event nobody sets (the network's part, not our code)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.support import in_process_context

from app.api.app import create_app
from app.bootstrap import prepare
from app.ensembles.definition import (
    DEFINITION_TAG,
    ENSEMBLE_FORMAT,
    KIND_TAG,
    Combine,
    EnsembleDefinition,
    PinnedMember,
    Policy,
)
from app.ensembles.serving import EnsembleRunner, check_ensemble_target, predictor_caller, runs_in_gateway
from app.errors import Conflict, DependencyUnavailable, InvalidInput
from app.registry.mlflow_registry import ResolvedModel
from app.settings import load_settings

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
MEMBERS = ("ens-m1", "ens-m2", "ens-m3")
CS = (0.05, 1.0, 50.0)  # different regularisation: members that disagree a little


def _onnx_iris(c: float) -> bytes:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from app.onnx.sklearn_export import to_onnx

    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    return to_onnx(LogisticRegression(C=c, max_iter=1000).fit(X, y), X, True).SerializeToString()


def _definition(name: str, members: list[PinnedMember], **policy) -> EnsembleDefinition:
    return EnsembleDefinition(
        name=name, task="classification", method="voting", members=tuple(members), combine=Combine("soft_vote"),
        policy=Policy(**policy), classes=[0, 1, 2], n_features=4,
    )


def _ensemble_model(defn: EnsembleDefinition, version: str = "1") -> ResolvedModel:
    return ResolvedModel(defn.name, version, {KIND_TAG: "ensemble", DEFINITION_TAG: defn.to_json(),
                                              "matih.format": ENSEMBLE_FORMAT, "matih.task": "classification"})


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """The platform's API in this process with three iris members registered (v1 each), and an
    ensemble registered the way the registry stores one: an MLflow version whose tags hold the
    kind and the definition (soft voting of the three)."""
    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home))
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, jobs=None)
    client = TestClient(create_app(ctx))
    client.headers["Authorization"] = f"Bearer {prepared.admin_token}"
    for name, c in zip(MEMBERS, CS):
        r = client.post(f"/v1/models/{name}/versions", data={"format": "onnx"},
                        files={"file": ("model.onnx", _onnx_iris(c), "application/octet-stream")})
        assert r.status_code == 201, r.text
    return client, ctx


def _register_ensemble(ctx, defn: EnsembleDefinition) -> str:
    """An ensemble version straight in MLflow (what app.ensembles.registry.publish stores)."""
    mlflow = ctx.registry.client
    try:
        mlflow.create_registered_model(defn.name, tags={KIND_TAG: "ensemble"})
    except Exception:  # noqa: BLE001 - registered by an earlier test of the module
        pass
    tags = {KIND_TAG: "ensemble", DEFINITION_TAG: defn.to_json(), "matih.format": ENSEMBLE_FORMAT,
            "matih.formats": json.dumps([ENSEMBLE_FORMAT]), "matih.task": "classification",
            "matih.classes": json.dumps([0, 1, 2])}
    mv = mlflow.create_model_version(defn.name, source="ensemble-without-artifacts", tags=tags)
    ctx.registry.invalidate(defn.name)
    return str(mv.version)


def _members(**extra) -> list[PinnedMember]:
    return [PinnedMember(name, "1", **extra) for name in MEMBERS]


def _mean_probabilities(ctx, rows) -> np.ndarray:
    async def each():
        return await asyncio.gather(*(
            ctx.predictor.predict(ResolvedModel(n, "1"), {"instances": rows, "return_probabilities": True})
            for n in MEMBERS
        ))

    outs = asyncio.run(each())
    return np.mean([o["probabilities"] for o in outs], axis=0)


class _Gate:
    """A member caller over the LocalPredictor: each call first waits until ``width`` calls have
    started (so calls made one after another would never get past the first), and members named
    in ``silent`` never answer."""

    def __init__(self, predictor, width: int, silent: frozenset[str] = frozenset()):
        self.inner = predictor_caller(predictor)
        self.width = width
        self.silent = silent
        self.started = 0
        self.all_in = asyncio.Event()
        self.never = asyncio.Event()

    async def __call__(self, member: PinnedMember, payload):
        self.started += 1
        if self.started >= self.width:
            self.all_in.set()
        await self.all_in.wait()
        if member.name in self.silent:
            await self.never.wait()
        return await self.inner(member, payload)


def test_members_run_in_parallel_and_soft_voting_averages_them(api):
    _, ctx = api
    defn = _definition("ens-runner", _members())
    model = _ensemble_model(defn)

    async def go():
        gate = _Gate(ctx.predictor, width=3)
        # Sequential calls would hang on the gate and time out (a degraded or failed answer).
        runner = EnsembleRunner(gate, timeout_s=60)
        return await runner.run(model, {"instances": ROWS, "return_probabilities": True}, explain=True)

    out = asyncio.run(go())
    expected = _mean_probabilities(ctx, ROWS)
    assert "degraded" not in out
    np.testing.assert_allclose(out["probabilities"], expected, rtol=1e-5)
    assert out["predictions"] == expected.argmax(1).tolist()
    assert [m["model"] for m in out["members"]] == [f"{n}/1" for n in MEMBERS]
    for m in out["members"]:
        assert m["weight"] == 1.0 and m["latency_ms"] >= 0 and "error" not in m
        assert len(m["output"]["predictions"]) == len(ROWS)


def test_a_silent_member_past_its_timeout_leaves_a_degraded_quorum_answer(api):
    _, ctx = api
    defn = _definition("ens-quorum", _members(), min_members=2, member_timeout_s=0.5)

    async def go():
        runner = EnsembleRunner(_Gate(ctx.predictor, width=3, silent=frozenset({"ens-m3"})), timeout_s=60)
        return await runner.run(_ensemble_model(defn), {"instances": ROWS}, explain=True)

    out = asyncio.run(go())
    assert out["degraded"] is True
    assert out["failed"] == [{"model": "ens-m3/1", "error": "no answer within 0.5 s"}]
    assert "probabilities" not in out  # not asked for, though soft voting asked the members
    assert out["members"][2]["output"] is None and "0.5 s" in out["members"][2]["error"]
    # The quorum's answer is the soft vote of the two that answered.
    both = np.mean([m["output"]["probabilities"] for m in out["members"][:2]], axis=0)
    assert out["predictions"] == both.argmax(1).tolist()


def test_below_the_quorum_is_a_503_naming_the_members(api):
    _, ctx = api
    defn = _definition("ens-all", _members(), member_timeout_s=0.5)  # every member required

    async def go():
        runner = EnsembleRunner(_Gate(ctx.predictor, width=3, silent=frozenset({"ens-m2"})), timeout_s=60)
        return await runner.run(_ensemble_model(defn), {"instances": ROWS})

    with pytest.raises(DependencyUnavailable) as err:
        asyncio.run(go())
    assert "2 of 3 members answered, 3 needed" in err.value.message and "ens-m2/1" in err.value.message
    assert err.value.details["retry_after_s"] == 2 and err.value.details["quorum"] == 3


def test_a_bad_payload_is_the_callers_error_not_a_down_member(api):
    _, ctx = api
    defn = _definition("ens-bad", _members(), min_members=1)
    runner = EnsembleRunner(predictor_caller(ctx.predictor), timeout_s=60)
    with pytest.raises(InvalidInput) as err:
        asyncio.run(runner.run(_ensemble_model(defn), {"instances": [[1.0, 2.0]]}))
    assert "4" in err.value.message  # the member's own message: the width the model takes


def test_placement_follows_the_single_model_rule():
    onnx = _definition("e", _members())
    triton = _definition("e", [*_members(), PinnedMember("t", "1", runtime="triton")])
    gpu = _definition("e", [*_members()[:2], PinnedMember("g", "1", config={"device": "gpu"})])
    assert runs_in_gateway(onnx, None, True) and not runs_in_gateway(onnx, None, False)
    assert not runs_in_gateway(triton, None, True) and not runs_in_gateway(gpu, None, True)
    assert runs_in_gateway(triton, {"placement": "gateway"}, True)
    assert not runs_in_gateway(onnx, {"placement": "model_server"}, True)


def test_fused_needs_a_fused_graph():
    defn = _definition("e", _members())
    fanout_only = _ensemble_model(defn)
    fused = ResolvedModel("e", "2", {**fanout_only.tags, "matih.format": "onnx",
                                     "matih.formats": json.dumps(["onnx", "ensemble"])})
    with pytest.raises(InvalidInput) as err:
        check_ensemble_target(fanout_only, {"ensemble": "fused"})
    assert err.value.details["field"] == "config.ensemble"
    check_ensemble_target(fused, {"ensemble": "fused"})
    check_ensemble_target(fanout_only, None)
    with pytest.raises(InvalidInput):
        check_ensemble_target(ResolvedModel("plain", "1"), {"ensemble": "fused"})


def test_rest_endpoint_serves_the_ensemble_with_explain_and_degraded(api):
    client, ctx = api
    version = _register_ensemble(ctx, _definition("ens-rest", [*_members(), PinnedMember("ens-gone", "7")],
                                                  min_members=3))
    assert client.put("/v1/models/ens-rest/aliases/champion", json={"version": version}).status_code in (200, 201)
    r = client.post("/v1/endpoints", json={"name": "ens-rest", "target": "ens-rest@champion"})
    assert r.status_code == 201, r.text
    r = client.post("/v1/endpoints/ens-rest/predict?explain=members",
                    json={"instances": ROWS, "return_probabilities": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "ens-rest" and body["model_version"] == version
    assert body["degraded"] is True and [f["model"] for f in body["failed"]] == ["ens-gone/7"]
    np.testing.assert_allclose(body["probabilities"], _mean_probabilities(ctx, ROWS), rtol=1e-5)
    assert [m["model"] for m in body["members"]] == [*(f"{n}/1" for n in MEMBERS), "ens-gone/7"]
    assert "error" in body["members"][3]
    # the body field asks the same; without it no members
    r = client.post("/v1/endpoints/ens-rest/predict", json={"instances": ROWS, "explain": "members"})
    assert r.status_code == 200 and len(r.json()["members"]) == 4
    r = client.post("/v1/endpoints/ens-rest/predict", json={"instances": ROWS})
    assert r.status_code == 200 and "members" not in r.json() and "probabilities" not in r.json()
    assert client.post("/v1/endpoints/ens-rest/predict?explain=why", json={"instances": ROWS}).status_code == 422
    # a bad payload: the members' 422, not a 503
    r = client.post("/v1/endpoints/ens-rest/predict", json={"instances": [[1.0]]})
    assert r.status_code == 422, r.text
    # fused asked of a version without a fused graph: 422 when the endpoint is changed
    r = client.put("/v1/endpoints/ens-rest", json={"config": {"ensemble": "fused"}})
    assert r.status_code == 422 and "fused" in r.text, r.text


def test_below_quorum_over_rest_is_503_with_retry_after(api):
    client, ctx = api
    version = _register_ensemble(ctx, _definition("ens-strict", [*_members()[:2], PinnedMember("ens-gone", "7")]))
    r = client.post("/v1/endpoints", json={"name": "ens-strict", "target": f"ens-strict/{version}"})
    assert r.status_code == 201, r.text
    r = client.post("/v1/endpoints/ens-strict/predict", json={"instances": ROWS})
    assert r.status_code == 503, r.text
    assert "ens-gone/7" in r.json()["error"] and r.headers.get("retry-after")


def test_v2_infer_on_an_ensemble_name(api):
    client, ctx = api
    version = _register_ensemble(ctx, _definition("ens-v2", _members()))
    assert client.put("/v1/models/ens-v2/aliases/champion", json={"version": version}).status_code in (200, 201)
    req = {"inputs": [{"name": "X", "shape": [3, 4], "datatype": "FP32", "data": ROWS}],
           "parameters": {"explain": "members"}}
    r = client.post("/v2/models/ens-v2/infer", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    outs = {o["name"]: o for o in body["outputs"]}
    expected = _mean_probabilities(ctx, ROWS)
    np.testing.assert_allclose(np.reshape(outs["probabilities"]["data"], (3, 3)), expected, rtol=1e-5)
    assert outs["label"]["data"] == expected.argmax(1).tolist()
    members = json.loads(body["parameters"]["members"])
    assert [m["model"] for m in members] == [f"{n}/1" for n in MEMBERS]
    assert "degraded" not in body["parameters"]
    req["parameters"] = {"explain": "everything"}
    assert client.post("/v2/models/ens-v2/infer", json=req).status_code == 400


def test_a_plain_load_of_an_ensemble_without_fused_graph_is_409(api):
    from app.serving.routing import _combine_of

    model = _ensemble_model(_definition("e", _members()))
    with pytest.raises(Conflict) as err:
        _combine_of(model, {"ensemble": "fused"})
    assert "fanout" in err.value.message
    assert _combine_of(model, None) == "ensemble"
