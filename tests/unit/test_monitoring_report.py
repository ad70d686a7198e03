"""The HTML drift report of a monitor run (app.monitoring.report): a realistic run rendered to
one self-contained page, opened in headless Chromium; hostile column names escaped; a run of a
thousand columns keeps its plots bounded."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from app.monitoring.report import MAX_OTHER_PLOTS, render

HOSTILE = "<script>alert(1)</script>"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def _numeric(statistic, p, drifted, *, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    edges = np.linspace(-3, 3, 11)
    ref = np.histogram(rng.normal(size=2000), edges)[0]
    cur = np.histogram(rng.normal(loc=shift, size=800), edges)[0]
    return {"kind": "numeric", "test": "ks", "statistic": statistic, "p_value": p, "p_adjusted": min(1.0, p * 6),
            "threshold": 0.05, "drifted": drifted, "reference_rows": 2000, "current_rows": 800, "current_missing": 3,
            "plot": {"type": "histogram", "edges": edges.tolist(), "reference": (ref / ref.sum()).tolist(),
                     "current": (cur / cur.sum()).tolist()}}


def _categorical(labels, ref, cur, statistic, drifted, test="psi"):
    return {"kind": "categorical", "test": test, "statistic": statistic, "p_value": None, "p_adjusted": None,
            "threshold": 0.1, "drifted": drifted, "reference_rows": 2000, "current_rows": 800, "current_missing": 0,
            "plot": {"type": "categories", "labels": labels, "reference": ref, "current": cur}}


def _drift(columns):
    counted = [c for c in columns.values() if "error" not in c]
    drifted = sum(c["drifted"] for c in counted)
    share = drifted / len(counted)
    return {"dataset_drift": {"detected": share >= 0.5, "share": share, "drifted": drifted, "columns": len(counted),
                              "threshold": 0.5},
            "correction": "bonferroni", "columns": columns}


def _performance():
    start = datetime(2026, 12, 3, 7, tzinfo=timezone.utc)
    buckets = []
    for i in range(6):
        acc = 0.9 - 0.03 * i
        buckets.append({"start": (start + timedelta(hours=i)).isoformat(),
                        "end": (start + timedelta(hours=i + 1)).isoformat(), "rows": 1000, "labelled_rows": 300,
                        "metrics": {"accuracy": {"value": acc, "ci": [acc - 0.03, acc + 0.03], "n": 300}},
                        "estimated": {"accuracy": {"value": acc + 0.01, "ci": [acc - 0.005, acc + 0.025]}}})
    metrics = {"accuracy": {"value": 0.83, "ci": [0.81, 0.85], "n": 1800},
               "f1": {"value": 0.8, "ci": [0.77, 0.83], "n": 1800},
               "roc_auc": {"value": 0.9, "ci": [0.88, 0.92], "n": 1750}}
    return {"task": "classification", "rows": 6000, "labelled_rows": 1800, "confidence": 0.95, "overall": metrics,
            "variants": {"blue": {"rows": 3000, "labelled_rows": 900, "metrics": metrics},
                         HOSTILE: {"rows": 3000, "labelled_rows": 900, "metrics": metrics}},
            "segments": {"region": {"eu": {"rows": 4000, "labelled_rows": 1200, "metrics": metrics},
                                    "us": {"rows": 2000, "labelled_rows": 600, "metrics": {}}}},
            "buckets": buckets,
            "estimated": {"accuracy": {"value": 0.84, "ci": [0.835, 0.845]}, "f1": {"value": 0.81, "ci": [0.8, 0.82]}},
            "comparison": {"accuracy": {"estimated": 0.845, "measured": 0.83, "abs_error": 0.015, "n": 1800}}}


def _run():
    columns = {
        "age": _numeric(0.31, 1e-9, True, shift=1.0),
        "income": _numeric(0.02, 0.7, False, seed=1),
        HOSTILE: _numeric(0.25, 1e-6, True, shift=-0.8, seed=2),
        "country": _categorical(["de", "fr", "us", f"<b>{HOSTILE}</b>"], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.6, 0.1],
                                0.42, True),
        "plan": _categorical(["free", "pro"], [0.7, 0.3], [0.68, 0.32], 0.001, False),
        "gone": {"kind": "numeric", "drifted": False, "error": "not in the current window"},
    }
    prediction = _categorical(["0", "1"], [0.6, 0.4], [0.45, 0.55], 0.09, False, test="jensenshannon")
    segment = _drift({"age": _numeric(0.3, 1e-8, True, shift=1.0), "plan": _categorical(["free", "pro"], [0.7, 0.3],
                                                                                          [0.7, 0.3], 0.0, False)})
    return {"id": "run-1", "endpoint": "churn", "model": "churn-model", "model_version": "7", "status": "succeeded",
            "created_at": "2026-12-03T13:00:00+00:00", "finished_at": "2026-12-03T13:00:09+00:00",
            "window": {"since": "2026-12-03T07:00:00+00:00", "until": "2026-12-03T13:00:00+00:00", "rows": 6000},
            "drift": _drift(columns), "prediction_drift": prediction,
            "segments": {"region": {"eu": segment, HOSTILE: segment}}, "performance": _performance(), "error": None}


def test_report_shows_verdict_table_plots_and_performance():
    html = render(_run())
    assert html.count('<svg class="dist"') == 6  # five columns with a distribution + the prediction
    assert 'id="dataset-drift"' in html and "dataset drift detected" in html  # 3 of 5 drifted, threshold 0.5
    assert html.count('<tr class="drifted">') == 3
    assert "not in the current window" in html
    assert "Estimated vs measured" in html and 'class="chart perf"' in html
    assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>" not in html.replace("<b class=", "")  # the category's markup is text too
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "<script" not in html


def test_report_without_drift_or_performance():
    html = render({"id": "r", "endpoint": "e", "status": "failed", "drift": None, "prediction_drift": None,
                   "segments": {}, "performance": None, "error": f"window unreadable: {HOSTILE}"})
    assert 'id="dataset-drift"' in html and 'id="run-error"' in html and HOSTILE not in html
    assert '<svg class="dist"' not in html


def test_a_thousand_columns_plot_the_drifted_and_the_first_others():
    columns = {f"f{i:04d}": _numeric(0.3 if i % 100 == 0 else 0.01, 1e-9 if i % 100 == 0 else 0.9, i % 100 == 0,
                                     seed=i % 7) for i in range(1000)}
    html = render({"id": "big", "endpoint": "e", "drift": _drift(columns), "segments": {}})
    assert html.count('<svg class="dist"') == 10 + MAX_OTHER_PLOTS
    assert html.count("<tr") == 1000 + 1  # every column in the table
    note = re.search(r'id="plots-left-out">([^<]*)<', html).group(1)
    assert note.startswith(f"{1000 - 10 - MAX_OTHER_PLOTS:,} of 1,000 columns have no plot")
    assert 'id="dataset-drift" class="verdict" data-detected="false"' in html
    assert len(html) < 2_000_000


def test_report_renders_in_headless_chromium(tmp_path):
    binary = next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    if binary is None:
        if os.environ.get("CI") or os.environ.get("MATIH_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed; CI must run the report test (.ci/run: apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    page = tmp_path / "report.html"
    page.write_text(render(_run()), encoding="utf-8")
    args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = dom.stdout
    assert rendered.count('<svg class="dist"') == 6 and rendered.count("<rect class=\"current\"") > 20
    assert 'id="dataset-drift"' in rendered and "dataset drift detected" in rendered
    assert "<script" not in rendered and "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered  # shown, not run
    shot = tmp_path / "report.png"
    run = subprocess.run([*args, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.stat().st_size > 10_000, run.stderr[-2000:]  # pixels, not a blank page
    json.dumps(_run())  # the run is the JSON a monitor stores
