"""Progress of a long task: weighted steps, the estimate of the time left, cancelling, the log heartbeat."""

from __future__ import annotations

import threading
import time

import pytest

from app.model.progress import Cancelled, Progress, heartbeat


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_estimate_extrapolates_the_weight_done_not_the_steps() -> None:
    clock = Clock()
    progress = Progress("calibrating", clock)
    progress.begin([1, 1, 8])  # a cheap step, another, then one eight times their cost
    assert (progress.steps, progress.fraction, progress.left_s) == (3, 0.0, None)
    assert progress.summary() == "step 1/3, 0% done, 0 s elapsed, no estimate yet"
    clock.now += 10
    progress.advance()
    progress.advance()
    assert progress.fraction == 0.2 and progress.left_s == pytest.approx(40.0)  # not 5 s: the last step weighs 80%
    assert progress.summary() == "step 3/3, 20% done, 10 s elapsed, about 40 s left"
    assert progress.as_dict() == {"step": 3, "steps": 3, "fraction": 0.2, "elapsed_s": 10.0, "left_s": 40.0}
    clock.now += 40
    progress.finish()
    clock.now += 100  # the time stops at the end
    assert progress.as_dict() == {"step": 3, "steps": 3, "fraction": 1.0, "elapsed_s": 50.0, "left_s": 0.0}


def test_listeners_see_every_step_and_a_cancelled_task_stops_at_its_next_step() -> None:
    progress = Progress("warming up")
    seen: list[int] = []
    progress.listeners.append(lambda p: seen.append(p.done))
    progress.begin([1, 2, 4])
    progress.advance(to=2)
    progress.cancel()
    with pytest.raises(Cancelled, match="warming up: cancelled"):
        progress.advance()
    assert seen == [0, 2] and progress.done == 2


def test_the_heartbeat_says_where_the_task_is_until_it_ends() -> None:
    progress = Progress("litevar: calibrating")
    progress.begin([1, 1])
    lines: list[str] = []
    said = threading.Event()

    def say(line: str) -> None:
        lines.append(line)
        said.set()

    with heartbeat(progress, say, every_s=0.01):
        assert said.wait(10)
        progress.advance()
        end = time.monotonic() + 10
        while "step 2/2" not in lines[-1]:
            assert time.monotonic() < end, "no line after the step"
            time.sleep(0.01)
    count = len(lines)
    time.sleep(0.05)
    assert len(lines) == count  # nothing after the end
    assert lines[0].startswith("litevar: calibrating: step 1/2, 0% done")
    assert lines[-1].startswith("litevar: calibrating: step 2/2, 50% done")
