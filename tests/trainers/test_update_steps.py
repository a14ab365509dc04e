"""How many optimiser steps a warm-start cycle takes: passes over what is new, capped."""

from __future__ import annotations

from cluster.config import parse_config
from trainers.train import TrainOptions
from trainers.update import update_steps


def test_steps_follow_the_new_pairs_and_stop_at_the_cap() -> None:
    cfg = parse_config({"train": {"num_workers": 2, "batch_size": 4096}, "update": {"epochs": 4, "max_steps": 50}})
    # 14,280 pairs over 2 ranks: 7,140 each, 2 batches of 4,096 per pass.
    assert update_steps(cfg, TrainOptions(), 14_280) == 8
    assert update_steps(cfg, TrainOptions(), 44_726) == 24  # 6 batches per pass
    assert update_steps(cfg, TrainOptions(), 10_000_000) == 50
    # --num-workers changes the per-rank share.
    assert update_steps(cfg, TrainOptions(num_workers=1), 14_280) == 16


def test_fractional_passes_round_up() -> None:
    cfg = parse_config({"train": {"num_workers": 1, "batch_size": 1000}, "update": {"epochs": 0.5}})
    assert update_steps(cfg, TrainOptions(), 9_000) == 5
