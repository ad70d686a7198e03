"""Prediction records -> parquet rows: one row per instance, features by name, for every
payload shape the serving path hands over."""

from __future__ import annotations

import json

import numpy as np

from app.predlog.convert import to_table
from app.predlog.layout import SCHEMA
from app.predlog.records import PredictionRecord

NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def rec(inputs, outputs=None, feature_names=NAMES, **kw) -> PredictionRecord:
    base = dict(request_id="r" * 32, timestamp=1_796_000_000.25, endpoint="iris", variant="", model="iris",
                model_version="3", latency_ms=2.5, inputs=inputs, feature_names=feature_names, outputs=outputs)
    base.update(kw)
    return PredictionRecord(**base)


def rows(records):
    table = to_table(records)
    assert table.schema == SCHEMA
    return table.to_pylist()


def test_instances_as_lists_are_named_by_the_model_features():
    out = rows([rec({"instances": [[5.1, 3.5, 1.4, 0.2], [6.0, 2.9, 4.5, 1.5]]},
                    {"predictions": [0, 1], "probabilities": [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]]},
                    caller="alice", client_request_id="mine-1")])
    assert [r["instance"] for r in out] == [0, 1]
    assert json.loads(out[0]["inputs"]) == dict(zip(NAMES, [5.1, 3.5, 1.4, 0.2]))
    assert [json.loads(r["prediction"]) for r in out] == [0, 1]
    assert out[1]["probabilities"] == [0.1, 0.8, 0.1]
    assert {r["caller"] for r in out} == {"alice"} and out[0]["client_request_id"] == "mine-1"
    assert out[0]["timestamp"].timestamp() == 1_796_000_000.25 and out[0]["model_version"] == "3"


def test_instances_as_objects_and_unknown_feature_names():
    out = rows([rec({"instances": [{"a": 1, "b": 2}]}, {"predictions": ["setosa"]}, feature_names=None)])
    assert json.loads(out[0]["inputs"]) == {"a": 1, "b": 2} and json.loads(out[0]["prediction"]) == "setosa"
    out = rows([rec({"instances": [[1.0, 2.0]]}, {"predictions": [3.5]}, feature_names=NAMES)])  # width differs
    assert json.loads(out[0]["inputs"]) == {"f0": 1.0, "f1": 2.0} and json.loads(out[0]["prediction"]) == 3.5


def test_columns_payload():
    out = rows([rec({"inputs": {"x": [1, 2, 3], "y": [4, 5, 6]}}, {"predictions": np.array([7.0, 8.0, 9.0])})])
    assert [json.loads(r["inputs"]) for r in out] == [{"x": 1, "y": 4}, {"x": 2, "y": 5}, {"x": 3, "y": 6}]
    assert [json.loads(r["prediction"]) for r in out] == [7.0, 8.0, 9.0]
    assert all(r["probabilities"] is None for r in out)


def test_v2_tensor_payload():
    matrix = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = rows([rec({"tensor": matrix}, {"predictions": [0, 2]}, protocol="v2")])
    assert json.loads(out[1]["inputs"]) == dict(zip(NAMES, [4.0, 5.0, 6.0, 7.0]))
    assert out[0]["protocol"] == "v2"


def test_fields_not_kept_are_null_and_rows_follow_the_outputs():
    out = rows([rec(None, {"predictions": [1, 0, 1]}, caller=None)])
    assert len(out) == 3 and all(r["inputs"] is None and r["caller"] is None for r in out)
    out = rows([rec({"instances": [[1, 2, 3, 4], [5, 6, 7, 8]]}, None)])
    assert len(out) == 2 and all(r["prediction"] is None and r["probabilities"] is None for r in out)
    out = rows([rec(None, None)])
    assert len(out) == 1 and out[0]["inputs"] is None and out[0]["request_id"] == "r" * 32


def test_an_unreadable_payload_keeps_the_request_without_inputs():
    out = rows([rec({"something": 1}, {"predictions": [1]}), rec({"instances": [[1, 2, 3, 4]]}, {"predictions": [2]})])
    assert len(out) == 2 and out[0]["inputs"] is None and json.loads(out[1]["prediction"]) == 2


def test_many_records_in_one_table():
    records = [rec({"instances": [[float(i)] * 4]}, {"predictions": [i]}, request_id=f"{i:032x}") for i in range(500)]
    table = to_table(records)
    assert table.num_rows == 500 and table.column("request_id")[499].as_py() == f"{499:032x}"
