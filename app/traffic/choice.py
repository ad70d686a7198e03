"""Which variant of a traffic plan serves a request: a pure function, run in every Gateway
replica on the request path (a bisect over a precomputed list, no IO).

A sticky key maps to a point ``u`` in [0, 1) by a stable hash (the same on every replica and in
every process, unlike Python's salted ``hash``); a request without a key draws ``u`` at random.
``u`` falls into the variant whose slice of [0, 1) holds it, the slices laid out as cumulative
shares in the plan's declared order. So a set of keys splits in the configured proportions, and
moving weight between two adjacent variants (a 90 / b 10 -> a 80 / b 20) moves only the keys in
the slice that changes hands, from a into b, never the other way (the flaw of sticky splits in
flagger#1532 and argo-rollouts#2726, which hash to a bucket and reassign buckets freely).

Bandit strategies change the shares, not the mechanism: :func:`bandit_weights` computes the
share each arm should get now from the arms' reward sums (:class:`app.traffic.bandits.ArmStats`),
once per refresh, and :meth:`Chooser.update` installs them; sticky keys stay sticky while the
shares hold.
"""

from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from app.traffic.spec import BANDITS, STRATEGIES, BanditSpec

if TYPE_CHECKING:
    from app.traffic.spec import TrafficSpec

__all__ = ["Chooser", "bandit_weights", "pick", "sticky_unit"]

_TWO_64 = float(2**64)
_PRIOR_N = 1.0  # continuous Thompson: the prior counts as one pseudo-observation at the pooled mean


class _Arm(Protocol):
    """What the bandit maths reads of an arm (:class:`app.traffic.bandits.ArmStats`)."""

    @property
    def n(self) -> int: ...

    @property
    def reward_sum(self) -> float: ...

    @property
    def reward_sq_sum(self) -> float: ...


class _NoRewards:
    n = 0
    reward_sum = 0.0
    reward_sq_sum = 0.0


_NO_REWARDS = _NoRewards()


def sticky_unit(key: str) -> float:
    """The point in [0, 1) where ``key`` falls: the first 8 bytes of its BLAKE2b digest over
    2**64. Stable across processes, replicas and Python versions (no hash salt)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _TWO_64


def _normalized(weights: Sequence[float]) -> list[float]:
    clean = [w if (w > 0 and math.isfinite(w)) else 0.0 for w in weights]
    total = sum(clean)
    if total <= 0:
        return [1.0 / len(clean)] * len(clean) if clean else []
    return [w / total for w in clean]


def _cumulative(shares: Sequence[float]) -> list[float]:
    """Upper edges of the slices; the last is forced to 1.0 so rounding never leaves a gap. A
    variant with share 0 gets an empty slice (its edge equals the previous one)."""
    edges, acc = [], 0.0
    for share in shares:
        acc += share
        edges.append(acc)
    if edges:
        last = max(i for i, s in enumerate(shares) if s > 0) if any(s > 0 for s in shares) else len(edges) - 1
        for i in range(last, len(edges)):
            edges[i] = 1.0
    return edges


def _index(edges: Sequence[float], u: float) -> int:
    return min(bisect_right(edges, u), len(edges) - 1)


def pick(weights: Sequence[tuple[str, float]], u: float) -> str:
    """The variant whose slice of [0, 1) holds ``u``: slices are the weights' normalized shares,
    laid out in the given order (all weights 0 = equal shares)."""
    if not weights:
        raise ValueError("pick needs at least one variant")
    names = [name for name, _ in weights]
    return names[_index(_cumulative(_normalized([w for _, w in weights])), u)]


class Chooser:
    """The variant choice of one traffic plan, built once per plan version and called per
    request: ``choose`` is a hash (when sticky) and a bisect.

    ``variants`` are (name, weight) in the plan's order. For a bandit ``strategy`` the shares
    start as the configured weights with the floors applied, until :meth:`update` installs the
    ones :func:`bandit_weights` computed."""

    __slots__ = ("names", "strategy", "bandit", "_edges", "_shares")

    def __init__(self, variants: Sequence[tuple[str, float]], strategy: str = "fixed", bandit: BanditSpec | None = None):
        if not variants:
            raise ValueError("a traffic plan needs at least one variant")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
        self.names: tuple[str, ...] = tuple(name for name, _ in variants)
        self.strategy = strategy
        self.bandit = bandit or BanditSpec()
        shares = _normalized([w for _, w in variants])
        if strategy in BANDITS:
            shares = _with_floor(shares, self.bandit.floor)
        self._install(shares)

    @classmethod
    def from_spec(cls, spec: TrafficSpec) -> Chooser:
        return cls([(v.name, v.weight) for v in spec.variants], spec.strategy, spec.bandit)

    def _install(self, shares: list[float]) -> None:
        self._shares = dict(zip(self.names, shares))
        self._edges = _cumulative(shares)

    @property
    def shares(self) -> dict[str, float]:
        """The current share of each variant (sums to 1)."""
        return dict(self._shares)

    def update(self, weights: Mapping[str, float]) -> None:
        """Install new shares (e.g. from :func:`bandit_weights`); variants missing from
        ``weights`` get 0, names not in the plan are ignored; normalized here."""
        self._install(_normalized([float(weights.get(name, 0.0)) for name in self.names]))

    def choose(self, key: str | None, rng: random.Random) -> str:
        """The variant for a request: by ``key`` when it has one (sticky), else at random."""
        u = sticky_unit(key) if key is not None else rng.random()
        return self.names[_index(self._edges, u)]


# -- bandits -----------------------------------------------------------------------------------
def _with_floor(shares: Sequence[float], floor: float) -> list[float]:
    """Every arm gets ``floor``, the rest of the traffic goes by ``shares`` (which sum to 1)."""
    k = len(shares)
    floor = min(max(floor, 0.0), 1.0 / k)
    rest = 1.0 - floor * k
    return [floor + rest * s for s in shares]


def _split(winners: Sequence[int], k: int) -> list[float]:
    out = [0.0] * k
    for i in winners:
        out[i] = 1.0 / len(winners)
    return out


def _argmax_all(values: Sequence[float], candidates: Sequence[int]) -> list[int]:
    best = max(values[i] for i in candidates)
    return [i for i in candidates if values[i] == best]


def _thompson_binary(arms: Sequence[_Arm], rng: np.random.Generator, draws: int) -> np.ndarray:
    """Beta(1 + successes, 1 + failures) per arm (uniform prior); successes = the reward sum,
    kept within [0, n] (rewards outside [0, 1] are clipped in aggregate)."""
    n = np.array([max(a.n, 0) for a in arms], dtype=float)
    s = np.clip(np.array([a.reward_sum for a in arms], dtype=float), 0.0, n)
    return rng.beta(1.0 + s, 1.0 + n - s, size=(draws, len(arms)))


def _thompson_normal(arms: Sequence[_Arm], rng: np.random.Generator, draws: int) -> np.ndarray:
    """The posterior of each arm's mean reward, Normal(m, s2 / (n + n0)): a weak conjugate prior
    worth ``_PRIOR_N`` observation at the pooled mean of all arms, ``s2`` the arm's sample
    variance (the pooled one while the arm has fewer than 2 rewards; 1 with no data at all)."""
    n = np.array([max(a.n, 0) for a in arms], dtype=float)
    sums = np.array([a.reward_sum for a in arms], dtype=float)
    sq = np.array([a.reward_sq_sum for a in arms], dtype=float)
    total_n = n.sum()
    pooled_mean = sums.sum() / total_n if total_n > 0 else 0.0
    pooled_var = (sq.sum() - total_n * pooled_mean**2) / (total_n - 1) if total_n > 1 else 1.0
    pooled_var = pooled_var if pooled_var > 0 else 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, sums / np.maximum(n, 1.0), pooled_mean)
        var = np.where(n > 1, (sq - n * mean**2) / np.maximum(n - 1.0, 1.0), pooled_var)
    var = np.where(var > 0, var, pooled_var)
    post_mean = (n * mean + _PRIOR_N * pooled_mean) / (n + _PRIOR_N)
    post_sd = np.sqrt(var / (n + _PRIOR_N))
    return rng.normal(post_mean, post_sd, size=(draws, len(arms)))


def bandit_weights(
    strategy: str,
    arms: Mapping[str, _Arm],
    variants: Sequence[str],
    bandit: BanditSpec,
    *,
    rng: np.random.Generator,
    draws: int = 2000,
) -> dict[str, float]:
    """The share of traffic each of ``variants`` should get now under ``strategy``, given the
    rewards its arm has earned (``arms``; a variant without one has none yet). Every arm gets
    ``bandit.floor``; the rest goes by the strategy; the shares sum to 1.

    - thompson: the probability each arm is the best under its posterior (Thompson 1933;
      Chapelle & Li 2011), estimated from ``draws`` Monte Carlo draws: Beta-Bernoulli for
      binary rewards, Normal for continuous ones (see :func:`_thompson_normal`);
    - epsilon_greedy: ``epsilon`` spread evenly, the rest to the arm(s) with the best mean
      reward (arms without rewards only while none has any);
    - ucb1: all to the arm(s) with the highest mean + sqrt(2 ln N / n) (Auer et al. 2002),
      arms never pulled first.
    """
    if strategy not in BANDITS:
        raise ValueError(f"{strategy!r} is not a bandit strategy; one of {', '.join(BANDITS)}")
    names = list(variants)
    k = len(names)
    if k == 0:
        return {}
    stats = [arms.get(name) or _NO_REWARDS for name in names]
    counts = [max(int(a.n), 0) for a in stats]
    means = [a.reward_sum / a.n if a.n > 0 else 0.0 for a in stats]
    seen = [i for i in range(k) if counts[i] > 0]

    if strategy == "thompson":
        sample = (_thompson_binary if bandit.reward == "binary" else _thompson_normal)(stats, rng, max(int(draws), 1))
        wins = np.bincount(np.argmax(sample, axis=1), minlength=k).astype(float)
        raw = list(wins / wins.sum())
    elif strategy == "epsilon_greedy":
        best = _argmax_all(means, seen) if seen else list(range(k))
        greedy = _split(best, k)
        raw = [bandit.epsilon / k + (1.0 - bandit.epsilon) * g for g in greedy]
    else:  # ucb1
        unpulled = [i for i in range(k) if counts[i] == 0]
        if unpulled:
            raw = _split(unpulled, k)
        else:
            log_n = math.log(sum(counts))
            scores = [means[i] + math.sqrt(2.0 * log_n / counts[i]) for i in range(k)]
            raw = _split(_argmax_all(scores, range(k)), k)
    return dict(zip(names, _with_floor(raw, bandit.floor)))
