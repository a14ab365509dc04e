"""A live shard without Ray: what it rebuilds from the durable live files, and adds that arrive twice."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from core.storage import Storage
from datasets.live_files import live_file_time_ms
from datasets.validate import Rules
from serve_app.events import by_user, check, parse_batch, write_live
from serve_app.live_state import LiveEvent, LiveShard

KEY = b"test-pseudonym-key"


def _durable(storage: Storage, events: list[dict]) -> tuple[str, dict[str, list[LiveEvent]]]:
    """What POST /events does before the shard hears of it: validate, pseudonymise, write the live file."""
    checked = check(parse_batch(json.dumps(events).encode(), 100), Rules(max_id_length=128, max_future_s=300), KEY,
                    lambda _: False)
    path = write_live(storage, [checked.accepted], "replica-1", 10.0)
    received = live_file_time_ms(path)
    return path, {k: [LiveEvent(*r, received) for r in rows] for k, rows in by_user(checked.accepted).items()}


def test_an_add_that_arrives_after_the_shard_rebuilt_the_same_events_holds_them_once(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    now = int(time.time() * 1000)
    _, first = _durable(storage, [{"user_id": "bob", "item_id": "item-1", "event": "click", "ts": now}])
    # The shard starts after the write was durable but before the writer's add reached it (a fresh shard being
    # created, or one restarted by Ray while the writer retries).
    shard = LiveShard(50, storage=storage, index=0, count=1)
    assert shard.rebuilt == 1
    (user_key, events), = first.items()
    seq = asyncio.run(shard.add(first))
    assert list(shard.users[user_key]) == events and seq == shard.seq == 1  # nothing new to tell replicas
    _, second = _durable(storage, [{"user_id": "bob", "item_id": "item-2", "event": "view", "ts": now + 1}])
    assert asyncio.run(shard.add(second)) == 2
    assert [e.item_id for e in shard.users[user_key]] == ["item-1", "item-2"]
    assert asyncio.run(shard.add(second)) == 2 and len(shard.users[user_key]) == 2  # a retried add: once
