"""POST /events: a JSON batch of canonical events in, validated rows out, written durably under raw/live/.

Validation is ingestion's (`datasets.validate`), on the same raw-string table, so a live event and a logged one are
accepted or refused by the same rule with the same reason code. Files carry `user_key`, never the raw id; the next
ingestion takes them as already pseudonymised.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.storage import RAW, Storage
from datasets import schema as s
from datasets.pseudonym import pseudonymise_array
from datasets.validate import Rules, validate

LIVE = "live"  # raw/live/: files flushed by POST /events
SOURCE = "POST /events"
LIVE_SCHEMA = pa.schema([(s.USER_KEY, pa.string()), *[f for f in s.INTERACTION_SCHEMA if f.name != s.USER_KEY]])


class BatchError(ValueError):
    """The request as a whole is unusable: nothing of it is stored."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Checked:
    accepted: pa.Table  # LIVE_SCHEMA
    refused: list[dict]  # index, reason, detail


def parse_batch(body: bytes, max_events: int) -> list[dict]:
    """A JSON list of event objects, or {"events": [...]}; refuses the whole batch when it is neither."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BatchError(400, f"body is not JSON: {err}") from None
    events = doc.get("events") if isinstance(doc, dict) else doc
    if not isinstance(events, list):
        raise BatchError(422, 'body must be a JSON list of events or {"events": [...]}')
    if not events:
        raise BatchError(422, "the batch has no events")
    if len(events) > max_events:
        raise BatchError(413, f"the batch has {len(events)} events; at most {max_events} per request")
    for i, event in enumerate(events):
        if not isinstance(event, dict):
            raise BatchError(422, f"event {i} is not a JSON object")
    return events


def _field(value: object) -> tuple[str | None, bool]:
    """(the value as ingestion's raw string, whether it is usable): numbers as text, bools and nesting not."""
    if value is None or isinstance(value, str):
        return value, True
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value) if isinstance(value, float) else str(value), True
    return None, False


def raw_table(events: list[dict]) -> pa.Table:
    n = len(events)
    columns: dict[str, list[str | None]] = {c: [None] * n for c in s.CANONICAL_COLUMNS}
    reason: list[str | None] = [None] * n
    for i, event in enumerate(events):
        for c in s.CANONICAL_COLUMNS:
            text, ok = _field(event.get(c))
            columns[c][i] = text
            if not ok:
                reason[i] = s.Reason.BAD_LINE
    return pa.table({
        **{c: pa.array(v, pa.string()) for c, v in columns.items()},
        s.USER_KEY: pa.nulls(n, pa.string()),
        s.SOURCE: pa.array([SOURCE] * n, pa.string()),
        s.LINE: pa.array(np.arange(1, n + 1), pa.int64()),
        s.SPLIT: pa.array(["train"] * n, pa.string()),
        s.REASON: pa.array(reason, pa.string()),
    }, schema=s.RAW_SCHEMA)


def check(events: list[dict], rules: Rules, key: bytes, is_deleted: Callable[[str], bool]) -> Checked:
    """Validate with ingestion's rules, pseudonymise, and refuse events of deleted users."""
    accepted, rejected = validate(raw_table(events), rules)
    refused = [{"index": int(line) - 1, "reason": reason, "detail": detail}
               for line, reason, detail in zip(rejected.column(s.LINE).to_pylist(),
                                               rejected.column(s.REASON).to_pylist(),
                                               rejected.column(s.DETAIL).to_pylist(), strict=True)]
    user_key = pseudonymise_array(accepted.column(s.USER_ID), key)
    gone = np.array([is_deleted(k) for k in user_key.to_pylist()], dtype=bool)
    for line in accepted.column(s.LINE).filter(pa.array(gone)).to_pylist():
        refused.append({"index": int(line) - 1, "reason": s.Reason.DELETED_USER, "detail": "this user was deleted"})
    keep = pa.array(~gone)
    table = accepted.drop_columns([s.USER_ID, s.USER_KEY]).add_column(0, s.USER_KEY, user_key)
    table = table.filter(keep).select(LIVE_SCHEMA.names).cast(LIVE_SCHEMA)
    return Checked(table, sorted(refused, key=lambda r: r["index"]))


def write_live(storage: Storage, tables: list[pa.Table], replica: str) -> str:
    """One durable Parquet file for a group of accepted batches, where the next ingestion finds it."""
    day = time.strftime("%Y%m%d", time.gmtime())
    tag = re.sub(r"[^A-Za-z0-9_-]", "-", replica)[-24:]  # Serve's replica ids carry '#' and app names
    name = f"{time.strftime('%H%M%S', time.gmtime())}-{tag}-{uuid.uuid4().hex[:12]}.parquet"
    path = storage.path(RAW, LIVE, day, name)
    table = pa.concat_tables(tables).sort_by([(s.TS, "ascending")])
    storage.write_parquet(path, table, durable=True)
    return path


def by_user(table: pa.Table) -> dict[str, list[tuple[str, str, int]]]:
    """(item_id, event, ts_ms) per user key, in time order."""
    out: dict[str, list[tuple[str, str, int]]] = {}
    ts = pc.cast(table.column(s.TS), pa.int64()).to_pylist()
    for user, item, event, t in zip(table.column(s.USER_KEY).to_pylist(), table.column(s.ITEM_ID).to_pylist(),
                                    table.column(s.EVENT).to_pylist(), ts, strict=True):
        out.setdefault(user, []).append((item, event, t))
    return out
