"""Listing a local folder that other processes change while it is walked."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from core import storage as storage_module
from core.storage import Storage


def _storage_whose_walks_fail(root: Path, failures: int, monkeypatch: pytest.MonkeyPatch) -> Storage:
    storage = Storage(str(root))
    real = storage.fs.get_file_info
    left = {"n": failures}

    def flaky(what):
        if isinstance(what, pafs.FileSelector) and left["n"] > 0:
            left["n"] -= 1
            raise FileNotFoundError(f"Cannot list directory '{what.base_dir}'")
        return real(what)

    fake = type("FlakyWalks", (), {"get_file_info": staticmethod(flaky)})()
    monkeypatch.setattr(Storage, "fs", property(lambda self: fake))
    return storage


def test_a_walk_that_meets_a_folder_removed_under_it_is_taken_again(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "checkpoints" / "versions" / "v000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "versions" / "v000001" / "manifest.json").write_text("{}")
    storage = _storage_whose_walks_fail(tmp_path, storage_module.LIST_ATTEMPTS - 1, monkeypatch)
    assert storage.list_files("checkpoints", "versions") == [
        str(tmp_path / "checkpoints" / "versions" / "v000001" / "manifest.json")]


def test_a_walk_that_keeps_failing_raises(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "checkpoints" / "versions").mkdir(parents=True)
    storage = _storage_whose_walks_fail(tmp_path, storage_module.LIST_ATTEMPTS, monkeypatch)
    with pytest.raises(FileNotFoundError):
        storage.list_files("checkpoints", "versions")


def test_a_missing_folder_lists_nothing(tmp_path: Path) -> None:
    assert Storage(str(tmp_path)).list_files("checkpoints", "versions") == []
