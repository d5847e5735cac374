"""Sending the planned requests on loopback, one connection each, and what became of each request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpcore
import httpx

from app.bench.load.plan import CLOCK_TOLERANCE_S, EXPECTED, RETRY_AFTER, Planned
from app.bench.load.server import RssSampler, rejections, server_cpu_seconds


@dataclass
class Outcome:
    index: int
    kind: str
    variant: str
    phase: str
    at_s: float
    timeout_s: float
    lag_s: float = 0.0  # sent this much later than scheduled
    status: int | None = None
    latency_s: float | None = None  # from sending to the whole answer read
    done_s: float | None = None  # when the answer was read, from the start of the schedule
    images: int = 0
    answer_variant: str | None = None
    retry_after: str | None = None
    cancelled: bool = False  # the tool gave up on purpose (kind "cancel") before an answer came
    error: str | None = None


def problems(o: Outcome, allowance_s: float) -> set[str]:
    """What is wrong with one request's outcome: unanswered, late, unexpected_5xx, wrong_answer."""
    if o.status is None:
        return set() if o.cancelled else {"unanswered"}
    found = set()
    assert o.latency_s is not None
    if o.latency_s > o.timeout_s + allowance_s:
        found.add("late")
    if o.status >= 500 and not (o.status == 504 and o.latency_s >= o.timeout_s - CLOCK_TOLERANCE_S):
        found.add("unexpected_5xx")
    elif o.status not in EXPECTED[o.kind]:
        found.add("wrong_answer")
    if o.status in RETRY_AFTER and not o.retry_after:
        found.add("wrong_answer")
    if o.status == 200 and (o.images != 1 or o.answer_variant != o.variant):
        found.add("wrong_answer")
    return found


async def send(client: httpx.AsyncClient, p: Planned, o: Outcome, t0: float, hard_s: float) -> None:
    """Send one planned request and fill in its outcome; never raises (except when cancelled itself)."""
    loop = asyncio.get_running_loop()
    sent = loop.time()
    give_up = p.cancel_after_s if p.cancel_after_s is not None and p.cancel_after_s < hard_s else hard_s
    try:
        async with asyncio.timeout(give_up):
            r = await client.post("/generate", json=p.body)
    except TimeoutError:
        if give_up < hard_s:
            o.cancelled = True
        else:
            o.error = f"no answer within {hard_s:g} s"
        return
    except Exception as e:  # a transport error: the request got no answer
        o.error = f"{type(e).__name__}: {e}"
        return
    now = loop.time()
    o.status, o.latency_s, o.done_s = r.status_code, now - sent, now - t0
    o.retry_after = r.headers.get("retry-after")
    if r.status_code == 200:
        try:
            answer = r.json()
            o.images, o.answer_variant = len(answer["images"]), answer["variant"]
        except (ValueError, KeyError, TypeError) as e:
            o.error = f"unreadable 200 answer: {e}"


class ConnectionPerRequest(httpx.AsyncBaseTransport):
    """Each request on a connection of its own (httpx's own httpcore, without its pool), opened when it is
    sent and closed once its answer is read or when it is given up: every arrival is a client of its own, as
    in an open-loop test it should be, and the cost per request stays flat however many are in flight
    (httpcore's pool scans all its connections, some scans nested, for every request)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = httpcore.Origin(url.raw_scheme, url.raw_host, url.port or 80)
        target = httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path)
        req = httpcore.Request(request.method, target, headers=request.headers.raw, content=request.content)
        async with httpcore.AsyncHTTPConnection(origin) as connection:
            answer = await connection.handle_async_request(req)
            content = await answer.aread()
        return httpx.Response(answer.status, headers=answer.headers, content=content)


@dataclass
class RunResult:
    outcomes: list[Outcome]
    rss: RssSampler
    rejections: dict[str, float]
    lag_s: list[float]
    max_inflight: int
    span_s: float
    client_cpu_s: float  # this process: is the load generator keeping up?
    server_cpu_s: float | None


async def run_schedule(
    client: httpx.AsyncClient, plan: Sequence[Planned], rss: RssSampler, pid: int | None, hard_s: float, tail_s: float
) -> RunResult:
    """Send every planned request at its time (whatever the answers), then wait at most tail_s for the last
    answers; what is still open then got no answer."""
    loop = asyncio.get_running_loop()
    before = await rejections(client)
    cpu0, server_cpu0 = time.process_time(), await server_cpu_seconds(client, pid)
    outcomes = [Outcome(p.index, p.kind, p.variant, p.phase, p.at_s, p.timeout_s) for p in plan]
    inflight = max_inflight = 0

    async def tracked(p: Planned, o: Outcome) -> None:
        nonlocal inflight, max_inflight
        inflight += 1
        max_inflight = max(max_inflight, inflight)
        try:
            await send(client, p, o, t0, hard_s)
        finally:
            inflight -= 1

    stop = asyncio.Event()
    t0 = loop.time()
    sampler = asyncio.create_task(rss.run(client, t0, stop))
    tasks = []
    for p, o in zip(plan, outcomes, strict=True):
        if (delay := t0 + p.at_s - loop.time()) > 0:
            await asyncio.sleep(delay)
        o.lag_s = loop.time() - (t0 + p.at_s)
        tasks.append(asyncio.create_task(tracked(p, o)))
    if tasks:
        _, still_open = await asyncio.wait(tasks, timeout=tail_s)
        for t in still_open:
            t.cancel()
        await asyncio.gather(*still_open, return_exceptions=True)
    for o in outcomes:
        if o.status is None and not o.cancelled and o.error is None:
            o.error = f"still open {tail_s:g} s after the last arrival"
    span, cpu = loop.time() - t0, time.process_time() - cpu0
    server_cpu1 = await server_cpu_seconds(client, pid)
    server_cpu = None if server_cpu0 is None or server_cpu1 is None else server_cpu1 - server_cpu0
    stop.set()
    await sampler
    after = await rejections(client)
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return RunResult(outcomes, rss, diff, [o.lag_s for o in outcomes], max_inflight, span, cpu, server_cpu)
