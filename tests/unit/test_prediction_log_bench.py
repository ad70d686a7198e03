"""The pure pieces of benchmarks/prediction_log.py: the endpoints' specs, the interleaving of on /
off runs, the cost of logging against issue 12's 5% target, the record-count check, the overload
pacing and the realistic records (no Ray, no servers)."""

import pytest

from app.predlog.records import OPTIONAL_FIELDS
from app.serving.endpoint_spec import EndpointSpec
from benchmarks.peer_serving import WrkResult, summarize
from benchmarks.prediction_log import (
    due,
    endpoint_specs,
    logging_cost,
    make_record,
    markdown_table,
    records_check,
    round_order,
)


def test_endpoint_specs_are_valid_and_log_everything_or_nothing():
    specs = endpoint_specs(OPTIONAL_FIELDS)
    on = EndpointSpec.model_validate(specs["on"]).logging
    off = EndpointSpec.model_validate(specs["off"]).logging
    assert on.enabled and on.sample_rate == 1.0 and on.fields == list(OPTIONAL_FIELDS)
    assert not off.enabled


def test_round_order_pairs_back_to_back_alternating():
    assert round_order(0, ["rest", "v2"]) == ["rest_on", "rest_off", "v2_on", "v2_off"]
    assert round_order(1, ["rest", "v2"]) == ["rest_off", "rest_on", "v2_off", "v2_on"]
    assert round_order(2, ["rest"]) == ["rest_on", "rest_off"]


def _level(requests, seconds, p50):
    return summarize([WrkResult(requests, seconds, requests / seconds, p50, p50, p50, 2 * p50, 0, {})], 1.0)


def test_logging_cost_against_the_target():
    results = {
        "rest_on": {"c1": _level(1040, 10, 1.04), "c8": _level(4000, 10, 2.0)},
        "rest_off": {"c1": _level(1000, 10, 1.0), "c8": _level(5000, 10, 1.5)},
    }
    costs = logging_cost(results, ["rest"])
    c1, c8 = costs["rest_c1"], costs["rest_c8"]
    assert c1["p50_cost_pct"] == pytest.approx(4.0) and c1["p50_met"]
    assert c1["throughput_cost_pct"] == pytest.approx(-4.0) and c1["throughput_met"]  # on was faster: no cost
    assert c8["p50_cost_pct"] == pytest.approx(100 / 3) and not c8["p50_met"]
    assert c8["throughput_cost_pct"] == pytest.approx(20.0) and not c8["throughput_met"]
    table = markdown_table(costs)
    assert "| REST | 8 | 2.00 / 1.50 | +33.3% | 400 / 500 | +20.0% |" in table


def test_records_check_allows_only_the_requests_in_flight():
    assert records_check(1000, 9, 1000)["ok"]
    assert records_check(1000, 9, 1009)["ok"]
    assert not records_check(1000, 9, 1010)["ok"]
    bad = records_check(1000, 9, 990)
    assert not bad["ok"] and bad["missing"] == 10


def test_due_paces_and_caps():
    assert due(1000.0, 0.5, 0, 10_000) == 500
    assert due(1000.0, 0.5, 480, 10_000) == 20
    assert due(1000.0, 0.5, 600, 10_000) == 0  # ahead of the schedule
    assert due(1_000_000.0, 1.0, 0, 5000) == 5000


def test_make_record_keeps_every_field_with_fresh_dicts():
    a, b = make_record(0, "ep", 1_700_000_000.0), make_record(1, "ep", 1_700_000_000.0)
    for rec in (a, b):
        assert rec.inputs and rec.outputs and rec.caller and rec.client_request_id and rec.feature_names
    assert a.request_id != b.request_id and len(a.request_id) == 32
    assert a.inputs is not b.inputs and a.outputs is not b.outputs
    assert a.feature_names is b.feature_names
