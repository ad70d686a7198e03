"""Bandit arms in the metadata store (SQLite and PostgreSQL): increments that concurrent writers
cannot lose, and the feedback hook that records each row's variant from the prediction log and
moves the arm's rewards in the feedback's own transaction."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from app.predlog.feedback import FeedbackStore
from app.predlog.ids import new_request_id
from app.predlog.lookup import known_request_ids, request_variants
from app.settings import load_settings
from app.store.models import Feedback
from app.traffic.bandits import ArmStats, BanditStore, reward_delta
from tests.unit.test_feedback import log_rows, write_log

EP = "churn"


@pytest.fixture
def bandits(store):
    return BanditStore(store)


def apply_in_tx(store, bandits, *args):
    with sessionmaker(store.engine).begin() as s:
        return bandits.apply(s, *args)


def test_arm_stats_mean_and_variance():
    arm = ArmStats(4, 10.0, 30.0)  # rewards 1, 2, 3, 4
    assert arm.mean == 2.5 and arm.variance == pytest.approx(5 / 3)
    assert ArmStats(0, 0.0, 0.0).mean == 0.0 and ArmStats(1, 2.0, 4.0).variance == 0.0
    assert ArmStats(0, 0.0, 0.0).to_dict()["mean"] is None
    assert reward_delta(None, 1.0) == (1, 1.0, 1.0)
    assert reward_delta(2.0, None) == (-1, -2.0, -4.0)
    assert reward_delta(1.0, 3.0) == (0, 2.0, 8.0)


def test_apply_moves_the_sums_by_the_difference_and_reset_forgets(store, bandits):
    assert bandits.arms(EP) == {}
    assert apply_in_tx(store, bandits, EP, "a", None, 1.0) is True
    apply_in_tx(store, bandits, EP, "a", None, 0.0)
    apply_in_tx(store, bandits, EP, "b", None, 2.0)
    assert bandits.arms(EP) == {"a": ArmStats(2, 1.0, 1.0), "b": ArmStats(1, 2.0, 4.0)}
    assert apply_in_tx(store, bandits, EP, "a", 1.0, 1.0) is False  # same outcome: nothing
    apply_in_tx(store, bandits, EP, "a", 1.0, 0.0)  # superseded: 1 -> 0
    apply_in_tx(store, bandits, EP, "b", 2.0, None)  # reward withdrawn
    assert bandits.arms(EP) == {"a": ArmStats(2, 0.0, 0.0), "b": ArmStats(0, 0.0, 0.0)}
    apply_in_tx(store, bandits, "other", "a", None, 1.0)
    assert bandits.reset(EP, ["b"]) == 1
    assert set(bandits.arms(EP)) == {"a"}
    assert bandits.reset(EP, []) == 0
    assert bandits.reset(EP) == 1
    assert bandits.arms(EP) == {} and bandits.arms("other") == {"a": ArmStats(1, 1.0, 1.0)}


def test_apply_rolls_back_with_the_callers_transaction(store, bandits):
    with pytest.raises(RuntimeError):
        with sessionmaker(store.engine).begin() as s:
            bandits.apply(s, EP, "a", None, 1.0)
            raise RuntimeError("the feedback insert failed")
    assert bandits.arms(EP) == {}


def test_concurrent_writers_lose_no_update(store, bandits):
    """Eight threads, each with its own connection and transactions, add 25 rewards of 1 to the
    same arm (created by whichever gets there first): all 200 count."""
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work():
        try:
            barrier.wait()
            for _ in range(25):
                for attempt in range(50):  # SQLite: "database is locked" past its busy timeout is retried
                    try:
                        apply_in_tx(store, bandits, EP, "a", None, 1.0)
                        break
                    except Exception as exc:  # noqa: BLE001
                        if "locked" not in str(exc) or attempt == 49:
                            raise
                        time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert bandits.arms(EP) == {"a": ArmStats(200, 200.0, 200.0)}


# -- the feedback hook -------------------------------------------------------------------------
def variants_of(mapping):
    return lambda ids: {rid: mapping[rid] for rid in ids if rid in mapping}


def stored_variants(store, rid):
    with sessionmaker(store.engine).begin() as s:
        return [v for (v,) in s.execute(select(Feedback.variant).where(Feedback.request_id == rid).order_by(Feedback.id))]


def test_feedback_records_the_variant_and_feeds_the_bandit_arms(store, bandits):
    feedback = FeedbackStore(store)
    r1, r2, r3, r4 = (new_request_id() for _ in range(4))
    log = variants_of({r1: "a", r2: "b", r3: "", r4: "gone"})
    arms = ["a", "b"]
    rows = [
        {"request_id": r1, "reward": 1.0},
        {"request_id": r2, "reward": 0.0},
        {"request_id": r2, "instance": 1, "label": "x"},  # no reward: counts nowhere
        {"request_id": r3, "reward": 1.0},  # served without a plan
        {"request_id": r4, "reward": 1.0},  # a variant the plan no longer has
    ]
    out = feedback.record(EP, rows, "u", known=log, bandit_arms=arms)
    assert all(r["status"] == "accepted" for r in out)
    assert stored_variants(store, r1) == ["a"] and stored_variants(store, r3) == [None]
    assert stored_variants(store, r4) == ["gone"]
    assert bandits.arms(EP) == {"a": ArmStats(1, 1.0, 1.0), "b": ArmStats(1, 0.0, 0.0)}

    # superseded: the sums move by the difference; a repeat moves nothing
    feedback.record(EP, [{"request_id": r1, "reward": 0.0}, {"request_id": r2, "reward": 0.0}], "u",
                    known=log, bandit_arms=arms)
    assert bandits.arms(EP) == {"a": ArmStats(1, 0.0, 0.0), "b": ArmStats(1, 0.0, 0.0)}
    # a later row without a reward withdraws it; within one batch the last row wins
    feedback.record(EP, [{"request_id": r1, "label": "y"}, {"request_id": r2, "reward": 1.0},
                         {"request_id": r2, "reward": 0.5}], "u", known=log, bandit_arms=arms)
    assert bandits.arms(EP) == {"a": ArmStats(0, 0.0, 0.0), "b": ArmStats(1, 0.5, 0.25)}
    # without a bandit plan the arms are left alone (the variant is still recorded)
    feedback.record(EP, [{"request_id": r2, "reward": 1.0}], "u", known=log)
    assert bandits.arms(EP)["b"] == ArmStats(1, 0.5, 0.25)
    assert stored_variants(store, r2)[-1] == "b"


def test_a_pending_reward_counts_once_its_record_is_found(store, bandits):
    feedback = FeedbackStore(store)
    rid = new_request_id()
    out = feedback.record(EP, [{"request_id": rid, "reward": 1.0}], "u", known=variants_of({}), bandit_arms=["a"])
    assert out[0]["pending"] is True and bandits.arms(EP) == {}
    assert stored_variants(store, rid) == [None]
    feedback.record(EP, [{"request_id": rid, "reward": 0.0}], "u", known=variants_of({rid: "a"}), bandit_arms=["a"])
    assert bandits.arms(EP) == {"a": ArmStats(1, 0.0, 0.0)}  # the pending 1.0 was never counted


def test_request_variants_reads_the_variant_column(tmp_path):
    settings = load_settings("local", matih_home=str(tmp_path / "home"))
    a, b, plain, missing = (new_request_id(time.time() - 600) for _ in range(4))
    rows = log_rows(a, 2) + log_rows(b) + log_rows(plain)
    for row in rows:
        row["variant"] = {a: "v1", b: "v2"}.get(row["request_id"], "")
    write_log(settings.predlog.root, rows)
    assert request_variants(settings, EP, [a, b, plain, missing, "junk"]) == {a: "v1", b: "v2", plain: ""}
    assert known_request_ids(settings, EP, [a, b, plain, missing]) == {a, b, plain}
    assert request_variants(settings, "../etc", [a]) == {}


def test_settle_pending_counts_a_pending_reward_once(store, bandits):
    feedback = FeedbackStore(store)
    r1, r2, r3 = (new_request_id() for _ in range(3))
    nothing = variants_of({})
    feedback.record(EP, [{"request_id": r1, "reward": 1.0}, {"request_id": r2, "reward": 0.5},
                         {"request_id": r3, "label": "x"}], "u", known=nothing, bandit_arms=["a", "b"])
    assert bandits.arms(EP) == {}
    assert feedback.settle_pending(EP, nothing, bandit_arms=["a", "b"]) == 0  # still not in the log
    log = variants_of({r1: "a", r2: "b", r3: "a"})
    assert feedback.settle_pending(EP, log, bandit_arms=["a", "b"]) == 3
    assert bandits.arms(EP) == {"a": ArmStats(1, 1.0, 1.0), "b": ArmStats(1, 0.5, 0.25)}
    assert stored_variants(store, r1) == ["a"] and stored_variants(store, r3) == ["a"]
    assert feedback.settle_pending(EP, log, bandit_arms=["a", "b"]) == 0  # nothing counts twice
    # now a superseding row moves the settled reward by the difference
    feedback.record(EP, [{"request_id": r1, "reward": 0.0}], "u", known=log, bandit_arms=["a", "b"])
    assert bandits.arms(EP)["a"] == ArmStats(1, 0.0, 0.0)


def test_settle_pending_leaves_superseded_rows_and_races_safely(store, bandits):
    feedback = FeedbackStore(store)
    rid = new_request_id()
    nothing = variants_of({})
    feedback.record(EP, [{"request_id": rid, "reward": 1.0}], "u", known=nothing, bandit_arms=["a"])
    feedback.record(EP, [{"request_id": rid, "reward": 0.0}], "u", known=nothing, bandit_arms=["a"])
    log = variants_of({rid: "a"})
    # two replicas settle at once: only the latest row is filled in, and counted once
    results: list[int] = []
    barrier = threading.Barrier(2)

    def settle():
        barrier.wait()
        for attempt in range(50):
            try:
                results.append(feedback.settle_pending(EP, log, bandit_arms=["a"]))
                return
            except Exception as exc:  # noqa: BLE001  SQLite: a busy database past its timeout
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.01)

    threads = [threading.Thread(target=settle) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1]
    assert stored_variants(store, rid) == [None, "a"]
    assert bandits.arms(EP) == {"a": ArmStats(1, 0.0, 0.0)}
