"""One writer at a time on a storage root, on local disk (flock) and with the object-store lease protocol (run on
local disk through pyarrow's filesystem, as the registry's tests do)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from core import writer_lock
from core.storage import Storage
from core.writer_lock import WriterBusy, exclusive_writer


@pytest.fixture(params=["local", "object_store"])
def hold(request: pytest.FixtureRequest, tmp_path: Path):
    storage = Storage(str(tmp_path / "root"))
    if request.param == "local":
        return storage, lambda purpose, wait_s: exclusive_writer(storage, purpose, wait_s)
    return storage, lambda purpose, wait_s: writer_lock._leased(storage, purpose, wait_s, lease_s=2.0)


def test_a_second_writer_waits_for_the_first(hold) -> None:
    _, lock = hold
    order: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with lock("first", 5):
            order.append("first in")
            first_in.set()
            time.sleep(0.6)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    first_in.wait(5)
    with lock("second", 10):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]


def test_a_writer_that_would_wait_too_long_is_refused_with_who_holds_it(hold) -> None:
    storage, lock = hold
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with lock("ingestion", 5):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    try:
        with pytest.raises(WriterBusy) as err, lock("update cycle", 0.3):
            pass
    finally:
        release.set()
        t.join()
    message = str(err.value)
    assert storage.root in message and "ingestion" in message and "data.writer_wait_s" in message
    assert "\n" not in message
    with lock("after", 1):  # released on the way out
        pass


def test_a_lease_whose_holder_died_expires(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    stale = storage.path("state", writer_lock.LEASES, "dead.json")
    storage.write_bytes_atomic(stale, b'{"purpose": "crashed", "expires_ms": 1}')
    with writer_lock._leased(storage, "next", 1.0, lease_s=2.0):
        assert not storage.exists("state", writer_lock.LEASES, "dead.json")


def test_the_lock_is_reentrant_within_a_thread(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    with exclusive_writer(storage, "update cycle", 1), exclusive_writer(storage, "its ingestion", 0.1):
        pass
    assert not writer_lock._held
