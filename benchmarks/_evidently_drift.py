"""Evidently's DataDriftPreset on two parquet files, for benchmarks/drift.py and the verdict test.

Runs in Evidently's own venv (``make evidently-env``; never the platform's):

    .venv-evidently/bin/python benchmarks/_evidently_drift.py REF.parquet CUR.parquet \
        --numeric a,b --categorical c,d [--stattest NAME]

Uses the legacy Report API (``evidently.legacy``), which the 0.7 ``DataDriftPreset`` wraps and
which returns per-column results as a dict. Prints JSON: {"seconds": compute seconds (Report.run
plus as_dict, not the parquet read), "columns": {name: {"drifted", "test", "score"}},
"dataset": {...}}.
"""

import argparse
import json
import time

import pandas as pd
from evidently.legacy.metric_preset import DataDriftPreset
from evidently.legacy.pipeline.column_mapping import ColumnMapping
from evidently.legacy.report import Report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reference")
    ap.add_argument("current")
    ap.add_argument("--numeric", default="")
    ap.add_argument("--categorical", default="")
    ap.add_argument("--stattest", default=None)
    a = ap.parse_args()
    ref = pd.read_parquet(a.reference)
    cur = pd.read_parquet(a.current)
    num = [c for c in a.numeric.split(",") if c]
    cat = [c for c in a.categorical.split(",") if c]
    mapping = ColumnMapping(numerical_features=num, categorical_features=cat, target=None, prediction=None)
    t0 = time.perf_counter()
    report = Report(metrics=[DataDriftPreset(stattest=a.stattest)])
    report.run(reference_data=ref, current_data=cur, column_mapping=mapping)
    d = report.as_dict()
    seconds = time.perf_counter() - t0
    cols, dataset = {}, {}
    for m in d["metrics"]:
        r = m["result"]
        if "drift_by_columns" in r:
            for name, c in r["drift_by_columns"].items():
                cols[name] = {"drifted": bool(c["drift_detected"]), "test": c["stattest_name"],
                              "score": float(c["drift_score"])}
        elif "dataset_drift" in r:
            dataset = {"detected": bool(r["dataset_drift"]), "share": r.get("share_of_drifted_columns"),
                       "drifted": r.get("number_of_drifted_columns")}
    print(json.dumps({"seconds": seconds, "columns": cols, "dataset": dataset}))


if __name__ == "__main__":
    main()
