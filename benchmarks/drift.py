"""Data drift (issue 16): the platform's drift run against Evidently's DataDriftPreset.

  compare  ROWS reference and ROWS current rows x 50 columns (35 numeric of several
           distributions, 15 categorical strings; drift injected into about half of them at
           several strengths, some near the thresholds), written as parquet to a temp dir.
           (a) Evidently's DataDriftPreset on the same files with the same column types, in
               Evidently's own venv as a subprocess (benchmarks/_evidently_drift.py; its own
               compute seconds, not its import or parquet read);
           (b) the platform: build_profile on the reference (timed apart: it runs once, at
               registration) and dataset_drift_ray on the current table, on a local Ray
               cluster started here (ray.init(num_cpus=2)), first call (workers starting) and
               the best of 3 after.
           Printed: seconds, the ratio Evidently / platform (target >= 10x), the share of
           columns with the same verdict (target >= 95%) and the columns that differ.
  wide     300k x 1000 numeric columns: build_profile, then dataset_drift_ray on a current
           window of the same shape (first call, with peak memory -- see PeakRSS -- and a
           second call with the workers warm); seconds.

The Ray parts take /tmp/matih-integration.lock (flock) while the cluster is up.

    make evidently-env     # once: .venv-evidently with evidently (and pandas < 3)
    PYTHONPATH=$PWD .venv/bin/python benchmarks/drift.py [--part compare|wide|all]
        [--rows 100000] [--wide-rows 300000] [--wide-cols 1000] [--evidently PYTHON] [--json PATH]

Ratios are printed, never asserted.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.monitoring.drift import DriftOptions, dataset_drift_ray  # noqa: E402
from app.monitoring.profile import build_profile  # noqa: E402

EVIDENTLY_NAMES = {"K-S p_value": "ks", "chi-square p_value": "chisquare", "Z-test p_value": "z",
                   "PSI": "psi", "Jensen-Shannon distance": "jensenshannon",
                   "Wasserstein distance (normed)": "wasserstein", "Hellinger distance": "hellinger"}
LOCK = "/tmp/matih-integration.lock"
TARGET_SPEEDUP = 10.0
TARGET_AGREEMENT = 0.95


def _default_evidently() -> str:
    """Evidently's own venv: $MATIH_EVIDENTLY_PYTHON, else this checkout's (make evidently-env)."""
    return os.environ.get("MATIH_EVIDENTLY_PYTHON") or str(ROOT / ".venv-evidently/bin/python")


# Numeric columns: (distribution, drift). Shifts are in units of the column's std, so the
# normed Wasserstein distance of a pure shift is about the shift: 0.08-0.12 sit at its 0.1
# threshold. Scale changes and mixture changes exercise the tails.
NUMERIC = [
    ("normal", 0.0), ("normal", 0.0), ("normal", 0.02), ("normal", 0.05), ("normal", 0.08),
    ("normal", 0.1), ("normal", 0.12), ("normal", 0.2), ("normal", 0.5),
    ("lognormal", 0.0), ("lognormal", 0.05), ("lognormal", 0.15), ("lognormal", 0.4),
    ("exponential", 0.0), ("exponential", 0.09), ("exponential", 0.3),
    ("uniform", 0.0), ("uniform", 0.11), ("uniform", 0.25),
    ("gamma", 0.0), ("gamma", 0.06), ("gamma", 0.2),
    ("student_t", 0.0), ("student_t", 0.1),
    ("scale", 1.0), ("scale", 1.15), ("scale", 1.5),
    ("poisson", 0.0), ("poisson", 0.1), ("poisson", 0.3),
    ("small_int", 0.0), ("small_int", 0.1),
    ("binary", 0.0), ("binary", 0.05),
    ("missing", 0.1),
]
# Categorical columns: (number of categories, probability moved from the first category to the
# last). Jensen-Shannon's 0.1 sits near a move of about 0.1-0.15 for these.
CATEGORICAL = [(3, 0.0), (3, 0.02), (3, 0.08), (3, 0.15), (5, 0.0), (5, 0.05), (5, 0.12), (5, 0.3),
               (10, 0.0), (10, 0.04), (10, 0.1), (10, 0.2), (30, 0.0), (30, 0.06), (2, 0.1)]


def _numeric(rng, dist: str, n: int, drift: float) -> np.ndarray:
    if dist == "normal":
        return rng.normal(drift, 1.0, n)
    if dist == "lognormal":
        x = rng.lognormal(0.0, 0.5, n)
        return x + drift * 0.604  # std of lognormal(0, 0.5) ~ 0.604
    if dist == "exponential":
        return rng.exponential(1.0, n) + drift
    if dist == "uniform":
        return rng.uniform(0, 1, n) + drift * 0.2887
    if dist == "gamma":
        return rng.gamma(2.0, 1.0, n) + drift * 1.414
    if dist == "student_t":
        return rng.standard_t(5, n) + drift * 1.29
    if dist == "scale":
        return rng.normal(0.0, drift, n)
    if dist == "poisson":
        return rng.poisson(4.0 + drift * 2.0, n).astype(np.float64)
    if dist == "small_int":
        return rng.choice([0.0, 1.0, 2.0, 3.0], n, p=np.array([0.4, 0.3, 0.2, 0.1]) + [-drift, 0, 0, drift])
    if dist == "binary":
        return (rng.random(n) < 0.3 + drift).astype(np.float64)
    if dist == "missing":
        x = rng.normal(0.0, 1.0, n)
        x[rng.random(n) < drift] = np.nan
        return x
    raise ValueError(dist)


def _categorical(rng, k: int, n: int, move: float) -> pa.Array:
    p = np.linspace(2.0, 1.0, k)
    p /= p.sum()
    p[0] -= min(move, p[0] - 1e-3)
    p[-1] += 1 - p.sum()
    labels = np.array([f"cat_{i:02d}" for i in range(k)])
    return pa.array(labels[rng.choice(k, n, p=p)].tolist())


def make_tables(rows: int, seed: int = 0) -> tuple[pa.Table, pa.Table, list[str], list[str]]:
    rng = np.random.default_rng(seed)
    ref, cur, num, cat = {}, {}, [], []
    for i, (dist, drift) in enumerate(NUMERIC):
        name = f"num_{i:02d}_{dist}"
        base = 1.0 if dist == "scale" else 0.0
        ref[name] = _numeric(rng, dist, rows, base)
        cur[name] = _numeric(rng, dist, rows, drift if dist != "missing" else 0.3)
        num.append(name)
    for i, (k, move) in enumerate(CATEGORICAL):
        name = f"cat_{i:02d}_k{k}"
        ref[name] = _categorical(rng, k, rows, 0.0)
        cur[name] = _categorical(rng, k, rows, move)
        cat.append(name)
    return pa.table(ref), pa.table(cur), num, cat


@contextmanager
def integration_lock():
    with open(LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def ray_cluster(num_cpus: int = 2):
    import ray

    with integration_lock():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()


class PeakRSS:
    """Peak resident memory of this process and of the Ray worker processes (``ray::`` names,
    the raylet's children), sampled every 0.1 s with psutil. The workers' figure is the peak of
    their summed RSS: pages of the shared object store that a worker maps count in its RSS, so
    a block read by two workers counts twice -- an upper bound, not a measurement of distinct
    memory."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self._psutil, self.interval = psutil, interval
        self.driver = 0
        self.workers = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = self._psutil.Process()
        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, me.memory_info().rss)
                total = 0
                for p in self._psutil.process_iter(["name", "cmdline"]):
                    try:
                        name = p.info["name"] or ""
                        cmd = " ".join(p.info["cmdline"] or [])
                        if name.startswith("ray::") or cmd.startswith("ray::") or "default_worker.py" in cmd:
                            total += p.memory_info().rss
                    except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                        pass
                self.workers = max(self.workers, total)
            except Exception:  # noqa: BLE001 -- sampling must not kill the benchmark
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_evidently(python: str, ref_path: str, cur_path: str, num: list[str], cat: list[str]) -> dict:
    cmd = [python, str(ROOT / "benchmarks/_evidently_drift.py"), ref_path, cur_path,
           "--numeric", ",".join(num), "--categorical", ",".join(cat)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"Evidently failed: {out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = wall
    return res


def bench_compare(rows: int, evidently: str) -> dict[str, Any]:
    ref, cur, num, cat = make_tables(rows)
    with tempfile.TemporaryDirectory(prefix="matih-drift-") as d:
        rp, cp = os.path.join(d, "ref.parquet"), os.path.join(d, "cur.parquet")
        pq.write_table(ref, rp)
        pq.write_table(cur, cp)
        print(f"compare: {rows:,} reference + {rows:,} current rows x {len(num) + len(cat)} columns "
              f"({len(num)} numeric, {len(cat)} categorical)", flush=True)
        ev = run_evidently(evidently, rp, cp, num, cat)
        print(f"  Evidently DataDriftPreset: {ev['seconds']:.2f} s compute ({ev['wall_seconds']:.2f} s with "
              f"import and read)", flush=True)
        ref = pq.read_table(rp)
        t0 = time.perf_counter()
        profile = build_profile(ref, categorical=cat)
        t_profile = time.perf_counter() - t0
        cur = pq.read_table(cp)
    with ray_cluster(2):
        t0 = time.perf_counter()
        res = dataset_drift_ray(profile, cur, DriftOptions(), num_cpus=0.25, columns_per_task=50)
        t_first = time.perf_counter() - t0
        warm = []
        for _ in range(3):
            t0 = time.perf_counter()
            res = dataset_drift_ray(profile, cur, DriftOptions(), num_cpus=0.25, columns_per_task=50)
            warm.append(time.perf_counter() - t0)
    t_warm = min(warm)
    cols = res["columns"]
    same, differ = 0, []
    for name, e in ev["columns"].items():
        o = cols[name]
        etest = EVIDENTLY_NAMES.get(e["test"], e["test"])
        score = o["p_value"] if o["p_value"] is not None else o["statistic"]
        if o["drifted"] == e["drifted"] and o["test"] == etest:
            same += 1
        else:
            differ.append({"column": name, "test": o["test"], "evidently_test": etest, "score": score,
                           "evidently_score": e["score"], "drifted": o["drifted"], "evidently_drifted": e["drifted"]})
    agreement = same / len(ev["columns"])
    out = {"rows": rows, "columns": len(num) + len(cat), "evidently_seconds": ev["seconds"],
           "profile_seconds": t_profile, "drift_first_seconds": t_first, "drift_warm_seconds": t_warm,
           "speedup_warm": ev["seconds"] / t_warm, "speedup_first": ev["seconds"] / t_first,
           "agreement": agreement, "differ": differ,
           "drifted": {"platform": res["dataset_drift"]["drifted"],
                       "evidently": sum(1 for e in ev["columns"].values() if e["drifted"])},
           "scores": {n: {"platform": (cols[n]["p_value"] if cols[n]["p_value"] is not None else cols[n]["statistic"]),
                          "evidently": e["score"], "test": cols[n]["test"]} for n, e in ev["columns"].items()}}
    print("| step | seconds |\n| --- | ---: |")
    print(f"| Evidently DataDriftPreset (compute) | {ev['seconds']:.2f} |")
    print(f"| platform build_profile (reference, once) | {t_profile:.2f} |")
    print(f"| platform dataset_drift_ray, first call | {t_first:.2f} |")
    print(f"| platform dataset_drift_ray, best of 3 | {t_warm:.2f} |")
    print(f"ratio Evidently / platform drift: {out['speedup_warm']:.1f}x warm, {out['speedup_first']:.1f}x first "
          f"call (target >= {TARGET_SPEEDUP:.0f}x)")
    print(f"same verdict: {same}/{len(ev['columns'])} = {agreement:.1%} (target >= {TARGET_AGREEMENT:.0%}); "
          f"drifted: platform {out['drifted']['platform']}, Evidently {out['drifted']['evidently']}")
    for d_ in differ:
        print(f"  differs: {d_['column']}: {d_['test']} {d_['score']:.4g} drifted={d_['drifted']} vs Evidently "
              f"{d_['evidently_test']} {d_['evidently_score']:.4g} drifted={d_['evidently_drifted']}")
    return out


def bench_wide(rows: int, cols: int) -> dict[str, Any]:
    print(f"wide: {rows:,} x {cols} numeric columns", flush=True)
    rng = np.random.default_rng(1)
    with PeakRSS() as mem_profile:
        ref = pa.table({f"c{i:04d}": rng.normal(size=rows) for i in range(cols)})
        t0 = time.perf_counter()
        profile = build_profile(ref)
        t_profile = time.perf_counter() - t0
        del ref
    profile_bytes = len(json.dumps(profile))
    cur = pa.table({f"c{i:04d}": rng.normal(0.2 if i % 10 == 0 else 0.0, size=rows) for i in range(cols)})
    with ray_cluster(2):
        with PeakRSS() as mem_drift:
            t0 = time.perf_counter()
            res = dataset_drift_ray(profile, cur, DriftOptions(), num_cpus=0.25, columns_per_task=50)
            t_drift = time.perf_counter() - t0
        t0 = time.perf_counter()
        dataset_drift_ray(profile, cur, DriftOptions(), num_cpus=0.25, columns_per_task=50)
        t_second = time.perf_counter() - t0
    table_gb = rows * cols * 8 / 1e9
    out = {"rows": rows, "columns": cols, "table_gb": table_gb, "profile_seconds": t_profile,
           "profile_json_mb": profile_bytes / 1e6, "drift_seconds": t_drift, "drift_second_call_seconds": t_second,
           "drifted": res["dataset_drift"]["drifted"],
           "peak_rss_gb": {"profile_driver": mem_profile.driver / 1e9, "drift_driver": mem_drift.driver / 1e9,
                           "drift_workers_sum": mem_drift.workers / 1e9}}
    print("| step | seconds | peak RSS |\n| --- | ---: | --- |")
    print(f"| build_profile ({table_gb:.1f} GB of float64) | {t_profile:.1f} | driver {out['peak_rss_gb']['profile_driver']:.1f} GB |")
    print(f"| dataset_drift_ray (first call, 2 CPUs) | {t_drift:.1f} | driver {out['peak_rss_gb']['drift_driver']:.1f} GB, "
          f"workers (sum, shared pages counted per worker) {out['peak_rss_gb']['drift_workers_sum']:.1f} GB |")
    print(f"| dataset_drift_ray (second call, workers warm) | {t_second:.1f} | |")
    print(f"profile JSON {out['profile_json_mb']:.1f} MB; drifted columns {out['drifted']} (expected {cols // 10})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=("compare", "wide", "all"), default="all")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--wide-rows", type=int, default=300_000)
    p.add_argument("--wide-cols", type=int, default=1000)
    p.add_argument("--evidently", default=_default_evidently(), help="python of Evidently's venv")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    out: dict[str, Any] = {}
    try:
        from benchmarks.peer_serving import commit, machine_info

        out["machine"], out["commit"] = machine_info(), commit()
    except Exception:  # noqa: BLE001 -- informational only
        pass
    if a.part in ("compare", "all"):
        out["compare"] = bench_compare(a.rows, a.evidently)
    if a.part in ("wide", "all"):
        out["wide"] = bench_wide(a.wide_rows, a.wide_cols)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
