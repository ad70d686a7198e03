"""dataset_drift_ray equals dataset_drift. It starts a Ray cluster of its own (2 CPUs): run it
under the integration lock,

    flock /tmp/matih-integration.lock env PYTHONPATH=$PWD .venv/bin/python -m pytest \
        tests/unit/test_monitoring_drift_ray.py -q
"""

import numpy as np
import pyarrow as pa
import pytest

from app.monitoring.drift import DriftOptions, dataset_drift, dataset_drift_ray
from app.monitoring.profile import build_profile

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from tests.support import start_local_ray

    start_local_ray(2)
    try:
        yield
    finally:
        ray.shutdown()


def _tables():
    rng = np.random.default_rng(0)
    ref, cur = {}, {}
    for i in range(23):
        ref[f"n{i}"] = rng.normal(size=4000)
        cur[f"n{i}"] = rng.normal(0.3 if i % 4 == 0 else 0.0, size=3000)
    for i in range(5):
        ref[f"c{i}"] = pa.array(rng.choice(list("abcd"), 4000).tolist())
        cur[f"c{i}"] = pa.array(rng.choice(list("abcd"), 3000, p=[0.4, 0.2, 0.2, 0.2] if i < 2 else None).tolist())
    ref["small"] = rng.integers(0, 3, 4000).astype(float)
    cur["small"] = rng.integers(0, 3, 3000).astype(float)
    return pa.table(ref), pa.table(cur)


def test_ray_equals_in_process(cluster):
    ref, cur = _tables()
    prof = build_profile(ref, exact_rows=1000)
    for opts in (DriftOptions(), DriftOptions(default_test="psi", columns=["n0", "n1", "c0", "small"]),
                 DriftOptions(default_test="ks", columns=[f"n{i}" for i in range(23)], correction="bh")):
        local = dataset_drift(prof, cur, opts)
        assert dataset_drift_ray(prof, cur, opts, num_cpus=0.25, columns_per_task=4) == local
    # blocks as object refs (two halves), and a Ray Dataset
    local = dataset_drift(prof, cur, DriftOptions())
    refs = [ray.put(cur.slice(0, 1500)), ray.put(cur.slice(1500))]
    assert dataset_drift_ray(prof, refs, DriftOptions(), columns_per_task=10) == local
    ds = ray.data.from_arrow([cur.slice(0, 1000), cur.slice(1000)])
    assert dataset_drift_ray(prof, ds, DriftOptions(), columns_per_task=50) == local
    assert local["dataset_drift"]["drifted"] >= 6
