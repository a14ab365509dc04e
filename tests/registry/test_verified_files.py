"""A local version file this process hashed is not read again while it is unchanged, and any change is seen."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import registry
import registry.reader as reader
from core.storage import Storage
from registry import verified_files
from registry.verified_files import COARSE_MARGIN_NS, MARGIN_NS, VERIFIED, VerifiedFiles, stamp
from tests.registry.test_format_and_commit import _artifacts


@pytest.fixture(autouse=True)
def _fresh_memo() -> None:
    VERIFIED.forget_all()  # another test's files must not count here


class _Counting:
    """hashlib as the reader sees it, counting the sha256 objects made (one per file hashed)."""

    def __init__(self) -> None:
        self.made = 0

    def sha256(self, *args: object) -> object:
        self.made += 1
        return hashlib.sha256(*args)


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> _Counting:
    counting = _Counting()
    monkeypatch.setattr(reader, "hashlib", counting)
    return counting


def _settled_version(tmp_path: Path, seed: int = 0) -> tuple[Storage, str, Path]:
    """A published version whose files' last change is older than the memo's margin."""
    storage = Storage(str(tmp_path / "root"))
    version = registry.publish(storage, _artifacts(seed=seed))
    time.sleep(2 * MARGIN_NS / 1e9)
    return storage, version, Path(storage.path("checkpoints", "versions", version))


def test_a_version_verified_once_is_not_hashed_again_while_unchanged(tmp_path: Path, hashes: _Counting) -> None:
    storage, version, folder = _settled_version(tmp_path)
    files = len(registry.read_manifest(storage, version)["files"])
    VERIFIED.forget_all()  # another process than the publisher, which remembers what it read back
    hashes.made = 0
    registry.load_version(storage, version)
    assert hashes.made == files
    loaded = registry.load_version(storage, version)
    loaded.load_state(mapped=True)
    assert hashes.made == files  # neither the second load nor model.pt's check read a file again
    # The same bytes under a new inode (a copy put in place) are a file this process never hashed.
    model = folder / registry.MODEL
    shutil.copyfile(model, tmp_path / "copy")
    os.replace(tmp_path / "copy", model)
    registry.load_version(storage, version)
    assert hashes.made == files + 1


def test_a_publisher_does_not_hash_again_what_it_read_back(tmp_path: Path, hashes: _Counting) -> None:
    """Its read-back hashed the files from the disk in its own staging folder, where no other writer looks, so the
    update job's next cycle finds its parent verified however soon it comes."""
    storage = Storage(str(tmp_path / "root"))
    version = registry.publish(storage, _artifacts())
    files = len(registry.read_manifest(storage, version)["files"])
    assert hashes.made == files  # the read-back
    registry.load_version(storage, version).load_state(mapped=True)
    assert hashes.made == files
    VERIFIED.forget_all()  # another process: it hashes them
    registry.load_version(storage, version)
    assert hashes.made == 2 * files


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rel=st.sampled_from([registry.MODEL, registry.ITEM_VECTORS, registry.USERS, registry.SEEN,
                            registry.POPULARITY]),
       where=st.floats(min_value=0.0, max_value=1.0, exclude_max=True), bit=st.integers(0, 7))
def test_a_flipped_bit_with_its_times_put_back_is_refused(tmp_path_factory: pytest.TempPathFactory, rel: str,
                                                          where: float, bit: int) -> None:
    """The change time cannot be put back, so a damaged file is hashed again and refused however it is
    disguised (same size, same modification time)."""
    VERIFIED.forget_all()
    storage, version, folder = _settled_version(tmp_path_factory.mktemp("v"))
    registry.load_version(storage, version)  # verified and remembered
    path = folder / rel
    st_before = path.stat()
    data = bytearray(path.read_bytes())
    data[int(where * len(data))] ^= 1 << bit
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    assert path.stat().st_size == st_before.st_size and path.stat().st_mtime_ns == st_before.st_mtime_ns
    with pytest.raises(registry.CheckpointError, match=f"{rel} fails its checksum"):
        registry.load_version(storage, version)


def test_the_memo_needs_the_same_stamp_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    memo = VerifiedFiles(max_files=2)
    now = stamp(str(path))
    later = time.time_ns() + 2 * MARGIN_NS  # as if the hash began well after the file's last change
    memo.remember(now, now, "sha-a", later)
    assert memo.holds(now, "sha-a")
    assert not memo.holds(now, "sha-b")  # the manifest says otherwise: hash it
    assert not memo.holds(now._replace(size=now.size + 1), "sha-a")
    assert not memo.holds(None, "sha-a")
    memo.remember(now, now._replace(mtime_ns=now.mtime_ns + 1), "sha-a", later)  # moved while read: kept as was
    assert memo.holds(now, "sha-a")
    fresh = now._replace(ino=now.ino + 1, ctime_ns=time.time_ns())
    memo.remember(fresh, fresh, "sha-c", time.time_ns())  # changed within the margin: not remembered
    assert not memo.holds(fresh, "sha-c")
    memo.remember(fresh, fresh, "sha-c", time.time_ns(), written_here=True)  # unless this process wrote it
    assert memo.holds(fresh, "sha-c")
    for i in range(3):  # bounded: the oldest goes first
        other = now._replace(ino=now.ino + 10 + i)
        memo.remember(other, other, f"sha-{i}", later)
    assert not memo.holds(now, "sha-a") and not memo.holds(fresh, "sha-c")
    assert memo.holds(now._replace(ino=now.ino + 12), "sha-2")


def test_an_object_store_version_is_hashed_on_every_load(tmp_path: Path, hashes: _Counting) -> None:
    storage, version, folder = _settled_version(tmp_path)
    sha = registry.read_manifest(storage, version)["files"][registry.MODEL]
    object_store = SimpleNamespace(is_local=False, fs=pafs.LocalFileSystem())  # the same folder, as S3 is read
    before = hashes.made
    for _ in range(2):
        reader._check_streamed(object_store, str(folder), registry.MODEL, sha, "v")
    assert hashes.made - before == 2


def test_whole_second_timestamps_need_a_longer_margin(tmp_path: Path) -> None:
    """Where the filesystem keeps whole seconds, a change in the same second as the hash would not show."""
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    second = 10**18  # a whole second, in ns
    coarse = stamp(str(path))._replace(mtime_ns=second, ctime_ns=second)
    memo = VerifiedFiles()
    memo.remember(coarse, coarse, "sha", second + 2 * MARGIN_NS)
    assert not memo.holds(coarse, "sha")
    memo.remember(coarse, coarse, "sha", second + COARSE_MARGIN_NS + 1)
    assert memo.holds(coarse, "sha")


def test_a_file_on_a_network_filesystem_is_always_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A network filesystem's client can serve a stale stat after another client changed the file."""
    monkeypatch.setattr(verified_files, "filesystem_type", lambda dev: "nfs4")
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    now = stamp(str(path))
    memo = VerifiedFiles()
    memo.remember(now, now, "sha", time.time_ns() + 2 * MARGIN_NS, written_here=True)
    assert not memo.holds(now, "sha")


def test_the_filesystem_of_a_local_folder_is_known(tmp_path: Path) -> None:
    assert verified_files.filesystem_type(os.stat(tmp_path).st_dev) is not None


def test_a_publisher_reads_each_file_back_while_it_writes_the_others(tmp_path: Path, hashes: _Counting,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The read-back of the first file closed runs while the encoder is still writing the others (here the encoder
    waits for it, and would wait in vain if the checks ran after the last file); each file is read once."""
    import threading

    import registry.writer as writer

    storage = Storage(str(tmp_path / "root"))
    checking = threading.Event()
    waited: list[bool] = []
    real_check, real_encode = writer.check_written, writer.encode

    def check(*args: object) -> None:
        checking.set()
        real_check(*args)

    def encode(artifacts: object, sink: object, written: object) -> dict:
        def first_waits(rel: str, sha: str) -> None:
            written(rel, sha)
            if not waited:
                waited.append(checking.wait(timeout=20))

        return real_encode(artifacts, sink, first_waits)

    monkeypatch.setattr(writer, "check_written", check)
    monkeypatch.setattr(writer, "encode", encode)
    version = registry.publish(storage, _artifacts())
    assert waited == [True]
    assert hashes.made == len(registry.read_manifest(storage, version)["files"])


def test_a_file_that_fails_its_early_read_back_fails_the_publish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """A file whose bytes on disk differ from what was written (here: damaged between its write and its read-back)
    is not remembered as checked, so the publisher's own load refuses the version and LATEST does not move (the
    early read-back adds no trust of its own)."""
    import registry.writer as writer

    storage = Storage(str(tmp_path / "root"))
    first = registry.publish(storage, _artifacts(seed=1))
    real = writer.check_written

    def damaging(storage: Storage, folder: str, rel: str, *args: object) -> None:
        if rel == registry.ITEM_VECTORS:
            path = Path(folder) / rel
            data = bytearray(path.read_bytes())
            data[-1] ^= 0x01
            path.write_bytes(bytes(data))
        real(storage, folder, rel, *args)

    monkeypatch.setattr(writer, "check_written", damaging)
    with pytest.raises(registry.CheckpointError, match="fails its checksum"):
        registry.publish(storage, _artifacts(seed=2))
    assert registry.latest_version(storage) == first
