"""Reference profiles as artifacts of a version: a training job's version gets one at
registration (features from the training split, predictions and probabilities on the holdout);
``reference_profile`` jobs (POST .../profile) make or replace one from a dataset; monitors read
it back without touching training data."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from app.cli import DEMO_JOB
    from app.jobs.runner import run_job
    from app.settings import load_settings
    from app.store import MetadataStore
    from app.training.spec import TrainingJobSpec

    tmp = tmp_path_factory.mktemp("ref")
    settings = load_settings("local", matih_home=str(tmp / "home"), mlflow_tracking_uri=f"sqlite:///{tmp / 'm.db'}")
    settings.matih_home.mkdir(parents=True, exist_ok=True)
    store = MetadataStore(settings.database_url)
    store.migrate()
    job = store.create_job("training", "iris", TrainingJobSpec.model_validate(DEMO_JOB).model_dump(mode="json"), "dev")
    store.transition_job(job["job_id"], "running", expect="queued")
    done = run_job(job["job_id"], settings, store)
    assert done["status"] == "succeeded", done
    yield settings, store, done
    store.dispose()


def test_a_trained_version_has_a_profile(trained):
    from app.monitoring.reference import load_profile

    settings, _store, done = trained
    assert done["result"]["reference_profile"] == "monitoring/reference_profile.json"
    profile = load_profile(settings, "iris", done["result"]["model_version"])
    features = profile["features"]
    assert list(features) == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    assert profile["rows"] == 120  # the training split of 150 rows (test_size 0.2)
    sl = features["sepal_length"]
    assert sl["kind"] == "numeric" and sl["count"] == 120 and sl["missing"] == 0
    assert sl["values"] is not None and len(sl["values"]) == 120  # small reference: exact values kept
    assert 4.0 < sl["min"] < sl["mean"] < sl["max"] < 8.0
    assert profile["prediction"]["kind"] == "categorical"
    assert set(profile["prediction"]["categories"]) <= {"0", "1", "2"}
    holdout = profile["holdout"]
    assert holdout["task"] == "classification" and len(holdout["labels"]) == 30
    assert len(holdout["probabilities"][0]) == 3


def test_a_profile_job_replaces_it_from_a_dataset(trained):
    import numpy as np
    import pandas as pd

    from app.datasets import load_dataset
    from app.monitoring.reference import dataset_profile, load_profile

    settings, _store, done = trained
    version = done["result"]["model_version"]
    frame = load_dataset("builtin://iris")
    frame["sepal_length"] = frame["sepal_length"] + 10  # visibly another reference
    path = settings.matih_home / "data" / "ref.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    lines = []
    out = dataset_profile(settings, "iris", version, {"dataset": str(path), "target": "target"},
                          lambda progress, line=None: lines.append(line))
    assert out["rows"] == 150 and out["features"] == 4 and out["prediction"] is True
    profile = load_profile(settings, "iris", version)
    assert profile["features"]["sepal_length"]["min"] > 14 and profile["rows"] == 150
    assert len(profile["holdout"]["labels"]) == 150
    from app.errors import InvalidInput, NotFound

    with pytest.raises(InvalidInput):
        dataset_profile(settings, "iris", version, {"dataset": str(path), "target": "nope"}, lambda *a: None)
    pd.DataFrame({"a": np.arange(3.0)}).to_parquet(path, index=False)
    with pytest.raises(InvalidInput, match="features"):
        dataset_profile(settings, "iris", version, {"dataset": str(path)}, lambda *a: None)
    with pytest.raises(NotFound):
        load_profile(settings, "iris", "99")
