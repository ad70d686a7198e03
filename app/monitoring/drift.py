"""Data drift: per-column tests against a reference profile, the default choice, multiple-testing
correction and the dataset verdict; in process or as Ray tasks over column groups.

The tests, their thresholds, the default choice and the dataset rule follow Evidently's
(``evidently.legacy.calculations.stattests`` and ``data_drift.get_dataset_drift``, 0.7.x), so a
user moving from Evidently gets the same verdicts:

- default (``_get_default_stattest``): with n = the reference column's non-missing rows and
  u = distinct values of reference and current together: n <= 1000: numeric u > 5 -> ks,
  numeric 2 < u <= 5 or categorical u > 2 -> chisquare, u <= 2 -> z; n > 1000: numeric u > 5 ->
  wasserstein (normed), otherwise jensenshannon. Thresholds 0.05 (p-values) and 0.1 (distances).
- verdicts: ks p <= threshold; chisquare and z p < threshold; distances >= threshold.
- dataset: share of drifted columns >= drift_share (0.5).
- binning (``get_binned_data``, PSI and Jensen-Shannon): numeric columns with more than 20
  distinct reference values are cut into Sturges bins over reference+current; otherwise each
  distinct value is a bin. PSI replaces empty bins by 0.0001 (or min share / 1e6 when the
  smallest share is below 0.0001); Jensen-Shannon does not.

The reference side comes from the profile, not the raw training data. It is exact when the
profile keeps the values (``count <= exact_rows``) or the category counts (categorical columns
and numeric columns with at most ``max_categories`` distinct values). On large continuous
references it is approximated from the quantile sketch (``quantiles + 1`` points, CDF linear
between them, and in the two extreme bands a power curve fitted to the band's mean, because
linear interpolation to the min/max overstates heavy tails): each test's docstring says how.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from scipy import stats
from scipy.spatial import distance

from app.errors import InvalidInput
from app.monitoring.profile import category_values, numeric_values

PLOT_BINS = 20
PLOT_CATEGORIES = 20
CORRECTIONS = ("none", "bonferroni", "bh")


# ---------------------------------------------------------------------------------------------
# The reference side of a column, from its profile
# ---------------------------------------------------------------------------------------------

def is_numeric_profile(prof: dict) -> bool:
    """Whether the column was profiled as numbers (it has moments), whatever its kind."""
    return "mean" in prof


def _ref_weighted(prof: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact reference of a numeric column as sorted (values, counts), or None when only the
    quantile sketch is kept."""
    if prof.get("values") is not None:
        v, c = np.unique(np.asarray(prof["values"], dtype=np.float64), return_counts=True)
        return v, c.astype(np.float64)
    cats = prof.get("categories")
    if cats and not prof.get("categories_truncated"):
        v = np.array([float(k) for k in cats], dtype=np.float64)
        c = np.array(list(cats.values()), dtype=np.float64)
        order = np.argsort(v)
        return v[order], c[order]
    return None


def _ref_cdf(prof: dict, x: np.ndarray) -> np.ndarray:
    """Reference CDF at x: exact (right-continuous step) from kept values, else the sketch's
    piecewise-linear CDF."""
    w = _ref_weighted(prof)
    if w is not None:
        v, c = w
        cum = np.cumsum(c) / c.sum()
        idx = np.searchsorted(v, x, side="right")
        return np.where(idx > 0, cum[np.maximum(idx - 1, 0)], 0.0)
    return _sketch_cdf(prof, np.asarray(x, dtype=np.float64))


def _tail_exponents(prof: dict) -> tuple[float, float] | None:
    """Shape of the sketch's quantile function in its two extreme bands.

    In the lowest band (u in [0, 1/Q], t = uQ) the quantile function is modelled as
    q1 - (q1 - q0)(1 - t)^a, which runs from the minimum q0 to q1 and has mean q1 - (q1 - q0)/(a + 1);
    a is set so that the mean is the profile's ``tail_means[0]`` (a = 1 is the linear
    interpolation). The highest band mirrors it with b. None when the profile has no tail means."""
    tm = prof.get("tail_means")
    if not tm:
        return None
    q = prof["quantiles"]
    out = []
    for lo_end, hi_end, m in ((q[0], q[1], tm[0]), (q[-1], q[-2], tm[1])):
        span, gap = abs(hi_end - lo_end), abs(hi_end - m)
        out.append(1.0 if span == 0 or gap == 0 else max(span / gap - 1.0, 1e-6))
    return out[0], out[1]


def _sketch_quantile(prof: dict, u: np.ndarray) -> np.ndarray:
    """The sketch's quantile function: linear between the quantiles, the tail model of
    ``_tail_exponents`` in the two extreme bands."""
    q = np.asarray(prof["quantiles"], dtype=np.float64)
    big_q = q.size - 1
    out = np.interp(u, np.linspace(0.0, 1.0, q.size), q)
    ab = _tail_exponents(prof)
    if ab is not None:
        lo = u < 1.0 / big_q
        out[lo] = q[1] - (q[1] - q[0]) * (1 - u[lo] * big_q) ** ab[0]
        hi = u > 1.0 - 1.0 / big_q
        out[hi] = q[-2] + (q[-1] - q[-2]) * (1 - (1 - u[hi]) * big_q) ** ab[1]
    return out


def _sketch_cdf(prof: dict, x: np.ndarray) -> np.ndarray:
    """Inverse of ``_sketch_quantile``: piecewise-linear CDF, the tail model in the extreme bands."""
    q = np.asarray(prof["quantiles"], dtype=np.float64)
    big_q = q.size - 1
    out = np.interp(x, q, np.linspace(0.0, 1.0, q.size), left=0.0, right=1.0)
    ab = _tail_exponents(prof)
    if ab is not None:
        lo = (x >= q[0]) & (x < q[1])
        if lo.any():
            r = np.clip((q[1] - x[lo]) / (q[1] - q[0]), 0.0, 1.0)
            out[lo] = (1 - r ** (1 / ab[0])) / big_q
        hi = (x > q[-2]) & (x <= q[-1])
        if hi.any():
            r = np.clip((x[hi] - q[-2]) / (q[-1] - q[-2]), 0.0, 1.0)
            out[hi] = 1 - (1 - r ** (1 / ab[1])) / big_q
    return out


def _hist(x: np.ndarray, edges: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """``np.histogram(x, edges)`` for equal-width edges (all edges here come from linspace),
    through numpy's uniform-bin path: the same counts, without sorting x."""
    return np.histogram(x, bins=edges.size - 1, range=(edges[0], edges[-1]), weights=weights)[0]


def _ref_hist(prof: dict, edges: np.ndarray) -> np.ndarray:
    """Reference counts in ``np.histogram`` bins (last bin closed); from the sketch CDF when the
    values are not kept (share of the bin = CDF difference, times the count)."""
    w = _ref_weighted(prof)
    if w is not None:
        return _hist(w[0], edges, w[1])
    cdf = _ref_cdf(prof, edges)
    cdf[-1] = 1.0 if edges[-1] >= prof["max"] else cdf[-1]
    cdf[0] = 0.0 if edges[0] <= prof["min"] else cdf[0]
    return np.diff(cdf) * prof["count"]


def _ref_std0(prof: dict) -> float:
    """Population std (ddof=0, numpy's, which Evidently normalises Wasserstein by)."""
    n = prof["count"]
    return float(prof["std"]) * math.sqrt((n - 1) / n) if n > 1 else 0.0


def _counts(prof: dict, cur: np.ndarray) -> tuple[list, np.ndarray, np.ndarray]:
    """Keys of reference and current together (sorted as Evidently's z-test sorts them: by
    number for numeric columns, by string otherwise) with the count of each in both."""
    if is_numeric_profile(prof):
        w = _ref_weighted(prof)
        if w is None:
            raise InvalidInput(
                f"the reference has more than {prof.get('n_unique')} distinct values and no category "
                "counts; use a numeric test (ks, wasserstein, psi, jensenshannon, hellinger)")
        rv, rc = w
        cv, cc = np.unique(cur, return_counts=True)
        keys = np.union1d(rv, cv)
        ref = np.zeros(keys.size)
        ref[np.searchsorted(keys, rv)] = rc
        cnt = np.zeros(keys.size)
        cnt[np.searchsorted(keys, cv)] = cc
        return keys.tolist(), ref, cnt
    cats = dict(prof.get("categories") or {})
    cv, cc = np.unique(cur.astype(str), return_counts=True) if cur.size else (np.array([]), np.array([]))
    if prof.get("categories_truncated"):
        # only the top categories are kept: the rest of the reference and the current values
        # outside the kept ones are pooled in one bucket (an approximation, said in the profile)
        other = prof["count"] - sum(cats.values())
        cur_other = int(sum(c for k, c in zip(cv.tolist(), cc.tolist()) if k not in cats))
        keep = [k in cats for k in cv.tolist()]
        cv, cc = cv[keep], cc[keep]
        cats["\x00other"] = other
        cur_d = dict(zip(cv.tolist(), cc.tolist()))
        cur_d["\x00other"] = cur_other
    else:
        cur_d = dict(zip(cv.tolist(), cc.tolist()))
    keys = sorted(set(cats) | set(cur_d))
    return (keys, np.array([cats.get(k, 0) for k in keys], dtype=np.float64),
            np.array([cur_d.get(k, 0) for k in keys], dtype=np.float64))


def _sturges_edges(lo: float, hi: float, n: int) -> np.ndarray:
    """``np.histogram_bin_edges(data, bins="sturges")`` from the data's min, max and size."""
    if lo == hi:
        return np.linspace(lo - 0.5, hi + 0.5, 2)
    width = (hi - lo) / (np.log2(n) + 1.0)
    return np.linspace(lo, hi, int(np.ceil((hi - lo) / width)) + 1)


def _binned(prof: dict, cur: np.ndarray, *, fill_zeroes: bool) -> tuple[np.ndarray, np.ndarray]:
    """Evidently's ``get_binned_data``: reference and current shares per bin."""
    n_ref = prof["count"]
    if is_numeric_profile(prof) and prof["n_unique"] > 20:
        lo = min(prof["min"], float(cur.min())) if cur.size else prof["min"]
        hi = max(prof["max"], float(cur.max())) if cur.size else prof["max"]
        edges = _sturges_edges(lo, hi, n_ref + cur.size)
        ref = _ref_hist(prof, edges) / n_ref
        cnt = _hist(cur, edges) / cur.size
    else:
        _, rc, cc = _counts(prof, cur)
        ref, cnt = rc / n_ref, cc / cur.size
    if fill_zeroes:
        for a in (ref, cnt):
            nz = a[a != 0]
            m = nz.min() if nz.size else 0.0001
            np.place(a, a == 0, m / 10**6 if m <= 0.0001 else 0.0001)
    return ref, cnt


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------

class DriftTest(ABC):
    """One drift test: a statistic of (reference profile, current values) and its verdict.

    ``run`` takes the column's profile and the current non-missing values (floats for numeric
    profiles, category keys -- ``profile.category_key`` -- for categorical ones) and returns
    (statistic, p-value or None)."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "p_value" | "distance"
    default_threshold: ClassVar[float]
    kinds: ClassVar[frozenset] = frozenset({"numeric", "categorical", "binary"})
    numeric_only: ClassVar[bool] = False

    @abstractmethod
    def run(self, ref: dict, current: np.ndarray) -> tuple[float, float | None]:
        ...

    def drifted(self, statistic: float, p_value: float | None, threshold: float) -> bool:
        """Evidently's verdicts: p < threshold for p-value tests, distance >= threshold."""
        if self.kind == "p_value":
            return bool(p_value is not None and p_value < threshold)
        return bool(statistic >= threshold)

    def check(self, name: str, prof: dict) -> None:
        if self.numeric_only and not is_numeric_profile(prof):
            raise InvalidInput(f"test {self.name!r} needs a numeric column; {name!r} is {prof['kind']}: "
                               "use chisquare, z, psi, jensenshannon or hellinger")


class KSTest(DriftTest):
    """Two-sample Kolmogorov-Smirnov (``scipy.stats.ks_2samp``, two-sided, method auto), as
    Evidently's ``ks`` (drift when p <= threshold).

    Exact when the reference values (or their counts) are kept. From the sketch: D is the largest
    gap between the sketch CDF and the current empirical CDF (checked on both sides of each
    current value), and p is ks_2samp's asymptotic one, ``scipy.stats.kstwo.sf(D, round(n m /
    (n + m)))`` with n the reference rows."""

    name, kind, default_threshold = "ks", "p_value", 0.05
    kinds = frozenset({"numeric", "binary"})
    numeric_only = True

    def run(self, ref, current):
        w = _ref_weighted(ref)
        if w is not None:
            res = stats.ks_2samp(np.repeat(w[0], w[1].astype(np.int64)), current)
            return float(res.statistic), float(res.pvalue)
        cs = np.sort(current)
        m, n = cs.size, ref["count"]
        f_ref = _ref_cdf(ref, cs)
        hi = np.searchsorted(cs, cs, side="right") / m
        lo = np.searchsorted(cs, cs, side="left") / m
        d = float(max(np.max(np.abs(hi - f_ref)), np.max(np.abs(f_ref - lo))))
        q = np.asarray(ref["quantiles"])
        f_cur_q = np.searchsorted(cs, q, side="right") / m
        d = max(d, float(np.max(np.abs(f_cur_q - np.linspace(0, 1, q.size)))))
        p = float(np.clip(stats.kstwo.sf(d, round(n * m / (n + m))), 0.0, 1.0))
        return d, p

    def drifted(self, statistic, p_value, threshold):
        return bool(p_value is not None and p_value <= threshold)


class ChiSquareTest(DriftTest):
    """Pearson chi-square goodness of fit of current counts to reference shares scaled to the
    current size (``scipy.stats.chisquare(f_obs, f_exp)``), as Evidently's ``chisquare``. A
    current category the reference never saw has expected 0: statistic inf, p 0."""

    name, kind, default_threshold = "chisquare", "p_value", 0.05

    def run(self, ref, current):
        _, rc, cc = _counts(ref, current)
        f_exp = rc * (current.size / ref["count"])
        with np.errstate(divide="ignore", invalid="ignore"):
            res = stats.chisquare(cc, f_exp)
        return float(res.statistic), float(res.pvalue)


class ZTest(DriftTest):
    """Two-proportion z-test (pooled variance), as Evidently's ``z``: the proportion of values
    other than the smallest key (sorted) in reference vs current; p = 2 (1 - Phi(|z|)). Both
    sides constant and equal: p = 1."""

    name, kind, default_threshold = "z", "p_value", 0.05

    def run(self, ref, current):
        keys, rc, cc = _counts(ref, current)
        if np.count_nonzero(rc) == 1 and np.count_nonzero(cc) == 1 and np.argmax(rc) == np.argmax(cc):
            return 0.0, 1.0
        n1, n2 = rc.sum(), cc.sum()
        p1, p2 = (n1 - rc[0]) / n1, (n2 - cc[0]) / n2
        pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (p1 - p2) / np.sqrt(pooled * (1 - pooled) * (1.0 / n1 + 1.0 / n2))
        p = 2 * (1 - stats.norm.cdf(np.abs(z)))
        return float(z), float(p)


class PSITest(DriftTest):
    """Population stability index sum((r - c) ln(r / c)) over Evidently's bins (zeros filled).
    Bands in practice: < 0.1 stable, 0.1-0.25 moderate, > 0.25 large (Siddiqi, Credit Risk
    Scorecards, 2006). Numeric bins from the sketch CDF on large continuous references."""

    name, kind, default_threshold = "psi", "distance", 0.1

    def run(self, ref, current):
        r, c = _binned(ref, current, fill_zeroes=True)
        return float(np.sum((r - c) * np.log(r / c))), None


class JensenShannonTest(DriftTest):
    """Jensen-Shannon distance (``scipy.spatial.distance.jensenshannon``, natural log) of the
    binned shares, no zero filling, as Evidently's ``jensenshannon``."""

    name, kind, default_threshold = "jensenshannon", "distance", 0.1

    def run(self, ref, current):
        r, c = _binned(ref, current, fill_zeroes=False)
        return float(distance.jensenshannon(r, c)), None


class HellingerTest(DriftTest):
    """Hellinger distance sqrt(1 - sum sqrt(r c)), as Evidently's ``hellinger``: categorical
    columns over the categories; numeric ones over Sturges bins of the distinct values of both
    sides. On a sketch reference the number of distinct reference values is taken as its row
    count (continuous data) and the bin shares come from the sketch CDF."""

    name, kind, default_threshold = "hellinger", "distance", 0.1

    def run(self, ref, current):
        if not is_numeric_profile(ref):
            _, rc, cc = _counts(ref, current)
            bc = float(np.sum(np.sqrt((rc / rc.sum()) * (cc / cc.sum()))))
        else:
            w = _ref_weighted(ref)
            cu = np.unique(current)
            if w is not None:
                n_keys = np.union1d(w[0], cu).size
            else:
                n_keys = ref["count"] + cu.size
            lo = min(ref["min"], float(cu[0])) if cu.size else ref["min"]
            hi = max(ref["max"], float(cu[-1])) if cu.size else ref["max"]
            edges = _sturges_edges(lo, hi, n_keys)
            r = _ref_hist(ref, edges)
            c = _hist(current, edges).astype(np.float64)
            bc = float(np.sum(np.sqrt((r / r.sum()) * (c / c.sum()))))
        return math.sqrt(1 - float(np.clip(bc, 0, 1))), None


class WassersteinTest(DriftTest):
    """First Wasserstein distance divided by the reference's population std (floor 0.001), as
    Evidently's ``wasserstein`` (``scipy.stats.wasserstein_distance``). From the sketch: the
    integral of |F_ref^-1(u) - F_cur^-1(u)| over u, with the sketch's quantile function
    (``_sketch_quantile``) and the current's empirical one, by the midpoint rule."""

    name, kind, default_threshold = "wasserstein", "distance", 0.1
    kinds = frozenset({"numeric", "binary"})
    numeric_only = True

    def run(self, ref, current):
        norm = max(_ref_std0(ref), 0.001)
        w = _ref_weighted(ref)
        if w is not None:
            d = stats.wasserstein_distance(w[0], current, u_weights=w[1])
        else:
            # midpoint rule on a grid fine enough for the steep tail bands (>= 100 points each)
            cs = np.sort(current)
            m = max(cs.size, 100 * (len(ref["quantiles"]) - 1))
            u = (np.arange(m) + 0.5) / m
            cur_q = cs[np.minimum((u * cs.size).astype(np.int64), cs.size - 1)]
            d = float(np.mean(np.abs(_sketch_quantile(ref, u) - cur_q)))
        return float(d / norm), None


DRIFT_TESTS: dict[str, DriftTest] = {t.name: t for t in (
    KSTest(), ChiSquareTest(), ZTest(), PSITest(), WassersteinTest(), JensenShannonTest(), HellingerTest())}


def get_test(name: str) -> DriftTest:
    try:
        return DRIFT_TESTS[name]
    except KeyError:
        raise InvalidInput(f"unknown drift test {name!r}; known: {', '.join(DRIFT_TESTS)} "
                           "(or 'auto' for Evidently's default choice)") from None


def _union_unique(prof: dict, current: np.ndarray | None) -> int:
    """Distinct values of reference and current together, as far as the choice needs it."""
    if is_numeric_profile(prof):
        w = _ref_weighted(prof)
        if w is None:
            return prof["n_unique"]
        if current is None or current.size == 0:
            return int(w[0].size)
        return int(np.union1d(w[0], np.unique(current)).size)
    cats = prof.get("categories") or {}
    if current is None or current.size == 0:
        return prof["n_unique"]
    return len(set(cats) | set(np.unique(current.astype(str)).tolist()))


def default_test(column_profile: dict, reference_rows: int, current: np.ndarray | None = None) -> str:
    """Evidently's default choice (``_get_default_stattest``). ``reference_rows`` is the
    reference column's non-missing rows (Evidently drops missing values before choosing);
    distinct values count reference and ``current`` together when it is given, else the
    reference alone."""
    u = _union_unique(column_profile, current)
    numeric = is_numeric_profile(column_profile)
    if reference_rows <= 1000:
        if numeric and u > 5:
            return "ks"
        return "chisquare" if u > 2 else "z"
    if numeric and u > 5:
        return "wasserstein"
    return "jensenshannon"


# ---------------------------------------------------------------------------------------------
# Columns and the dataset
# ---------------------------------------------------------------------------------------------

@dataclass
class DriftOptions:
    """What a drift run tests. ``columns`` None: every profiled feature. ``tests`` per column,
    else ``default_test`` ("auto": Evidently's choice). ``thresholds`` per column, "*" for all,
    else the test's default. ``correction`` of p-values across the columns tested with p-value
    tests (Bonferroni, or Benjamini-Hochberg via scipy.stats.false_discovery_control); distances
    are not corrected. Dataset drift when drifted / tested columns >= ``drift_share``."""

    columns: list[str] | None = None
    tests: dict[str, str] = field(default_factory=dict)
    default_test: str = "auto"
    thresholds: dict[str, float] = field(default_factory=dict)
    correction: str = "none"
    drift_share: float = 0.5

    def validate(self, profile: dict) -> list[str]:
        feats = profile["features"]
        cols = list(feats) if self.columns is None else list(self.columns)
        unknown = [c for c in cols if c not in feats]
        if unknown:
            raise InvalidInput(f"columns {unknown} are not in the reference profile "
                               f"(profiled: {list(feats)[:20]})")
        if self.correction not in CORRECTIONS:
            raise InvalidInput(f"correction {self.correction!r} is not one of {', '.join(CORRECTIONS)}")
        if not 0 < self.drift_share <= 1:
            raise InvalidInput(f"drift_share={self.drift_share}: must be in (0, 1]")
        if self.default_test != "auto":
            get_test(self.default_test)
        for c, t in self.tests.items():
            if c not in feats:
                raise InvalidInput(f"test given for column {c!r}, which is not in the reference profile")
            get_test(t).check(c, feats[c])
        if self.default_test != "auto":
            for c in cols:
                if c not in self.tests:
                    get_test(self.default_test).check(c, feats[c])
        return cols

    def test_for(self, name: str) -> str | None:
        t = self.tests.get(name, self.default_test)
        return None if t == "auto" else t

    def threshold_for(self, name: str) -> float | None:
        return self.thresholds.get(name, self.thresholds.get("*"))


def _plot(prof: dict, cur: np.ndarray) -> dict:
    n_ref = max(prof["count"], 1)
    if is_numeric_profile(prof):
        lo = min(prof["min"], float(cur.min()))
        hi = max(prof["max"], float(cur.max()))
        edges = np.linspace(lo, hi, PLOT_BINS + 1) if hi > lo else np.array([lo - 0.5, hi + 0.5])
        r = _ref_hist(prof, edges) / n_ref
        c = _hist(cur, edges) / cur.size
        return {"type": "histogram", "edges": edges.tolist(), "reference": r.tolist(), "current": c.tolist()}
    keys, rc, cc = _counts(prof, cur)
    r, c = rc / n_ref, cc / cur.size
    top = np.argsort(-(r + c), kind="stable")[:PLOT_CATEGORIES]
    return {"type": "categories", "labels": [str(keys[i]).replace("\x00other", "(other)") for i in top],
            "reference": r[top].tolist(), "current": c[top].tolist()}



def column_drift(name: str, column_profile: dict, current: np.ndarray | pa.Array | pa.ChunkedArray | None,
                 test: str | None = None, threshold: float | None = None) -> dict:
    """One column's result (docs/monitoring.md, "Formats"), uncorrected. ``test`` None: the default choice."""
    prof = column_profile
    base: dict[str, Any] = {"kind": prof["kind"], "reference_rows": int(prof["count"]), "drifted": False}
    if current is None:
        return {**base, "test": test, "error": f"column {name!r} is not in the current window",
                "current_rows": 0, "current_missing": 0}
    if is_numeric_profile(prof):
        try:
            cur, missing = numeric_values(current)
        except InvalidInput as e:
            return {**base, "test": test, "error": f"column {name!r}: {e}", "current_rows": 0,
                    "current_missing": len(current)}
    else:
        cur, missing = category_values(current)
    base.update(current_rows=int(cur.size), current_missing=int(missing))
    if cur.size == 0:
        return {**base, "test": test, "error": f"column {name!r} has no non-missing values in the current window"}
    if prof["count"] == 0:
        return {**base, "test": test, "error": f"column {name!r} has no non-missing values in the reference"}
    test = test or default_test(prof, prof["count"], cur)
    t = get_test(test)
    t.check(name, prof)
    thr = t.default_threshold if threshold is None else float(threshold)
    stat, p = t.run(prof, cur)
    stat_out = float(stat) if math.isfinite(stat) else (None if math.isnan(stat) else float(stat))
    if isinstance(stat_out, float) and math.isinf(stat_out):
        stat_out = 1e308 if stat_out > 0 else -1e308  # JSON has no inf
    return {**base, "test": test, "statistic": stat_out,
            "p_value": None if p is None or math.isnan(p) else float(p),
            "p_adjusted": None if p is None or math.isnan(p) else float(p),
            "threshold": thr, "drifted": t.drifted(stat, p, thr), "plot": _plot(prof, cur)}


def _finish(results: dict[str, dict], options: DriftOptions) -> dict:
    """Correction across p-value columns, verdicts, and the dataset rule."""
    pcols = [c for c, r in results.items() if "error" not in r and DRIFT_TESTS[r["test"]].kind == "p_value"]
    if options.correction != "none" and pcols:
        ps = np.array([1.0 if results[c]["p_value"] is None else results[c]["p_value"] for c in pcols])
        if options.correction == "bonferroni":
            adj = np.minimum(ps * len(ps), 1.0)
        else:
            adj = stats.false_discovery_control(ps, method="bh")
        for c, a in zip(pcols, adj.tolist()):
            r = results[c]
            r["p_adjusted"] = float(a)
            r["drifted"] = DRIFT_TESTS[r["test"]].drifted(r["statistic"], float(a), r["threshold"])
    tested = [r for r in results.values() if "error" not in r]
    drifted = sum(1 for r in tested if r["drifted"])
    share = drifted / len(tested) if tested else 0.0
    return {"dataset_drift": {"detected": bool(tested) and share >= options.drift_share, "share": share,
                              "drifted": drifted, "columns": len(tested), "threshold": options.drift_share},
            "correction": options.correction, "columns": results}


def _columns_of(features: dict, table: pa.Table, names: list[str], tests: dict, thresholds: dict) -> dict:
    present = set(table.column_names)
    return {c: column_drift(c, features[c], table.column(c) if c in present else None,
                            tests.get(c), thresholds.get(c)) for c in names}


def _plan(profile: dict, options: DriftOptions) -> tuple[list[str], dict, dict]:
    cols = options.validate(profile)
    tests = {c: options.test_for(c) for c in cols}
    thresholds = {c: options.threshold_for(c) for c in cols}
    return cols, tests, thresholds


def dataset_drift(profile: dict, current: pa.Table, options: DriftOptions | None = None) -> dict:
    """The drift result (docs/monitoring.md, "Formats") of a current table against a reference profile."""
    options = options or DriftOptions()
    cols, tests, thresholds = _plan(profile, options)
    results = _columns_of(profile["features"], current, cols, tests, thresholds)
    return _finish(results, options)


def _drift_task(features: dict, names: list[str], tests: dict, thresholds: dict, *blocks: pa.Table) -> dict:
    tables = [b.select([c for c in names if c in b.column_names]) for b in blocks]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return _columns_of(features, table, names, tests, thresholds)


_REMOTE: Any = None


def _remote_task():
    """The Ray task, made once per process (ray.remote pickles and exports the function)."""
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(_drift_task)
    return _REMOTE


def dataset_drift_ray(profile: dict, current, options: DriftOptions | None = None, *,
                      num_cpus: float = 0.25, columns_per_task: int = 50) -> dict:
    """``dataset_drift`` with columns in groups of ``columns_per_task`` as Ray tasks.

    ``current`` is a pyarrow Table (put in the object store once), a list of ObjectRefs of
    Table blocks, or a ``ray.data.Dataset`` (its Arrow blocks). Every task gets the same block
    refs (read zero-copy from the object store) and selects its own columns; correction and the
    dataset verdict are applied after gathering, so the result equals ``dataset_drift``'s."""
    import ray

    options = options or DriftOptions()
    cols, tests, thresholds = _plan(profile, options)
    if isinstance(current, pa.Table):
        refs = [ray.put(current)]
    elif isinstance(current, list):
        refs = current
    else:  # ray.data.Dataset
        refs = list(current.to_arrow_refs())
    if not refs:
        raise InvalidInput("the current window has no blocks")
    task = _remote_task().options(num_cpus=num_cpus)
    feats = profile["features"]
    pending = []
    for i in range(0, len(cols), max(1, columns_per_task)):
        group = cols[i:i + columns_per_task]
        pending.append(task.remote({c: feats[c] for c in group}, group,
                                   {c: tests[c] for c in group}, {c: thresholds[c] for c in group}, *refs))
    results: dict[str, dict] = {}
    for part in ray.get(pending):
        results.update(part)
    return _finish({c: results[c] for c in cols}, options)
