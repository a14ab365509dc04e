"""Settings for the fuzz tests: derandomized in CI (the same inputs every run), random on demand.

`IG_FUZZ_SCALE=N` runs each fuzz test with N times its examples and fresh random seeds (`make fuzz`). The fixed
inputs keep CI reproducible; they also never change, and a split that read one line two ways was found only by a
random run (2026-12-08, `tests/datasets/test_adapters.py`). A failure prints the blob that replays it.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


def scale() -> int:
    """IG_FUZZ_SCALE as a whole number >= 1 (unset: 1, the derandomized CI run)."""
    raw = os.environ.get("IG_FUZZ_SCALE", "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"IG_FUZZ_SCALE must be a whole number >= 1, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"IG_FUZZ_SCALE must be a whole number >= 1, got {raw!r}")
    return value


def fuzz_settings(examples: int, *checks: HealthCheck) -> settings:
    """`examples` derandomized examples, or scale() times as many random ones when IG_FUZZ_SCALE is set."""
    random = bool(os.environ.get("IG_FUZZ_SCALE", "").strip())
    return settings(max_examples=examples * scale(), deadline=None, derandomize=not random, database=None,
                    print_blob=True, suppress_health_check=list(checks))
