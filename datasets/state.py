"""What has been ingested: files, committed runs and the data watermark, under state/.

A run's files carry its id; the run counts only once its id is in state/ingest.json, which is written last. A run
that died earlier leaves files that the next run deletes before it starts, so nothing is counted twice.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import asdict, dataclass, field

from core.storage import HOLDOUT, IDMAPS, INTERACTIONS, REJECTS, STATE, TMP, Storage

STATE_FILE = "ingest.json"
_RUN_IN_NAME = re.compile(r"(r\d{8}T\d{6}-[0-9a-f]{8})\.parquet$")


@dataclass
class IngestState:
    files: dict[str, dict[str, int | str]] = field(default_factory=dict)  # path -> size, mtime_ns, run
    runs: list[str] = field(default_factory=list)  # committed runs in order: a run's position is its arrival
    watermark_ms: int | None = None  # newest accepted event time
    formats: list[str] = field(default_factory=list)  # adapters ever ingested (the trainer picks its split by them)
    # Tombstone files (names under state/tombstones/) already applied. Names, not user keys: no file but the
    # tombstone itself names a deleted user.
    tombstones_applied: list[str] = field(default_factory=list)
    # Files no adapter could read: path -> size, mtime_ns, options, reason. Skipped until the file or the adapter
    # options change, so one bad file neither fails nor stalls later runs.
    unreadable: dict[str, dict[str, int | str]] = field(default_factory=dict)
    live_through_ms: int | None = None  # every live event received before this was in a committed run

    @classmethod
    def load(cls, storage: Storage) -> IngestState:
        raw = storage.read_json(storage.path(STATE, STATE_FILE), default={})
        legacy_purged = raw.pop("purged", None)  # before tombstones were tracked by file: the deleted users' keys
        state = cls(**raw)
        if legacy_purged:
            from datasets.tombstones import tombstone_files

            keys = set(legacy_purged)
            state.tombstones_applied = sorted(name for name, key in tombstone_files(storage).items() if key in keys)
        return state

    def save(self, storage: Storage) -> None:
        storage.write_json_atomic(storage.path(STATE, STATE_FILE), asdict(self))


def new_run_id() -> str:
    return time.strftime("r%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def run_of(path: str) -> str | None:
    """The run id embedded in a data file name (`...-<run>.parquet`)."""
    match = _RUN_IN_NAME.search(path.rsplit("/", 1)[-1])
    return match.group(1) if match else None


def remove_uncommitted(storage: Storage, state: IngestState) -> int:
    """Delete files of runs that never committed; returns how many went."""
    committed = set(state.runs)
    removed = 0
    for folder in (INTERACTIONS, HOLDOUT, IDMAPS, REJECTS):
        for path in storage.list_files(folder, suffix=".parquet"):
            run = run_of(path)
            if run is not None and run not in committed:
                storage.delete(path)
                removed += 1
    storage.delete(storage.path(TMP))
    return removed
