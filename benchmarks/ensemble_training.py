"""Bagging: 8 members trained as parallel Ray tasks vs one after the other in one process.

The same work both ways (``app.ensembles.training.train_bagging``): ``--members`` bootstrap
replicas of a random forest (``--trees`` trees, one thread) on breast cancer, each fit and
converted to ONNX with its parity check. Parallel: one Ray task per member reserving
``--cpus-per-member`` on a local Ray cluster of ``--cpus`` CPUs; sequential: this process,
no Ray. Wall time of each, median of ``--repeats`` runs after one warm-up run of each (the
first parallel run also pays for starting Ray's worker processes and importing scikit-learn
and skl2onnx in them: it is printed as "cold"). The issue expects 1.5-1.8x on 2 cores.

    .venv/bin/python benchmarks/ensemble_training.py [--members 8] [--trees 61] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--trees", type=int, default=61, help="trees of each member's random forest (odd: no 50-50 vote to break)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--cpus-per-member", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)

    import ray

    from app.ensembles.spec import EnsembleSpec
    from app.ensembles.training import prepare, train_bagging
    from app.settings import load_settings

    settings = load_settings("local", matih_home=tempfile.mkdtemp(prefix="bench-ens-"))
    spec = EnsembleSpec.model_validate({
        "name": "bench-bagging", "task": "classification", "method": "bagging", "n_estimators": args.members,
        "dataset": {"uri": "builtin://breast_cancer", "target": "target"},
        "base": {"estimator": "sklearn.ensemble.RandomForestClassifier",
                 "hyperparameters": {"n_estimators": args.trees, "n_jobs": 1, "random_state": 0}},
        "resources": {"cpus_per_member": args.cpus_per_member},
    })
    data = prepare(spec, settings)

    def sequential():
        return train_bagging(spec, settings, data, parallel=False)

    def parallel():
        return train_bagging(spec, settings, data, parallel=True)

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        cold = _timed(parallel)
        _timed(sequential)  # warm-up: imports and caches of this process
        seq = [_timed(sequential) for _ in range(args.repeats)]
        par = [_timed(parallel) for _ in range(args.repeats)]
        replicas = parallel()
    finally:
        ray.shutdown()
    pids = len({r.pid for r in replicas})
    out = {
        "members": args.members, "trees": args.trees, "cpus": args.cpus, "cpus_per_member": args.cpus_per_member,
        "sequential_s": statistics.median(seq), "parallel_s": statistics.median(par), "parallel_cold_s": cold,
        "sequential_runs_s": seq, "parallel_runs_s": par, "worker_processes": pids,
    }
    out["speedup"] = out["sequential_s"] / out["parallel_s"]
    print(f"bagging {args.members} members ({args.trees}-tree forests, breast cancer), {args.cpus} CPUs:")
    print(f"  sequential, one process : {out['sequential_s']:.2f} s (median of {args.repeats})")
    print(f"  Ray tasks, parallel     : {out['parallel_s']:.2f} s (median of {args.repeats}; cold first run "
          f"{cold:.2f} s; {pids} worker processes)")
    print(f"  speedup                 : {out['speedup']:.2f}x (issue 13 expects about 1.5-1.8x on 2 cores)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
