import numpy as np
import pytest

from app.errors import InvalidInput
from app.registry.targets import ModelRef, parse_target
from app.serving.signature import ModelSignature
from app.serving.payload import payload_to_matrix

SIG = ModelSignature(n_features=2, feature_names=["a", "b"])


def test_rows_dict_rows_and_columns_give_the_same_matrix():
    want = np.array([[1, 2], [3, 4]], dtype=np.float32)
    for payload in (
        {"instances": [[1, 2], [3, 4]]},
        {"instances": [{"a": 1, "b": 2}, {"b": 4, "a": 3}]},
        {"inputs": {"b": [2, 4], "a": [1, 3]}},
    ):
        got = payload_to_matrix(payload, SIG)
        assert got.dtype == np.float32 and np.array_equal(got, want)


@pytest.mark.parametrize(
    "payload,field",
    [
        ({"instances": [[1, 2, 3]]}, "instances[0]"),
        ({"instances": [[1, "x"]]}, "instances[0][1]"),
        ({"instances": [[1, True]]}, "instances[0][1]"),
        ({"instances": [[1, float("nan")]]}, "instances[0][1]"),
        ({"instances": [{"a": 1}]}, "instances[0]"),
        ({"instances": [5]}, "instances[0]"),
        ({"instances": []}, "instances"),
        ({"inputs": {"a": [1], "b": [1, 2]}}, "inputs"),
        ({}, "instances"),
        ({"instances": [[1, 2]], "inputs": {"a": [1], "b": [2]}}, "instances"),
    ],
)
def test_bad_payloads_name_the_field(payload, field):
    with pytest.raises(InvalidInput) as err:
        payload_to_matrix(payload, SIG)
    assert err.value.details["field"] == field


def test_row_limit():
    with pytest.raises(InvalidInput, match="at most 3"):
        payload_to_matrix({"instances": [[1, 2]] * 4}, SIG, max_rows=3)


@pytest.mark.parametrize(
    "target,ref",
    [
        ("iris@champion", ModelRef("iris", alias="champion")),
        ("iris/3", ModelRef("iris", version="3")),
        ("models:/iris@challenger", ModelRef("iris", alias="challenger")),
        ("models:/my-model.v2/12", ModelRef("my-model.v2", version="12")),
    ],
)
def test_targets(target, ref):
    assert parse_target(target) == ref


@pytest.mark.parametrize("target", ["iris", "iris@", "iris/0", "iris/x", "../iris@champion", "models:/", "a@b@c"])
def test_bad_targets(target):
    with pytest.raises(InvalidInput, match="name@alias"):
        parse_target(target)
