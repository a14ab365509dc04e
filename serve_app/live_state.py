"""Shoppers' live events and deletions, shared by every replica through Ray actors sharded by user key.

A `LiveShard` actor keeps, for the users that hash to it, their events since they arrived (bounded per user) and
the deletions, plus a bounded log of changes with sequence numbers. Every replica runs a `LiveView`: one thread per
shard long-polls `changes` and applies them to a local copy, so a request reads live state from memory, never
across an actor call. The replica that took a write waits until every replica has applied it (`wait_applied`),
which is what makes "at once, on every replica" hold when its HTTP answer arrives.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import ray

from datasets.pseudonym import shard_of_keys

log = logging.getLogger("serve_app.live_state")
ACTOR_PREFIX = "ig-live-shard-"
NAMESPACE = "interest-graph"
# A replica that has not polled for this long is gone (scaled down, crashed): writers stop waiting for it.
SUBSCRIBER_TTL_S = 5.0


@dataclass(frozen=True)
class LiveEvent:
    item_id: str
    event: str
    ts_ms: int


class LiveShard:
    """One shard's state (an async Ray actor; created by `shard_handles`)."""

    def __init__(self, max_events_per_user: int, log_size: int = 100_000) -> None:
        self.max_events = max_events_per_user
        self.seq = 0
        self.log: deque[tuple[int, str, str, list[LiveEvent]]] = deque(maxlen=log_size)  # seq, kind, user, events
        self.users: dict[str, deque[LiveEvent]] = {}
        self.deleted: set[str] = set()
        self.acked: dict[str, tuple[int, float]] = {}  # subscriber -> (applied seq, when)
        self.changed = asyncio.Condition()

    async def _commit(self, kind: str, user_key: str, events: list[LiveEvent]) -> int:
        async with self.changed:
            self.seq += 1
            self.log.append((self.seq, kind, user_key, events))
            self.changed.notify_all()
            return self.seq

    async def add(self, by_user: dict[str, list[LiveEvent]]) -> int:
        """Append events per user (already validated and durable); returns the sequence number to wait for."""
        seq = self.seq
        for user_key, events in by_user.items():
            if user_key in self.deleted:
                continue
            held = self.users.setdefault(user_key, deque(maxlen=self.max_events))
            held.extend(events)
            seq = await self._commit("add", user_key, events)
        return seq

    async def delete(self, user_key: str) -> int:
        self.deleted.add(user_key)
        self.users.pop(user_key, None)
        return await self._commit("delete", user_key, [])

    async def changes(self, subscriber: str, since: int, timeout_s: float) -> dict[str, Any]:
        """What changed after `since` (a long poll: waits up to `timeout_s` for something new). Calling it also says
        that `subscriber` has applied everything up to `since`."""
        async with self.changed:
            self.acked[subscriber] = (since, time.monotonic())
            self.changed.notify_all()
            if since == self.seq:
                try:
                    await asyncio.wait_for(self.changed.wait_for(lambda: self.seq > since), timeout_s)
                except TimeoutError:
                    pass
            first = self.log[0][0] if self.log else self.seq + 1
            if since > self.seq or since < first - 1:  # this actor restarted, or the log moved past the subscriber
                return {"seq": self.seq, "snapshot": True, "users": {k: list(v) for k, v in self.users.items()},
                        "deleted": sorted(self.deleted)}
            entries = [e for e in self.log if e[0] > since]
            return {"seq": self.seq, "snapshot": False, "entries": entries}

    async def wait_applied(self, seq: int, timeout_s: float) -> bool:
        """True once every live subscriber has applied `seq` (False after `timeout_s`)."""

        def done() -> bool:
            now = time.monotonic()
            return all(applied >= seq for applied, seen in self.acked.values() if now - seen < SUBSCRIBER_TTL_S)

        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(done), timeout_s)
                return True
            except TimeoutError:
                return False

    async def forget_until(self, ts_ms: int) -> int:
        """Drop held events at or before `ts_ms`: a served model's watermark covers them. Returns how many went."""
        dropped = _drop_until(self.users, ts_ms, self.max_events)
        if dropped:
            await self._commit("forget", str(ts_ms), [])
        return dropped


def _drop_until(users: dict[str, deque[LiveEvent]], ts_ms: int, max_events: int) -> int:
    dropped = 0
    for user_key in list(users):
        held = users[user_key]
        keep = [e for e in held if e.ts_ms > ts_ms]
        dropped += len(held) - len(keep)
        if keep:
            users[user_key] = deque(keep, maxlen=max_events)
        else:
            del users[user_key]
    return dropped


def shard_names(root: str, count: int) -> list[str]:
    # One set of shards per storage root, so two apps (or test runs) on one cluster never share live state.
    tag = hashlib.sha256(root.encode()).hexdigest()[:12]
    return [f"{ACTOR_PREFIX}{tag}-{i}" for i in range(count)]


def shard_handles(root: str, count: int, max_events_per_user: int) -> list[Any]:
    """The shard actors, created on first use and found by name afterwards (detached: they outlive replicas)."""
    remote = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1000)(LiveShard)
    return [remote.options(name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached")
            .remote(max_events_per_user) for name in shard_names(root, count)]


def kill_shards(root: str, count: int) -> None:
    """Remove a root's shard actors (tests, and operators retiring an app)."""
    for name in shard_names(root, count):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:
            pass


class LiveView:
    """A replica's local, continuously updated copy of every shard's state."""

    def __init__(self, shards: list[Any], max_events_per_user: int, poll_timeout_s: float = 1.0) -> None:
        self.shards = shards
        self.max_events = max_events_per_user
        self.poll_timeout_s = poll_timeout_s
        self.id = uuid.uuid4().hex
        self.users: dict[str, deque[LiveEvent]] = {}
        self.deleted: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._follow, args=(i,), name=f"live-shard-{i}", daemon=True)
                         for i in range(len(shards))]
        for t in self._threads:
            t.start()

    def shard_of(self, user_key: str) -> int:
        return int(shard_of_keys([user_key], len(self.shards))[0])

    def events(self, user_key: str) -> list[LiveEvent]:
        with self._lock:
            held = self.users.get(user_key)
            return list(held) if held else []

    def is_deleted(self, user_key: str) -> bool:
        return user_key in self.deleted

    def apply_delete(self, user_key: str) -> None:
        """The writing replica applies its own deletion before anything else can answer from here."""
        with self._lock:
            self.deleted.add(user_key)
            self.users.pop(user_key, None)

    def _follow(self, shard: int) -> None:
        since = 0
        while not self._stop.is_set():
            try:
                got = ray.get(self.shards[shard].changes.remote(self.id, since, self.poll_timeout_s))
            except Exception:  # noqa: BLE001 - a shard restarting must not end the replica's view
                log.exception("reading live shard %d failed; retrying", shard)
                self._stop.wait(0.5)
                continue
            with self._lock:
                if got["snapshot"]:
                    for user_key in [k for k in self.users if self.shard_of(k) == shard]:
                        del self.users[user_key]
                    for user_key, events in got["users"].items():
                        self.users[user_key] = deque(events, maxlen=self.max_events)
                    self.deleted.update(got["deleted"])
                else:
                    for _, kind, user_key, events in got["entries"]:
                        if kind == "delete":
                            self.deleted.add(user_key)
                            self.users.pop(user_key, None)
                        elif kind == "forget":
                            _drop_until(self.users, int(user_key), self.max_events)
                        elif user_key not in self.deleted:
                            self.users.setdefault(user_key, deque(maxlen=self.max_events)).extend(events)
            since = got["seq"]

    def close(self) -> None:
        self._stop.set()
