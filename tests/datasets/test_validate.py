"""The validation rules on raw rows, without Ray: one rule, one reason code, the first problem wins."""

from __future__ import annotations

import pyarrow as pa
import pytest

from datasets import schema as s
from datasets.schema import Reason
from datasets.validate import Rules, parse_timestamps, validate

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
NOW_S = NOW_MS // 1000
RULES = Rules(max_id_length=16, max_future_s=3600)


def _raw(rows: list[dict]) -> pa.Table:
    cols: dict[str, list] = {c: [r.get(c) for r in rows] for c in (*s.CANONICAL_COLUMNS, s.USER_KEY)}
    n = len(rows)
    cols[s.SOURCE] = ["test.csv"] * n
    cols[s.LINE] = list(range(1, n + 1))
    cols[s.SPLIT] = ["train"] * n
    cols[s.REASON] = [r.get(s.REASON) for r in rows]
    return pa.table(cols, schema=s.RAW_SCHEMA)


def _good(**fields: str | None) -> dict:
    row = {"user_id": "u1", "item_id": "i1", "event": "view", "ts": str(NOW_S - 60)}
    row.update(fields)
    return row


@pytest.mark.parametrize(("fields", "reason"), [
    ({"user_id": None}, Reason.MISSING_USER),
    ({"user_id": "   "}, Reason.MISSING_USER),
    ({"item_id": ""}, Reason.MISSING_ITEM),
    ({"event": None}, Reason.MISSING_EVENT),
    ({"event": "teleport"}, Reason.UNKNOWN_EVENT),
    ({"ts": "yesterday"}, Reason.BAD_TIMESTAMP),
    ({"ts": "915148800"}, Reason.TIMESTAMP_TOO_OLD),
    ({"ts": str(NOW_S + 7200)}, Reason.TIMESTAMP_IN_FUTURE),
    ({"item_id": "x" * 17}, Reason.ID_TOO_LONG),
    ({"category_id": "c" * 17}, Reason.ID_TOO_LONG),
    ({"price": "-1"}, Reason.BAD_PRICE),
    ({"price": "cheap"}, Reason.BAD_PRICE),
    ({"reason": Reason.BAD_LINE}, Reason.BAD_LINE),
    ({"reason": Reason.INVALID_UTF8}, Reason.INVALID_UTF8),
])
def test_each_rule_rejects_with_its_reason(fields: dict, reason: str) -> None:
    accepted, rejected = validate(_raw([_good(), _good(**fields)]), RULES, now_ms=NOW_MS)
    assert accepted.num_rows == 1 and rejected.num_rows == 1
    assert rejected.column(s.REASON).to_pylist() == [reason]
    assert rejected.column(s.LINE).to_pylist() == [2]


def test_the_first_problem_an_operator_must_fix_wins() -> None:
    _, rejected = validate(_raw([_good(user_id=None, event="teleport", ts="never")]), RULES, now_ms=NOW_MS)
    assert rejected.column(s.REASON).to_pylist() == [Reason.MISSING_USER]


def test_accepted_rows_are_typed_and_trimmed_and_synonyms_map_to_canonical_events() -> None:
    rows = [_good(event="pv", user_id=" u1 "), _good(event="BUY", price="9.5"), _good(event="add_to_cart", ts="x")]
    rows[2]["ts"] = "2025-12-31T23:00:00Z"
    accepted, rejected = validate(_raw(rows), RULES, now_ms=NOW_MS)
    assert rejected.num_rows == 0
    assert accepted.column(s.EVENT).to_pylist() == ["view", "purchase", "cart"]
    assert accepted.column(s.USER_ID).to_pylist()[0] == "u1"
    assert accepted.column(s.PRICE).to_pylist() == [None, 9.5, None]
    assert accepted.schema.field(s.TS).type == pa.timestamp("ms", tz="UTC")
    assert accepted.column(s.TS).cast(pa.int64()).to_pylist()[2] == NOW_MS - 3_600_000


def test_a_row_pseudonymised_before_it_was_written_needs_no_raw_user() -> None:
    accepted, rejected = validate(_raw([_good(user_id=None, user_key="k" * 32)]), RULES, now_ms=NOW_MS)
    assert accepted.num_rows == 1 and rejected.num_rows == 0


def test_timestamps_in_seconds_milliseconds_and_iso() -> None:
    ms = parse_timestamps(pa.array([str(NOW_S), str(NOW_MS), "2026-01-01T00:00:00+00:00", "2026-01-01", "soon", None]))
    assert ms[:4].tolist() == [NOW_MS] * 4
    assert all(v != v for v in ms[4:])  # NaN: unparsable or absent
