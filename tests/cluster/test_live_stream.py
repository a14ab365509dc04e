"""The demo's producer waits as the server asks before it retries a refused event."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from cluster.main import retry_after


def test_retry_after_follows_the_server_within_bounds() -> None:
    assert retry_after("5") == 5.0 and retry_after("2.5") == 2.5
    assert retry_after(None) == 1.0 and retry_after("Wed, 21 Oct 2026 07:28:00 GMT") == 1.0
    assert retry_after("3600") == 5.0 and retry_after("-4") == 0.0
    assert retry_after("nan") == 1.0 and retry_after("inf") == 1.0


@given(st.one_of(st.none(), st.text(max_size=40)))
def test_any_header_gives_a_wait_a_thread_can_take(header: str | None) -> None:
    wait = retry_after(header)
    assert math.isfinite(wait) and 0.0 <= wait <= 5.0
