"""Settings for the fuzz tests: derandomized in CI (the same inputs every run), random on demand.

`IG_FUZZ_SCALE=N` runs each fuzz test with N times its examples and fresh random seeds (`make fuzz`). The fixed
inputs keep CI reproducible; they also never change, and a split that read one line two ways was found only by a
random run (2026-12-08, `tests/datasets/test_adapters.py`). A failure prints the blob that replays it.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings


def fuzz_settings(examples: int, *checks: HealthCheck) -> settings:
    """`examples` derandomized examples; with IG_FUZZ_SCALE=N (a whole number >= 1), N times as many random ones."""
    raw = os.environ.get("IG_FUZZ_SCALE", "").strip()
    scale = None
    if raw:
        scale = int(raw) if raw.isdigit() else 0
        if scale < 1:
            raise ValueError(f"IG_FUZZ_SCALE must be a whole number >= 1, got {raw!r}")
    return settings(max_examples=examples * (scale or 1), deadline=None, derandomize=scale is None, database=None,
                    print_blob=True, suppress_health_check=list(checks))
