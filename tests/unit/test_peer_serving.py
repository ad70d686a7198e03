"""The pure pieces of benchmarks/peer_serving.py: wrk output parsing, process-tree grouping, CPU
deltas, ratios against MLServer and the issue-11 targets (no Ray, no servers)."""

import math

import pytest

from benchmarks.peer_serving import (
    WrkResult,
    cpu_delta,
    group_of,
    parse_wrk,
    pooled_cpu_ms,
    ratios,
    summarize,
    targets_met,
    wrk_lua,
)

# real `wrk -t1 -c2 -d2s --latency` output (a server answering 501 to POST)
WRK_NON2XX = """Running 2s test @ http://127.0.0.1:18777/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.14ms    1.11ms  14.27ms   92.32%
    Req/Sec     1.91k   269.48     2.45k    75.00%
  Latency Distribution
     50%  831.00us
     75%    1.25ms
     90%    1.98ms
     99%    6.40ms
  3804 requests in 2.00s, 2.01MB read
  Non-2xx or 3xx responses: 3804
Requests/sec:   1899.69
Transfer/sec:      1.01MB
"""

WRK_SOCKET = """Running 20s test @ http://127.0.0.1:8000/v1/endpoints/iris/predict
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    45.20ms   12.00ms   1.02s    90.00%
    Req/Sec   700.00     50.00     0.90k    80.00%
  Latency Distribution
     50%   42.10ms
     75%   50.00ms
     90%   60.00ms
     99%    1.02s
  14000 requests in 20.01s, 3.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 5
Requests/sec:    699.65
Transfer/sec:    153.52KB
"""


def test_parse_wrk_units_and_non_2xx():
    r = parse_wrk(WRK_NON2XX)
    assert r.requests == 3804 and r.duration_s == pytest.approx(2.0) and r.rps == pytest.approx(1899.69)
    assert r.p50_ms == pytest.approx(0.831) and r.p75_ms == pytest.approx(1.25) and r.p99_ms == pytest.approx(6.4)
    assert r.non_2xx == 3804 and r.errors == 3804


def test_parse_wrk_socket_errors_and_seconds():
    r = parse_wrk(WRK_SOCKET)
    assert r.p99_ms == pytest.approx(1020.0) and r.duration_s == pytest.approx(20.01)
    assert r.socket_errors == {"connect": 0, "read": 2, "write": 0, "timeout": 5}
    assert r.non_2xx == 0 and r.errors == 7


def test_parse_wrk_rejects_other_output():
    with pytest.raises(ValueError, match="unexpected wrk output"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_wrk_lua_body_and_headers():
    lua = wrk_lua('{"instances": [[1.0, 2.0]]}', {"Authorization": "Bearer t"})
    assert 'wrk.method = "POST"' in lua
    assert 'wrk.body = [==[{"instances": [[1.0, 2.0]]}]==]' in lua
    assert 'wrk.headers["Authorization"] = "Bearer t"' in lua


def test_group_of_nearest_root_wins():
    # 1 init -> 10 driver -> 11 raylet -> 12 worker -> 13 haproxy; 10 -> 20 mlserver -> 21 worker; 10 -> 30 wrk
    parent = {10: 1, 11: 10, 12: 11, 13: 12, 20: 10, 21: 20, 30: 10, 40: 1}
    roots = {10: "platform", 20: "mlserver", 30: None}
    assert [group_of(p, parent, roots) for p in (11, 12, 13, 20, 21, 30, 40)] == [
        "platform", "platform", "platform", "mlserver", "mlserver", None, None]


def test_cpu_delta_new_and_restarted_processes():
    before = {(11, 1.0): ("platform", 5.0), (20, 1.0): ("mlserver", 2.0), (12, 1.0): ("platform", 9.0)}
    after = {(11, 1.0): ("platform", 5.5), (20, 1.0): ("mlserver", 2.25), (12, 7.0): ("platform", 0.5)}
    # pid 12 was reused by a new process: all its time counts; the old one's last interval is lost
    assert cpu_delta(before, after) == {"platform": pytest.approx(1.0), "mlserver": pytest.approx(0.25)}


def _level(requests, seconds, p50, cpu_s):
    r = WrkResult(requests, seconds, requests / seconds, p50, p50, p50, 2 * p50, 0, {})
    return summarize([r], cpu_s)


def test_summarize_medians_over_rounds():
    runs = [WrkResult(1000, 10.0, 100.0, p, p, p, 10 * p, 0, {}) for p in (1.0, 3.0, 2.0)]
    s = summarize(runs, cpu_s=6.0)
    assert s["p50_ms"] == 2.0 and s["p99_ms"] == 20.0 and s["rps"] == pytest.approx(100.0)
    assert s["cpu_ms_per_request"] == pytest.approx(2.0) and s["p50_ms_range"] == [1.0, 3.0]


def test_ratios_and_targets():
    ml = {"c1": _level(500, 10, 2.0, 0.5), "c8": _level(8000, 10, 8.0, 8.0), "c32": _level(9000, 10, 30.0, 9.0)}
    fast = {"c1": _level(500, 10, 2.4, 0.6), "c8": _level(8000, 10, 8.0, 8.0), "c32": _level(9900, 10, 28.0, 9.9)}
    slow = {"c1": _level(100, 10, 10.0, 1.0), "c8": _level(1600, 10, 40.0, 16.0), "c32": _level(1800, 10, 150, 18)}
    rat = ratios({"mlserver": ml, "platform_rest": fast, "platform_v2": slow})
    assert rat["platform_rest"]["throughput_c8"] == pytest.approx(1.0)
    assert rat["platform_rest"]["throughput_c32"] == pytest.approx(1.1)
    assert rat["platform_rest"]["p50_c1"] == pytest.approx(1.2)
    assert rat["platform_rest"]["cpu_ms_per_request"] == pytest.approx(pooled_cpu_ms(fast) / pooled_cpu_ms(ml))
    assert rat["platform_v2"]["throughput_c8"] == pytest.approx(0.2)
    met = targets_met(rat)
    assert met["platform_rest"] == {"throughput_c8": True, "throughput_c32": True, "p50_c1": True,
                                    "cpu_ms_per_request": True}
    assert not any(met["platform_v2"].values())


def test_pooled_cpu_empty_is_nan():
    assert math.isnan(pooled_cpu_ms({}))
