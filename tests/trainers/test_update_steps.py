"""How many optimiser steps a warm-start cycle takes: passes over what is new, capped."""

from __future__ import annotations

from core.config import parse_config
from trainers.warm_start import update_steps


def test_steps_follow_the_new_pairs_and_stop_at_the_cap() -> None:
    cfg = parse_config({"train": {"num_workers": 2, "batch_size": 4096}, "update": {"epochs": 4, "max_steps": 50}})
    # 14,280 pairs over 2 ranks: 7,140 each, 2 batches of 4,096 per pass.
    assert update_steps(cfg, 2, 14_280) == 8
    assert update_steps(cfg, 2, 44_726) == 24  # 6 batches per pass
    assert update_steps(cfg, 2, 10_000_000) == 50
    # One worker takes the whole share.
    assert update_steps(cfg, 1, 14_280) == 16


def test_fractional_passes_round_up() -> None:
    cfg = parse_config({"train": {"num_workers": 1, "batch_size": 1000}, "update": {"epochs": 0.5}})
    assert update_steps(cfg, 1, 9_000) == 5


def test_a_step_batch_makes_the_passes_asked_and_no_more() -> None:
    from trainers.loop import step_batch

    # A cycle's 1,029 pairs a rank, 4 passes in 4 steps: 1,029 triples a step, not 16,384 (64 passes).
    assert step_batch(1_029, 4, 4.0, 16_384) == 1_029
    # One pass of a full training: the rank's pairs spread evenly over its steps, never above the batch size.
    assert step_batch(405_064, 25, 1.0, 16_384) == 16_203
    # Capped by update.max_steps: full batches, fewer passes than asked.
    assert step_batch(1_000_000, 50, 4.0, 16_384) == 16_384
    for pairs, steps, passes in [(1, 1, 0.5), (7, 3, 1.0), (10_000, 7, 2.5)]:
        batch = step_batch(pairs, steps, passes, 16_384)
        assert batch >= 1 and batch * steps >= pairs * passes
