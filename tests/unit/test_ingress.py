"""The cluster environment (app/serving/ingress.py): each ingress mode, Serve's log stream, the
background loops' periods."""

from app.serving.ingress import apply_cluster_env, cluster_env, mode_in_effect
from app.settings import load_settings


def test_haproxy_is_the_default_and_names_its_ports():
    settings = load_settings("local")
    env = cluster_env(settings)
    assert settings.http.ingress.mode == "haproxy"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_HAPROXY_NBTHREAD"] == "1"
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "8404"
    assert env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] == "8500"
    assert mode_in_effect(env) == "haproxy"


def test_proxy_mode_switches_both_flags_off():
    env = cluster_env(load_settings("local", http={"ingress": {"mode": "proxy"}}))
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert not any(key.startswith("RAY_SERVE_HAPROXY_") for key in env)
    assert mode_in_effect(env) == "proxy"
    assert mode_in_effect({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}) == "direct"


def test_a_variable_already_set_wins():
    environ = {"RAY_SERVE_HAPROXY_STATS_PORT": "18404"}
    effective = apply_cluster_env(load_settings("local", http={"ingress": {"stats_port": 9999}}), environ)
    assert effective["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    assert environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_an_unknown_mode_is_refused():
    import pytest

    from app.errors import ConfigError

    with pytest.raises(ConfigError, match="mode"):
        load_settings("local", http={"ingress": {"mode": "nginx"}})


def test_serve_logs_stay_off_the_terminal_unless_asked():
    assert cluster_env(load_settings("local"))["RAY_SERVE_LOG_TO_STDERR"] == "0"
    assert cluster_env(load_settings("local", serving={"log_to_terminal": True}))["RAY_SERVE_LOG_TO_STDERR"] == "1"


def test_idle_periods_are_cluster_variables_and_extra_env_wins():
    env = cluster_env(load_settings("local"))
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    assert env["RAY_memory_monitor_refresh_ms"] == "1000"
    assert env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] == "1000"
    assert env["RAY_task_events_report_interval_ms"] == "5000"
    idle = {"control_loop_interval_s": 0.2, "extra_env": {"RAY_memory_monitor_refresh_ms": "250", "RAY_X": "1"}}
    env = cluster_env(load_settings("local", serving={"idle": idle}))
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.2"
    assert env["RAY_memory_monitor_refresh_ms"] == "250" and env["RAY_X"] == "1"
