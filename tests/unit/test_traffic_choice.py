"""The variant choice of traffic plans (app.traffic.choice): sticky splits that keep the
configured proportions and move keys only where the weights moved, and bandit shares that
converge to the best arm on simulated rewards while every arm keeps its floor."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from app.traffic.bandits import ArmStats
from app.traffic.choice import Chooser, bandit_weights, pick, sticky_unit
from app.traffic.spec import BanditSpec, TrafficSpec

KEYS = [f"customer-{i}" for i in range(20_000)]


def shares_of(chooser: Chooser, keys=KEYS) -> dict[str, float]:
    counts: dict[str, int] = {}
    for key in keys:
        v = chooser.choose(key, random.Random(0))
        counts[v] = counts.get(v, 0) + 1
    return {name: counts.get(name, 0) / len(keys) for name in chooser.names}


# -- sticky_unit -------------------------------------------------------------------------------
# Hard-coded: the hash must not change between processes, replicas or releases (blake2b, 8
# bytes, big-endian, over 2**64), or every sticky user would switch variant on an upgrade.
EXPECTED_UNITS = {
    "alice": 0.3043658763184171,
    "bob": 0.4568354589222517,
    "customer-42": 0.20265168573428766,
    "": 0.8931675160897388,
}


def test_sticky_unit_is_a_fixed_function():
    for key, unit in EXPECTED_UNITS.items():
        assert sticky_unit(key) == unit
    assert all(0.0 <= sticky_unit(k) < 1.0 for k in KEYS[:1000])


def test_sticky_unit_is_the_same_in_another_process():
    """Python's ``hash`` of a str is salted per process; ours must not be."""
    code = "from app.traffic.choice import sticky_unit; print(repr([sticky_unit(k) for k in %r]))" % list(EXPECTED_UNITS)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", **__import__("os").environ})
    assert eval(out.stdout) == list(EXPECTED_UNITS.values())


# -- proportions -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "weights", [[("a", 90), ("b", 10)], [("a", 50), ("b", 30), ("c", 20)], [("a", 1), ("b", 1), ("c", 2)]]
)
def test_sticky_keys_split_in_the_configured_proportions(weights):
    chooser = Chooser(weights)
    total = sum(w for _, w in weights)
    got = shares_of(chooser)
    for name, w in weights:
        assert abs(got[name] - w / total) < 0.01, (name, got)


def test_random_choice_keeps_the_proportions_too():
    chooser = Chooser([("a", 70), ("b", 30)])
    rng = random.Random(7)
    picks = [chooser.choose(None, rng) for _ in range(20_000)]
    assert abs(picks.count("b") / len(picks) - 0.30) < 0.01


def test_moving_weight_to_the_next_variant_moves_keys_only_into_it():
    before = Chooser([("a", 90), ("b", 10)])
    after = Chooser([("a", 80), ("b", 20)])
    moved = {(before.choose(k, None), after.choose(k, None)) for k in KEYS}  # type: ignore[arg-type]
    assert ("b", "a") not in moved
    assert ("a", "b") in moved
    was_b = [k for k in KEYS if before.choose(k, None) == "b"]  # type: ignore[arg-type]
    assert all(after.choose(k, None) == "b" for k in was_b)  # type: ignore[arg-type]
    now_b = sum(after.choose(k, None) == "b" for k in KEYS) / len(KEYS)  # type: ignore[arg-type]
    assert abs(now_b - 0.20) < 0.01


def test_pick_lays_out_slices_in_order():
    w = [("a", 1), ("b", 0), ("c", 3)]
    assert pick(w, 0.0) == "a"
    assert pick(w, 0.2499) == "a"
    assert pick(w, 0.25) == "c"  # b has an empty slice
    assert pick(w, 0.9999999) == "c"
    assert pick([("a", 0), ("b", 0)], 0.75) == "b"  # all zero: equal shares
    assert pick([("a", 0), ("b", 5), ("c", 0)], 0.999) == "b"  # trailing zero never picked
    with pytest.raises(ValueError):
        pick([], 0.5)


def test_chooser_update_and_from_spec():
    spec = TrafficSpec.model_validate(
        {"variants": [{"name": "a", "target": "m/1", "weight": 1}, {"name": "b", "target": "m/2", "weight": 1}],
         "strategy": "thompson", "bandit": {"floor": 0.05}}
    )
    chooser = Chooser.from_spec(spec)
    assert chooser.shares == pytest.approx({"a": 0.5, "b": 0.5})
    chooser.update({"a": 0.0, "b": 1.0, "z": 3.0})
    assert chooser.shares == {"a": 0.0, "b": 1.0}
    assert {chooser.choose(k, None) for k in KEYS[:500]} == {"b"}  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Chooser([("a", 1)], "softmax")


# -- bandits -----------------------------------------------------------------------------------
def test_bandit_weights_floor_and_sum():
    arms = {"a": ArmStats(1000, 10.0, 10.0), "b": ArmStats(1000, 500.0, 500.0), "c": ArmStats(0, 0.0, 0.0)}
    spec = BanditSpec(floor=0.05)
    for strategy in ("thompson", "epsilon_greedy", "ucb1"):
        w = bandit_weights(strategy, arms, ["a", "b", "c"], spec, rng=np.random.default_rng(0))
        assert sum(w.values()) == pytest.approx(1.0)
        assert min(w.values()) >= 0.05 - 1e-12, (strategy, w)
    # ucb1: the unpulled arm first
    w = bandit_weights("ucb1", arms, ["a", "b", "c"], spec, rng=np.random.default_rng(0))
    assert w["c"] == pytest.approx(0.05 + 0.85)
    # epsilon_greedy: epsilon spread evenly, the rest to the best mean; ties split
    w = bandit_weights("epsilon_greedy", arms, ["a", "b"], BanditSpec(floor=0.0, epsilon=0.2),
                       rng=np.random.default_rng(0))
    assert w == pytest.approx({"a": 0.1, "b": 0.9})
    tie = {"a": ArmStats(10, 5.0, 5.0), "b": ArmStats(20, 10.0, 10.0)}
    w = bandit_weights("epsilon_greedy", tie, ["a", "b"], BanditSpec(floor=0.0), rng=np.random.default_rng(0))
    assert w == pytest.approx({"a": 0.5, "b": 0.5})
    # no data at all: every strategy is (about) even
    w = bandit_weights("thompson", {}, ["a", "b"], BanditSpec(), rng=np.random.default_rng(0), draws=20_000)
    assert w["a"] == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError):
        bandit_weights("fixed", {}, ["a"], BanditSpec(), rng=np.random.default_rng(0))


def test_thompson_binary_is_the_probability_of_being_best():
    """Two arms with Beta(1+s, 1+f) posteriors: P(b > a) by numerical integration with scipy
    (the reference) equals the Monte Carlo share."""
    from scipy import integrate, stats

    a, b = ArmStats(50, 5.0, 5.0), ArmStats(50, 9.0, 9.0)
    pa_, pb_ = stats.beta(1 + 5, 1 + 45), stats.beta(1 + 9, 1 + 41)
    p_b_best = integrate.quad(lambda x: pb_.pdf(x) * pa_.cdf(x), 0, 1)[0]
    w = bandit_weights("thompson", {"a": a, "b": b}, ["a", "b"], BanditSpec(floor=0.0),
                       rng=np.random.default_rng(1), draws=200_000)
    assert w["b"] == pytest.approx(p_b_best, abs=0.005)


def _simulate(strategy: str, *, reward: str = "binary", p=(0.05, 0.10, 0.15), rounds: int = 200, seed: int = 1):
    """Pull arms through a Chooser whose shares refresh from the arms' rewards every 100 pulls."""
    names = ["a", "b", "c"]
    spec = BanditSpec(reward=reward, floor=0.01)
    chooser = Chooser([(n, 1) for n in names], strategy, spec)
    gen = np.random.default_rng(seed)
    rng = random.Random(seed)
    sums = {n: [0, 0.0, 0.0] for n in names}
    pulls: list[int] = []
    least = 1.0
    for _ in range(rounds):
        shares = bandit_weights(strategy, {n: ArmStats(*v) for n, v in sums.items()}, names, spec, rng=gen)
        least = min(least, *shares.values())
        chooser.update(shares)
        for _ in range(100):
            v = chooser.choose(None, rng)
            i = names.index(v)
            pulls.append(i)
            x = float(gen.random() < p[i]) if reward == "binary" else float(gen.normal(p[i], 1.0))
            s = sums[v]
            s[0] += 1
            s[1] += x
            s[2] += x * x
    last = np.array(pulls[-len(pulls) // 4 :])
    return np.bincount(last, minlength=3) / len(last), least, sums


@pytest.mark.parametrize("strategy", ["thompson", "epsilon_greedy", "ucb1"])
@pytest.mark.parametrize("seed", [1, 2])
def test_bandits_converge_to_the_best_arm_on_bernoulli_rewards(strategy, seed):
    last, least, sums = _simulate(strategy, seed=seed)
    assert last[2] > 0.8, last  # the best arm (p = .15) gets most of the last quarter's pulls
    assert least >= 0.01 - 1e-12  # every arm kept its floor at every refresh
    assert all(v[0] >= 0.005 * 20_000 for v in sums.values())  # and was actually pulled


def test_thompson_converges_on_continuous_rewards():
    """Normal rewards with means .05 / .10 / .15 and sd 1: a harder problem (signal-to-noise
    .05), so more pulls; the best arm still wins the last quarter."""
    last, least, _ = _simulate("thompson", reward="continuous", rounds=600, seed=3)
    assert last[2] > 0.6, last
    assert least >= 0.01 - 1e-12
    w = bandit_weights("thompson", {"a": ArmStats(100, -50.0, 125.0), "b": ArmStats(100, 50.0, 125.0)}, ["a", "b"],
                       BanditSpec(reward="continuous", floor=0.0), rng=np.random.default_rng(0))
    assert w["b"] > 0.99  # means -0.5 vs 0.5, sd 1, n 100: b is surely the best
