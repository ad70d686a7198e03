"""ONNX Runtime vs native scikit-learn predict, side by side in one run.

For logistic regression, random forest and gradient boosting (trained here on a synthetic
20-feature classification set), converted with the same skl2onnx settings the platform
uses (app/onnx/sklearn_export.py: zipmap off) and run with the platform's ONNX Runtime
session options (app/runtimes/onnx.py: 1 intra-op thread), it times ``predict`` at batch 1,
100 and 10,000 rows and prints the median latency of each and the ratio native / ONNX.

    .venv/bin/python benchmarks/runtime_speedup.py [--repeats 200] [--json out.json]

Target: >= 10x at batch 1 for the tree ensembles. Bounded loops; about a minute on 2 vCPUs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCHES = (1, 100, 10_000)
TARGET = 10.0


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=200, help="timed calls per cell (fewer for 10k rows)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from sklearn.datasets import make_classification
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    from app.runtimes.onnx import OnnxModelRuntime
    from app.onnx.sklearn_export import to_onnx

    X, y = make_classification(n_samples=20_000, n_features=20, n_informative=10, random_state=0)
    X = X.astype(np.float32)
    models = {
        "logistic_regression": LogisticRegression(max_iter=500),
        "random_forest": RandomForestClassifier(n_estimators=100, max_depth=10, random_state=0, n_jobs=1),
        "gradient_boosting": GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=0),
    }
    rows = []
    for name, est in models.items():
        est.fit(X[:5000], y[:5000])
        onnx_model = to_onnx(est, X, is_classifier=True)
        with tempfile.TemporaryDirectory() as tmp:  # the platform's runtime, as a replica opens it
            (Path(tmp) / "model.onnx").write_bytes(onnx_model.SerializeToString())
            runtime = OnnxModelRuntime({"intra_op_threads": 1, "inter_op_threads": 1})
            runtime.load(Path(tmp), {})
        sess = runtime.session
        inp = sess.get_inputs()[0].name
        label = [o.name for o in sess.get_outputs()][0]
        for batch in BATCHES:
            data = X[5000 : 5000 + batch]
            reps = args.repeats if batch < 10_000 else max(5, args.repeats // 20)
            native = _time(lambda: est.predict(data), reps)
            onnx = _time(lambda: sess.run([label], {inp: data}), reps)
            agree = float(np.mean(sess.run([label], {inp: data})[0] == est.predict(data)))
            rows.append({"model": name, "batch": batch, "native_ms": native * 1e3, "onnx_ms": onnx * 1e3,
                         "speedup": native / onnx, "label_agreement": agree})

    print(f"{'model':<22}{'batch':>7}{'native ms':>12}{'onnx ms':>10}{'native/onnx':>13}")
    for r in rows:
        print(f"{r['model']:<22}{r['batch']:>7}{r['native_ms']:>12.3f}{r['onnx_ms']:>10.3f}{r['speedup']:>12.1f}x")
    trees = [r for r in rows if r["batch"] == 1 and r["model"] != "logistic_regression"]
    met = all(r["speedup"] >= TARGET for r in trees)
    print("target: tree ensembles >= 10x at batch 1: " + ("met" if met else "NOT met") + " ("
          + ", ".join(f"{r['model']} {r['speedup']:.1f}x" for r in trees) + ")")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "target_met": met}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
