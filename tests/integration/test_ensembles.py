"""Ensembles on the real platform (Ray + Serve over HTTP, jobs as Ray Jobs), made and promoted
through the product's API only (POST /v1/ensembles, the registry's alias route):

* a soft vote of three iris classifiers, served through an endpoint in both placements (the
  Gateway's own fan-out and the Ensemble deployment's) with explain=members, over V2 infer with
  ``parameters.explain``, and fused against fan-out (the registry stored the fused graph);
* a member that never answers (a triton member pointing at a TCP server that accepts
  connections and stays silent, created through the API like any member) under a quorum of 2
  of 3 (degraded answer) and under "all required" (503); that ensemble has no fused graph, so
  an endpoint asking for ``fused`` is refused;
* the trained path through the JobScheduler: three breast-cancer members trained by training
  jobs, a stacking job (out-of-fold folds without leakage, beats its best member), served by
  fan-out (the meta-learner's combiner.onnx fetched through the RegistryCache) and fused, both
  equal to the same ensemble computed in this process by LocalEnsemble from the registry's ONNX;
  a bagging job whose members trained as parallel Ray tasks, served by fan-out;
* a second version of a voting ensemble (a changed member list) that gets ``challenger``; an
  endpoint on ``<ensemble>@champion`` serves version 1 until the champion alias is moved to 2.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
EXTRA = {"ens-lr-a": 0.05, "ens-lr-b": 50.0}  # two more iris members beside the trained champion
BC = {"uri": "builtin://breast_cancer", "target": "target", "split": {"test_size": 0.3, "seed": 42}}
# Weak members that err differently (tests/unit/test_ensemble_training.py: stacking them beats the best)
BC_MEMBERS = {"bc-stump": ("sklearn.tree.DecisionTreeClassifier", {"max_depth": 1, "random_state": 0}),
              "bc-tree2": ("sklearn.tree.DecisionTreeClassifier", {"max_depth": 2, "random_state": 0}),
              "bc-knn5": ("sklearn.neighbors.KNeighborsClassifier", {"n_neighbors": 5})}


def _onnx_iris(c: float) -> bytes:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from app.onnx.sklearn_export import to_onnx

    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    return to_onnx(LogisticRegression(C=c, max_iter=1000).fit(X, y), X, True).SerializeToString()


class SilentServer:
    """A TCP server that accepts connections and never answers: a member whose server hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        """Kill it: the listening socket is shut (a blocked accept returns, new connections are
        refused) and the connections it holds are reset."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            c.close()


def _create(c, name: str, members: list[dict], **fields) -> dict:
    """POST /v1/ensembles (voting unless ``method`` says otherwise): 201 with a new version, 200 with
    the latest when its pins and definition are the same."""
    body = {"name": name, "task": "classification", "method": "voting", "voting": "soft", "members": members,
            **fields}
    r = c.post("/v1/ensembles", json=body)
    assert r.status_code == (201 if r.json().get("created", True) else 200), r.text
    return r.json()


def _mean_probabilities(c, targets: list[str]) -> np.ndarray:
    """The soft vote computed by the test from each member's own V2 answer."""
    outs = []
    for t in targets:
        name, version = t.split("/")
        r = c.post(f"/v2/models/{name}/versions/{version}/infer",
                   json={"inputs": [{"name": "X", "datatype": "FP32", "shape": [3, 4], "data": ROWS}]})
        assert r.status_code == 200, r.text
        outs.append(np.reshape({o["name"]: o["data"] for o in r.json()["outputs"]}["probabilities"], (3, 3)))
    return np.mean(outs, axis=0)


def _endpoint(c, name: str, target: str, **config) -> None:
    r = c.post("/v1/endpoints", json={"name": name, "target": target, "config": config})
    assert r.status_code == 201, r.text


def _predict(c, endpoint: str, rows, explain: bool = False) -> dict:
    r = c.post(f"/v1/endpoints/{endpoint}/predict" + ("?explain=members" if explain else ""),
               json={"instances": rows, "return_probabilities": True})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def members(platform, iris) -> list[str]:
    """Three ONNX iris members, pinned targets: the champion of the session's iris job and two uploads."""
    with platform.client() as c:
        for name, cval in EXTRA.items():
            r = c.post(f"/v1/models/{name}/versions", files={"file": ("model.onnx", _onnx_iris(cval))},
                       data={"format": "onnx", "classes": "[0, 1, 2]"})  # members of an ensemble name their classes
            assert r.status_code == 201, r.text
        champion = c.get("/v1/endpoints/iris").json()["model_version"]
    return [f"iris/{champion}", *(f"{n}/1" for n in EXTRA)]


@pytest.fixture(scope="module")
def vote(platform, members) -> dict:
    """The soft vote of the three members: version 1, champion, with a fused graph (all ONNX)."""
    with platform.client() as c:
        out = _create(c, "ens-vote", [{"model": m} for m in members])
    assert out["model_version"] == "1" and out["aliases"] == ["champion"] and out["created"] is True
    assert [f"{m['name']}/{m['version']}" for m in out["definition"]["members"]] == members
    assert out["fused"] is True, out.get("fused_note")
    return out


@pytest.fixture(scope="module")
def hung(platform, members):
    """Two ensembles of the first two members and a triton member whose server never answers:
    one with a quorum of 2, one needing all three. Created through POST /v1/ensembles: the
    triton member is pinned like any other (its width read from its version's signature)."""
    server = SilentServer()
    triton = {"model": members[0], "runtime": "triton",
              "config": {"url": f"127.0.0.1:{server.port}", "model_name": "iris", "timeout_s": 2}}
    three = [{"model": m} for m in members[1:]] + [triton]
    with platform.client() as c:
        quorum = _create(c, "ens-quorum", three, policy={"min_members": 2, "member_timeout_s": 3})
        strict = _create(c, "ens-strict", three, policy={"member_timeout_s": 3})
    for out in (quorum, strict):
        assert out["definition"]["members"][2]["runtime"] == "triton" and out["fused"] is False
    yield {"members": members[1:], "failed": f"triton:{members[0]}", "server": server}
    server.close()


@pytest.mark.parametrize("placement", ["gateway", "model_server"])
def test_a_voting_ensemble_served_through_an_endpoint(platform, members, vote, placement):
    name = f"ens-vote-{placement.replace('_', '-')}"
    with platform.client() as c:
        _endpoint(c, name, "ens-vote/1", placement=placement)
        expected = _mean_probabilities(c, members)
        body = _predict(c, name, ROWS, explain=True)
        assert body["model"] == "ens-vote" and body["model_version"] == "1" and "degraded" not in body
        np.testing.assert_allclose(body["probabilities"], expected, rtol=1e-5)
        assert body["predictions"] == expected.argmax(1).tolist()
        assert [m["model"] for m in body["members"]] == members
        assert all(m["latency_ms"] >= 0 and len(m["output"]["probabilities"]) == 3 for m in body["members"])
        # a bad payload: the members' 422, whichever process fanned out
        r = c.post(f"/v1/endpoints/{name}/predict", json={"instances": [[1.0, 2.0]]})
        assert r.status_code == 422 and "the model takes 4" in r.json()["error"], r.text


def test_v2_infer_on_an_ensemble_name(platform, members, vote):
    """No endpoint: /v2/models/ens-vote serves ens-vote@champion, members explained in parameters."""
    with platform.client() as c:
        expected = _mean_probabilities(c, members)
        r = c.post("/v2/models/ens-vote/infer", json={
            "inputs": [{"name": "X", "datatype": "FP32", "shape": [3, 4], "data": ROWS}],
            "parameters": {"explain": "members"}})
        assert r.status_code == 200, r.text
        out = {o["name"]: o["data"] for o in r.json()["outputs"]}
        np.testing.assert_allclose(np.reshape(out["probabilities"], (3, 3)), expected, rtol=1e-5)
        assert out["label"] == expected.argmax(1).tolist()
        assert [m["model"] for m in json.loads(r.json()["parameters"]["members"])] == members


def test_fused_and_fanout_give_the_same_answers(platform, vote):
    with platform.client() as c:
        for mode in ("fanout", "fused"):
            _endpoint(c, f"ens-vote-{mode}", "ens-vote@champion", ensemble=mode)
        fanout = _predict(c, "ens-vote-fanout", ROWS, explain=True)
        fused = _predict(c, "ens-vote-fused", ROWS)
    assert len(fanout["members"]) == 3 and "members" not in fused  # the fused graph is one model call
    assert fused["model_version"] == fanout["model_version"] == "1"
    assert fused["predictions"] == fanout["predictions"]
    np.testing.assert_allclose(fused["probabilities"], fanout["probabilities"], atol=1e-5)


@pytest.mark.parametrize("placement", ["gateway", "model_server"])
def test_a_member_that_never_answers(platform, hung, placement):
    """With a quorum of 2 the answer comes from the other two, marked degraded; with every
    member required, 503 naming the hung member."""
    tag = placement.replace("_", "-")
    with platform.client() as c:
        for name in ("ens-quorum", "ens-strict"):
            _endpoint(c, f"{name}-{tag}", f"{name}/1", placement=placement)
        expected = _mean_probabilities(c, hung["members"])
        body = _predict(c, f"ens-quorum-{tag}", ROWS)
        assert body["degraded"] is True and [f["model"] for f in body["failed"]] == [hung["failed"]]
        np.testing.assert_allclose(body["probabilities"], expected, rtol=1e-5)
        r = c.post(f"/v1/endpoints/ens-strict-{tag}/predict", json={"instances": ROWS})
        assert r.status_code == 503, r.text
        assert hung["failed"] in r.json()["error"] and r.headers.get("retry-after")


def test_a_member_whose_server_was_killed(platform, hung):
    """The hung member's server is killed (after the test above): its connections are refused,
    so the member fails at once rather than timing out, and the quorum still answers, degraded;
    with every member required, 503."""
    hung["server"].close()
    with platform.client() as c:
        for name in ("ens-quorum", "ens-strict"):
            _endpoint(c, f"{name}-killed", f"{name}/1")
        body = _predict(c, "ens-quorum-killed", ROWS)
        assert body["degraded"] is True and [f["model"] for f in body["failed"]] == [hung["failed"]]
        assert "no answer within" not in body["failed"][0]["error"], body["failed"]  # refused, not timed out
        np.testing.assert_allclose(body["probabilities"], _mean_probabilities(c, hung["members"]), rtol=1e-5)
        r = c.post("/v1/endpoints/ens-strict-killed/predict", json={"instances": ROWS})
        assert r.status_code == 503 and hung["failed"] in r.json()["error"], r.text


def test_fused_is_refused_for_an_ensemble_without_a_fused_graph(platform, hung):
    with platform.client() as c:
        r = c.post("/v1/endpoints", json={"name": "ens-nofuse", "target": "ens-strict/1",
                                          "config": {"ensemble": "fused"}})
    assert r.status_code == 422 and r.json()["details"]["field"] == "config.ensemble", r.text


# --- the trained path: jobs through the JobScheduler (Ray Jobs) ---------------------------------

@pytest.fixture(scope="module")
def trained(platform) -> dict:
    """Three breast-cancer members trained by training jobs side by side (a quarter CPU each; the
    integration platform runs three jobs at once), then a stacking job over them and a bagging
    job, queued together."""
    jobs = {}
    with platform.client() as c:
        for name, (est, hp) in BC_MEMBERS.items():
            r = c.post("/v1/training/jobs", json={"name": name, "estimator": est, "hyperparameters": hp,
                                                  "dataset": BC, "register_as": name,
                                                  "resources": {"cpus_per_worker": 0.25}})
            assert r.status_code == 202, r.text
            jobs[name] = r.json()["job_id"]
        for name in BC_MEMBERS:
            job = platform.wait_job(jobs[name])
            assert job["status"] == "succeeded", (job["error"], job.get("logs"))
        r = c.post("/v1/ensembles", json={
            "name": "bc-stack", "task": "classification", "method": "stacking", "dataset": BC,
            "members": [{"model": f"{n}@champion"} for n in BC_MEMBERS]})
        assert r.status_code == 202, r.text
        assert [m["version"] for m in r.json()["members"]] == ["1", "1", "1"]  # pinned before the job runs
        stack = r.json()["job_id"]
        r = c.post("/v1/ensembles", json={
            "name": "bc-bag", "task": "classification", "method": "bagging", "dataset": BC, "n_estimators": 4,
            "resources": {"cpus_per_member": 0.25},
            "base": {"estimator": "sklearn.tree.DecisionTreeClassifier", "hyperparameters": {"max_depth": 3}}})
        assert r.status_code == 202, r.text
        bag = r.json()["job_id"]
    out = {}
    for name, job_id in (("stacking", stack), ("bagging", bag)):
        job = platform.wait_job(job_id, timeout=300)
        assert job["status"] == "succeeded", (job["error"], job.get("logs"))
        out[name] = job["result"]
    return out


def _bc_rows() -> np.ndarray:
    from sklearn.datasets import load_breast_cancer

    X, _ = load_breast_cancer(return_X_y=True)
    return X[::19].astype(np.float32)  # 30 rows, both classes


def _local_answer(platform, result: dict, X: np.ndarray, tmp_path) -> dict:
    """The ensemble computed in this process from the registry's artifacts: the members' ONNX
    and the version's combiner.onnx (downloaded from each version's source), combined by
    LocalEnsemble."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    from app.ensembles.definition import COMBINER_FILE, EnsembleDefinition
    from app.ensembles.local import LocalEnsemble
    from app.runtimes.onnx import find_onnx_file

    client = MlflowClient(platform.mlflow.uri, platform.mlflow.uri)

    def files(name: str, version: str):
        from pathlib import Path

        dest = tmp_path / f"{name}-{version}"
        uri = client.get_model_version_download_uri(name, version)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest),
                                                        tracking_uri=platform.mlflow.uri))

    defn = EnsembleDefinition.from_dict(result["definition"])
    models = [find_onnx_file(files(m.name, m.version)).read_bytes() for m in defn.members]
    combiner = next(files(result["model_name"], result["model_version"]).rglob(COMBINER_FILE)).read_bytes()
    return LocalEnsemble(defn, models, combiner).predict(X)


def test_a_stacking_ensemble_trained_by_a_job_and_served(platform, trained, tmp_path):
    from app.ensembles.learners import check_no_leakage

    res = trained["stacking"]
    assert res["method"] == "stacking" and res["model_version"] == "1" and res["aliases"] == ["champion"]
    check_no_leakage(res["folds"], sum(len(f["held_out"]) for f in res["folds"]))
    assert len(res["folds"]) == 5
    # expected on breast cancer with these members (tests/unit/test_ensemble_training.py)
    assert res["beats_best_member"] is True and res["fused"] is True, res.get("fused_note")
    best = max(m["accuracy"] for m in res["member_metrics"])
    assert res["metrics"]["accuracy"] > best
    with platform.client() as c:
        ens = c.get("/v1/ensembles/bc-stack").json()
        assert ens["current_version"] == "1" and ens["aliases"] == {"champion": "1"}
        v1 = ens["versions"][0]
        assert v1["method"] == "stacking" and v1["combine"] == "meta" and v1["beats_best_member"] is True
        assert [(m["name"], m["version"]) for m in v1["members"]] == [(n, "1") for n in BC_MEMBERS]
        np.testing.assert_allclose([m["metrics"]["accuracy"] for m in v1["members"]],  # the tag keeps 6 digits
                                   [m["accuracy"] for m in res["member_metrics"]], rtol=1e-5)
        card = c.get("/v1/models/bc-stack/versions/1/card").json()["ensemble"]
        assert card["beats_best_member"] is True and card["method"] == "stacking"
        assert all(m["metrics"] for m in card["members"])

        X = _bc_rows()
        _endpoint(c, "bc-stack", "bc-stack@champion", ensemble="fanout")
        _endpoint(c, "bc-stack-fused", "bc-stack@champion", ensemble="fused")
        fanout = _predict(c, "bc-stack", X.tolist(), explain=True)
        fused = _predict(c, "bc-stack-fused", X.tolist())
    assert [m["model"] for m in fanout["members"]] == [f"{n}/1" for n in BC_MEMBERS]
    local = _local_answer(platform, res, X, tmp_path)
    assert fanout["predictions"] == fused["predictions"] == np.asarray(local["predictions"]).tolist()
    assert len(set(fanout["predictions"])) == 2
    np.testing.assert_allclose(fanout["probabilities"], local["probabilities"], atol=1e-5)
    np.testing.assert_allclose(fused["probabilities"], local["probabilities"], atol=1e-4)


def test_a_bagging_ensemble_trained_as_parallel_tasks_and_served(platform, trained):
    res = trained["bagging"]
    assert res["method"] == "bagging" and res["model_version"] == "1" and res["parallel"] is True
    assert sorted(t["member"] for t in res["tasks"]) == [0, 1, 2, 3]
    assert all(t["end"] >= t["start"] and t["unique_rows"] > 0 for t in res["tasks"])
    assert [m["name"] for m in res["definition"]["members"]] == ["bc-bag-members"] * 4
    with platform.client() as c:
        _endpoint(c, "bc-bag", "bc-bag@champion")
        body = _predict(c, "bc-bag", _bc_rows().tolist(), explain=True)
    assert body["model_version"] == "1" and len(body["members"]) == 4
    mean = np.mean([m["output"]["probabilities"] for m in body["members"]], axis=0)  # equal weights
    np.testing.assert_allclose(body["probabilities"], mean, rtol=1e-5)
    assert body["predictions"] == mean.argmax(1).tolist()


# --- a new version promoted through aliases ------------------------------------------------------

def test_an_ensemble_version_promoted_through_aliases(platform, members):
    """A changed member list makes version 2 (challenger); the endpoint on @champion keeps
    version 1 until the champion alias moves, then serves 2 (the change feed pushes the move)."""
    with platform.client() as c:
        v1 = _create(c, "ens-promote", [{"model": m} for m in members[:2]])
        assert (v1["model_version"], v1["aliases"]) == ("1", ["champion"])
        _endpoint(c, "ens-promote", "ens-promote@champion")
        v2 = _create(c, "ens-promote", [{"model": m} for m in members])
        assert (v2["model_version"], v2["aliases"], v2["created"]) == ("2", ["challenger"], True)
        again = _create(c, "ens-promote", [{"model": m} for m in members])  # same pins: no new version
        assert (again["model_version"], again["created"]) == ("2", False)

        body = _predict(c, "ens-promote", ROWS, explain=True)
        assert body["model_version"] == "1" and [m["model"] for m in body["members"]] == members[:2]
        r = c.put("/v1/models/ens-promote/aliases/champion", json={"version": "2"})
        assert r.status_code == 200 and r.json()["previous_version"] == "1", r.text
        deadline = time.monotonic() + 30
        while body["model_version"] != "2" and time.monotonic() < deadline:
            time.sleep(0.5)
            body = _predict(c, "ens-promote", ROWS, explain=True)
        assert body["model_version"] == "2" and [m["model"] for m in body["members"]] == members
        np.testing.assert_allclose(body["probabilities"], _mean_probabilities(c, members), rtol=1e-5)
        assert c.get("/v1/ensembles/ens-promote").json()["current_version"] == "2"
