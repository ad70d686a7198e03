"""The rewards each traffic variant (bandit arm) of an endpoint has earned, durable in the
metadata store's ``bandit_arms`` table so every Gateway replica computes the same posteriors.

An arm keeps sufficient statistics only (count, sum and sum of squares of the rewards): enough
for the Beta-Bernoulli and Normal posteriors of :func:`app.traffic.choice.bandit_weights`, and
updatable by difference. Each prediction's current reward counts once: when feedback
supersedes an earlier reward, :meth:`BanditStore.apply` moves the sums from the old to the new
one, inside the transaction that stores the feedback, so the arms never disagree with the
feedback table. The update is one ``UPDATE ... SET n = n + :dn`` (atomic in the database),
so two replicas recording feedback at once cannot lose each other's increment.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.store.models import BanditArm

__all__ = ["ArmStats", "BanditStore", "reward_delta"]


def reward_delta(old_reward: float | None, new_reward: float | None) -> tuple[int, float, float]:
    """(dn, dsum, dsq): how an arm's count, sum and sum of squares move when a prediction's
    counted reward goes from ``old_reward`` to ``new_reward`` (None: not counted)."""
    old, new = old_reward or 0.0, new_reward or 0.0
    return (new_reward is not None) - (old_reward is not None), new - old, new * new - old * old


@dataclass(frozen=True)
class ArmStats:
    """An arm's rewards so far: how many, their sum and their sum of squares."""

    n: int
    reward_sum: float
    reward_sq_sum: float

    @property
    def mean(self) -> float:
        """The mean reward (0 before the first)."""
        return self.reward_sum / self.n if self.n > 0 else 0.0

    @property
    def variance(self) -> float:
        """The sample variance of the rewards (n - 1 denominator; 0 with fewer than 2)."""
        if self.n < 2:
            return 0.0
        return max((self.reward_sq_sum - self.n * self.mean**2) / (self.n - 1), 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n, "reward_sum": self.reward_sum, "reward_sq_sum": self.reward_sq_sum,
            "mean": self.mean if self.n > 0 else None, "variance": self.variance if self.n > 1 else None,
        }


class BanditStore:
    """Bandit arms on one metadata store (:class:`app.store.MetadataStore`; SQLite or PostgreSQL)."""

    def __init__(self, store):
        self.store = store

    def _tx(self) -> AbstractContextManager[Session]:
        return self.store.transaction()

    def arms(self, endpoint: str) -> dict[str, ArmStats]:
        """Every arm of ``endpoint`` that has a row (variants without rewards yet have none)."""
        with self._tx() as s:
            rows = s.execute(
                select(BanditArm.variant, BanditArm.n, BanditArm.reward_sum, BanditArm.reward_sq_sum).where(
                    BanditArm.endpoint == endpoint
                )
            ).all()
        return {variant: ArmStats(int(n or 0), float(total or 0.0), float(sq or 0.0)) for variant, n, total, sq in rows}

    def apply(
        self, session: Session, endpoint: str, variant: str, old_reward: float | None, new_reward: float | None
    ) -> bool:
        """Move the arm ``variant`` of ``endpoint`` from counting ``old_reward`` (None: the
        prediction had no reward counted) to counting ``new_reward`` (None: it has none now),
        inside the caller's transaction ``session``. Returns whether anything changed.

        The row is created if missing (an insert that does nothing on conflict, so two replicas
        creating it at once both go on), then changed by increments computed in the database."""
        if old_reward == new_reward:
            return False
        self.add(session, endpoint, variant, *reward_delta(old_reward, new_reward))
        return True

    def add(self, session: Session, endpoint: str, variant: str, dn: int, dsum: float, dsq: float) -> None:
        """Add ``dn`` rewards summing to ``dsum`` (squares: ``dsq``) to the arm, inside the caller's
        transaction: the deltas of many feedback rows summed first cost one update per arm."""
        now = datetime.now(timezone.utc)
        dialect = session.get_bind().dialect.name
        values = {"endpoint": endpoint, "variant": variant, "n": 0, "reward_sum": 0.0, "reward_sq_sum": 0.0,
                  "updated_at": now}
        if dialect == "postgresql":
            session.execute(postgresql.insert(BanditArm).values(**values).on_conflict_do_nothing())
        elif dialect == "sqlite":
            session.execute(sqlite.insert(BanditArm).values(**values).on_conflict_do_nothing())
        elif session.get(BanditArm, (endpoint, variant)) is None:  # other databases: not shared by replicas in tests
            session.add(BanditArm(**values))
            session.flush()
        session.execute(
            update(BanditArm)
            .where(BanditArm.endpoint == endpoint, BanditArm.variant == variant)
            .values(
                n=BanditArm.n + dn,
                reward_sum=BanditArm.reward_sum + dsum,
                reward_sq_sum=BanditArm.reward_sq_sum + dsq,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )

    def reset(self, endpoint: str, variants: Sequence[str] | None = None) -> int:
        """Forget the rewards of ``variants`` of ``endpoint`` (all its arms when None), e.g. when a
        variant is new or now serves another target. Returns the number of arms reset."""
        cond = [BanditArm.endpoint == endpoint]
        if variants is not None:
            if not variants:
                return 0
            cond.append(BanditArm.variant.in_(sorted(set(variants))))
        with self._tx() as s:
            return s.connection().execute(delete(BanditArm).where(*cond)).rowcount
