"""The watchdog alone, on a hand-moved clock: when a batch counts as stuck, and a dead scheduler."""

from __future__ import annotations

import pytest

from app.serve.engine.watchdog import WATCHDOG_FACTOR, Watchdog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_before_any_batch_ended_only_the_floor_counts() -> None:
    clock = Clock()
    dog = Watchdog(floor_s=5.0, clock=clock)
    dog.batch_started("baseline", 4)
    clock.now += 5.0
    assert dog.check() is None
    clock.now += 0.1
    problem = dog.check()
    assert problem is not None and problem.reason == "batch_stuck"
    assert problem.detail == "a batch of 4 baseline image(s) has run 5.1 s (limit 5.0 s)"
    dog.batch_ended(computed=True)
    assert dog.check() is None


def test_a_batch_is_stuck_only_far_past_the_running_mean_of_batch_seconds() -> None:
    clock = Clock()
    dog = Watchdog(floor_s=1.0, clock=clock)
    for _ in range(50):  # batches of 2 s: the mean approaches 2 s
        dog.batch_started("baseline", 1)
        clock.now += 2.0
        dog.batch_ended(computed=True)
    assert dog.stuck_after_s() == pytest.approx(WATCHDOG_FACTOR * 2.0, rel=1e-3)
    dog.batch_started("baseline", 1)
    clock.now += 15.0  # far above the floor, not far above the mean
    assert dog.check() is None
    clock.now += 6.0
    assert dog.check() is not None


def test_a_failed_batch_does_not_move_the_mean() -> None:
    clock = Clock()
    dog = Watchdog(floor_s=1.0, clock=clock)
    dog.batch_started("baseline", 1)
    clock.now += 100.0
    dog.batch_ended(computed=False)
    assert (dog.batches, dog.batch_s, dog.running) == (0, 0.1, None)


def test_a_dead_scheduler_is_unhealthy_for_good() -> None:
    dog = Watchdog(floor_s=1.0, clock=Clock())
    dog.scheduler_died = "RuntimeError: bug (error id abc)"
    problem = dog.check()
    assert problem is not None and problem.reason == "scheduler_dead" and "RuntimeError: bug" in problem.detail
