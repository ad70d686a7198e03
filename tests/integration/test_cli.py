"""The matih-ml CLI against the running platform, reading the admin token from MATIH_HOME."""

import os
import subprocess
import sys


def _cli(platform, *args, timeout=240):
    env = {**os.environ, "MATIH_HOME": str(platform.home)}
    env.pop("MATIH_ADMIN_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "--url", platform.url, *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def test_cli_status_and_predict(platform, iris):
    r = _cli(platform, "status")
    assert r.returncode == 0, r.stderr
    assert '"ready": true' in r.stdout
    r = _cli(platform, "predict", "iris", "[6.7, 3.0, 5.2, 2.3]")
    assert r.returncode == 0, r.stderr
    assert '"predictions": [\n    2\n  ]' in r.stdout


def test_cli_demo_runs_the_slice(platform, iris):
    r = _cli(platform, "demo")
    assert r.returncode == 0, r.stdout + r.stderr
    for step in ("1. platform health", "2. submit training job", "3. wait for it", "4. endpoint iris", "5. predict"):
        assert step in r.stdout
    assert "succeeded" in r.stdout and '"predictions": [0, 2]' in r.stdout
