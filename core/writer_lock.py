"""One writer at a time on a storage root: ingestion runs (alone or inside an update cycle) take this lock, so two
of them never clean up or commit over each other.

Local disk: `flock` on `state/.writer.lock` (held by an open file description, so it is released when the process
dies). Object stores have no lock: a writer PUTs a lease object under `state/.writers/` and holds the root while its
lease is the only live one (S3's read-after-write consistency means two writers that both PUT before listing each
see the other, and both back off); the holder renews its lease from a thread, and a lease whose holder died expires.
Re-entrant within a thread: an update cycle holds the lock around the ingestion it runs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from core.storage import STATE, Storage

LOCK_FILE = ".writer.lock"
LEASES = ".writers"
_held: dict[tuple[int, str], int] = {}  # (thread, storage root) -> nesting depth
_held_lock = threading.Lock()


class WriterBusy(RuntimeError):
    """Another writer holds the root for longer than this one would wait: one line saying who and since when."""


def _owner(purpose: str) -> dict:
    return {"purpose": purpose, "host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _describe(owner: dict | None) -> str:
    if not owner:
        return "another writer"
    who = f"pid {owner.get('pid')} on {owner.get('host')}"
    return f"{owner.get('purpose', 'a writer')} ({who}, since {owner.get('since')})"


@contextmanager
def exclusive_writer(storage: Storage, purpose: str, wait_s: float, lease_s: float = 60.0) -> Iterator[None]:
    """Hold the root's writer lock for the block, waiting up to `wait_s` for a current holder; WriterBusy after."""
    mine = (threading.get_ident(), storage.root)
    with _held_lock:
        depth = _held.get(mine, 0)
        _held[mine] = depth + 1
    try:
        if depth:  # this thread holds it already (an update cycle around its ingestion)
            yield
            return
        hold = _local if storage.is_local else _leased
        with hold(storage, purpose, wait_s, lease_s):
            yield
    finally:
        with _held_lock:
            _held[mine] -= 1
            if not _held[mine]:
                del _held[mine]


@contextmanager
def _local(storage: Storage, purpose: str, wait_s: float, lease_s: float) -> Iterator[None]:
    path = storage.makedirs(STATE) + "/" + LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                try:
                    holder = json.loads(os.pread(fd, 4096, 0) or b"null")
                except ValueError:
                    holder = None
                raise WriterBusy(f"{storage.root}: {_describe(holder)} is writing; gave up after {wait_s:.0f} s "
                                 f"(data.writer_wait_s)") from None
            time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner(purpose)).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _read_lease(storage: Storage, path: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(path))
    except (OSError, ValueError):
        return None


@contextmanager
def _leased(storage: Storage, purpose: str, wait_s: float, lease_s: float) -> Iterator[None]:
    mine = storage.path(STATE, LEASES, f"{uuid.uuid4().hex}.json")
    owner = _owner(purpose)

    def put() -> None:
        storage.write_bytes_atomic(mine, json.dumps({**owner, "expires_ms": int((time.time() + lease_s) * 1000)})
                                   .encode())

    deadline = time.monotonic() + wait_s
    attempt = 0
    while True:
        put()
        rivals = []
        for path in storage.list_files(STATE, LEASES, suffix=".json"):
            if path == mine:
                continue
            lease = _read_lease(storage, path)
            if lease is None:
                continue  # half visible or just deleted: the next round sees it settled
            if lease.get("expires_ms", 0) < time.time() * 1000:
                storage.delete(path)  # its holder died without letting go
                continue
            rivals.append(lease)
        if not rivals:
            break
        storage.delete(mine)
        if time.monotonic() >= deadline:
            raise WriterBusy(f"{storage.root}: {_describe(rivals[0])} is writing; gave up after {wait_s:.0f} s "
                             f"(data.writer_wait_s)")
        attempt += 1
        time.sleep(random.uniform(0.1, 0.5) * min(attempt, 4))
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            try:
                put()
            except OSError:
                pass  # a missed renewal is retried; the lease still has two thirds of its time

    renewer = threading.Thread(target=renew, name="writer-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        storage.delete(mine)
