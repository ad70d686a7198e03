"""The statistics A/B tests and canary rollouts are judged by.

Every comparison is of a control ``a`` and a treatment ``b``; ``effect`` is always ``b - a``.
Distributions, tests and quantiles come from :mod:`scipy.stats` and :mod:`numpy` only; each
function names its reference, and ``tests/unit/test_experiment_stats.py`` checks it against
scipy's own results, published values and seeded simulations.

- fixed horizon: :func:`two_proportion_ztest`, :func:`welch_ttest` / :func:`welch_from_stats`,
  :func:`mann_whitney`, and the sample sizes that make them powered
  (:func:`sample_size_proportions`, :func:`sample_size_means`);
- sequential, safe to peek: :func:`msprt` / :func:`msprt_path` (always-valid p-values and
  confidence sequences of Johari, Pekelis and Walsh's normal-mixture SPRT);
- Bayesian: :func:`bayes_binary`, :func:`bayes_normal` (probability each arm is best, expected loss);
- trust and multiplicity: :func:`srm_check` (sample ratio mismatch), :func:`holm`.

Results are frozen dataclasses whose ``to_dict()`` is JSON-safe: NaN and infinities become ``None``
(an infinite confidence bound means "no information yet").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import special, stats

from app.errors import InvalidInput

__all__ = [
    "TestResult", "SequentialResult", "BayesResult", "SRMResult",
    "two_proportion_ztest", "welch_ttest", "welch_from_stats", "mann_whitney",
    "sample_size_proportions", "sample_size_means",
    "msprt_tau2", "msprt", "msprt_path", "msprt_statistics",
    "bayes_binary", "bayes_normal", "srm_check", "holm",
]

# Above this many (a, b) pairs the Hodges-Lehmann shift is estimated from a seeded random
# sample of pairs instead of all of them (memory and time stay bounded for large windows).
HL_MAX_PAIRS = 1_000_000
_HL_SEED = 0


def _json_safe(value: Any) -> Any:
    """Plain Python values for JSON: numpy scalars unwrapped, NaN and +-inf as ``None``."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


class _JsonResult:
    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-safe values (NaN and infinities become ``None``)."""
        return _json_safe(asdict(self))  # type: ignore[call-overload]


# --------------------------------------------------------------------------- fixed horizon


@dataclass(frozen=True)
class TestResult(_JsonResult):
    """A fixed-horizon two-sample comparison; ``effect`` and its interval are for ``b - a``."""

    __test__ = False  # not a pytest test class despite its name

    method: str
    statistic: float
    p_value: float
    effect: float
    ci_low: float
    ci_high: float
    n_a: int
    n_b: int
    detail: dict = field(default_factory=dict)


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise InvalidInput(f"alpha must be in (0, 1), got {alpha}; 0.05 is the usual choice")
    return alpha


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise InvalidInput(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _sample(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(arr)):
        raise InvalidInput(f"{name} holds NaN or infinite values; drop or impute them before the test")
    return arr


def two_proportion_ztest(x_a: int, n_a: int, x_b: int, n_b: int, *, alpha: float = 0.05) -> TestResult:
    """Two-sided z-test of ``p_b = p_a`` for conversion-like counts (``x`` successes of ``n``).

    The statistic uses the pooled standard error (the variance under the null, so ``z**2`` equals
    Pearson's chi-square on the 2x2 table without continuity correction,
    ``scipy.stats.chi2_contingency(..., correction=False)``); the interval for ``p_b - p_a`` is the
    unpooled Wald interval (Agresti, *Categorical Data Analysis*, 3rd ed., chapter 3; the examples of
    OpenIntro Statistics, 4th ed., section 6.2, are reproduced in the unit tests).

    Degenerate inputs do not raise and produce no NaN: an empty arm, or both arms at 0% or at 100%
    (no variance under the null), give ``p_value`` 1.0 and ``detail["degenerate"]`` saying why.
    """
    alpha = _check_alpha(alpha)
    x_a, n_a, x_b, n_b = (_check_count(k, v) for k, v in (("x_a", x_a), ("n_a", n_a), ("x_b", x_b), ("n_b", n_b)))
    if x_a > n_a or x_b > n_b:
        raise InvalidInput(f"successes cannot exceed trials: x_a={x_a} of n_a={n_a}, x_b={x_b} of n_b={n_b}")
    z_crit = float(stats.norm.ppf(1 - alpha / 2))
    if n_a == 0 or n_b == 0:
        empty = "a" if n_a == 0 else "b"
        if n_a == 0 and n_b == 0:
            empty = "a and b"
        return TestResult("two_proportion_ztest", 0.0, 1.0, 0.0, -1.0, 1.0, n_a, n_b,
                          {"degenerate": f"no trials in arm {empty}: nothing to compare, p_value set to 1",
                           "p_a": x_a / n_a if n_a else None, "p_b": x_b / n_b if n_b else None,
                           "alpha": alpha})
    p_a, p_b = x_a / n_a, x_b / n_b
    effect = p_b - p_a
    pooled = (x_a + x_b) / (n_a + n_b)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    se_wald = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    detail: dict[str, Any] = {"p_a": p_a, "p_b": p_b, "pooled_p": pooled, "se_pooled": se_pooled,
                              "se_unpooled": se_wald, "alpha": alpha,
                              "relative_effect": effect / p_a if p_a > 0 else None}
    if se_pooled == 0.0:
        detail["degenerate"] = (f"both arms at {pooled:.0%}: no variance under the null, p_value set to 1 "
                                "and the Wald interval collapses to the observed difference")
        return TestResult("two_proportion_ztest", 0.0, 1.0, effect, effect, effect, n_a, n_b, detail)
    z = effect / se_pooled
    p_value = float(2 * stats.norm.sf(abs(z)))
    if se_wald == 0.0:
        detail["note"] = "each arm at 0% or 100%: the Wald interval has zero width and understates uncertainty"
    return TestResult("two_proportion_ztest", float(z), p_value, effect,
                      max(-1.0, effect - z_crit * se_wald), min(1.0, effect + z_crit * se_wald), n_a, n_b, detail)


def _welch_degenerate(method: str, mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float,
                      n_b: int, alpha: float, reason: str) -> TestResult:
    effect = (mean_b - mean_a) if n_a and n_b else 0.0
    return TestResult(method, 0.0, 1.0, effect, -math.inf, math.inf, n_a, n_b,
                      {"degenerate": reason, "mean_a": mean_a if n_a else None, "mean_b": mean_b if n_b else None,
                       "var_a": var_a if n_a > 1 else None, "var_b": var_b if n_b > 1 else None, "alpha": alpha})


def _welch_zero_variance(method: str, mean_a: float, n_a: int, mean_b: float, n_b: int, alpha: float) -> TestResult:
    effect = mean_b - mean_a
    if effect == 0:
        return TestResult(method, 0.0, 1.0, 0.0, 0.0, 0.0, n_a, n_b,
                          {"degenerate": "both arms constant and equal: p_value set to 1", "mean_a": mean_a,
                           "mean_b": mean_b, "var_a": 0.0, "var_b": 0.0, "alpha": alpha})
    return TestResult(method, math.copysign(math.inf, effect), 0.0, effect, effect, effect, n_a, n_b,
                      {"degenerate": "both arms constant with different values: the difference is certain",
                       "mean_a": mean_a, "mean_b": mean_b, "var_a": 0.0, "var_b": 0.0, "alpha": alpha})


def welch_ttest(a: Sequence[float], b: Sequence[float], *, alpha: float = 0.05) -> TestResult:
    """Welch's unequal-variance t-test of ``mean_b = mean_a`` (two-sided).

    ``scipy.stats.ttest_ind(b, a, equal_var=False)`` and its ``confidence_interval`` (Welch 1947,
    Welch-Satterthwaite degrees of freedom). Fewer than two values in an arm gives ``p_value`` 1 and
    an unbounded interval (``detail["degenerate"]``).
    """
    alpha = _check_alpha(alpha)
    xa, xb = _sample("a", a), _sample("b", b)
    n_a, n_b = len(xa), len(xb)
    mean_a = float(xa.mean()) if n_a else 0.0
    mean_b = float(xb.mean()) if n_b else 0.0
    var_a = float(xa.var(ddof=1)) if n_a > 1 else 0.0
    var_b = float(xb.var(ddof=1)) if n_b > 1 else 0.0
    if n_a < 2 or n_b < 2:
        return _welch_degenerate("welch_ttest", mean_a, var_a, n_a, mean_b, var_b, n_b, alpha,
                                 "fewer than 2 values in an arm: no variance estimate, p_value set to 1")
    if var_a == 0.0 and var_b == 0.0:
        return _welch_zero_variance("welch_ttest", mean_a, n_a, mean_b, n_b, alpha)
    res = stats.ttest_ind(xb, xa, equal_var=False)
    ci = res.confidence_interval(confidence_level=1 - alpha)
    return TestResult("welch_ttest", float(res.statistic), float(res.pvalue), mean_b - mean_a,
                      float(ci.low), float(ci.high), n_a, n_b,
                      {"mean_a": mean_a, "mean_b": mean_b, "var_a": var_a, "var_b": var_b, "df": float(res.df),
                       "relative_effect": (mean_b - mean_a) / mean_a if mean_a else None, "alpha": alpha})


def welch_from_stats(mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int, *,
                     alpha: float = 0.05) -> TestResult:
    """Welch's t-test from summary statistics (``var`` = sample variance, ddof=1), for windows kept
    as running sums rather than raw values.

    ``scipy.stats.ttest_ind_from_stats(..., equal_var=False)`` for the statistic and p-value; the
    interval is ``effect +- t_{1-alpha/2, df} * se`` with ``se**2 = var_a/n_a + var_b/n_b`` and the
    Welch-Satterthwaite ``df = se**4 / ((var_a/n_a)**2/(n_a-1) + (var_b/n_b)**2/(n_b-1))``, which is
    what :func:`welch_ttest` returns on the raw values.
    """
    alpha = _check_alpha(alpha)
    n_a, n_b = _check_count("n_a", n_a), _check_count("n_b", n_b)
    mean_a, mean_b, var_a, var_b = float(mean_a), float(mean_b), float(var_a), float(var_b)
    if not all(map(math.isfinite, (mean_a, mean_b, var_a, var_b))) or var_a < 0 or var_b < 0:
        raise InvalidInput(f"means must be finite and variances finite and >= 0, got var_a={var_a}, var_b={var_b}")
    if n_a < 2 or n_b < 2:
        return _welch_degenerate("welch_ttest", mean_a, var_a, n_a, mean_b, var_b, n_b, alpha,
                                 "fewer than 2 values in an arm: no variance estimate, p_value set to 1")
    if var_a == 0.0 and var_b == 0.0:
        return _welch_zero_variance("welch_ttest", mean_a, n_a, mean_b, n_b, alpha)
    res = stats.ttest_ind_from_stats(mean_b, math.sqrt(var_b), n_b, mean_a, math.sqrt(var_a), n_a, equal_var=False)
    va, vb = var_a / n_a, var_b / n_b
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    effect = mean_b - mean_a
    return TestResult("welch_ttest", float(res.statistic), float(res.pvalue), effect, effect - half, effect + half,
                      n_a, n_b, {"mean_a": mean_a, "mean_b": mean_b, "var_a": var_a, "var_b": var_b, "df": df,
                                 "relative_effect": effect / mean_a if mean_a else None, "alpha": alpha})


def _pairwise_differences(xa: np.ndarray, xb: np.ndarray) -> tuple[np.ndarray, bool]:
    """All ``b_j - a_i`` (sorted), or a seeded random sample of HL_MAX_PAIRS of them."""
    if len(xa) * len(xb) <= HL_MAX_PAIRS:
        return np.sort(np.subtract.outer(xb, xa).ravel()), False
    rng = np.random.default_rng(_HL_SEED)
    i = rng.integers(0, len(xa), HL_MAX_PAIRS)
    j = rng.integers(0, len(xb), HL_MAX_PAIRS)
    return np.sort(xb[j] - xa[i]), True


def mann_whitney(a: Sequence[float], b: Sequence[float], *, alpha: float = 0.05) -> TestResult:
    """Mann-Whitney U test (two-sided) of whether ``b`` tends to be larger or smaller than ``a``.

    ``scipy.stats.mannwhitneyu(b, a, alternative="two-sided")``; ``statistic`` is ``U`` of ``b``.
    ``effect`` is the Hodges-Lehmann shift (median of all ``b_j - a_i``; Hodges & Lehmann 1963) with
    the distribution-free Moses interval from the order statistics of those differences at the
    normal-approximation critical value of ``U`` (Hollander, Wolfe & Chicken, *Nonparametric
    Statistical Methods*, 3rd ed., chapter 4; no tie correction). Above ``HL_MAX_PAIRS`` pairs both
    come from a seeded random sample of pairs (``detail["hl_subsampled"]``), so the same data always
    give the same numbers. ``detail["cles"]`` is the common-language effect size ``U / (n_a n_b)``
    (probability that a random ``b`` exceeds a random ``a``, ties counted half).
    """
    alpha = _check_alpha(alpha)
    xa, xb = _sample("a", a), _sample("b", b)
    n_a, n_b = len(xa), len(xb)
    if n_a == 0 or n_b == 0:
        return TestResult("mann_whitney", 0.0, 1.0, 0.0, -math.inf, math.inf, n_a, n_b,
                          {"degenerate": "an arm has no values: nothing to compare, p_value set to 1",
                           "median_a": float(np.median(xa)) if n_a else None,
                           "median_b": float(np.median(xb)) if n_b else None, "alpha": alpha})
    res = stats.mannwhitneyu(xb, xa, alternative="two-sided")
    u_b = float(res.statistic)
    nm = n_a * n_b
    diffs, subsampled = _pairwise_differences(xa, xb)
    shift = float(np.median(diffs))
    k = math.floor(nm / 2 - float(stats.norm.ppf(1 - alpha / 2)) * math.sqrt(nm * (n_a + n_b + 1) / 12))
    if k < 1:
        ci_low, ci_high = -math.inf, math.inf  # too few pairs for an interval at this alpha
    else:
        m = len(diffs)
        lo = min(m - 1, max(0, math.ceil(k * m / nm) - 1))  # the k-th smallest of nm, scaled to the sample
        hi = m - 1 - lo
        ci_low, ci_high = float(diffs[lo]), float(diffs[hi])
    p_value = float(res.pvalue)
    if not math.isfinite(p_value):  # all values identical in both arms: no ranking information
        p_value = 1.0
    return TestResult("mann_whitney", u_b, p_value, shift, ci_low, ci_high, n_a, n_b,
                      {"median_a": float(np.median(xa)), "median_b": float(np.median(xb)), "cles": u_b / nm,
                       "hl_subsampled": subsampled, "hl_pairs": int(len(diffs)), "alpha": alpha})


def sample_size_proportions(p_base: float, mde: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Samples per arm for the two-sided two-proportion z-test to detect ``p_base -> p_base + mde``.

    Normal approximation with the pooled variance under the null and the unpooled one under the
    alternative, without continuity correction (Fleiss, Levin & Paik, *Statistical Methods for Rates
    and Proportions*, 3rd ed., chapter 4, without the correction term)::

        n = (z_{1-alpha/2} sqrt(2 pbar qbar) + z_{power} sqrt(p1 q1 + p2 q2))**2 / mde**2,  pbar = (p1+p2)/2

    e.g. p_base 0.10, mde 0.02, alpha 0.05, power 0.8 -> 3,841 per arm.
    """
    alpha = _check_alpha(alpha)
    _check_power(power)
    p1, p2 = float(p_base), float(p_base) + float(mde)
    if not 0 < p1 < 1 or not 0 < p2 < 1 or mde == 0:
        raise InvalidInput(f"need 0 < p_base < 1, 0 < p_base + mde < 1 and mde != 0 (mde is absolute), "
                           f"got p_base={p_base}, mde={mde}")
    pbar = (p1 + p2) / 2
    z_a, z_b = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    n = (z_a * math.sqrt(2 * pbar * (1 - pbar)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2 / mde**2
    return int(math.ceil(n - 1e-9))


def sample_size_means(sd: float, mde: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Samples per arm for a two-sided two-sample test of means to detect a shift ``mde`` when both
    arms have standard deviation ``sd``: ``n = 2 (z_{1-alpha/2} + z_{power})**2 sd**2 / mde**2``
    (normal approximation; e.g. sd 1, mde 0.5 -> 63, one below the t-based 64 of Cohen's tables)."""
    alpha = _check_alpha(alpha)
    _check_power(power)
    if not sd > 0 or mde == 0 or not math.isfinite(sd) or not math.isfinite(mde):
        raise InvalidInput(f"need sd > 0 and a non-zero finite mde, got sd={sd}, mde={mde}")
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return int(math.ceil(2 * z**2 * sd**2 / mde**2 - 1e-9))


def _check_power(power: float) -> None:
    if not 0.0 < power < 1.0:
        raise InvalidInput(f"power must be in (0, 1), got {power}; 0.8 is the usual choice")


# --------------------------------------------------------------------------- sequential (mSPRT)


@dataclass(frozen=True)
class SequentialResult(_JsonResult):
    """One look of the mixture SPRT: an always-valid p-value and a (1 - alpha) confidence
    sequence for ``b - a``; both stay valid however often and whenever they are read."""

    p_value: float
    effect: float
    ci_low: float
    ci_high: float
    n_a: int
    n_b: int
    tau2: float
    likelihood_ratio: float


def _optimal_ratio(alpha: float) -> float:
    """``r = tau2 / V`` minimising the confidence-sequence half-width at ``V``: the root of
    ``r - log(1 + r) = 2 log(1/alpha)``, closed form through Lambert's W (branch -1)."""
    c = 2 * math.log(1 / alpha)
    return float(-special.lambertw(-math.exp(-(c + 1)), k=-1).real) - 1


def msprt_tau2(sigma2: float, expected_n: int, *, alpha: float = 0.05) -> float:
    """The mixing variance of the normal-mixture SPRT, tuned to ``expected_n`` samples per arm.

    Johari, Pekelis & Walsh ("Always valid inference: continuous monitoring of A/B tests", arXiv
    1512.04922, Operations Research 2022; Johari, Koomen, Pekelis & Walsh, "Peeking at A/B tests",
    KDD 2017) mix the likelihood ratio over ``theta ~ N(0, tau2)`` and tune ``tau2`` to the sample
    size the test is expected to reach, so that it is most efficient for the effects that become
    detectable there. The tuning used here is the closed-form optimum of the normal-mixture
    boundary of Robbins (1970) for a target time, as in Howard, Ramdas, McAuliffe & Sekhon
    ("Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist. 2021): with
    ``V = 2 sigma2 / expected_n`` (the variance of the difference of means at ``expected_n`` per
    arm), ``tau2 = r* V`` where ``r*`` minimises the half-width of the confidence sequence
    ``sqrt(V (1 + r)/r (log(1 + r) + 2 log(1/alpha)))`` at that ``V``::

        r* - log(1 + r*) = 2 log(1/alpha)   =>   r* = -W_{-1}(-exp(-(1 + 2 log(1/alpha)))) - 1

    (``W_{-1}`` is ``scipy.special.lambertw(k=-1)``; ``r*`` is about 8.2 at alpha 0.05, so the
    mixture centres on effects near 2.9 standard errors at ``expected_n``). For arms of unequal
    size pass the harmonic mean of their planned sizes. Any fixed ``tau2`` keeps the p-values
    always valid; the tuning only moves power between early and late looks.
    """
    alpha = _check_alpha(alpha)
    sigma2 = float(sigma2)
    if not math.isfinite(sigma2) or sigma2 < 0:
        raise InvalidInput(f"sigma2 must be a finite variance >= 0, got {sigma2}")
    if expected_n is None or not expected_n >= 1:
        raise InvalidInput(f"expected_n must be >= 1 sample per arm, got {expected_n}")
    return _tau2(sigma2, float(expected_n), alpha)


def _tau2(sigma2: float, n: float, alpha: float) -> float:
    """:func:`msprt_tau2` for a (possibly fractional, harmonic-mean) size; 0 without samples."""
    return _optimal_ratio(alpha) * 2 * sigma2 / n if n >= 1 else 0.0


def msprt_statistics(theta: Any, variance: Any, tau2: Any, *, alpha: float = 0.05
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised normal-mixture SPRT at given looks, each look on its own (no running min).

    For an estimate ``theta`` of ``b - a`` with variance ``V`` (``var_a/n_a + var_b/n_b``) and
    mixing variance ``tau2`` (the normal mixture of Johari, Pekelis & Walsh)::

        Lambda = sqrt(V / (V + tau2)) * exp(theta**2 tau2 / (2 V (V + tau2)))
        p = min(1, 1 / Lambda),  CS = theta +- sqrt(V (V + tau2)/tau2 * (log((V + tau2)/V) + 2 log(1/alpha)))

    Returns ``(log_lr, p, half_width)`` arrays; looks without information (``V`` or ``tau2`` not
    positive and finite) get ``log_lr`` 0, ``p`` 1 and an infinite half-width. :func:`msprt` and
    :func:`msprt_path` are built on it, and it makes simulations of many tests cheap.
    """
    alpha = _check_alpha(alpha)
    theta = np.asarray(theta, dtype=float)
    v = np.asarray(variance, dtype=float)
    t2 = np.broadcast_to(np.asarray(tau2, dtype=float), np.broadcast_shapes(theta.shape, v.shape))
    ok = np.isfinite(theta) & np.isfinite(v) & (v > 0) & np.isfinite(t2) & (t2 > 0)
    vs = np.where(ok, v, 1.0)
    ts = np.where(ok, t2, 1.0)
    th = np.where(ok, theta, 0.0)
    log_lr = 0.5 * np.log(vs / (vs + ts)) + th**2 * ts / (2 * vs * (vs + ts))
    log_lr = np.where(ok, log_lr, 0.0)
    p = np.minimum(1.0, np.exp(-log_lr))
    half = np.sqrt(vs * (vs + ts) / ts * (np.log((vs + ts) / vs) + 2 * math.log(1 / alpha)))
    half = np.where(ok, half, np.inf)
    return log_lr, p, half


def _pooled_variance(var_a: Any, n_a: Any, var_b: Any, n_b: Any) -> Any:
    return (np.asarray(var_a) * n_a + np.asarray(var_b) * n_b) / np.maximum(np.asarray(n_a) + n_b, 1)


def _harmonic_n(n_a: float, n_b: float) -> float:
    return 2.0 / (1.0 / n_a + 1.0 / n_b) if n_a > 0 and n_b > 0 else 0.0


def msprt(mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int, *,
          alpha: float = 0.05, tau2: float | None = None, expected_n: int | None = None) -> SequentialResult:
    """One look of the normal-mixture SPRT for ``theta = mean_b - mean_a`` (Johari, Pekelis &
    Walsh 2017), with the plug-in variance ``V = var_a/n_a + var_b/n_b``. For binary metrics pass
    ``mean = p`` and ``var = p (1 - p)``.

    ``tau2`` defaults to :func:`msprt_tau2` of the pooled variance at ``expected_n`` (samples per arm
    the test is planned for). Pass ``expected_n`` (or ``tau2``) fixed for the life of a test: the
    p-value is always valid only for a mixture chosen in advance. Without either, ``tau2`` is tuned
    to the current (harmonic-mean) sample size, which suits a single look. This single look's
    p-value and interval are not yet the running minimum and intersection over earlier looks; a
    caller reading a test repeatedly keeps those (or uses :func:`msprt_path`).
    """
    n_a, n_b = _check_count("n_a", n_a), _check_count("n_b", n_b)
    values = [float(x) for x in (mean_a, var_a, mean_b, var_b)]
    if not all(map(math.isfinite, values)) or values[1] < 0 or values[3] < 0:
        raise InvalidInput(f"means must be finite and variances finite and >= 0, got var_a={var_a}, var_b={var_b}")
    mean_a, var_a, mean_b, var_b = values
    if tau2 is None:
        n_plan = _harmonic_n(n_a, n_b)
        sigma2 = float(_pooled_variance(var_a, n_a, var_b, n_b))
        tau2 = msprt_tau2(sigma2, expected_n, alpha=alpha) if expected_n is not None else \
            _tau2(sigma2, n_plan, _check_alpha(alpha))
    elif not float(tau2) >= 0:
        raise InvalidInput(f"tau2 must be >= 0, got {tau2}")
    effect = (mean_b - mean_a) if n_a and n_b else 0.0
    v = var_a / n_a + var_b / n_b if n_a and n_b else math.inf
    log_lr, p, half = msprt_statistics(effect, v, tau2, alpha=alpha)
    half_f = float(half)
    return SequentialResult(float(p), effect, effect - half_f, effect + half_f, n_a, n_b, float(tau2),
                            float(np.exp(np.minimum(float(log_lr), 700.0))))


def _cumulative(x: np.ndarray, looks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sample variance (ddof=1) of ``x[:k]`` for each ``k`` in ``looks`` (capped at len(x))."""
    n = np.minimum(looks, len(x))
    if len(x) == 0:
        zeros = np.zeros(len(looks))
        return n, zeros, np.full(len(looks), np.nan)
    shift = x[0]  # shifted sums keep the variance accurate for large means
    c1 = np.concatenate([[0.0], np.cumsum(x - shift)])
    c2 = np.concatenate([[0.0], np.cumsum((x - shift) ** 2)])
    s1, s2 = c1[n], c2[n]
    nn = np.maximum(n, 1)
    mean = shift + s1 / nn
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(n > 1, np.maximum(s2 - s1**2 / nn, 0.0) / np.maximum(n - 1, 1), np.nan)
    return n, mean, var


def msprt_path(a: Sequence[float], b: Sequence[float], *, looks: Sequence[int] | None = None, alpha: float = 0.05,
               tau2: float | None = None, expected_n: int | None = None) -> list[SequentialResult]:
    """The always-valid path of the normal-mixture SPRT over the observations in arrival order.

    At each look ``k`` (cumulative samples per arm; an arm shorter than ``k`` contributes all it has)
    the p-value is the running minimum of the per-look mSPRT p-values and the confidence sequence
    the running intersection of the per-look intervals, so reading the path at any point, or
    stopping at any look, keeps the false-positive rate and the coverage at ``alpha`` (Johari,
    Pekelis & Walsh). ``looks`` defaults to 50 evenly spaced sizes up to the longer
    arm. ``tau2`` defaults to :func:`msprt_tau2` of the pooled variance of all the data at
    ``expected_n``, or at the harmonic-mean size of the last look; it is one value for the whole path.
    Looks with fewer than two samples in an arm carry no information (p 1, unbounded interval).
    """
    alpha = _check_alpha(alpha)
    xa, xb = _sample("a", a), _sample("b", b)
    longest = max(len(xa), len(xb))
    if looks is None:
        ks = np.unique(np.linspace(1, longest, num=min(longest, 50)).round().astype(np.int64)) if longest else \
            np.zeros(0, dtype=np.int64)
    else:
        ks = np.asarray(list(looks), dtype=np.int64)
        if ks.size and (np.any(ks < 0) or np.any(np.diff(ks) < 0)):
            raise InvalidInput("looks must be non-negative cumulative sample sizes in increasing order")
    if ks.size == 0:
        return []
    n_a, mean_a, var_a = _cumulative(xa, ks)
    n_b, mean_b, var_b = _cumulative(xb, ks)
    if tau2 is None:
        last_na, last_nb = int(n_a[-1]), int(n_b[-1])
        sigma2 = float(_pooled_variance(xa.var(ddof=1) if len(xa) > 1 else 0.0, len(xa),
                                        xb.var(ddof=1) if len(xb) > 1 else 0.0, len(xb)))
        n_plan = _harmonic_n(last_na, last_nb)
        tau2 = msprt_tau2(sigma2, expected_n, alpha=alpha) if expected_n is not None else \
            _tau2(sigma2, n_plan, alpha)
    informative = (n_a > 1) & (n_b > 1)
    theta = np.where(informative, mean_b - mean_a, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = np.where(informative, var_a / np.maximum(n_a, 1) + var_b / np.maximum(n_b, 1), np.inf)
    log_lr, p, half = msprt_statistics(theta, v, tau2, alpha=alpha)
    p_run = np.minimum.accumulate(p)
    lo_run = np.maximum.accumulate(theta - half)
    hi_run = np.minimum.accumulate(theta + half)
    lr = np.exp(np.minimum(log_lr, 700.0))
    effect = np.where((n_a > 0) & (n_b > 0), mean_b - mean_a, 0.0)
    return [SequentialResult(float(p_run[i]), float(effect[i]), float(lo_run[i]), float(hi_run[i]),
                             int(n_a[i]), int(n_b[i]), float(tau2), float(lr[i])) for i in range(len(ks))]


# --------------------------------------------------------------------------- Bayesian


@dataclass(frozen=True)
class BayesResult(_JsonResult):
    """Posterior summaries per arm: mean, probability of being the best, expected loss of choosing
    it (``E[max over arms - arm]``, in the metric's units) and a 95% equal-tailed interval."""

    means: dict
    prob_best: dict
    expected_loss: dict
    intervals: dict


def _summarise(names: list[str], samples: np.ndarray, means: dict, intervals: dict) -> BayesResult:
    best = samples.max(axis=1)
    winner = samples.argmax(axis=1)
    counts = np.bincount(winner, minlength=len(names))
    return BayesResult(
        means=means,
        prob_best={name: float(counts[i] / len(samples)) for i, name in enumerate(names)},
        expected_loss={name: float(np.mean(best - samples[:, i])) for i, name in enumerate(names)},
        intervals=intervals,
    )


def _check_arms(*dicts: dict) -> list[str]:
    names = list(dicts[0])
    if not names:
        raise InvalidInput("need at least one arm")
    for other in dicts[1:]:
        if set(other) != set(names):
            raise InvalidInput(f"every input must name the same arms, got {sorted(names)} and {sorted(other)}")
    return names


def bayes_binary(successes: dict[str, int], trials: dict[str, int], *, prior: tuple[float, float] = (1.0, 1.0),
                 draws: int = 20000, seed: int = 0) -> BayesResult:
    """Beta-Binomial posteriors ``Beta(prior_a + successes, prior_b + failures)`` per arm (conjugate
    update; Gelman et al., *Bayesian Data Analysis*, 3rd ed., chapter 2). Means and 95% intervals
    are exact (``scipy.stats.beta``); ``prob_best`` and ``expected_loss`` come from ``draws`` joint
    samples of a seeded ``numpy`` Generator, so the same counts give the same answer."""
    names = _check_arms(successes, trials)
    a0, b0 = (float(x) for x in prior)
    if not (a0 > 0 and b0 > 0):
        raise InvalidInput(f"prior parameters must be > 0, got {prior}")
    if draws < 1:
        raise InvalidInput(f"draws must be >= 1, got {draws}")
    alphas, betas = [], []
    for name in names:
        s, n = _check_count(f"successes[{name}]", successes[name]), _check_count(f"trials[{name}]", trials[name])
        if s > n:
            raise InvalidInput(f"arm {name!r}: successes {s} exceed trials {n}")
        alphas.append(a0 + s)
        betas.append(b0 + n - s)
    al, be = np.array(alphas), np.array(betas)
    rng = np.random.default_rng(seed)
    samples = rng.beta(al, be, size=(int(draws), len(names)))
    lo, hi = stats.beta.ppf(0.025, al, be), stats.beta.ppf(0.975, al, be)
    means = {name: float(al[i] / (al[i] + be[i])) for i, name in enumerate(names)}
    intervals = {name: [float(lo[i]), float(hi[i])] for i, name in enumerate(names)}
    return _summarise(names, samples, means, intervals)


def bayes_normal(means: dict[str, float], variances: dict[str, float], counts: dict[str, int], *,
                 draws: int = 20000, seed: int = 0) -> BayesResult:
    """Normal posteriors of each arm's mean under a flat prior: ``N(mean, var / n)`` with ``var``
    the sample variance (the large-sample posterior; Gelman et al., *Bayesian Data Analysis*, 3rd ed.,
    chapter 3). Intervals from ``scipy.stats.norm``; ``prob_best`` and ``expected_loss`` from seeded
    joint draws. An arm without observations has no posterior under a flat prior and is refused."""
    names = _check_arms(means, variances, counts)
    if draws < 1:
        raise InvalidInput(f"draws must be >= 1, got {draws}")
    mu, sd = [], []
    for name in names:
        n = _check_count(f"counts[{name}]", counts[name])
        m, v = float(means[name]), float(variances[name])
        if n < 1:
            raise InvalidInput(f"arm {name!r} has no observations: a flat prior gives it no posterior")
        if not math.isfinite(m) or not math.isfinite(v) or v < 0:
            raise InvalidInput(f"arm {name!r}: mean must be finite and variance finite and >= 0, got {m}, {v}")
        mu.append(m)
        sd.append(math.sqrt(v / n))
    mu_a, sd_a = np.array(mu), np.array(sd)
    rng = np.random.default_rng(seed)
    samples = rng.normal(mu_a, sd_a, size=(int(draws), len(names)))
    z = float(stats.norm.ppf(0.975))
    intervals = {name: [float(mu_a[i] - z * sd_a[i]), float(mu_a[i] + z * sd_a[i])] for i, name in enumerate(names)}
    return _summarise(names, samples, {name: float(mu_a[i]) for i, name in enumerate(names)}, intervals)


# --------------------------------------------------------------------------- trust and multiplicity


@dataclass(frozen=True)
class SRMResult(_JsonResult):
    """Sample ratio mismatch: whether the observed split differs from the configured weights by
    more than chance (a broken assignment makes every other number of the test unreliable)."""

    statistic: float
    p_value: float
    mismatch: bool
    observed: dict
    expected: dict


def srm_check(counts: dict[str, int], weights: dict[str, float], *, threshold: float = 0.001) -> SRMResult:
    """Pearson chi-square goodness of fit of the per-arm counts to ``weights * total``
    (``scipy.stats.chisquare``, the test of Fabijan et al., "Diagnosing sample ratio mismatch in
    online controlled experiments", KDD 2019). ``mismatch`` when ``p < threshold``.

    Weights are relative (90 and 10 = 90%/10%). Arms with weight 0 and no samples are ignored; an arm
    with weight 0 that received samples is a certain mismatch (statistic infinite, p 0).
    """
    if not 0 < threshold < 1:
        raise InvalidInput(f"threshold must be in (0, 1), got {threshold}")
    names = sorted(set(counts) | set(weights))
    obs = {n: _check_count(f"counts[{n}]", counts.get(n, 0)) for n in names}
    w = {}
    for n in names:
        value = float(weights.get(n, 0.0))
        if not math.isfinite(value) or value < 0:
            raise InvalidInput(f"weights[{n}] must be finite and >= 0, got {value}")
        w[n] = value
    names = [n for n in names if not (w[n] == 0 and obs[n] == 0)]
    total = sum(obs[n] for n in names)
    weight_sum = sum(w[n] for n in names)
    if weight_sum == 0:
        if total == 0:
            return SRMResult(0.0, 1.0, False, {}, {})
        raise InvalidInput("every arm with samples has weight 0: the configured split is empty")
    expected = {n: w[n] / weight_sum * total for n in names}
    observed = {n: obs[n] for n in names}
    if total == 0 or len(names) < 2:
        return SRMResult(0.0, 1.0, False, observed, expected)
    if any(expected[n] == 0 and observed[n] > 0 for n in names):
        return SRMResult(math.inf, 0.0, True, observed, expected)
    f_obs = np.array([observed[n] for n in names], dtype=float)
    f_exp = np.array([expected[n] for n in names], dtype=float)
    res = stats.chisquare(f_obs, f_exp)
    p_value = float(res.pvalue)
    return SRMResult(float(res.statistic), p_value, p_value < threshold, observed, expected)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given (Holm 1979): with the p-values sorted
    ascending, ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``. Rejecting where ``adj <= alpha``
    controls the family-wise error rate over several arms and metrics at ``alpha``."""
    p = np.asarray(list(p_values), dtype=float)
    if p.size == 0:
        return []
    if np.any(~np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise InvalidInput(f"p-values must be in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.maximum.accumulate(scaled)
    out = np.empty(m)
    out[order] = adjusted
    return [float(x) for x in out]
