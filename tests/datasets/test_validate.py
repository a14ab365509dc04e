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
    accepted, rejected = validate(_raw([_good(user_id=None, user_key="0123456789abcdef" * 2)]), RULES, now_ms=NOW_MS)
    assert accepted.num_rows == 1 and rejected.num_rows == 0


@pytest.mark.parametrize("key", ["k" * 32, "0123456789ABCDEF" * 2, "0123456789abcdef", "0123456789abcdef" * 2 + "0",
                                 "+123456789abcdef0123456789abcdef", "zz"])
def test_a_given_user_key_must_be_a_pseudonym(key: str) -> None:
    accepted, rejected = validate(_raw([_good(user_id=None, user_key=key)]), RULES, now_ms=NOW_MS)
    assert accepted.num_rows == 0
    assert rejected.column(s.REASON).to_pylist() == [Reason.BAD_USER_KEY]


def test_timestamps_in_seconds_milliseconds_and_iso() -> None:
    ms = parse_timestamps(pa.array([str(NOW_S), str(NOW_MS), "2026-01-01T00:00:00+00:00", "2026-01-01", "soon", None]))
    assert ms[:4].tolist() == [NOW_MS] * 4
    assert all(v != v for v in ms[4:])  # NaN: unparsable or absent


def test_integers_past_int64_and_calendar_extremes_are_judged_not_raised() -> None:
    ms = parse_timestamps(pa.array(["9223372036854775807", "9223372036854775808", "9999999999999999999",
                                    "-9999999999999999999", "99999999999999999999", "0001-01-01T00:00:00+23:59",
                                    "9999-12-31T23:59:59-23:59", "2026-13-45"]))
    assert ms[:4].tolist() == [9223372036854775807.0, 9223372036854775808.0, 9999999999999999999.0,
                               -9999999999999999999.0]
    assert all(v != v for v in (ms[4], ms[7]))  # 20 digits, a month 13: unparsable
    rows = [_good(ts=t) for t in ("9999999999999999999", "-9999999999999999999", "9" * 20)]
    _, rejected = validate(_raw(rows), RULES, now_ms=NOW_MS)
    assert rejected.column(s.REASON).to_pylist() == [Reason.TIMESTAMP_IN_FUTURE, Reason.TIMESTAMP_TOO_OLD,
                                                     Reason.BAD_TIMESTAMP]


@pytest.mark.parametrize("price", ["1e999", "-1e999", "1" * 400, "1.7976931348623157e309"])
def test_a_price_that_overflows_is_not_a_finite_number(price: str) -> None:
    _, rejected = validate(_raw([_good(price=price)]), RULES, now_ms=NOW_MS)
    assert rejected.column(s.REASON).to_pylist() == [Reason.BAD_PRICE]
    assert rejected.column(s.DETAIL).to_pylist() == ["not a finite number"]


def test_a_reason_the_reader_found_keeps_its_detail_unless_an_earlier_rule_wins() -> None:
    raw = _raw([_good(reason=Reason.UNREADABLE), _good(reason=Reason.BAD_TIMESTAMP),
                _good(reason=Reason.BAD_TIMESTAMP, user_id=None)])
    raw = raw.append_column(s.DETAIL, pa.array(["ArrowInvalid: boom", "ts is not a finite number", "stale"]))
    _, rejected = validate(raw, RULES, now_ms=NOW_MS)
    assert rejected.column(s.REASON).to_pylist() == [Reason.UNREADABLE, Reason.BAD_TIMESTAMP, Reason.MISSING_USER]
    assert rejected.column(s.DETAIL).to_pylist() == ["ArrowInvalid: boom", "ts is not a finite number", None]
