"""`python -m app.bench serve`: the offline side's thread counts, hey's summary read, and the agreement of two
clients judged against our own run-to-run spread."""

from __future__ import annotations

import argparse
import os

import pytest

from app.bench import hey
from app.bench.served import Served, thread_counts

HEY_CSV = """response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
0.1149,0.0004,0.0000,0.0001,0.1142,0.0002,200,0.0001
0.1150,0.0002,0.0000,0.0000,0.1146,0.0000,200,0.0005
0.1248,0.0000,0.0000,0.0000,0.1247,0.0001,429,0.1155
0.1070,0.0000,0.0000,0.0000,0.1068,0.0001,200,0.2403
"""


def test_hey_rows_are_read() -> None:
    run = hey.parse(HEY_CSV)
    assert run.median_s == pytest.approx((0.1149 + 0.1150) / 2) and run.statuses == {200: 3, 429: 1}
    assert run.requests_per_s == pytest.approx(4 / (0.2403 + 0.1070))  # first start to last answer
    with pytest.raises(ValueError, match="per-request rows"):
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
