"""Model load: a cold load from MLflow vs a replica loading from Ray's object store.

Starts a real MLflow tracking server (SQLite backend, artifacts proxied through the server
as ``mlflow-artifacts:/``, the usual production set-up), registers two models through the
platform's trainer (the iris logistic regression, a few KB, and a random forest on the
digits data, about 5 MB as ONNX), then, inside a Ray actor that stands in for a fresh
ModelServer replica, times two ways to get from ``name/version`` to a ready ONNX Runtime
session with the platform's own ModelLoader:

  cold          resolve + download the MLflow model into an empty directory + open it
                (what the first replica on a machine does without the RegistryCache);
  object store  resolve through the RegistryCache actor + ``ray.get`` of the packed
                artifact it keeps in the object store + unpack + open it
                (what every further replica does).

Each is repeated (fresh directory every time) and the medians are compared side by side.

    .venv/bin/python benchmarks/model_load.py [--repeats 10] [--json out.json]

Target: the object-store load is >= 5x faster than the cold load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET = 5.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()

    import ray

    from actors.registry_cache import get_registry_cache
    from app.bootstrap import prepare
    from app.schemas import TrainingJobSpec
    from app.settings import load_settings
    from app.training.pipeline import train_sklearn

    from tests.support import MlflowServer

    home = Path(tempfile.mkdtemp(prefix="matih-bench-load-"))
    os.environ["MATIH_HOME"] = str(home)
    server = MlflowServer(home)
    server.start()
    settings = load_settings("local", matih_home=str(home), admin_token="bench",
                             mlflow_tracking_uri=server.uri, artifact_root="mlflow-artifacts:/bench")
    prepare(settings)
    model_ids = []
    for name, estimator, params, data in (
        ("iris", "sklearn.linear_model.LogisticRegression", {"max_iter": 300}, "iris"),
        ("forest", "sklearn.ensemble.RandomForestClassifier",
         {"n_estimators": 150, "max_depth": 14, "random_state": 0, "n_jobs": 1}, "digits"),
    ):
        spec = TrainingJobSpec.model_validate({
            "name": name, "estimator": estimator, "hyperparameters": params,
            "dataset": {"uri": f"builtin://{data}", "target": "target"}, "register_as": name,
        })
        res = train_sklearn(spec, settings, f"bench-{name}", lambda *a: None)
        model_ids.append(f"{name}/{res['model_version']}")
    kwargs = settings.to_init_kwargs()

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        cache = get_registry_cache(kwargs, 0.05)

        @ray.remote(num_cpus=0.25)
        class Replica:
            """Loads the way a ModelServer replica does, two ways."""

            def __init__(self, settings_kwargs):
                from app.serving.loader import ModelLoader
                from app.settings import Settings
                from deployments.model_server import _fetch_from_object_store

                self.settings = Settings(**settings_kwargs)
                tmp = lambda: Path(tempfile.mkdtemp(prefix="matih-cold-"))  # noqa: E731
                self.cold = ModelLoader(self.settings,  # nothing cached: resolve and download from MLflow
                                        resolve=lambda mid: self.cold.registry.resolve(mid, use_cache=False),
                                        fetch=lambda m: self.cold.registry.download_to(m, tmp()),
                                        release=lambda p: shutil.rmtree(p, ignore_errors=True))
                self.warm = ModelLoader(self.settings,
                                        resolve=lambda mid: ray.get(cache.resolve.remote(mid)),
                                        fetch=lambda m: _fetch_from_object_store(cache, m.model_id),
                                        release=lambda p: shutil.rmtree(p, ignore_errors=True))

            def time_load(self, which: str, model_id: str) -> dict:
                import time

                t0 = time.perf_counter()
                rt = (self.cold if which == "cold" else self.warm).load(model_id)
                total = time.perf_counter() - t0
                return {"total": total, "fetch": rt.signature.extra["fetch_seconds"],
                        "open": rt.signature.extra["load_seconds"]}

        replica = Replica.remote(kwargs)
        out = {}
        for model_id in model_ids:
            ray.get(replica.time_load.remote("object", model_id))  # the first replica puts it in the store
            size = len(ray.get(ray.get(cache.artifact.remote(model_id))[0]))
            results = {"cold": [], "object": []}
            for _ in range(args.repeats):  # interleaved, so a passing disturbance hits both
                for which in ("cold", "object"):
                    results[which].append(ray.get(replica.time_load.remote(which, model_id)))
            out[model_id] = (size, results)
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(home, ignore_errors=True)

    summary = {}
    for model_id, (size, results) in out.items():
        med = {w: {k: statistics.median(r[k] for r in rs) * 1e3 for k in ("total", "fetch", "open")}
               for w, rs in results.items()}
        ratio = med["cold"]["total"] / med["object"]["total"]
        fetch_ratio = med["cold"]["fetch"] / med["object"]["fetch"]
        summary[model_id] = {"bytes": size, "median_ms": med, "ratio": ratio, "fetch_ratio": fetch_ratio}
        print(f"\nmodel {model_id}: packed artifact {size / 1e6:.2f} MB; {args.repeats} loads each (median ms)")
        print(f"{'path':<14}{'total':>10}{'fetch':>10}{'open':>10}")
        for w, label in (("cold", "cold MLflow"), ("object", "object store")):
            print(f"{label:<14}{med[w]['total']:>10.1f}{med[w]['fetch']:>10.1f}{med[w]['open']:>10.1f}")
        print(f"cold / object store: total {ratio:.1f}x, fetch {fetch_ratio:.1f}x "
              f"(target >= {TARGET:.0f}x on total: {'met' if ratio >= TARGET else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
