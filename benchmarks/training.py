"""Training: data-parallel scaling and the job scheduler's overhead.

1. Data-parallel speedup. The same fixed CPU workload (an MLP with two 256-wide hidden
   layers on a generated 32-feature classification set) trained with Ray Train on 1 worker
   (strategy single) and on 2 workers (DDP over gloo), each worker with 1 CPU. The steady
   epoch time is the median gap between consecutive epochs as they appear in the metadata
   store (so worker start-up does not count); the end-to-end time of each run is printed too.
   On a 2-core machine the 2-worker run shares the cores with Ray's own processes, so read
   the figure as such.

2. Scheduler overhead. Time from "job submitted" to "first epoch reported in the metadata
   store" when the JobScheduler actor runs the job as a Ray Job (``python -m app.jobs.run``),
   against calling the trainer (``fit_torch``) directly in this process. Same spec, same
   store, same cluster.

    .venv/bin/python benchmarks/training.py [--rows 60000] [--epochs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _spec(name: str, uri: str, workers: int, epochs: int, register: bool = False) -> dict:
    return {
        "name": name,
        "framework": "torch",
        "model": {"kind": "mlp", "hidden": [256, 256]},
        "dataset": {"uri": uri, "target": "target"},
        "hyperparameters": {"epochs": epochs, "lr": 0.01, "batch_size": 128},
        "strategy": "single" if workers == 1 else "data_parallel",
        "resources": {"num_workers": workers, "cpus_per_worker": 1.0 if workers > 1 else 1.0},
        "checkpoint": {"frequency": 1000},  # the benchmark measures training, not checkpoint I/O
        **({"register_as": "bench-training"} if register else {}),
    }


def _epoch_times(store, job_id: str, epochs: int, out: dict[int, float], timeout: float = 900) -> None:
    """Record when each epoch first shows in the store (polls every 20 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(out) < epochs:
        epoch = (store.get_job(job_id)["progress"] or {}).get("epoch", 0)
        if epoch and epoch not in out:
            out[epoch] = time.monotonic()
        time.sleep(0.02)


def _wait_epoch(store, job_id: str, timeout: float = 600) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get_job(job_id)
        if (job["progress"] or {}).get("epoch", 0) >= 1:
            return time.monotonic()
        if job["status"] in ("failed", "cancelled"):
            raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
        time.sleep(0.05)
    raise SystemExit(f"job {job_id} reported no epoch in {timeout}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()

    import pandas as pd
    import ray
    from sklearn.datasets import make_classification

    from app.bootstrap import prepare
    from app.settings import load_settings
    from app.store import MetadataStore
    from app.training.data import prepare_data
    from app.training.spec import TrainingJobSpec
    from app.training.torch_train import fit_torch

    home = Path(tempfile.mkdtemp(prefix="matih-bench-train-"))
    os.environ["MATIH_HOME"] = str(home)
    X, y = make_classification(n_samples=args.rows, n_features=32, n_informative=16, n_classes=4, random_state=0)
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(32)]).assign(target=y)
    (home / "data").mkdir()  # the default data root: job specs may name only paths under it
    uri = str(home / "data" / "train.parquet")
    frame.to_parquet(uri)
    settings = load_settings("local", matih_home=str(home), admin_token="bench")
    prepare(settings)
    store = MetadataStore(settings.database_url)
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)

    def direct(name: str, workers: int, epochs: int) -> tuple[float, float, float]:
        """(seconds to the first epoch in the store, seconds to the end, median steady epoch
        seconds) of fit_torch called here."""
        spec = TrainingJobSpec.model_validate(_spec(name, uri, workers, epochs))
        data = prepare_data(uri, "target", None, 0.2, 42, encode_labels=True)
        job = store.create_job("training", name, spec.model_dump(mode="json"), "bench")
        store.transition_job(job["job_id"], "running")
        t0 = time.monotonic()
        seen: dict[int, float] = {}
        watcher = threading.Thread(target=_epoch_times, args=(store, job["job_id"], epochs, seen), daemon=True)
        watcher.start()
        fit_torch(spec, data, settings, job["job_id"])
        end = time.monotonic()
        watcher.join(timeout=60)
        store.transition_job(job["job_id"], "succeeded")
        gaps = [seen[e + 1] - seen[e] for e in range(1, epochs) if e in seen and e + 1 in seen]
        first = seen.get(1, float("nan")) - t0
        return first, end - t0, (statistics.median(gaps) if gaps else float("nan"))

    # -- 1. data-parallel 1 vs 2 workers -------------------------------------------------------
    direct("warm-up", 1, 1)  # imports, first worker processes
    runs = {w: direct(f"dp{w}", w, args.epochs) for w in (1, 2)}
    steady = {w: r[2] for w, r in runs.items()}
    total = {w: r[1] for w, r in runs.items()}
    speedup_steady = steady[1] / steady[2]
    speedup_total = total[1] / total[2]
    print(f"data-parallel, {args.rows} rows x 32 features, MLP 256x256, {args.epochs} epochs, 1 CPU per worker")
    print(f"  {'workers':>7} {'end to end s':>13} {'steady s/epoch':>15}")
    for w in (1, 2):
        print(f"  {w:>7} {total[w]:>13.2f} {steady[w]:>15.3f}")
    print(f"  speedup 2 vs 1 workers: steady epochs {speedup_steady:.2f}x, end to end {speedup_total:.2f}x")

    # -- 2. scheduler overhead ------------------------------------------------------------------
    from actors.job_scheduler import get_job_scheduler

    scheduler = get_job_scheduler(settings.to_init_kwargs(), settings.actors.num_cpus)
    ray.get(scheduler.ping.remote())
    spec = TrainingJobSpec.model_validate(_spec("sched", uri, 1, 2)).model_dump(mode="json")
    direct_first = direct("direct", 1, 2)[0]
    sched_first = []
    for i in range(2):  # the first Ray Job also pays the job supervisor's start
        job = store.create_job("training", f"sched-{i}", spec, "bench")
        t0 = time.monotonic()
        ray.get(scheduler.notify.remote())
        sched_first.append(_wait_epoch(store, job["job_id"]) - t0)
        while store.get_job(job["job_id"])["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.2)
    sched = min(sched_first)
    print("scheduler overhead: submit -> first epoch in the store")
    print(f"  fit_torch called directly: {direct_first:.2f} s")
    print(f"  through the JobScheduler as a Ray Job: {sched:.2f} s (runs: {', '.join(f'{s:.2f}' for s in sched_first)})")
    print(f"  ratio scheduled / direct: {sched / direct_first:.2f}x (+{sched - direct_first:.2f} s)")
    out = {"rows": args.rows, "epochs": args.epochs, "end_to_end_s": total, "steady_s_per_epoch": steady,
           "speedup_steady": speedup_steady, "speedup_end_to_end": speedup_total,
           "direct_first_epoch_s": direct_first, "scheduled_first_epoch_s": sched_first,
           "scheduler_ratio": sched / direct_first}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
