"""app.experiments.stats against scipy's own results, published values and seeded simulations."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from app.errors import InvalidInput
from app.experiments.stats import (
    bayes_binary,
    bayes_normal,
    holm,
    mann_whitney,
    msprt,
    msprt_path,
    msprt_statistics,
    msprt_tau2,
    sample_size_means,
    sample_size_proportions,
    srm_check,
    two_proportion_ztest,
    welch_from_stats,
    welch_ttest,
)


def _json(result) -> dict:
    return json.loads(json.dumps(result.to_dict(), allow_nan=False))


# ----------------------------------------------------------------- two proportions


def test_two_proportion_ztest_pooled_statistic_equals_pearson_chi_square_from_scipy():
    res = two_proportion_ztest(120, 1000, 150, 1000)
    table = np.array([[120, 880], [150, 850]])
    chi2 = stats.chi2_contingency(table, correction=False)
    assert res.statistic > 0 and res.effect == pytest.approx(0.03)
    assert res.statistic**2 == pytest.approx(chi2.statistic, rel=1e-12)
    assert res.p_value == pytest.approx(chi2.pvalue, rel=1e-10)


def test_two_proportion_ztest_textbook_examples():
    # OpenIntro Statistics (4th ed., section 6.2): the mammogram trial, 500 of 44,425 vs 505 of
    # 44,405 deaths: pooled p 0.0113, Z = 0.17, p-value 0.87 (not significant).
    res = two_proportion_ztest(500, 44425, 505, 44405)
    assert res.detail["pooled_p"] == pytest.approx(0.0113, abs=5e-5)
    assert round(abs(res.statistic), 2) == 0.17
    assert round(res.p_value, 2) == 0.87
    # Same book: the CPR trial, 14 of 40 vs 11 of 50 survived; difference 0.13, SE 0.095 and the
    # 90% Wald interval (-0.03, 0.29) for treatment minus control (here a = control, b = treatment).
    res = two_proportion_ztest(11, 50, 14, 40, alpha=0.10)
    assert res.effect == pytest.approx(0.13)
    assert res.detail["se_unpooled"] == pytest.approx(0.095, abs=5e-4)
    assert (round(res.ci_low, 2), round(res.ci_high, 2)) == (-0.03, 0.29)
    # Hand-worked: 50/100 vs 60/100, pooled 0.55, SE sqrt(0.55*0.45*0.02) = 0.070356, z = 1.4213.
    res = two_proportion_ztest(50, 100, 60, 100)
    assert res.statistic == pytest.approx(0.1 / math.sqrt(0.55 * 0.45 * 0.02))
    assert res.p_value == pytest.approx(2 * stats.norm.sf(1.42134), abs=1e-5)


@pytest.mark.parametrize("args", [(0, 0, 5, 10), (0, 10, 0, 0), (0, 100, 0, 100), (100, 100, 100, 100)])
def test_two_proportion_ztest_degenerate_inputs_give_p_one_and_json_safe_results(args):
    res = two_proportion_ztest(*args)
    assert res.p_value == 1.0 and "degenerate" in res.detail
    body = _json(res)
    assert all(v is not None for k, v in body.items() if k != "detail")


def test_two_proportion_ztest_rejects_impossible_counts():
    with pytest.raises(InvalidInput):
        two_proportion_ztest(11, 10, 1, 10)
    with pytest.raises(InvalidInput):
        two_proportion_ztest(1, 10, 1, 10, alpha=1.5)


# ----------------------------------------------------------------- Welch and Mann-Whitney


def test_welch_matches_scipy_and_summary_statistics_agree():
    rng = np.random.default_rng(7)
    a, b = rng.normal(10, 2, 300), rng.normal(10.5, 3, 200)
    res = welch_ttest(a, b)
    ref = stats.ttest_ind(b, a, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert (res.statistic, res.p_value) == pytest.approx((ref.statistic, ref.pvalue))
    assert (res.ci_low, res.ci_high) == pytest.approx((ci.low, ci.high))
    assert res.effect == pytest.approx(b.mean() - a.mean())
    same = welch_from_stats(a.mean(), a.var(ddof=1), len(a), b.mean(), b.var(ddof=1), len(b))
    assert (same.statistic, same.p_value, same.ci_low, same.ci_high, same.detail["df"]) == pytest.approx(
        (res.statistic, res.p_value, res.ci_low, res.ci_high, res.detail["df"]), rel=1e-9)
    assert _json(res)["detail"]["df"] == pytest.approx(ref.df)


def test_welch_degenerate_arms():
    res = welch_ttest([1.0], [2.0, 3.0])
    assert res.p_value == 1.0 and _json(res)["ci_low"] is None
    assert welch_ttest([1.0, 1.0], [1.0, 1.0]).p_value == 1.0
    assert welch_from_stats(1.0, 0.0, 10, 2.0, 0.0, 10).p_value == 0.0
    with pytest.raises(InvalidInput):
        welch_ttest([1.0, float("nan")], [1.0, 2.0])


def test_mann_whitney_matches_scipy_and_estimates_the_shift():
    rng = np.random.default_rng(3)
    a = rng.exponential(20.0, 400)
    b = rng.exponential(20.0, 300) + 5.0
    res = mann_whitney(a, b)
    ref = stats.mannwhitneyu(b, a, alternative="two-sided")
    assert (res.statistic, res.p_value) == pytest.approx((ref.statistic, ref.pvalue))
    assert res.effect == pytest.approx(np.median(np.subtract.outer(b, a)))
    assert res.ci_low < res.effect < res.ci_high
    assert res.detail["cles"] == pytest.approx(ref.statistic / (400 * 300))
    assert res.detail["median_a"] == pytest.approx(np.median(a))
    assert res.detail["median_b"] == pytest.approx(np.median(b))
    # An exact shift is recovered exactly, and its interval contains it.
    shifted = mann_whitney(a, a + 3.0)
    assert shifted.effect == pytest.approx(3.0)
    assert shifted.ci_low <= 3.0 <= shifted.ci_high


def test_mann_whitney_subsamples_pairs_deterministically_for_large_arms():
    rng = np.random.default_rng(11)
    a, b = rng.normal(0, 1, 2000), rng.normal(0.5, 1, 1500)  # 3M pairs > 1M
    first, second = mann_whitney(a, b), mann_whitney(a, b)
    assert first.detail["hl_subsampled"] and first.detail["hl_pairs"] == 1_000_000
    assert first.to_dict() == second.to_dict()
    assert first.effect == pytest.approx(0.5, abs=0.1)
    assert first.ci_low < 0.5 < first.ci_high


def test_mann_whitney_empty_arm():
    res = mann_whitney([], [1.0, 2.0])
    assert res.p_value == 1.0 and _json(res)["ci_high"] is None


# ----------------------------------------------------------------- sample sizes


def test_sample_sizes_match_published_values():
    # Pooled-variance normal approximation (Fleiss): p 0.10 -> 0.12 at alpha 0.05, power 0.8.
    assert sample_size_proportions(0.10, 0.02) == 3841
    assert sample_size_proportions(0.10, -0.02) == 3213  # 0.10 -> 0.08, hand-worked with the same formula
    # Cohen's d = 0.5: 63 per arm by the normal approximation (64 with the t correction).
    assert sample_size_means(1.0, 0.5) == 63
    assert sample_size_means(2.0, 1.0) == 63
    assert sample_size_means(1.0, 0.5, power=0.9) == 85
    with pytest.raises(InvalidInput):
        sample_size_proportions(0.99, 0.02)


def test_sample_size_proportions_achieves_the_power_by_simulation():
    n = sample_size_proportions(0.10, 0.02)
    rng = np.random.default_rng(2024)
    sims = 2000
    xa, xb = rng.binomial(n, 0.10, sims), rng.binomial(n, 0.12, sims)
    power = np.mean([two_proportion_ztest(int(a), n, int(b), n).p_value < 0.05 for a, b in zip(xa, xb)])
    assert abs(power - 0.8) < 3 * math.sqrt(0.8 * 0.2 / sims)


def test_sample_size_means_achieves_the_power_by_simulation():
    n = sample_size_means(1.0, 0.5)
    rng = np.random.default_rng(99)
    sims = 4000
    a, b = rng.normal(0.0, 1.0, (sims, n)), rng.normal(0.5, 1.0, (sims, n))
    power = np.mean(stats.ttest_ind(b, a, axis=1, equal_var=False).pvalue < 0.05)
    assert abs(power - 0.8) < 3 * math.sqrt(0.8 * 0.2 / sims)


# ----------------------------------------------------------------- mSPRT


def test_msprt_one_look_is_the_normal_mixture_likelihood_ratio():
    mean_a, var_a, n_a, mean_b, var_b, n_b, tau2 = 0.10, 0.09, 5000, 0.115, 0.101775, 5000, 1e-4
    res = msprt(mean_a, var_a, n_a, mean_b, var_b, n_b, tau2=tau2)
    v = var_a / n_a + var_b / n_b
    theta = mean_b - mean_a
    lam = math.sqrt(v / (v + tau2)) * math.exp(theta**2 * tau2 / (2 * v * (v + tau2)))
    half = math.sqrt(v * (v + tau2) / tau2 * (math.log((v + tau2) / v) + 2 * math.log(20)))
    assert res.likelihood_ratio == pytest.approx(lam)
    assert res.p_value == pytest.approx(min(1.0, 1 / lam))
    assert (res.ci_low, res.ci_high) == pytest.approx((theta - half, theta + half))
    assert res.effect == pytest.approx(theta) and res.tau2 == tau2
    # The test rejects exactly when the confidence sequence excludes 0 (same boundary).
    assert (res.p_value <= 0.05) == (res.ci_low > 0 or res.ci_high < 0)


def test_msprt_tau2_closed_form_optimum():
    tau2 = msprt_tau2(2.0, 1000)
    r = tau2 / (2 * 2.0 / 1000)
    assert r - math.log(1 + r) == pytest.approx(2 * math.log(20))
    # It is the minimiser of the confidence-sequence half-width at expected_n.
    v = 2 * 2.0 / 1000

    def width(t2):
        return float(msprt_statistics(0.0, v, t2)[2])

    assert width(tau2) < width(tau2 * 1.1) and width(tau2) < width(tau2 / 1.1)
    assert msprt_tau2(2.0, 1000, alpha=0.01) > tau2  # stricter alpha: tuned to larger effects
    with pytest.raises(InvalidInput):
        msprt_tau2(1.0, 0)


def test_msprt_defaults_and_degenerate_looks():
    res = msprt(0.1, 0.09, 1000, 0.12, 0.1056, 1000)
    assert res.tau2 == pytest.approx(msprt_tau2((0.09 + 0.1056) / 2, 1000))
    planned = msprt(0.1, 0.09, 1000, 0.12, 0.1056, 1000, expected_n=5000)
    assert planned.tau2 == pytest.approx(msprt_tau2((0.09 + 0.1056) / 2, 5000))
    uneven = msprt(0.1, 0.09, 900, 0.12, 0.1056, 100)  # 90/10 split: tuned at the harmonic mean, 180
    assert uneven.tau2 == pytest.approx(msprt_tau2((900 * 0.09 + 100 * 0.1056) / 1000, 180))
    empty = msprt(0.0, 0.0, 0, 0.0, 0.0, 0)
    assert empty.p_value == 1.0 and empty.likelihood_ratio == 1.0
    assert _json(empty)["ci_low"] is None and _json(empty)["ci_high"] is None
    flat = msprt(0.0, 0.0, 100, 0.0, 0.0, 100)  # binary metric at 0% in both arms
    assert flat.p_value == 1.0


def test_msprt_path_is_monotone_and_ends_at_the_last_look():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0, 1, 3000), rng.normal(0.05, 1, 3000)
    looks = list(range(100, 3001, 100))
    path = msprt_path(a, b, looks=looks, expected_n=3000)
    assert [r.n_a for r in path] == looks
    p = [r.p_value for r in path]
    assert all(x >= y for x, y in zip(p, p[1:]))
    assert all(x.ci_low <= y.ci_low and x.ci_high >= y.ci_high for x, y in zip(path, path[1:]))
    last = path[-1]
    one = msprt(a.mean(), a.var(ddof=1), 3000, b.mean(), b.var(ddof=1), 3000, tau2=last.tau2)
    assert last.effect == pytest.approx(one.effect)
    assert last.likelihood_ratio == pytest.approx(one.likelihood_ratio)
    assert last.p_value <= one.p_value
    assert last.ci_low >= one.ci_low - 1e-12 and last.ci_high <= one.ci_high + 1e-12
    assert all(v is not None for v in _json(last).values())
    # Unequal arms: the shorter arm contributes all it has; default looks are 50.
    uneven = msprt_path(a[:500], b)
    assert len(uneven) == 50 and uneven[-1].n_a == 500 and uneven[-1].n_b == 3000
    assert msprt_path([], []) == []


def test_msprt_detects_a_real_effect():
    rng = np.random.default_rng(8)
    a, b = rng.binomial(1, 0.10, 20000), rng.binomial(1, 0.13, 20000)
    path = msprt_path(a, b, looks=range(500, 20001, 500), expected_n=20000)
    assert path[-1].p_value < 0.001
    assert 0 < path[-1].ci_low < path[-1].effect < path[-1].ci_high
    first = next(r for r in path if r.p_value < 0.05)
    assert first.n_a < 20000  # stopped early


def _aa_simulation(kind: str, tests: int, per_look: int, looks: int, effect: float = 0.0, seed: int = 0):
    """Rejection rates of mSPRT and of naive repeated z-tests over ``tests`` A/B tests peeked every
    ``per_look`` samples per arm, at alpha 0.05, with the platform's tuning (expected_n = the end),
    and the share of tests whose confidence sequence misses the true effect at some look."""
    rng = np.random.default_rng(seed)
    n = per_look * np.arange(1, looks + 1)
    if kind == "binary":
        p = 0.10
        sa = np.cumsum(rng.binomial(per_look, p, (tests, looks)), axis=1)
        sb = np.cumsum(rng.binomial(per_look, p + effect, (tests, looks)), axis=1)
        mean_a, mean_b = sa / n, sb / n
        var_a, var_b = mean_a * (1 - mean_a), mean_b * (1 - mean_b)  # callers pass p(1-p)
    else:
        xa = rng.normal(0.0, 1.0, (tests, looks, per_look))
        xb = rng.normal(effect, 1.0, (tests, looks, per_look))
        s1a, s1b = np.cumsum(xa.sum(-1), 1), np.cumsum(xb.sum(-1), 1)
        s2a, s2b = np.cumsum((xa**2).sum(-1), 1), np.cumsum((xb**2).sum(-1), 1)
        mean_a, mean_b = s1a / n, s1b / n
        var_a, var_b = (s2a - n * mean_a**2) / (n - 1), (s2b - n * mean_b**2) / (n - 1)
    theta, v = mean_b - mean_a, var_a / n + var_b / n
    tau2 = np.vectorize(lambda s2: msprt_tau2(s2, int(n[-1])))((var_a + var_b) / 2)
    _, p_msprt, half = msprt_statistics(theta, v, tau2)
    msprt_reject = (p_msprt <= 0.05).any(axis=1)
    cs_misses_truth = (np.abs(theta - effect) >= half).any(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_naive = 2 * stats.norm.sf(np.abs(theta) / np.sqrt(v))
    naive_reject = (np.nan_to_num(p_naive, nan=1.0) < 0.05).any(axis=1)
    return msprt_reject.mean(), naive_reject.mean(), cs_misses_truth.mean()


@pytest.mark.parametrize("kind", ["binary", "normal"])
def test_aa_simulation_msprt_keeps_alpha_while_naive_peeking_does_not(kind):
    tests, alpha = 1000, 0.05
    se = math.sqrt(alpha * (1 - alpha) / tests)
    msprt_fpr, naive_fpr, cs_miss = _aa_simulation(kind, tests, per_look=100, looks=20)
    assert msprt_fpr <= alpha + 3 * se
    assert cs_miss == msprt_fpr  # the confidence sequence misses 0 exactly when the test rejects
    assert naive_fpr > alpha + 5 * se  # ~0.2 with 20 peeks


def test_msprt_power_and_coverage_on_a_real_effect_by_simulation():
    tests = 1000
    power, _, cs_miss = _aa_simulation("binary", tests, per_look=100, looks=20, effect=0.04, seed=1)
    assert power > 0.8
    # The confidence sequence covers the true effect at every look at once, in >= 95% of the tests.
    assert cs_miss <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / tests)


# ----------------------------------------------------------------- Bayesian


def test_bayes_binary_clear_winner_and_exact_intervals():
    res = bayes_binary({"a": 100, "b": 150}, {"a": 1000, "b": 1000})
    assert res.prob_best["b"] > 0.99
    assert res.expected_loss["b"] < 1e-4 < res.expected_loss["a"]
    assert sum(res.prob_best.values()) == pytest.approx(1.0)
    assert res.means["a"] == pytest.approx(101 / 1002)
    assert res.intervals["b"] == pytest.approx(list(stats.beta.ppf([0.025, 0.975], 151, 851)))
    assert res.to_dict() == bayes_binary({"a": 100, "b": 150}, {"a": 1000, "b": 1000}).to_dict()
    # P(b > a) by numerical integration of the two Beta posteriors.
    x = np.linspace(0.0, 1.0, 200001)
    exact = np.trapezoid(stats.beta.pdf(x, 151, 851) * stats.beta.cdf(x, 101, 901), x)
    assert res.prob_best["b"] == pytest.approx(exact, abs=3 * math.sqrt(exact * (1 - exact) / 20000) + 1e-4)


def test_bayes_binary_equal_arms_and_empty_arms():
    res = bayes_binary({"a": 50, "b": 50, "c": 0}, {"a": 500, "b": 500, "c": 0}, draws=40000)
    assert res.prob_best["a"] == pytest.approx(res.prob_best["b"], abs=0.03)
    assert res.means["c"] == 0.5  # the prior alone
    with pytest.raises(InvalidInput):
        bayes_binary({"a": 5}, {"a": 4})
    with pytest.raises(InvalidInput):
        bayes_binary({"a": 1}, {"b": 4})


def test_bayes_normal_matches_the_analytic_probability():
    res = bayes_normal({"a": 10.0, "b": 10.3}, {"a": 4.0, "b": 4.0}, {"a": 400, "b": 400})
    exact = stats.norm.cdf(0.3 / math.sqrt(4 / 400 + 4 / 400))
    assert res.prob_best["b"] == pytest.approx(exact, abs=0.01)
    assert res.intervals["a"] == pytest.approx([10.0 - 1.959964 * 0.1, 10.0 + 1.959964 * 0.1], abs=1e-6)
    clear = bayes_normal({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 1.0}, {"a": 1000, "b": 1000})
    assert clear.prob_best["b"] > 0.99 and clear.expected_loss["b"] < 1e-6
    with pytest.raises(InvalidInput):
        bayes_normal({"a": 1.0}, {"a": 1.0}, {"a": 0})


# ----------------------------------------------------------------- SRM and Holm


def test_srm_flags_a_broken_split_and_matches_scipy():
    res = srm_check({"a": 5000, "b": 5400}, {"a": 50, "b": 50})
    ref = stats.chisquare([5000, 5400], [5200, 5200])
    assert (res.statistic, res.p_value) == pytest.approx((ref.statistic, ref.pvalue))
    assert res.mismatch and res.p_value < 0.001
    ok = srm_check({"a": 9020, "b": 980}, {"a": 90, "b": 10})
    assert not ok.mismatch and ok.expected == {"a": 9000.0, "b": 1000.0}
    assert not srm_check({"a": 5000, "b": 5200}, {"a": 1, "b": 1}).mismatch  # p 0.048: chance


def test_srm_ignores_idle_arms_and_flags_traffic_to_a_zero_weight_arm():
    res = srm_check({"a": 500, "b": 500, "old": 0}, {"a": 1, "b": 1, "old": 0})
    assert set(res.observed) == {"a", "b"} and not res.mismatch and res.p_value == pytest.approx(1.0)
    leak = srm_check({"a": 500, "b": 500, "old": 7}, {"a": 1, "b": 1, "old": 0})
    assert leak.mismatch and leak.p_value == 0.0 and _json(leak)["statistic"] is None
    assert not srm_check({}, {"a": 1}).mismatch


def test_holm_adjusted_p_values():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Hand-worked: sorted p x (5, 4, 3, 2, 1) = .05 .08 .09 .08 .05, running max .05 .08 .09 .09 .09.
    assert holm([0.01, 0.02, 0.03, 0.04, 0.05]) == pytest.approx([0.05, 0.08, 0.09, 0.09, 0.09])
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([0.2]) == [0.2] and holm([]) == []
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 0.2, 12)
    adj = np.array(holm(list(p)))
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0) and np.all(adj >= p) and np.all(adj <= 1)
    with pytest.raises(InvalidInput):
        holm([0.1, 1.2])
