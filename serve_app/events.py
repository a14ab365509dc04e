"""POST /events: a JSON batch of canonical events in, validated rows out, written durably under raw/live/.

Validation is ingestion's (`datasets.validate`), on the same raw-string table, so a live event and a logged one are
accepted or refused by the same rule with the same reason code. Files carry `user_key`, never the raw id; the next
ingestion takes them as already pseudonymised.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.storage import RAW, Storage
from datasets import schema as s
from datasets.live_files import LIVE, live_file_name
from datasets.pseudonym import pseudonymise_array
from datasets.validate import REASON_RANK, Rules, json_field, validate

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
    """A JSON list of event objects, or {"events": [...]}; refuses the whole batch when it is neither.

    Whatever the bytes, the outcome is a list or a `BatchError` (4xx): bytes that decode to no JSON text, invalid
    JSON, nesting too deep for the parser (RecursionError) and integers past Python's digit limit are all 400.
    Strings holding lone surrogates (a JSON "\\ud800" escape, or such bytes, which json.loads lets through) do not
    refuse the body: `check` refuses each event that has one with reason `invalid_utf8`, like a log line with
    invalid UTF-8, so one bad field never costs the good events of the batch.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BatchError(400, f"body is not JSON: {_one_line(err)}") from None
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


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field(name: str, value: object) -> tuple[str | None, str | None, str | None]:
    """(the value as ingestion's raw string, the reason it is refused or None, detail): ingestion's JSON rule
    (`datasets.validate.json_field`): numbers as text; bools, nesting, NaN/Infinity, unwritable ints and strings
    with lone surrogates refused, never an exception."""
    if value is None or (type(value) is str and value.isascii()):
        return value, None, None  # type: ignore[return-value]
    return json_field(name, value)


def raw_table(events: list[dict]) -> pa.Table:
    """The batch as ingestion's raw rows (RAW_SCHEMA, plus `detail` when a field was refused here)."""
    n = len(events)
    columns: dict[str, list[str | None]] = {c: [None] * n for c in s.CANONICAL_COLUMNS}
    reason: list[str | None] = [None] * n
    detail: list[str | None] = [None] * n
    for i, event in enumerate(events):
        for c in s.CANONICAL_COLUMNS:
            text, problem, why = _field(c, event.get(c))
            columns[c][i] = text
            if problem is not None and (reason[i] is None or REASON_RANK[problem] < REASON_RANK[reason[i]]):
                reason[i], detail[i] = problem, why
    table = pa.table({
        **{c: pa.array(v, pa.string()) for c, v in columns.items()},
        s.USER_KEY: pa.nulls(n, pa.string()),
        s.SOURCE: pa.array([SOURCE] * n, pa.string()),
        s.LINE: pa.array(np.arange(1, n + 1), pa.int64()),
        s.SPLIT: pa.array(["train"] * n, pa.string()),
        s.REASON: pa.array(reason, pa.string()),
    }, schema=s.RAW_SCHEMA)
    if any(d is not None for d in detail):
        table = table.append_column(s.DETAIL, pa.array(detail, pa.string()))
    return table


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


def write_live(storage: Storage, tables: list[pa.Table], replica: str, deadline_s: float) -> str:
    """One durable Parquet file for a group of accepted batches, where the next ingestion finds it. Its name says
    when it was written (datasets.live_files); a write that takes longer than `deadline_s` is abandoned before it
    becomes visible (TimeoutError, an OSError): ingestion relies on sealed files being complete."""
    started = time.time()
    day, name = live_file_name(replica, started)
    path = storage.path(RAW, LIVE, day, name)
    table = pa.concat_tables(tables).sort_by([(s.TS, "ascending")])
    storage.write_parquet(path, table, durable=True, deadline=started + deadline_s)
    return path


def by_user(table: pa.Table) -> dict[str, list[tuple[str, str, int]]]:
    """(item_id, event, ts_ms) per user key, in time order."""
    out: dict[str, list[tuple[str, str, int]]] = {}
    ts = pc.cast(table.column(s.TS), pa.int64()).to_pylist()
    for user, item, event, t in zip(table.column(s.USER_KEY).to_pylist(), table.column(s.ITEM_ID).to_pylist(),
                                    table.column(s.EVENT).to_pylist(), ts, strict=True):
        out.setdefault(user, []).append((item, event, t))
    return out
