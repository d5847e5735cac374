"""The one table from error to HTTP answer: every engine error has its answer, and the one handler writes the
status, Retry-After, error id and the reason it counts."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.serve.engine import (
    BatchFailed,
    DeadlineExceeded,
    Draining,
    EngineError,
    NonFiniteOutput,
    NotAccepting,
    NotReady,
    QueueFull,
    UnknownVariant,
)
from app.serve.http.errors import ANSWERS, install_error_handlers
from app.serve.metrics import Rejection, ServeMetrics


def subclasses(kind: type) -> set[type]:
    return {kind} | {s for c in kind.__subclasses__() for s in subclasses(c)}


def test_every_engine_error_a_request_can_meet_has_an_answer() -> None:
    # UnknownVariant never reaches the engine through HTTP: the request checks refuse the variant first (422);
    # the bases are raised only as their subclasses
    reachable = subclasses(EngineError) - {EngineError, NotAccepting, UnknownVariant}
    answered = {e for e in reachable if any(t in ANSWERS for t in e.__mro__)}
    assert answered == reachable


CASES = [
    (QueueFull(9, 8, retry_after_s=3), 429, Rejection.QUEUE_FULL, "3"),
    (NotReady("loading", 5), 503, Rejection.NOT_READY, "5"),
    (Draining("draining", 1), 503, Rejection.DRAINING, "1"),
    (DeadlineExceeded(2.0, computed=True), 504, Rejection.DEADLINE, None),
    (BatchFailed("abc123"), 500, Rejection.FAILED, None),
    (NonFiniteOutput("def456"), 500, Rejection.FAILED, None),
]


@pytest.mark.parametrize(("error", "status", "reason", "retry_after"), CASES)
def test_the_handler_answers_as_the_table_says(
    error: Exception, status: int, reason: Rejection, retry_after: str | None
) -> None:
    app = FastAPI()
    metrics = ServeMetrics(["baseline"], 8, 16)
    install_error_handlers(app, metrics)

    @app.get("/fail")
    async def fail() -> None:
        raise error

    r = TestClient(app).get("/fail")
    assert r.status_code == status
    assert r.headers.get("Retry-After") == retry_after
    assert r.json()["detail"] == str(error)
    assert r.json().get("error_id") == getattr(error, "error_id", None)
    assert metrics.registry.get_sample_value("var_rejections_total", {"reason": reason}) == 1
