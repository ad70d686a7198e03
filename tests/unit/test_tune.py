"""Ray Tune searches: the search-space grammar, the schedulers, the scikit-learn trial
function in-process, and one real search (8 trials, ASHA, iris) on a Ray cluster this module
starts, with every trial an MLflow child run on a real MLflow server."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from pydantic import ValidationError

from app.errors import InvalidInput
from app.training.spec import SearchDim, TrainingJobSpec, TuneSpec
from app.training.tune import (
    STOPPED_EARLY,
    TAG_PARENT_RUN,
    TAG_TRIAL,
    TERMINATED,
    make_scheduler,
    max_reports,
    run_search,
    search_space,
    sklearn_trial_fn,
    trials_total,
)

LOGREG = "sklearn.linear_model.LogisticRegression"


def _spec(tune: dict, **extra) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate(
        {
            "name": "iris-search",
            "estimator": LOGREG,
            "hyperparameters": {"max_iter": 300},
            "dataset": {"uri": "builtin://iris", "target": "target"},
            "tune": tune,
            **extra,
        }
    )


# -- the grammar -----------------------------------------------------------------------------
def test_each_kind_becomes_its_tune_domain():
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Uniform

    space = search_space(
        {
            "a": SearchDim(uniform=[0.1, 0.9]),
            "b": SearchDim(loguniform=[1e-3, 10]),
            "c": SearchDim(choice=["x", "y"]),
            "d": SearchDim(randint=[1, 5]),
            "e": SearchDim(grid=[1, 2, 3]),
        }
    )
    assert isinstance(space["a"], Float) and isinstance(space["a"].get_sampler(), Uniform)
    assert (space["a"].lower, space["a"].upper) == (0.1, 0.9)
    assert isinstance(space["b"], Float) and isinstance(space["b"].get_sampler(), LogUniform)
    assert (space["b"].lower, space["b"].upper) == (1e-3, 10)
    assert isinstance(space["c"], Categorical) and space["c"].categories == ["x", "y"]
    assert isinstance(space["d"], Integer) and (space["d"].lower, space["d"].upper) == (1, 5)
    assert space["e"] == {"grid_search": [1, 2, 3]}
    for _ in range(50):  # randint is [low, high)
        assert 1 <= space["d"].sample() < 5
        assert 1e-3 <= space["b"].sample() <= 10


def test_plain_dicts_are_read_with_the_same_grammar():
    assert search_space({"n": {"grid": [10, 20]}}) == {"n": {"grid_search": [10, 20]}}


def test_grids_expand_into_every_combination_times_num_samples():
    from ray.tune.search.variant_generator import generate_variants

    spec = TuneSpec(search_space={"C": {"grid": [0.1, 1, 10]}, "solver": {"grid": ["lbfgs", "saga"]},
                                  "tol": {"loguniform": [1e-5, 1e-3]}}, num_samples=2)
    variants = [cfg for _, cfg in generate_variants(search_space(spec.search_space))]
    assert len(variants) == 6
    assert {(v["C"], v["solver"]) for v in variants} == {(c, s) for c in (0.1, 1, 10) for s in ("lbfgs", "saga")}
    assert trials_total(spec) == 12


@pytest.mark.parametrize(
    "dim, words",
    [
        ({"uniform": [1.0, 0.5]}, "uniform: low must be < high"),
        ({"loguniform": [0, 1]}, "loguniform: low must be > 0"),
        ({"randint": [3, 3]}, "randint: low must be < high"),
        ({"uniform": [1.0]}, "uniform"),
        ({"choice": []}, "choice"),
        ({"grid": []}, "grid"),
        ({"uniform": [0, 1], "choice": [1]}, "exactly one of"),
        ({}, "exactly one of"),
        ({"normal": [0, 1]}, "normal"),
    ],
)
def test_invalid_dimensions_are_refused_naming_the_kind(dim, words):
    with pytest.raises(ValidationError) as info:
        TuneSpec(search_space={"C": dim})
    assert words in str(info.value)


# -- schedulers ------------------------------------------------------------------------------
def test_make_scheduler_for_each_name():
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, PopulationBasedTraining

    space = {"C": {"loguniform": [0.01, 10]}, "solver": {"choice": ["lbfgs", "saga"]},
             "n": {"randint": [1, 4]}, "g": {"grid": [1, 2]}}
    assert make_scheduler(TuneSpec(search_space=space), 10) is None
    asha = make_scheduler(TuneSpec(search_space=space, scheduler="asha"), 10)
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "training_iteration" and asha._max_t == 10
    median = make_scheduler(TuneSpec(search_space=space, scheduler="median"), 10)
    assert isinstance(median, MedianStoppingRule)
    pbt = make_scheduler(TuneSpec(search_space=space, scheduler="pbt"), 10)
    assert isinstance(pbt, PopulationBasedTraining) and pbt._time_attr == "training_iteration"
    assert set(pbt._hyperparam_mutations) == {"C", "solver"}  # randint and grid are not mutated


def test_pbt_without_a_mutable_dimension_is_refused():
    with pytest.raises(InvalidInput, match="pbt.*uniform, loguniform or choice"):
        make_scheduler(TuneSpec(search_space={"n": {"randint": [1, 4]}}, scheduler="pbt"), 4)


def test_max_reports_counts_epochs_for_torch_and_one_fit_for_sklearn():
    assert max_reports(_spec({"search_space": {"C": {"loguniform": [0.01, 10]}}})) == 1
    torch = TrainingJobSpec.model_validate(
        {"name": "t", "framework": "torch", "hyperparameters": {"epochs": 3},
         "dataset": {"uri": "builtin://iris", "target": "target"},
         "tune": {"search_space": {"epochs": {"choice": [2, 8]}, "lr": {"loguniform": [1e-3, 1e-1]}}}}
    )
    assert max_reports(torch) == 8


# -- the scikit-learn trial function, in this process ----------------------------------------
@pytest.fixture(scope="module")
def iris_data():
    from app.training.data import prepare_data

    return prepare_data("builtin://iris", "target", None, test_size=0.2, seed=42)


def test_sklearn_trial_reports_once_and_returns_the_holdout_metrics(iris_data, tmp_path):
    from app.settings import load_settings

    settings = load_settings("local", matih_home=str(tmp_path))
    fn = sklearn_trial_fn(_spec({"search_space": {"C": {"loguniform": [0.01, 10]}}}), iris_data, settings)
    reports: list[dict] = []
    final = fn({"C": 1.0}, reports.append)
    assert reports == [final]
    assert set(final) == {"accuracy", "f1", "roc_auc", "log_loss"} and final["accuracy"] > 0.9


def test_sklearn_trial_refuses_a_metric_of_the_other_task(iris_data, tmp_path):
    from app.settings import load_settings

    settings = load_settings("local", matih_home=str(tmp_path))
    with pytest.raises(InvalidInput, match="'rmse' is not a classification metric"):
        sklearn_trial_fn(_spec({"search_space": {"C": {"uniform": [0.1, 1]}}, "metric": "rmse", "mode": "min"}),
                         iris_data, settings)


# -- a real search ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real MLflow server, then a Ray cluster of this module's own (one after the other:
    starting both at once on a busy 2-core machine can time Ray's start-up out)."""
    import ray

    from tests.support import MlflowServer, start_local_ray

    server = MlflowServer(tmp_path_factory.mktemp("tune_mlflow"))
    server.start(timeout=240)  # a loaded 2-core machine takes a while to import the server
    try:
        start_local_ray(2)
        yield server
    finally:
        ray.shutdown()
        try:
            server.stop()
        except subprocess.TimeoutExpired:  # a busy machine: no more waiting on a graceful stop
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


def test_asha_search_on_iris_logs_every_trial_as_a_child_run(cluster, iris_data, tmp_path):
    from mlflow import MlflowClient

    from app.registry.mlflow_registry import ensure_experiment
    from app.settings import load_settings
    from app.store import MetadataStore

    settings = load_settings("local", matih_home=str(tmp_path / "home"), mlflow_tracking_uri=cluster.uri)
    store = MetadataStore(settings.database_url)
    store.migrate()
    spec = _spec(
        {"search_space": {"C": {"loguniform": [0.001, 10]}}, "num_samples": 8, "metric": "accuracy",
         "mode": "max", "scheduler": "asha", "max_concurrent": 2, "cpus_per_trial": 0.5}
    )
    job = store.create_job("training", spec.name, spec.model_dump(mode="json"), "test")
    client = MlflowClient(cluster.uri)
    parent = client.create_run(ensure_experiment(client, settings), run_name=spec.name).info.run_id

    started = time.monotonic()
    outcome = run_search(spec, settings, job["job_id"], parent, sklearn_trial_fn(spec, iris_data, settings),
                         str(tmp_path / "ray_results"))
    took = time.monotonic() - started

    assert len(outcome.trials) == 8
    assert {t["status"] for t in outcome.trials} <= {TERMINATED, STOPPED_EARLY}
    finished = [t for t in outcome.trials if t["status"] == TERMINATED]
    assert finished, outcome.trials
    assert outcome.best_metrics["accuracy"] == max(t["metrics"]["accuracy"] for t in finished)
    assert outcome.best_metrics["accuracy"] >= 0.9
    assert 0.001 <= outcome.best_config["C"] <= 10 and set(outcome.best_config) == {"C"}
    assert outcome.best_trial_id in {t["trial_id"] for t in finished}
    for trial in outcome.trials:
        assert set(trial["metrics"]) == {"accuracy", "f1", "roc_auc", "log_loss"}

    runs = client.search_runs([ensure_experiment(client, settings)], f"tags.`{TAG_PARENT_RUN}` = '{parent}'")
    assert len(runs) == 8
    by_id = {r.info.run_id: r for r in runs}
    assert {t["mlflow_run_id"] for t in outcome.trials} == set(by_id)
    for trial in outcome.trials:
        run = by_id[trial["mlflow_run_id"]]
        assert run.data.tags[TAG_TRIAL] == trial["trial_id"]
        assert run.data.tags["matih.job_id"] == job["job_id"]
        assert run.info.run_name.startswith("trial-")
        assert float(run.data.params["C"]) == pytest.approx(trial["config"]["C"])
        assert run.data.metrics["accuracy"] == pytest.approx(trial["metrics"]["accuracy"])
        assert run.info.status == ("FINISHED" if trial["status"] == TERMINATED else "KILLED")
    assert len({r.info.run_name for r in runs}) == 8

    progress = store.get_job(job["job_id"], with_logs=True)
    assert progress["progress"] == {"stage": "tuning", "trials_done": 8, "trials_total": 8}
    assert progress["logs"].count("trial-") == 8
    assert (tmp_path / "ray_results" / f"{job['job_id']}-tune").is_dir()
    store.dispose()
    print(f"8-trial ASHA search: {took:.1f}s")


def test_a_failing_trial_is_reported_and_no_runs_are_made_without_a_parent(cluster, iris_data, tmp_path):
    from app.settings import load_settings
    from app.training.tune import ERROR

    settings = load_settings("local", matih_home=str(tmp_path / "home"), mlflow_tracking_uri=cluster.uri)
    spec = _spec({"search_space": {"C": {"grid": [1.0, -1.0]}}, "num_samples": 1, "max_concurrent": 2})
    outcome = run_search(spec, settings, "job-no-parent", None, sklearn_trial_fn(spec, iris_data, settings),
                         str(tmp_path / "ray_results"))

    by_c = {t["config"]["C"]: t for t in outcome.trials}
    assert by_c[1.0]["status"] == TERMINATED and by_c[1.0]["error"] is None
    assert by_c[-1.0]["status"] == ERROR and by_c[-1.0]["error"].startswith("invalid_input: fit failed")
    assert outcome.best_config == {"C": 1.0} and outcome.best_trial_id == by_c[1.0]["trial_id"]
    assert all(t["mlflow_run_id"] is None for t in outcome.trials)


def test_a_search_whose_every_trial_fails_raises_the_trials_error(cluster, iris_data, tmp_path):
    from app.settings import load_settings

    settings = load_settings("local", matih_home=str(tmp_path / "home"), mlflow_tracking_uri=cluster.uri)
    spec = _spec({"search_space": {"C": {"grid": [-1.0]}}, "num_samples": 1})
    with pytest.raises(InvalidInput, match="fit failed"):
        run_search(spec, settings, "job-all-fail", None, sklearn_trial_fn(spec, iris_data, settings),
                   str(tmp_path / "ray_results"))
