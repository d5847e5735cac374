"""`python -m app.bench serve`: the offline side's thread counts, hey's summary read, and the agreement of two
clients judged against our own run-to-run spread."""

from __future__ import annotations

import argparse
import os

import pytest

from app.bench import hey
from app.bench.served import Served, thread_counts

HEY_SUMMARY = """
Summary:
  Total:\t2.1133 secs
  Slowest:\t0.0907 secs
  Fastest:\t0.0561 secs
  Average:\t0.0704 secs
  Requests/sec:\t14.1955

Latency distribution:
  10% in 0.0612 secs
  50% in 0.0704 secs
  99% in 0.0907 secs

Status code distribution:
  [200]\t28 responses
  [429]\t2 responses
"""


def test_hey_summary_is_read() -> None:
    run = hey.parse(HEY_SUMMARY)
    assert (run.requests_per_s, run.median_s, run.statuses) == (14.1955, 0.0704, {200: 28, 429: 2})
    with pytest.raises(ValueError, match="Requests/sec"):
        hey.parse("Error: connection refused")


def test_thread_counts_default_to_every_usable_cpu() -> None:
    assert thread_counts("") == list(range(1, len(os.sched_getaffinity(0)) + 1))
    assert thread_counts("4,1,2,2") == [1, 2, 4]
    with pytest.raises(argparse.ArgumentTypeError):
        thread_counts("0,2")


def test_agreement_is_judged_against_our_own_spread() -> None:
    assert Served([0.100, 0.110]).agrees is None  # no hey figures
    assert Served([0.100, 0.110], hey=[0.112]).agrees  # within our spread of 10 ms
    assert not Served([0.100, 0.110], hey=[0.125]).agrees
    assert Served([0.100, 0.100], hey=[0.104]).agrees  # no spread: 5% of our median
    assert not Served([0.100, 0.100], hey=[0.106]).agrees
