"""A replica's hot swap without Serve: what it serves when LATEST is damaged or names a damaged version."""

from __future__ import annotations

from pathlib import Path

import pytest

import registry
from core.storage import Storage
from serve_app.model_store import ModelWatcher
from tests.helpers import publish_toy_version


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(str(tmp_path / "root"))


def _watcher(storage: Storage, refusals: list) -> ModelWatcher:
    return ModelWatcher(storage, 0.1, warm=lambda model: None, on_refuse=lambda v, why: refusals.append(v))


def _damage(storage: Storage, version: str) -> None:
    target = Path(storage.path("checkpoints", "versions", version, "embeddings", "items.parquet"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("garbage", [b"", b"not a version\n", b"v99999x", b"\xff\xfe\x00", b"v000009"])
def test_a_replica_that_finds_latest_unusable_serves_the_newest_good_version(storage: Storage, garbage: bytes
                                                                            ) -> None:
    publish_toy_version(storage, seed=1)
    good = publish_toy_version(storage, seed=2)
    Path(storage.path("checkpoints", "LATEST")).write_bytes(garbage)  # v000009 names no version at all
    refusals: list[str] = []
    watcher = _watcher(storage, refusals)
    assert watcher.poll_once() and watcher.current.version == good
    assert refusals  # said, and counted (ig_refused_versions_total)
    assert not watcher.poll_once()  # nothing newer: no swap, no new refusal said again
    assert len(refusals) == 1


def test_latest_naming_a_damaged_version_falls_back_and_a_later_good_one_is_taken(storage: Storage) -> None:
    first = publish_toy_version(storage, seed=1)
    bad = publish_toy_version(storage, seed=2)
    _damage(storage, bad)
    refusals: list[str] = []
    watcher = _watcher(storage, refusals)
    assert watcher.poll_once() and watcher.current.version == first
    assert refusals == [bad] and bad in watcher.refused
    fixed = publish_toy_version(storage, seed=3)
    assert watcher.poll_once() and watcher.current.version == fixed


def test_an_update_finds_its_parent_the_same_way(storage: Storage) -> None:
    good = publish_toy_version(storage, seed=1)
    bad = publish_toy_version(storage, seed=2)
    _damage(storage, bad)
    loaded, refused = registry.load_newest_good(storage)
    assert loaded.version == good and set(refused) == {bad}
    Path(storage.path("checkpoints", "LATEST")).write_text("garbage")
    loaded, refused = registry.load_newest_good(storage)
    assert loaded.version == good and "LATEST" in refused and bad in refused
