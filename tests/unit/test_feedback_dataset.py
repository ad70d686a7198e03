"""join_dataset: the same join as join_feedback, batch by batch over a Ray Dataset (large
windows). A local Ray instance of this module's own; the result must equal the in-memory join."""

from __future__ import annotations

import pyarrow as pa
import pytest

from app.predlog.feedback import FEEDBACK_SCHEMA
from app.predlog.ids import new_request_id
from app.predlog.join import join_dataset, join_feedback
from app.predlog.layout import SCHEMA
from tests.unit.test_feedback import _feedback, log_rows


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    from tests.support import start_local_ray

    start_local_ray(1)
    yield ray
    ray.shutdown()


def test_join_dataset_equals_the_in_memory_join(local_ray):
    import ray.data

    ids = [new_request_id() for _ in range(40)]
    preds = pa.Table.from_pylist([r for rid in ids for r in log_rows(rid, 2)], schema=SCHEMA)
    fb = _feedback(
        [{"request_id": rid, "instance": i % 2, "label": f'"{i}"', "reward": float(i)} for i, rid in enumerate(ids[::3])]
    )
    ds = ray.data.from_arrow(preds).repartition(4)
    for how in ("left", "inner"):
        got = pa.concat_tables(join_dataset(ds, fb, how=how).iter_batches(batch_format="pyarrow", batch_size=None))
        want = join_feedback(preds, fb, how=how)
        key = [("request_id", "ascending"), ("instance", "ascending")]
        assert got.sort_by(key).to_pylist() == want.sort_by(key).to_pylist()
    empty = join_dataset(ds, FEEDBACK_SCHEMA.empty_table(), how="inner")
    assert empty.count() == 0
