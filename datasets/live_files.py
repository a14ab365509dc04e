"""The files POST /events writes under raw/live/: their names say when they were written, which is what makes a
live event's arrival comparable across the live API, ingestion and the live-state shards.

raw/live/<YYYYMMDD>/<HHMMSS>-<replica>-<uuid>.parquet, UTC. A file's name time is its events' "received" time (to
the second): ingestion takes a file once it is sealed (older than serve.live_seal_s), and the live API refuses a
write that takes longer than a third of that, so every event received before `live_through_ms(listed)` is in a
file that an ingestion listing at `listed` takes.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime

LIVE = "live"
_NAME = re.compile(r"/live/(\d{8})/(\d{6})-[^/]*\.parquet$")


def live_file_name(replica: str, now_s: float | None = None) -> tuple[str, str]:
    """(day folder, file name) for a live file written now; the replica id is only a readable tag."""
    now = time.gmtime(time.time() if now_s is None else now_s)
    tag = re.sub(r"[^A-Za-z0-9_-]", "-", replica)[-24:]  # Serve's replica ids carry '#' and app names
    return time.strftime("%Y%m%d", now), f"{time.strftime('%H%M%S', now)}-{tag}-{uuid.uuid4().hex[:12]}.parquet"


def live_file_time_ms(path: str) -> int | None:
    """When a live file was named (to the second); None for any other path."""
    match = _NAME.search(path)
    if match is None:
        return None
    try:
        named = datetime.strptime(match.group(1) + match.group(2), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return int(named.timestamp() * 1000)


def sealed(path: str, now_ms: int, seal_s: float) -> bool:
    """Whether ingestion may take this file now (files that are not live files always may)."""
    named = live_file_time_ms(path)
    return named is None or named + 1000 <= now_ms - int(seal_s * 1000)


def live_through_ms(listed_ms: int, seal_s: float) -> int:
    """Every live event received before this is in a file sealed at `listed_ms`."""
    return listed_ms - int(seal_s * 4000 / 3)


def write_deadline_s(seal_s: float) -> float:
    """How long the live API may take to write a file after naming it; slower writes are refused (503)."""
    return seal_s / 3
