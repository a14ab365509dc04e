"""Large files written and read around the page cache (O_DIRECT), where the filesystem allows it.

A published version's files (the vectors as .npy and as Parquet, the model: 620 MB on Taobao at 1,024 dimensions)
are written once by the publisher, read back once to verify them, and then read by serving (and, where a resident
worker kept no copy, by the next update cycle's workers). Through the page cache, every write takes a fresh page of
memory. On this project's VMs (and others whose host takes back the guest's free memory) a fresh page costs about
2 s per GB of kernel time, against 0.1 s for memory used a moment before: a Taobao update cycle's publish spent
1.8 s in the kernel, 0.2 s when the same process published the same version again. Around the cache, the data goes
from one reused, aligned buffer to the disk, and the read-back checks the bytes on the disk rather than a copy in
memory.

Where O_DIRECT is refused (tmpfs before Linux 6.6, some network filesystems, a block size above ALIGN) the same
calls fall back to ordinary buffered I/O, silently: the bytes are the same either way.

The cost moves: around the cache, a read-back reads the device, which on a slow disk (a cloud volume at 125 MB/s)
takes seconds for a Taobao-sized version, where the page cache would answer at once.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

ALIGN = 4096  # a multiple of every device's logical block size in use (512 or 4,096 bytes)
CHUNK = 8 << 20  # one buffer: a multiple of ALIGN
POOL = 8  # buffers kept for the next file (a publish uses up to six at once: two lanes, four read-back threads)
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere 0, which is buffered I/O


class _Buffers:
    """Page-aligned buffers, each held by one open file at a time and kept for the next (the point is memory that
    is not fresh: a publish's threads are new every time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []

    @contextmanager
    def held(self) -> Iterator[memoryview]:
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None:
            buf = mmap.mmap(-1, CHUNK)  # anonymous: page-aligned
        view = memoryview(buf)
        try:
            yield view
        finally:
            view.release()
            with self._lock:
                if len(self._free) < POOL:
                    self._free.append(buf)
                    buf = None
            if buf is not None:
                try:
                    buf.close()
                except BufferError:  # a chunk of it still referenced: the collector frees it later
                    pass


_BUFFERS = _Buffers()


def _open(path: str, flags: int) -> tuple[int, bool]:
    """(fd, direct): opened with O_DIRECT if the filesystem takes it, else without."""
    if _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT | os.O_CLOEXEC, 0o644), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags | os.O_CLOEXEC, 0o644), False


def _buffered(fd: int) -> None:
    """Clear O_DIRECT on an open file: the device refused an aligned transfer (a block size above ALIGN)."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)


class DirectWriter:
    """A forward-only binary file: `write` copies into the aligned buffer, each full buffer goes to the disk in one
    transfer, and `finish` pads the last block, cuts the file to its length and syncs it."""

    def __init__(self, fd: int, direct: bool, buf: memoryview) -> None:
        self._fd, self._direct = fd, direct
        self._buf = buf  # this file's alone while it is open
        self._fill = 0
        self._size = 0
        self.closed = False  # read by pyarrow's file wrapper

    def write(self, data: object) -> int:
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        pos, n = 0, len(view)
        while pos < n:
            take = min(CHUNK - self._fill, n - pos)
            self._buf[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == CHUNK:
                self._drain(CHUNK)
        self._size += n
        return n

    def flush(self) -> None:
        """Nothing: a partial block cannot go around the cache; `finish` writes it."""

    def finish(self) -> None:
        if self._fill:
            pad = (-self._fill) % ALIGN
            self._buf[self._fill : self._fill + pad] = bytes(pad)
            self._drain(self._fill + pad)
        os.ftruncate(self._fd, self._size)  # the last block's padding goes
        os.fsync(self._fd)

    def _drain(self, length: int) -> None:
        out = self._buf[:length]
        while out:
            try:
                out = out[os.write(self._fd, out) :]
            except OSError as e:
                if not (self._direct and e.errno == errno.EINVAL):
                    raise
                _buffered(self._fd)  # the same bytes then go through the cache
                self._direct = False
        self._fill = 0


@contextmanager
def direct_write(path: str) -> Iterator[DirectWriter]:
    """A file at `path`, written around the page cache and synced when the block ends. A file already there is
    truncated in place (a process mapping it would fault): for folders no reader uses yet, such as a staging one."""
    fd, direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with _BUFFERS.held() as buf:
            writer = DirectWriter(fd, direct, buf)
            try:
                yield writer
                writer.finish()
            finally:
                writer.closed = True
    finally:
        os.close(fd)


def direct_chunks(path: str) -> Iterator[memoryview]:
    """The file's bytes in order, read around the page cache into a buffer of its own (each chunk is valid until
    the next is read)."""
    fd, direct = _open(path, os.O_RDONLY)
    try:
        with _BUFFERS.held() as buf:
            yield from _read_chunks(fd, direct, buf)
    finally:
        os.close(fd)


def _read_chunks(fd: int, direct: bool, buf: memoryview) -> Iterator[memoryview]:
    while True:
        try:
            n = os.readv(fd, [buf])
        except OSError as e:
            if not (direct and e.errno == errno.EINVAL):
                raise
            _buffered(fd)
            direct = False
            continue
        if not n:
            return
        yield buf[:n]
