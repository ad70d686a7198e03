"""Judging one step of a canary: the candidate against the baseline on the SAME traffic window
(the requests of both arms since the step began), never against static thresholds.

Three guardrails, each one-sided (only "the candidate is worse" fails a step):

- **error rate**: the share of requests answered with status >= 400. At the step's end
  (bake time over, ``min_samples`` in both arms) a two-proportion z-test
  (:func:`app.experiments.stats.two_proportion_ztest`, one-sided p = half the two-sided p when
  the candidate's rate is the higher); before that, at every tick, the always-valid mSPRT p
  (:func:`app.experiments.stats.msprt`, Johari et al. 2017) on the 0/1 outcomes with the pooled
  Bernoulli variance, so that looking every few seconds does not inflate false alarms.
- **latency** (successful requests): at the step's end, Mann-Whitney U, one-sided
  (``scipy.stats.mannwhitneyu(candidate, baseline, alternative="greater")``); before it, mSPRT on
  the mean latency. Either way the regression counts only when the Hodges-Lehmann shift
  (:func:`app.experiments.stats.mann_whitney`'s effect) also exceeds BOTH floors:
  ``latency_abs_floor_ms`` and ``latency_rel_floor`` x the baseline's median (kayenta#674).
- **quality** (optional, from feedback): mSPRT at every look; fails when the candidate is
  significantly worse (lower conversion / value / accuracy, higher squared error).

Any guardrail failing fails the step at once, even before bake time or ``min_samples``: a
candidate with ten times the errors is rolled back in its first step. The error-rate and latency
guardrails split ``alpha`` between their two kinds of look (Bonferroni): the interim always-valid
looks test at ``alpha / 2`` however often they are taken, the final look at ``alpha / 2``, so a
step of a candidate no worse than the baseline fails a guardrail with probability at most
``alpha``. The quality metric is read with mSPRT alone, at ``alpha``. A step passes only at its
end, with no guardrail failing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from app.experiments.metrics import metric_samples
from app.rollouts.spec import HIGHER_IS_BETTER, RolloutSpec

__all__ = ["Arm", "Decision", "arms_from_table", "judge_step", "BASELINE", "CANDIDATE"]

BASELINE, CANDIDATE = "baseline", "candidate"  # the variants' names in the traffic plan


@dataclass(frozen=True)
class Arm:
    """One arm's requests in the step's window: per request its latency and HTTP status
    (same length), and per labeled prediction the quality metric's value (0/1 conversion or
    correctness, a reward, or a squared error), empty without feedback."""

    latency_ms: np.ndarray
    status: np.ndarray
    quality: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def requests(self) -> int:
        return int(self.status.size)

    @property
    def errors(self) -> int:
        return int(np.count_nonzero(self.status >= 400))

    def ok_latencies(self) -> np.ndarray:
        return np.asarray(self.latency_ms, dtype=float)[self.status < 400]


@dataclass(frozen=True)
class Decision:
    """The verdict on a step: ``fail`` (a guardrail failed: roll back), ``pass`` (bake time and
    samples reached, nothing failed: next step), ``wait`` (not enough yet); why, and the
    statistics behind it (what the audit record and the ``rollout.*`` event carry)."""

    verdict: Literal["pass", "fail", "wait"]
    reasons: list[str]
    stats: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """As JSON takes it: numpy numbers as Python's, NaN and infinities as None."""
        return _clean(asdict(self))


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _one_sided(p_two: float, worse: bool) -> float:
    """One-sided p of a symmetric two-sided test, in the direction "candidate worse"."""
    if not math.isfinite(p_two):
        return 1.0
    return p_two / 2 if worse else 1 - p_two / 2


def _error_rate(a: Arm, b: Arm, spec: RolloutSpec, final: bool) -> dict[str, Any] | None:
    from app.experiments import stats

    alpha = spec.alpha / 2  # interim and final looks share alpha
    n_a, n_b, x_a, x_b = a.requests, b.requests, a.errors, b.errors
    if n_a == 0 or n_b == 0:
        return None
    rate_a, rate_b = x_a / n_a, x_b / n_b
    out: dict[str, Any] = {"baseline": rate_a, "candidate": rate_b, "errors": {BASELINE: x_a, CANDIDATE: x_b},
                           "requests": {BASELINE: n_a, CANDIDATE: n_b}, "floor": spec.error_rate_floor}
    if x_a + x_b == 0:
        return {**out, "method": "none (no errors in either arm)", "p_value": 1.0, "failed": False}
    if final:
        res = stats.two_proportion_ztest(x_a, n_a, x_b, n_b, alpha=alpha)
        p = _one_sided(res.p_value, res.effect > 0)
        out.update(method="two_proportion_ztest (one-sided)", test=res.to_dict())
    else:
        pooled = (x_a + x_b) / (n_a + n_b)
        var = pooled * (1 - pooled)
        res = stats.msprt(rate_a, var, n_a, rate_b, var, n_b, alpha=alpha, expected_n=spec.min_samples)
        p = res.p_value
        out.update(method="msprt (always valid)", test=res.to_dict())
    effect = rate_b - rate_a
    out.update(effect=effect, p_value=p, alpha=alpha, failed=bool(p < alpha and effect > spec.error_rate_floor))
    return out


def _latency(a: Arm, b: Arm, spec: RolloutSpec, final: bool) -> dict[str, Any] | None:
    from scipy.stats import mannwhitneyu

    from app.experiments import stats

    la, lb = a.ok_latencies(), b.ok_latencies()
    if la.size < 2 or lb.size < 2:
        return None
    alpha = spec.alpha / 2  # interim and final looks share alpha
    mw = stats.mann_whitney(la, lb, alpha=alpha)  # the shift (Hodges-Lehmann) and its interval
    median_a, median_b = float(np.median(la)), float(np.median(lb))
    shift = float(mw.effect)
    floor = max(spec.latency_abs_floor_ms, spec.latency_rel_floor * median_a)
    out: dict[str, Any] = {"median_ms": {BASELINE: median_a, CANDIDATE: median_b}, "shift_ms": shift,
                           "floor_ms": floor, "n": {BASELINE: int(la.size), CANDIDATE: int(lb.size)},
                           "hodges_lehmann": mw.to_dict()}
    if final:
        p = float(mannwhitneyu(lb, la, alternative="greater").pvalue)
        out["method"] = "mann_whitney (one-sided)"
    else:
        res = stats.msprt(float(la.mean()), float(la.var(ddof=1)), int(la.size), float(lb.mean()),
                          float(lb.var(ddof=1)), int(lb.size), alpha=alpha, expected_n=spec.min_samples)
        p = res.p_value if res.effect > 0 else 1.0
        out.update(method="msprt on the mean (always valid)", test=res.to_dict())
    significant = bool(p < alpha)
    out.update(p_value=p, alpha=alpha, significant=significant, failed=significant and shift > floor)
    return out


def _quality(a: Arm, b: Arm, spec: RolloutSpec) -> dict[str, Any] | None:
    from app.experiments import stats

    if spec.quality is None:
        return None
    qa, qb = np.asarray(a.quality, dtype=float), np.asarray(b.quality, dtype=float)
    metric = spec.quality.metric
    out: dict[str, Any] = {"metric": metric, "n": {BASELINE: int(qa.size), CANDIDATE: int(qb.size)}}
    if qa.size < 2 or qb.size < 2:
        return {**out, "failed": False, "p_value": None}
    mean_a, mean_b = float(qa.mean()), float(qb.mean())
    var_a, var_b = float(qa.var(ddof=1)), float(qb.var(ddof=1))
    if var_a == 0 and var_b == 0:
        if mean_a == mean_b:
            return {**out, "failed": False, "p_value": 1.0, "baseline": mean_a, "candidate": mean_b}
        var_a = var_b = 1e-12  # constant arms that differ: as certain as data gets
    res = stats.msprt(mean_a, var_a, int(qa.size), mean_b, var_b, int(qb.size), alpha=spec.alpha,
                      expected_n=spec.quality.expected_n or spec.min_samples)
    worse = res.effect < 0 if HIGHER_IS_BETTER[metric] else res.effect > 0
    value = (lambda m: math.sqrt(m)) if metric == "rmse" else (lambda m: m)
    out.update(method="msprt (always valid)", baseline=value(mean_a), candidate=value(mean_b), test=res.to_dict(),
               p_value=res.p_value, failed=bool(worse and res.p_value < spec.alpha))
    return out


def judge_step(baseline: Arm, candidate: Arm, spec: RolloutSpec, *, elapsed_s: float) -> Decision:
    """The verdict on a step ``elapsed_s`` seconds old, from both arms' requests of the step's
    window (see the module docstring for the tests and the rule)."""
    final = elapsed_s >= spec.bake_s and min(baseline.requests, candidate.requests) >= spec.min_samples
    stats: dict[str, Any] = {
        "elapsed_s": round(float(elapsed_s), 3), "final": final,
        "requests": {BASELINE: baseline.requests, CANDIDATE: candidate.requests},
        "error_rate": _error_rate(baseline, candidate, spec, final),
        "latency": _latency(baseline, candidate, spec, final),
        "quality": _quality(baseline, candidate, spec),
    }
    fails = []
    err, lat, qual = stats["error_rate"], stats["latency"], stats["quality"]
    if err and err["failed"]:
        fails.append(f"error rate {err['candidate']:.2%} vs {err['baseline']:.2%} on the baseline "
                     f"(p={err['p_value']:.3g} < {err['alpha']:g}, {err['method']})")
    if lat and lat["failed"]:
        fails.append(f"latency +{lat['shift_ms']:.1f} ms (median {lat['median_ms'][CANDIDATE]:.1f} vs "
                     f"{lat['median_ms'][BASELINE]:.1f} ms; p={lat['p_value']:.3g}, over the floor of "
                     f"{lat['floor_ms']:.1f} ms)")
    if qual and qual["failed"]:
        fails.append(f"{qual['metric']} {qual['candidate']:.4g} vs {qual['baseline']:.4g} on the baseline "
                     f"(always-valid p={qual['p_value']:.3g} < {spec.alpha})")
    if fails:
        return Decision("fail", fails, stats)
    waiting = []
    if elapsed_s < spec.bake_s:
        waiting.append(f"baking: {elapsed_s:.0f} of {spec.bake_s:.0f} s")
    if min(baseline.requests, candidate.requests) < spec.min_samples:
        waiting.append(f"samples: baseline {baseline.requests}, candidate {candidate.requests} of {spec.min_samples}")
    if spec.quality is not None and spec.quality.required and qual is not None \
            and min(qual["n"].values()) < spec.min_samples:
        waiting.append(f"labeled samples: baseline {qual['n'][BASELINE]}, candidate {qual['n'][CANDIDATE]} "
                       f"of {spec.min_samples}")
    if waiting:
        return Decision("wait", waiting, stats)
    return Decision("pass", ["no guardrail failed: error rate, latency" + (", quality" if qual else "")], stats)


def arms_from_table(table: pa.Table, metric: str | None = None) -> dict[str, Arm]:
    """The two arms of a prediction-log window (``app.predlog.join.read_window``, or
    ``labeled(..., how="left")`` for a quality metric): rows of the variants ``baseline`` and
    ``candidate``. Latency and status count per request (the row of instance 0; a request's
    rows share them); the quality metric per prediction. A null status is 200 (files from
    before the column)."""
    out: dict[str, Arm] = {}
    variants = np.asarray(table.column("variant").to_numpy(zero_copy_only=False), dtype=object) \
        if table.num_rows else np.empty(0, dtype=object)
    instance = np.asarray(table.column("instance").to_numpy(zero_copy_only=False)) if table.num_rows else np.empty(0)
    latency = np.asarray(table.column("latency_ms").to_numpy(zero_copy_only=False), dtype=float) \
        if table.num_rows else np.empty(0)
    if table.num_rows and "status" in table.column_names:
        status = np.asarray(table.column("status").fill_null(200).to_numpy(zero_copy_only=False), dtype=int)
    else:
        status = np.full(table.num_rows, 200, dtype=int)
    # the quality metric as A/B tests define it (app.experiments.metrics): one definition per metric
    quality = metric_samples(table, metric, [BASELINE, CANDIDATE]).values if metric is not None else {}
    for name in (BASELINE, CANDIDATE):
        first = (variants == name) & (instance == 0)
        out[name] = Arm(latency_ms=latency[first], status=status[first], quality=quality.get(name, np.empty(0)))
    return out
