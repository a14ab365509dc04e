"""A replica's request metrics: every answer counted exactly (flushed once a second), one in 16 timed."""

import asyncio
import time

import pytest

from serve_app.scorer import Metrics


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> tuple[Metrics, list, list]:
    m = Metrics()
    m.FLUSH_S = 0.01
    counted: list = []
    timed: list = []
    monkeypatch.setattr(m.requests, "inc", lambda n, tags: counted.append((n, tags)))
    monkeypatch.setattr(m.latency, "observe", lambda ms, tags: timed.append((ms, tags)))
    return m, counted, timed


def test_answers_are_tallied_then_flushed_exactly_and_latency_is_sampled(metrics: tuple) -> None:
    m, counted, timed = metrics

    async def run() -> dict:
        for _ in range(33):
            m.answered("recommend", "personalised", time.perf_counter())
        m.answered("similar", "personalised", time.perf_counter())
        before = dict(m.tally)
        await asyncio.sleep(0.1)  # the loop flushes
        m.answered("recommend", "folded", time.perf_counter())
        await asyncio.sleep(0.1)
        assert not m.tally
        return before

    assert asyncio.run(run()) == {("recommend", "personalised"): 33, ("similar", "personalised"): 1}
    assert counted == [(33, {"endpoint": "recommend", "path": "personalised"}),
                       (1, {"endpoint": "similar", "path": "personalised"}),
                       (1, {"endpoint": "recommend", "path": "folded"})]
    assert len(timed) == 35 // Metrics.LATENCY_SAMPLE_EVERY and all(ms >= 0 for ms, _ in timed)


def test_counts_left_on_a_closed_loop_are_flushed_by_the_next_one(metrics: tuple) -> None:
    m, counted, _ = metrics

    async def count(n: int, wait_s: float) -> None:
        for _ in range(n):
            m.answered("recommend", "popular", time.perf_counter())
        await asyncio.sleep(wait_s)

    asyncio.run(count(5, 0))  # its loop closes with the flush still pending
    asyncio.run(count(2, 0.1))
    assert counted == [(7, {"endpoint": "recommend", "path": "popular"})]
    asyncio.run(count(1, 0))
    m.flush()  # what Scorer.close does: the last second's counts are not lost
    assert counted[-1] == (1, {"endpoint": "recommend", "path": "popular"}) and not m.tally
