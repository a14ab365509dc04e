"""Shoppers' live events and deletions, shared by every replica through Ray actors sharded by user key.

A `LiveShard` actor keeps, for the users that hash to it, their newest events (bounded per user, and at most
`serve.live_max_users` users: the least recently active go first) and the deletions, plus a bounded log of changes
with sequence numbers. Every replica runs a `LiveView`: one thread per shard long-polls `changes` and applies them
to a local copy, so a request reads live state from memory, never across an actor call. The replica that took a
write waits until every replica has applied it (`wait_applied`), which is what makes "at once, on every replica"
hold when its HTTP answer arrives.

Nothing acknowledged lives only here: POST /events writes each batch durably under raw/live/ before it reaches a
shard, and a shard that restarts (Ray restarts the actor) rebuilds its users' events from those files, from the
served model's coverage on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

import registry
from core.storage import RAW, Storage
from datasets import schema as s
from datasets.live_files import LIVE, live_file_time_ms
from datasets.pseudonym import shard_of_keys
from datasets.tombstones import load_tombstones

log = logging.getLogger("serve_app.live_state")
ACTOR_PREFIX = "ig-live-shard-"
NAMESPACE = "interest-graph"
# A replica that has not polled for this long is gone (scaled down, crashed): writers stop waiting for it.
SUBSCRIBER_TTL_S = 5.0


@dataclass(frozen=True)
class LiveEvent:
    item_id: str
    event: str
    ts_ms: int  # when it happened (the event's own time)
    received_ms: int  # when it arrived: the time its durable file was named (what "covered by a version" is about)


@dataclass(frozen=True)
class Coverage:
    """Which live events a served version already learned from."""

    live_through_ms: int | None  # every event received before this (versions that record arrival)
    watermark_ms: int  # versions from before arrival was recorded: events at or before their newest event time

    def covers(self, e: LiveEvent) -> bool:
        if self.live_through_ms is not None:
            return e.received_ms < self.live_through_ms
        return e.ts_ms <= self.watermark_ms

    @classmethod
    def of(cls, version: registry.LoadedVersion | None) -> Coverage:
        if version is None:
            return cls(None, -1)
        return cls(version.coverage.get("live_through_ms"), int(version.watermark_ms or -1))


class LiveShard:
    """One shard's state (an async Ray actor; created by `shard_handles`)."""

    def __init__(self, max_events_per_user: int, max_users: int = 100_000, log_entries: int = 10_000,
                 storage: Storage | None = None, index: int = 0, count: int = 1) -> None:
        self.max_events, self.max_users = max_events_per_user, max_users
        # Starts past 0 with an empty log: a replica that subscribes from 0 (a new one, or any after a restart) gets
        # a snapshot first, so what the shard rebuilt from the durable files reaches every replica.
        self.seq = 1
        # seq, kind (add, delete, evict, forget), user key, payload (the events added; a forget's Coverage)
        self.log: deque[tuple[int, str, str, Any]] = deque(maxlen=log_entries)
        self.users: OrderedDict[str, deque[LiveEvent]] = OrderedDict()  # least recently active first
        self.deleted: set[str] = set()
        self.acked: dict[str, tuple[int, float]] = {}  # subscriber -> (applied seq, when)
        self.changed = asyncio.Condition()
        self.rebuilt = 0
        if storage is not None:
            self.rebuilt = self._rebuild(storage, index, count)

    def _rebuild(self, storage: Storage, index: int, count: int) -> int:
        """Acknowledged events of this shard's users that the served version does not cover, from the durable
        live files (a fresh shard finds none; a restarted one gets back what it held). Returns how many."""
        try:
            coverage = Coverage.of(registry.load_newest_good(storage)[0])
            self.deleted = set(load_tombstones(storage).to_pylist())
            since = coverage.live_through_ms if coverage.live_through_ms is not None else 0
            paths = [p for p in storage.list_files(RAW, LIVE, suffix=".parquet")
                     if ".tmp-" not in p and (live_file_time_ms(p) or 0) + 1000 >= since]
            tables = [(live_file_time_ms(p) or 0,
                       storage.read_parquet([p], columns=[s.USER_KEY, s.ITEM_ID, s.EVENT, s.TS])) for p in paths]
        except (OSError, pa.ArrowInvalid) as err:
            log.error("live shard %d could not rebuild from raw/live: %s", index, err)
            return 0
        rebuilt = 0
        for received, table in sorted(tables, key=lambda x: x[0]):
            keys = table.column(s.USER_KEY).to_pylist()
            mine = shard_of_keys([k or "0" for k in keys], count) == index
            ts = pc.cast(table.column(s.TS), pa.int64()).to_pylist()
            items, events = table.column(s.ITEM_ID).to_pylist(), table.column(s.EVENT).to_pylist()
            for i, key in enumerate(keys):
                e = LiveEvent(items[i], events[i], ts[i], received)
                if mine[i] and key is not None and key not in self.deleted and not coverage.covers(e):
                    self._hold(key, [e])
                    rebuilt += 1
        if rebuilt:
            log.info("live shard %d rebuilt %d events of %d users from raw/live", index, rebuilt, len(self.users))
        return rebuilt

    def _hold(self, user_key: str, events: list[LiveEvent]) -> list[str]:
        """Keep a user's events (newest last); returns the users evicted to stay within max_users."""
        held = self.users.get(user_key)
        if held is None:
            held = self.users[user_key] = deque(maxlen=self.max_events)
        else:
            self.users.move_to_end(user_key)
        held.extend(events)
        evicted = []
        while len(self.users) > self.max_users:  # bounded memory: the least recently active user goes
            evicted.append(self.users.popitem(last=False)[0])
        return evicted

    async def _commit(self, kind: str, user_key: str, payload: Any) -> int:
        async with self.changed:
            self.seq += 1
            self.log.append((self.seq, kind, user_key, payload))
            self.changed.notify_all()
            return self.seq

    async def add(self, by_user: dict[str, list[LiveEvent]]) -> int:
        """Append events per user (already validated and durable); returns the sequence number to wait for.

        Idempotent: an event this shard already holds is not held again. The events are durable before they get
        here, so a shard that starts (or restarts) while a write is on its way finds them in the live files, and
        the writer's add (or its retry) then arrives too; ingestion would drop the copy as a duplicate anyway."""
        seq = self.seq
        for user_key, events in by_user.items():
            if user_key in self.deleted:
                continue
            held = set(self.users.get(user_key, ()))
            events = [e for e in events if e not in held]
            if not events:
                continue
            evicted = self._hold(user_key, events)
            seq = await self._commit("add", user_key, events)
            for gone in evicted:  # replicas drop them too, so their copies stay as bounded as this one
                await self._commit("evict", gone, [])
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

    async def forget_covered(self, live_through_ms: int | None, watermark_ms: int) -> int:
        """Drop held events a served version covers. Returns how many went."""
        coverage = Coverage(live_through_ms, watermark_ms)
        dropped = _drop_covered(self.users, coverage, self.max_events)
        if dropped:
            await self._commit("forget", "", coverage)  # replicas apply the same rule
        return dropped

    async def stats(self) -> dict[str, int]:
        return {"users": len(self.users), "events": sum(len(v) for v in self.users.values()), "log": len(self.log),
                "deleted": len(self.deleted), "rebuilt": self.rebuilt, "seq": self.seq}


def _drop_covered(users: OrderedDict[str, deque[LiveEvent]] | dict[str, deque[LiveEvent]], coverage: Coverage,
                  max_events: int) -> int:
    dropped = 0
    for user_key in list(users):
        held = users[user_key]
        keep = [e for e in held if not coverage.covers(e)]
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


def shard_handles(storage: Storage, count: int, max_events_per_user: int, max_users: int = 100_000,
                  log_entries: int = 10_000) -> list[Any]:
    """The shard actors, created on first use and found by name afterwards (detached: they outlive replicas;
    restarted by Ray when they die, rebuilding from the durable live files)."""
    remote = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1000)(LiveShard)
    return [remote.options(name=name, namespace=NAMESPACE, get_if_exists=True, lifetime="detached")
            .remote(max_events_per_user, max_users, log_entries, storage, i, count)
            for i, name in enumerate(shard_names(storage.root, count))]


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
                        if kind in ("delete", "evict"):
                            if kind == "delete":
                                self.deleted.add(user_key)
                            self.users.pop(user_key, None)
                        elif kind == "forget":
                            _drop_covered(self.users, events, self.max_events)
                        elif user_key not in self.deleted:
                            self.users.setdefault(user_key, deque(maxlen=self.max_events)).extend(events)
            since = got["seq"]

    def close(self) -> None:
        self._stop.set()
