"""A training job's registration survives a crash at any point: one ``create_model_version``
carries every ``matih.*`` tag, the version is found by its job id before anything is created,
and the alias step is repeatable. Real MLflow (SQLite); the crash is an MlflowClient that
dies at one call, before or after MLflow did the work."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from app.registry.mlflow_registry import TAG_FORMAT, TAG_JOB, TAG_VALIDATION
from app.training.pipeline import register_version

TAGS = {TAG_FORMAT: "onnx", TAG_VALIDATION: "passed", "matih.task": "regression", "matih.feature_names": '["x"]'}


class Crash(BaseException):
    """The process dies here (not an Exception: nothing may catch it)."""


class CrashingClient(MlflowClient):
    def __init__(self, uri: str, method: str, after: bool):
        super().__init__(uri, uri)
        self._method, self._after = method, after

    def __getattribute__(self, attr):
        value = super().__getattribute__(attr)
        if attr != super().__getattribute__("_method"):
            return value

        def dying(*args, **kwargs):
            if not self._after:
                raise Crash(f"before {attr}")
            value(*args, **kwargs)
            raise Crash(f"after {attr}")

        return dying


@pytest.fixture(scope="module")
def mlflow_with_a_model(tmp_path_factory):
    """An MLflow on SQLite and one logged ONNX model (a 1-input identity graph)."""
    import mlflow
    import mlflow.onnx
    import onnx
    from onnx import TensorProto, helper

    tmp_path = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    with mlflow.start_run(experiment_id=exp) as run:
        info = mlflow.onnx.log_model(model, name="model")
    return uri, run.info.run_id, info.model_id


@pytest.fixture
def logged(mlflow_with_a_model, request):
    """(uri, run id, model id, a model name of this test's own)."""
    return (*mlflow_with_a_model, "m-" + request.node.name.split("[")[-1].rstrip("]").replace("-", "_"))


def _register(client, run_id, model_id, name, job="job-1"):
    return register_version(client, name, job, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
                            tags=TAGS, alias_on_pass="challenger")


def _check_one_full_version(uri, name, job="job-1", alias="champion"):
    c = MlflowClient(uri, uri)
    mine = [mv for mv in c.search_model_versions(f"name = '{name}'") if (mv.tags or {}).get(TAG_JOB) == job]
    assert len(mine) == 1
    [mv] = mine
    assert {**TAGS, TAG_JOB: job}.items() <= dict(mv.tags).items()
    assert str(c.get_model_version_by_alias(name, alias).version) == str(mv.version)
    return str(mv.version)


@pytest.mark.parametrize(
    ("method", "after"),
    [
        ("create_registered_model", False),
        ("create_registered_model", True),
        ("create_model_version", False),
        ("create_model_version", True),  # MLflow made the version; the job never heard back
        ("set_registered_model_alias", False),
        ("set_registered_model_alias", True),
    ],
)
def test_a_retry_after_a_crash_yields_one_fully_tagged_version(logged, method, after):
    uri, run_id, model_id, name = logged
    with pytest.raises(Crash):
        _register(CrashingClient(uri, method, after), run_id, model_id, name)
    c = MlflowClient(uri, uri)
    if method == "create_model_version" and after or method == "set_registered_model_alias":
        # what a crash leaves: a version with every tag, or none at all; never one half tagged
        [mv] = c.search_model_versions(f"name = '{name}'")
        assert {**TAGS, TAG_JOB: "job-1"}.items() <= dict(mv.tags).items()
    version, alias = _register(c, run_id, model_id, name)  # the retry
    assert alias == "champion"
    assert _check_one_full_version(uri, name) == version
    assert _register(c, run_id, model_id, name) == (version, alias)  # and again: nothing changes


def test_a_later_job_takes_the_challenger_alias_and_keeps_it_on_retry(logged):
    uri, run_id, model_id, name = logged
    c = MlflowClient(uri, uri)
    assert _register(c, run_id, model_id, name, job="job-1") == ("1", "champion")
    with pytest.raises(Crash):
        _register(CrashingClient(uri, "set_registered_model_alias", True), run_id, model_id, name, job="job-2")
    assert _register(c, run_id, model_id, name, job="job-2") == ("2", "challenger")
    _check_one_full_version(uri, name, "job-2", "challenger")
    assert str(c.get_model_version_by_alias(name, "champion").version) == "1"
