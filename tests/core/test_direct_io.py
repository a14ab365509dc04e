"""Files written and read around the page cache hold exactly the bytes given, whatever the sizes of the writes, and
the same calls fall back to buffered I/O where O_DIRECT is refused."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import direct_io
from core.direct_io import ALIGN, CHUNK, direct_chunks, direct_write

# Sizes around every boundary the writer has: empty, one block, one buffer, and either side of each.
_SIZES = st.one_of(st.sampled_from([0, 1, ALIGN - 1, ALIGN, ALIGN + 1, CHUNK - 1, CHUNK, CHUNK + 1]),
                   st.integers(0, 3 * ALIGN))


def _payload(sizes: list[int], seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(_SIZES, max_size=5), seed=st.integers(0, 2**16))
def test_a_file_written_around_the_cache_holds_exactly_what_was_written(tmp_path: Path, sizes: list[int],
                                                                        seed: int) -> None:
    parts = _payload(sizes, seed)
    path = str(tmp_path / "f")
    with direct_write(path) as out:
        assert all(out.write(p) == len(p) for p in parts)
    expected = b"".join(parts)
    assert Path(path).read_bytes() == expected  # the padding of the last block is cut off
    assert b"".join(bytes(c) for c in direct_chunks(path)) == expected


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    """A folder on a filesystem that takes O_DIRECT (ext4 and xfs do; tmpfs since Linux 6.6), else the test is
    skipped: a fallback test there would pass without any fallback."""
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError as e:
        pytest.skip(f"this filesystem refuses O_DIRECT: {e}")
    return tmp_path


def test_the_file_is_opened_around_the_cache(direct_dir: Path) -> None:
    with direct_write(str(direct_dir / "f")) as out:
        assert out._direct and fcntl.fcntl(out._fd, fcntl.F_GETFL) & os.O_DIRECT
        out.write(b"x" * (CHUNK + 5))
    assert (direct_dir / "f").stat().st_size == CHUNK + 5


def test_a_refused_open_falls_back_to_buffered_io(direct_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(direct_dir / "f")
    real_open = os.open

    def refuses_direct(target, flags, *args):
        if str(target) == path and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "O_DIRECT refused")
        return real_open(target, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", refuses_direct)
    data = _payload([CHUNK + ALIGN + 3], 1)[0]
    with direct_write(path) as out:
        out.write(data)
    assert not out._direct
    assert (direct_dir / "f").read_bytes() == data
    assert b"".join(bytes(c) for c in direct_chunks(path)) == data


def test_a_refused_transfer_mid_file_goes_on_through_the_cache(direct_dir: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """A device whose blocks are larger than ALIGN refuses the transfer, not the open: the file goes on buffered,
    every byte once, and a read refused the same way does too."""
    path = str(direct_dir / "f")
    real_write, real_readv = os.write, os.readv
    ours = {"fd": -1, "transfers": 0}
    refused = []

    def refuses_second_direct_write(fd, data):
        if fd == ours["fd"] and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            ours["transfers"] += 1
            if ours["transfers"] == 2:
                refused.append("write")
                raise OSError(errno.EINVAL, "unaligned for this device")
        return real_write(fd, data)

    def refuses_direct_read(fd, buffers):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append("read")
            raise OSError(errno.EINVAL, "unaligned for this device")
        return real_readv(fd, buffers)

    data = _payload([3 * CHUNK + 7], 2)[0]
    with direct_write(path) as out:
        ours["fd"] = out._fd
        monkeypatch.setattr(direct_io.os, "write", refuses_second_direct_write)
        out.write(data)
        assert out._direct is False
    monkeypatch.setattr(direct_io.os, "readv", refuses_direct_read)
    assert (direct_dir / "f").read_bytes() == data
    assert b"".join(bytes(c) for c in direct_chunks(path)) == data
    assert refused == ["write", "read"]


def test_buffers_are_kept_for_the_next_file_and_never_shared(direct_dir: Path) -> None:
    """Two files open at once (a copy from one to the other) hold buffers of their own; closed, they go back."""
    src, dst = str(direct_dir / "src"), str(direct_dir / "dst")
    data = _payload([2 * CHUNK + 11], 3)[0]
    with direct_write(src) as out:
        out.write(data)
    with direct_write(dst) as out:
        for chunk in direct_chunks(src):
            out.write(chunk)
    assert Path(dst).read_bytes() == data
    kept = list(direct_io._BUFFERS._free)
    with direct_write(str(direct_dir / "again")) as out:
        out.write(b"y")
    assert direct_io._BUFFERS._free == kept  # the same buffer taken and given back


def test_other_errors_are_raised(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        with direct_write(str(tmp_path / "missing" / "f")):
            pass
    with pytest.raises(FileNotFoundError):
        list(direct_chunks(str(tmp_path / "absent")))
