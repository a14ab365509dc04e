"""The fuzz tests' settings: derandomized unless IG_FUZZ_SCALE asks for a random run, and a bad scale refused."""

from __future__ import annotations

import pytest

from tests.fuzzing import fuzz_settings


def test_ci_runs_the_fuzz_derandomized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IG_FUZZ_SCALE", raising=False)
    s = fuzz_settings(50)
    assert s.derandomize and s.max_examples == 50 and s.database is None


def test_a_scale_runs_random_seeds_and_more_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IG_FUZZ_SCALE", "10")
    s = fuzz_settings(50)
    assert not s.derandomize and s.max_examples == 500


@pytest.mark.parametrize("bad", ["0", "-3", "ten", "1.5"])
def test_a_scale_that_is_no_whole_number_is_refused(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv("IG_FUZZ_SCALE", bad)
    with pytest.raises(ValueError, match="IG_FUZZ_SCALE"):
        fuzz_settings(50)
