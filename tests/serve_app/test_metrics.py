"""A replica's request metrics: every answer counted exactly (flushed once a second), one in 16 timed."""

import asyncio
import time

import pytest

from serve_app.scorer import Metrics


def test_answers_are_tallied_then_flushed_exactly_and_latency_is_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> tuple[list, list, dict]:
        metrics = Metrics()
        metrics.FLUSH_S = 0.01
        counted: list = []
        timed: list = []
        monkeypatch.setattr(metrics.requests, "inc", lambda n, tags: counted.append((n, tags)))
        monkeypatch.setattr(metrics.latency, "observe", lambda ms, tags: timed.append((ms, tags)))
        for _ in range(33):
            metrics.answered("recommend", "personalised", time.perf_counter())
        metrics.answered("similar", "personalised", time.perf_counter())
        before = dict(metrics.tally)
        await asyncio.sleep(0.1)  # the loop flushes
        metrics.answered("recommend", "folded", time.perf_counter())
        await asyncio.sleep(0.1)
        assert not metrics.tally
        return counted, timed, before

    counted, timed, before = asyncio.run(run())
    assert before == {("recommend", "personalised"): 33, ("similar", "personalised"): 1}
    assert counted == [(33, {"endpoint": "recommend", "path": "personalised"}),
                       (1, {"endpoint": "similar", "path": "personalised"}),
                       (1, {"endpoint": "recommend", "path": "folded"})]
    assert len(timed) == 35 // Metrics.LATENCY_SAMPLE_EVERY and all(ms >= 0 for ms, _ in timed)
