"""The analysis of an A/B test: each arm's metric, every treatment against the control by the
spec's method, guardrails, one multiple-testing correction over all of it, the sample ratio
mismatch check, and a verdict with its reasons.

The statistics themselves are :mod:`app.experiments.stats` (scipy and numpy); this module
decides which test runs on which samples and how their results combine:

- p-values of every (treatment arm x metric) comparison, primary and guardrails, are adjusted
  together with Holm's step-down method, so the chance of any false alarm stays at ``alpha``
  however many arms and guardrails the test has. Bayesian results have no p-value and are judged
  by each arm's probability to be best (at least ``1 - alpha``).
- The sample ratio mismatch check (chi-square of the requests each variant got against the
  plan's weights, p < 0.001) runs first: a split that did not happen as configured (a crashing
  variant, a biased assignment, logging that drops one side) makes every comparison suspect, so
  the verdict is ``unreliable_srm`` whatever the tests say.
- A fixed-horizon test (z, Welch, Mann-Whitney) read before its planned sample size gives no
  winner: reading it repeatedly and stopping at the first significant look inflates the false
  positive rate well past alpha; mSPRT's always-valid p-values are the method for reading early.
- mSPRT's mixing variance tau^2 is tuned (Johari et al. 2017, eq. 9) to the expected sample per
  arm with the pooled variance of the data, and the same tau^2 is used for every look of the
  timeline, so the confidence sequence the report draws is the one the verdict reads.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
from scipy import stats as sps

from app.errors import MatihError
from app.experiments import stats
from app.experiments.metrics import MetricSamples, assignment_counts, metric_samples
from app.experiments.spec import FIXED_HORIZON, LOWER_IS_BETTER, ABTestSpec

__all__ = ["VERDICTS", "analyze", "timeline", "arms_of", "expected_samples"]

VERDICTS = ("insufficient_data", "no_difference_yet", "treatment_wins", "control_wins", "guardrail_failed",
            "unreliable_srm")
SRM_THRESHOLD = 0.001
DEFAULT_BUCKETS = 20
# Without mde or expected_samples_per_arm, mSPRT is tuned to this many times min_samples_per_arm.
EXPECTED_N_FACTOR = 10


def _finite(value: Any) -> Any:
    """JSON-safe numbers: NaN and infinities become None, numpy scalars plain Python."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def arms_of(spec: ABTestSpec, traffic_weights: dict[str, float]) -> tuple[str, list[str]]:
    """(control, treatments): the control is the spec's (or the plan's first variant); every
    other variant with a positive weight is a treatment arm."""
    control = spec.control or next(iter(traffic_weights))
    treatments = [v for v, w in traffic_weights.items() if v != control and w > 0]
    return control, treatments


def _arm_summary(values: np.ndarray, kind: str, metric: str, alpha: float) -> dict[str, Any]:
    n = int(values.size)
    out: dict[str, Any] = {"n": n, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    if n == 0:
        return out
    mean = float(values.mean())
    out["mean"] = mean
    if kind == "binary":
        out["successes"] = int(values.sum())
        ci = sps.binomtest(out["successes"], n).proportion_ci(confidence_level=1 - alpha, method="wilson")
        out["ci_low"], out["ci_high"] = float(ci.low), float(ci.high)
    if n >= 2:
        std = float(values.std(ddof=1))
        out["std"] = std
        if kind == "continuous":
            if std > 0:
                low, high = sps.t.interval(1 - alpha, n - 1, loc=mean, scale=std / math.sqrt(n))
            else:
                low = high = mean
            out["ci_low"], out["ci_high"] = float(low), float(high)
    if metric == "rmse":
        out["rmse"] = math.sqrt(mean)
    return out


def _pooled_variance(samples: MetricSamples, arms: list[str]) -> float:
    parts = [samples.values[a] for a in arms if samples.values[a].size >= 2]
    if not parts:
        return float("nan")
    dof = sum(p.size - 1 for p in parts)
    return float(sum(p.var(ddof=1) * (p.size - 1) for p in parts) / dof) if dof > 0 else float("nan")


def expected_samples(spec: ABTestSpec, required_per_arm: int | None) -> int:
    """The sample per arm mSPRT is tuned to: the spec's, else the sample-size calculator's,
    else EXPECTED_N_FACTOR x min_samples_per_arm."""
    return spec.expected_samples_per_arm or required_per_arm or EXPECTED_N_FACTOR * spec.min_samples_per_arm


def _sample_size(spec: ABTestSpec, control: dict[str, Any], comparisons: int) -> dict[str, Any] | None:
    """The sample-size calculator at the spec's alpha (split over the treatment arms, Bonferroni,
    which Holm never needs more than), power and mde; the baseline from the spec or the control."""
    if spec.mde is None:
        return None
    alpha = spec.alpha / max(1, comparisons)
    out: dict[str, Any] = {"mde": spec.mde, "alpha": alpha, "power": spec.power, "required_per_arm": None}
    if spec.baseline is not None:
        baseline, source = spec.baseline, "spec"
    elif spec.kind == "binary":
        baseline, source = control.get("mean"), "control data"
    else:
        baseline, source = control.get("std"), "control data"
    out["baseline"], out["baseline_from"] = baseline, source
    try:
        if baseline is None:
            raise ValueError("no baseline yet")
        if spec.kind == "binary":
            out["required_per_arm"] = int(stats.sample_size_proportions(baseline, spec.mde, alpha=alpha, power=spec.power))
        else:
            out["required_per_arm"] = int(stats.sample_size_means(baseline, spec.mde, alpha=alpha, power=spec.power))
    except (MatihError, ValueError, ZeroDivisionError) as exc:
        out["error"] = f"not computable yet: {getattr(exc, 'message', exc)}"
    return out


def _tau2(spec: ABTestSpec, samples: MetricSamples, arms: list[str], expected_n: int) -> float | None:
    sigma2 = _pooled_variance(samples, arms)
    if not math.isfinite(sigma2) or sigma2 <= 0:
        return None
    return float(stats.msprt_tau2(sigma2, expected_n, alpha=spec.alpha))


def _test(method: str, a: np.ndarray, b: np.ndarray, alpha: float) -> dict[str, Any]:
    """One fixed-horizon comparison of treatment ``b`` with control ``a``: the result's dict, or why none."""
    if a.size < 2 or b.size < 2:
        return {"error": f"needs at least 2 samples per arm (control {a.size}, treatment {b.size})"}
    try:
        if method == "z_test":
            result = stats.two_proportion_ztest(int(a.sum()), int(a.size), int(b.sum()), int(b.size), alpha=alpha)
        elif method == "welch":
            result = stats.welch_ttest(a, b, alpha=alpha)
        elif method == "mann_whitney":
            result = stats.mann_whitney(a, b, alpha=alpha)
        else:  # pragma: no cover - the spec admits no other method here
            raise ValueError(f"unknown method {method!r}")
    except (MatihError, ValueError, ZeroDivisionError, FloatingPointError) as exc:
        return {"error": str(getattr(exc, "message", exc))}
    return result.to_dict()


def _bayes(spec: ABTestSpec, samples: MetricSamples, arms: list[str]) -> dict[str, Any]:
    """Each arm's probability to be best and expected loss. The posteriors see the metric on a
    higher-is-better scale: error rates as their complement (successes = requests without an
    error), rmse and latency negated; expected losses are in the metric's own unit either way."""
    counts = {a: int(samples.values[a].size) for a in arms}
    if min(counts.values()) < 2:
        return {"error": f"needs at least 2 samples per arm ({counts})"}
    lower = spec.metric in LOWER_IS_BETTER
    try:
        if spec.kind == "binary":
            hits = {a: int(samples.values[a].sum()) for a in arms}
            if lower:
                hits = {a: counts[a] - hits[a] for a in arms}
            result = stats.bayes_binary(hits, counts)
            scale = "complement" if lower else "metric"
        else:
            sign = -1.0 if lower else 1.0
            means = {a: sign * float(samples.values[a].mean()) for a in arms}
            variances = {a: float(samples.values[a].var(ddof=1)) for a in arms}
            result = stats.bayes_normal(means, variances, counts)
            scale = "negated" if lower else "metric"
    except (MatihError, ValueError, ZeroDivisionError) as exc:
        return {"error": str(getattr(exc, "message", exc))}
    return {**result.to_dict(), "scale": scale}


def _better(metric: str, effect: float) -> bool:
    return effect < 0 if metric in LOWER_IS_BETTER else effect > 0


def _srm(traffic_weights: dict[str, float], table: pa.Table) -> tuple[dict[str, Any] | None, dict[str, int]]:
    counts = assignment_counts(table)
    planned = {v: w for v, w in traffic_weights.items() if w > 0}
    unplanned = {v: n for v, n in counts.items() if v not in planned}
    observed = {v: counts.get(v, 0) for v in planned}
    if sum(observed.values()) == 0:
        return None, unplanned
    return stats.srm_check(observed, planned, threshold=SRM_THRESHOLD).to_dict(), unplanned


def _looks(since_us: int, until_us: int, buckets: int) -> np.ndarray:
    """The ends of ``buckets`` equal slices of ``[since, until)`` (microseconds): cumulative looks."""
    return np.linspace(since_us, until_us, max(1, buckets) + 1)[1:].astype(np.int64)


def _cumulative(values: np.ndarray, times: np.ndarray, edges: np.ndarray) -> dict[str, np.ndarray]:
    """n, mean and sample variance (ddof=1) of the values logged before each edge; the last
    look holds every value (the window's end is its reader's, the rows are all before it)."""
    order = np.argsort(times, kind="stable")
    x = values[order]
    n = np.searchsorted(times[order], edges, side="left")
    if n.size:
        n[-1] = x.size
    if x.size == 0:
        return {"n": n, "mean": np.full(edges.size, np.nan), "var": np.full(edges.size, np.nan)}
    shift = x[0]  # shifted sums keep the variance accurate for large means (latencies)
    s1 = np.concatenate([[0.0], np.cumsum(x - shift)])[n]
    s2 = np.concatenate([[0.0], np.cumsum((x - shift) ** 2)])[n]
    nn = np.maximum(n, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, shift + s1 / nn, np.nan)
        var = np.where(n > 1, np.maximum(s2 - s1 ** 2 / nn, 0.0) / np.maximum(n - 1, 1), np.nan)
    return {"n": n, "mean": mean, "var": var}


def _sequence(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tau2: float, alpha: float) -> list[dict[str, Any] | None]:
    """mSPRT at each look (``stats.msprt`` with one tau^2 for all), the p-value as the running
    minimum and the interval as the running intersection: the always-valid reading (Johari,
    Pekelis & Walsh 2017, section 3), which holds whichever looks are taken. None before both
    arms have 2 samples."""
    out: list[dict[str, Any] | None] = []
    low, high, p_min = -math.inf, math.inf, 1.0
    for k in range(a["n"].size):
        if a["n"][k] < 2 or b["n"][k] < 2:
            out.append(None)
            continue
        r = stats.msprt(float(a["mean"][k]), float(a["var"][k]), int(a["n"][k]), float(b["mean"][k]),
                        float(b["var"][k]), int(b["n"][k]), alpha=alpha, tau2=tau2)
        low, high, p_min = max(low, r.ci_low), min(high, r.ci_high), min(p_min, r.p_value)
        out.append({**r.to_dict(), "p_value": p_min, "ci_low": low, "ci_high": high,
                    "p_value_at_look": r.p_value})
    return out


def _msprt_result(samples: MetricSamples, control: str, arm: str, edges: np.ndarray, tau2: float | None,
                  alpha: float) -> dict[str, Any]:
    if tau2 is None:
        return {"error": "the outcomes have no variance yet (every value the same): mSPRT cannot be tuned"}
    a = _cumulative(samples.values[control], samples.times[control], edges)
    b = _cumulative(samples.values[arm], samples.times[arm], edges)
    try:
        path = _sequence(a, b, tau2, alpha)
    except (MatihError, ValueError, ZeroDivisionError) as exc:
        return {"error": str(getattr(exc, "message", exc))}
    if path[-1] is None:
        return {"error": f"needs at least 2 samples per arm (control {samples.n(control)}, treatment {samples.n(arm)})"}
    return {**path[-1], "method": "msprt", "looks": int(edges.size)}


def _window_us(table: pa.Table, since: datetime | None, until: datetime) -> tuple[int, int]:
    until_us = int(until.timestamp() * 1_000_000)
    if since is not None:
        return int(since.timestamp() * 1_000_000), until_us
    if table.num_rows and "timestamp" in table.column_names:
        first = table.column("timestamp").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        return int(np.min(first.to_numpy(zero_copy_only=False))), until_us
    return until_us - 1, until_us


def analyze(
    spec: ABTestSpec, traffic_weights: dict[str, float], table: pa.Table, *, now: datetime,
    since: datetime | None = None, until: datetime | None = None, buckets: int = DEFAULT_BUCKETS,
) -> dict[str, Any]:
    """The analysis of ``spec`` on ``table`` (the endpoint's log window joined with feedback,
    ``labeled(..., how="left")``, up to ``now``), with the split ``traffic_weights`` (variant ->
    share, the plan's) as the SRM check's expectation. mSPRT reads the window (``since``, default
    the first row, .. ``until``, default ``now``) at ``buckets`` cumulative looks, the ones
    :func:`timeline` draws.

    Returns a JSON-ready dict: ``arms`` (n, mean, CI at 1 - alpha), ``comparisons`` (per treatment
    and metric: the test's result, the Holm-adjusted p-value, significance, and for guardrails
    whether they failed), ``bayes`` (the Bayesian method), ``srm``, ``reliable``, ``sample_size``,
    ``verdict`` (one of :data:`VERDICTS`), ``winner`` and ``reasons``."""
    control, treatments = arms_of(spec, traffic_weights)
    arms = [control, *treatments]
    alpha = spec.alpha
    primary = metric_samples(table, spec.metric, arms)
    summaries = {a: _arm_summary(primary.values[a], primary.kind, spec.metric, alpha) for a in arms}
    sample_size = _sample_size(spec, summaries[control], len(treatments))
    required = (sample_size or {}).get("required_per_arm")
    expected_n = expected_samples(spec, required)
    edges = _looks(*_window_us(table, since, until or now), buckets)

    samples_by_metric: dict[str, MetricSamples] = {spec.metric: primary}
    tau2_by_metric: dict[str, float | None] = {}

    def compare(metric: str, method: str, arm: str) -> dict[str, Any]:
        samples = samples_by_metric[metric]
        if method != "msprt":
            return _test(method, samples.values[control], samples.values[arm], alpha)
        if metric not in tau2_by_metric:
            tau2_by_metric[metric] = _tau2(spec, samples, arms, expected_n)
        return _msprt_result(samples, control, arm, edges, tau2_by_metric[metric], alpha)

    comparisons: list[dict[str, Any]] = []
    bayes = None
    if spec.method == "bayesian":
        bayes = _bayes(spec, primary, arms)
    else:
        for arm in treatments:
            comparisons.append({"treatment": arm, "role": "primary", "metric": spec.metric, "method": spec.method,
                                "result": compare(spec.metric, spec.method, arm)})
    for guard in spec.guardrails:
        if guard.metric not in samples_by_metric:
            samples_by_metric[guard.metric] = metric_samples(table, guard.metric, arms)
        samples = samples_by_metric[guard.metric]
        for arm in treatments:
            comparisons.append({"treatment": arm, "role": "guardrail", "metric": guard.metric, "method": guard.method,
                                "direction": guard.direction, "n_control": samples.n(control),
                                "n_treatment": samples.n(arm), "result": compare(guard.metric, guard.method, arm)})

    tested = [c for c in comparisons if c["result"].get("p_value") is not None]
    adjusted = stats.holm([float(c["result"]["p_value"]) for c in tested]) if tested else []
    for c, p in zip(tested, adjusted):
        c["p_adjusted"] = float(p)
        c["significant"] = bool(p < alpha)
    for c in comparisons:
        c.setdefault("p_adjusted", None)
        c.setdefault("significant", False)
        if c["role"] == "guardrail":
            effect = c["result"].get("effect")
            enough = min(c["n_control"], c["n_treatment"]) >= spec.min_samples_per_arm
            worse = effect is not None and (effect > 0 if c["direction"] == "increase_is_bad" else effect < 0)
            c["failed"] = bool(c["significant"] and worse and enough)

    srm, unplanned = _srm(traffic_weights, table)
    reliable = not (srm is not None and srm["mismatch"])
    verdict, winner, reasons = _verdict(spec, control, treatments, primary, comparisons, bayes, srm, required)
    if unplanned:
        reasons.append(f"requests of variants outside the plan are left out: {dict(sorted(unplanned.items()))}")
    if spec.metric == "rmse":
        reasons.append("rmse: the tests compare mean squared errors (the squared error of each prediction); "
                       "the arms show the root too")
    out = {
        "metric": spec.metric, "kind": primary.kind, "method": spec.method, "control": control,
        "treatments": treatments, "alpha": alpha, "analysed_at": now.astimezone(timezone.utc).isoformat(),
        "weights": dict(traffic_weights), "arms": summaries, "comparisons": comparisons, "bayes": bayes,
        "srm": srm, "reliable": reliable, "sample_size": sample_size, "expected_samples_per_arm": expected_n,
        "tau2": dict(tau2_by_metric), "verdict": verdict, "winner": winner, "reasons": reasons,
    }
    return _finite(out)


def _verdict(
    spec: ABTestSpec, control: str, treatments: list[str], primary: MetricSamples, comparisons: list[dict[str, Any]],
    bayes: dict[str, Any] | None, srm: dict[str, Any] | None, required: int | None,
) -> tuple[str, str | None, list[str]]:
    reasons: list[str] = []
    if srm is not None and srm["mismatch"]:
        reasons.append(
            f"sample ratio mismatch: requests per variant {srm['observed']} against the plan's expected "
            f"{ {k: round(v, 1) for k, v in srm['expected'].items()} } (chi-square p = {srm['p_value']:.3g} < "
            f"{SRM_THRESHOLD}); the split did not happen as configured, so no comparison can be trusted"
        )
        return "unreliable_srm", None, reasons
    failed = [c for c in comparisons if c["role"] == "guardrail" and c.get("failed")]
    if failed:
        for c in failed:
            reasons.append(
                f"guardrail {c['metric']} ({c['direction']}): {c['treatment']} vs {control} effect "
                f"{c['result']['effect']:.4g}, Holm-adjusted p = {c['p_adjusted']:.3g} < {spec.alpha}"
            )
        return "guardrail_failed", None, reasons
    short = {a: primary.n(a) for a in [control, *treatments] if primary.n(a) < spec.min_samples_per_arm}
    if short:
        reasons.append(f"below min_samples_per_arm ({spec.min_samples_per_arm}) for {spec.metric}: {short}")
        return "insufficient_data", None, reasons

    if spec.method == "bayesian":
        if bayes is None or "error" in bayes:
            reasons.append(f"no Bayesian result: {(bayes or {}).get('error')}")
            return "no_difference_yet", None, reasons
        best = max(bayes["prob_best"], key=lambda a: bayes["prob_best"][a])
        p_best = bayes["prob_best"][best]
        if p_best >= 1 - spec.alpha:
            reasons.append(f"{best} is best with probability {p_best:.4f} >= {1 - spec.alpha} (expected loss "
                           f"{bayes['expected_loss'][best]:.4g})")
            return ("control_wins" if best == control else "treatment_wins"), best, reasons
        reasons.append(f"no arm is best with probability >= {1 - spec.alpha} (highest: {best}, {p_best:.4f})")
        return "no_difference_yet", None, reasons

    main = [c for c in comparisons if c["role"] == "primary"]
    wins = [c for c in main if c["significant"] and _better(spec.metric, c["result"]["effect"])]
    losses = [c for c in main if c["significant"] and not _better(spec.metric, c["result"]["effect"])]
    if (wins or losses) and spec.method in FIXED_HORIZON and required is not None:
        n_min = min(primary.n(a) for a in [control, *treatments])
        if n_min < required:
            reasons.append(
                f"{spec.method} is a fixed-horizon test planned for {required} samples per arm and the smallest arm "
                f"has {n_min}: a significant result read before that is not a verdict (peeking inflates false "
                "positives; use method msprt to read the test at any time)"
            )
            return "no_difference_yet", None, reasons
    if wins:
        best = max(wins, key=lambda c: abs(c["result"]["effect"]))
        for c in wins:
            reasons.append(f"{c['treatment']} beats {control} on {spec.metric}: effect {c['result']['effect']:.4g} "
                           f"(CI {c['result']['ci_low']:.4g} .. {c['result']['ci_high']:.4g}), Holm-adjusted p = "
                           f"{c['p_adjusted']:.3g} < {spec.alpha}")
        return "treatment_wins", best["treatment"], reasons
    if losses and len(losses) == len(main):
        for c in losses:
            reasons.append(f"{control} beats {c['treatment']} on {spec.metric}: effect {c['result']['effect']:.4g}, "
                           f"Holm-adjusted p = {c['p_adjusted']:.3g} < {spec.alpha}")
        return "control_wins", control, reasons
    for c in main:
        if "error" in c["result"]:
            reasons.append(f"{c['treatment']}: no test result: {c['result']['error']}")
        elif c["significant"]:
            reasons.append(f"{control} beats {c['treatment']} on {spec.metric} (Holm-adjusted p = "
                           f"{c['p_adjusted']:.3g}); other treatments undecided")
        else:
            reasons.append(f"{c['treatment']} vs {control}: effect {c['result']['effect']:.4g}, Holm-adjusted p = "
                           f"{c['p_adjusted']:.3g} >= {spec.alpha}")
    return "no_difference_yet", None, reasons



def timeline(
    spec: ABTestSpec, traffic_weights: dict[str, float], table: pa.Table, *, since: datetime, until: datetime,
    buckets: int = DEFAULT_BUCKETS,
) -> dict[str, Any]:
    """The primary metric of each arm (cumulative mean) and each treatment's mSPRT confidence
    sequence for the effect (treatment - control) at ``buckets`` cumulative looks evenly spaced
    over ``[since, until)``: at look k, everything logged before its end; the looks, tau^2 and
    running intersection are :func:`analyze`'s, so the last point is the analysis' result."""
    control, treatments = arms_of(spec, traffic_weights)
    arms = [control, *treatments]
    samples = metric_samples(table, spec.metric, arms)
    edges = _looks(int(since.timestamp() * 1_000_000), int(until.timestamp() * 1_000_000), buckets)
    summaries = {a: _arm_summary(samples.values[a], samples.kind, spec.metric, spec.alpha) for a in arms}
    required = (_sample_size(spec, summaries[control], len(treatments)) or {}).get("required_per_arm")
    tau2 = _tau2(spec, samples, arms, expected_samples(spec, required))
    cumulative = {a: _cumulative(samples.values[a], samples.times[a], edges) for a in arms}
    per_arm = {a: {"n": c["n"].tolist(), "mean": c["mean"].tolist()} for a, c in cumulative.items()}
    sequences: dict[str, dict[str, list]] = {}
    for arm in treatments:
        path: list[dict[str, Any] | None] = [None] * edges.size
        if tau2 is not None:
            try:
                path = _sequence(cumulative[control], cumulative[arm], tau2, spec.alpha)
            except (MatihError, ValueError, ZeroDivisionError):
                pass
        sequences[arm] = {key: [None if look is None else look[key] for look in path]
                          for key in ("effect", "ci_low", "ci_high", "p_value")}
    bucket_ends = [datetime.fromtimestamp(int(e) / 1_000_000, tz=timezone.utc).isoformat() for e in edges]
    return _finite({"metric": spec.metric, "control": control, "since": since.isoformat(), "until": until.isoformat(),
                    "buckets": bucket_ends, "arms": per_arm, "sequences": sequences, "tau2": tau2})
