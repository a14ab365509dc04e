"""What a resident update worker prepares at start: the re-filter's Gaussian draw, guessed from the newest version."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.storage import Storage
from tests.helpers import N_CATS, N_ITEMS, N_USERS, make_config, publish_toy_version
from trainers import loop
from trainers.resident import first_draw
from trainers.spectral import filter_rank, sketch_width

FILTER = {"init": "spectral", "spectral_filter": 3.5, "embedding_dim": 8, "seed": 7}


def test_the_first_draw_is_the_newest_versions_item_block(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, train=FILTER)
    assert first_draw(cfg) is None  # nothing published: the first cycle is a full training
    publish_toy_version(Storage(str(tmp_path)), seed=1)
    k = filter_rank(8, N_USERS + N_CATS, N_ITEMS)
    assert first_draw(cfg) == (N_ITEMS, sketch_width(k), 7) == (N_ITEMS, 16, 7)


@pytest.mark.parametrize("sections", [
    {"train": {**FILTER, "init": "normal"}},
    {"train": {**FILTER, "spectral_filter": None}},  # the exact SVD draws nothing
    {"train": FILTER, "update": {"refilter_above": 1.5}},  # no cycle re-filters
])
def test_no_draw_is_guessed_where_no_cycle_would_make_one(tmp_path: Path, sections: dict) -> None:
    publish_toy_version(Storage(str(tmp_path)), seed=1)
    assert first_draw(make_config(tmp_path, **sections)) is None


def test_an_unreadable_newest_version_guesses_nothing(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    version = publish_toy_version(storage, seed=1)
    (tmp_path / "checkpoints" / "versions" / version / "manifest.json").write_text("{not json")
    assert first_draw(make_config(tmp_path, train=FILTER)) is None


def test_a_worker_warmed_up_with_a_draw_keeps_it_for_its_first_refilter(monkeypatch) -> None:
    monkeypatch.setattr(loop, "_KEPT", loop._Kept())
    loop.warm_up((100, 32, 7))
    kept = loop._KEPT.draws
    assert kept is not None and kept._drawn == 100
    rows = kept.draw(100, 32, 7)
    expected = torch.randn(110, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    assert torch.equal(rows, expected[:100])
    assert torch.equal(kept.draw(110, 32, 7), expected)  # ten new items: only their rows are drawn


@pytest.mark.parametrize("predraw", [None, (100, 20, 7), (10**9, 32, 7)])
def test_a_draw_that_would_not_be_kept_is_not_made_at_start(monkeypatch, predraw) -> None:
    """No guess, a width torch draws otherwise (20), or one past the bound: nothing drawn, nothing held."""
    monkeypatch.setattr(loop, "_KEPT", loop._Kept())
    loop.warm_up(predraw)
    assert loop._KEPT.draws is not None and loop._KEPT.draws._drawn == 0
