"""Row validation, shared by ingestion and the live POST /events endpoint: one rule, one reason code.

Works on whole arrow tables of raw strings (RAW_SCHEMA) with vectorised compute; per-row Python only runs for the
rare values that need it (ISO timestamps, invalid UTF-8, numbers arrow's parser refuses). Nothing in a row's content
raises here: every value ends as accepted or as a reason code.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from datasets import schema as s
from datasets.schema import Reason

# Lower number wins when a row breaks several rules: the first problem an operator has to fix.
_PRECEDENCE = (
    Reason.UNREADABLE,
    Reason.BAD_LINE,
    Reason.INVALID_UTF8,
    Reason.MISSING_USER,
    Reason.BAD_USER_KEY,
    Reason.MISSING_ITEM,
    Reason.MISSING_EVENT,
    Reason.ID_TOO_LONG,
    Reason.UNKNOWN_EVENT,
    Reason.BAD_TIMESTAMP,
    Reason.TIMESTAMP_TOO_OLD,
    Reason.TIMESTAMP_IN_FUTURE,
    Reason.BAD_PRICE,
)
REASON_RANK = {reason: rank for rank, reason in enumerate(_PRECEDENCE)}
_INT_RE = r"^[+-]?\d{1,19}$"
_FLOAT_RE = r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$"
# What `datasets.pseudonym.pseudonymise` makes; a given key must be exactly that shape (its first 8 characters
# pick the shard, and anything else could be a raw id that must not reach disk).
USER_KEY_RE = r"^[0-9a-f]{32}$"
# Integer timestamps below this are seconds, above it milliseconds (1e11 s is year 5138; 1e11 ms is 1973).
_SECONDS_LIMIT = 100_000_000_000


@dataclass(frozen=True)
class Rules:
    max_id_length: int = 128
    max_future_s: int = 86400


def _blank_to_null(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    trimmed = pc.utf8_trim_whitespace(arr)
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)


def _np_mask(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _parse_iso(values: list[str | None]) -> list[int | None]:
    out: list[int | None] = []
    for v in values:
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))  # type: ignore[union-attr]
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            out.append(int(dt.timestamp() * 1000))
        # Dates at the ends of the calendar overflow in timestamp() on some platforms.
        except (ValueError, TypeError, AttributeError, OverflowError, OSError):
            out.append(None)
    return out


def json_field(name: str, value: object) -> tuple[str | None, str | None, str | None]:
    """A JSON value (a JSONL line's, a POST /events body's) as ingestion's raw text: (text, reason, detail), reason
    None when the value is usable.

    Strings stay as they are, integers and finite floats become their text. Booleans, lists and objects are no
    field (bad_line); a string with lone surrogates (JSON "\\ud800") is invalid_utf8; a number that is not finite
    (NaN, Infinity, 1e999) or has too many digits to write is bad_timestamp in `ts`, bad_price in `price`, and
    bad_line elsewhere.
    """
    if value is None:
        return None, None, None
    if isinstance(value, str):
        if value.isascii():
            return value, None, None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None, Reason.INVALID_UTF8, f"{name} is not valid UTF-8 (a lone surrogate)"
        return value, None, None
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = {list: "a list", dict: "an object", bool: "a boolean"}.get(type(value), type(value).__name__)
        return None, Reason.BAD_LINE, f"{name} is {kind}, not a string or number"
    try:
        if isinstance(value, int):
            return str(value), None, None
        if math.isfinite(value):
            return repr(value), None, None
        why = f"{name} is not a finite number"
    except ValueError:  # an int past Python's digit limit for str()
        why = f"{name} has more digits than can be read"
    return None, {s.TS: Reason.BAD_TIMESTAMP, s.PRICE: Reason.BAD_PRICE}.get(name, Reason.BAD_LINE), why


def _to_float(value: str | None) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return math.nan


def _cast_numbers(text: pa.Array, to: pa.DataType) -> np.ndarray:
    """float64 of strings that already look like numbers. Arrow's parser refuses some (an int64 past its range):
    then, and only then, Python parses each value, NaN where it cannot."""
    try:
        return pc.cast(text, to).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if to != pa.float64():  # float64 holds every 19-digit integer closely enough to judge it
            return _cast_numbers(text, pa.float64())
        return np.array([_to_float(v) for v in text.to_pylist()], dtype=np.float64)


def parse_timestamps(raw: pa.Array) -> np.ndarray:
    """Milliseconds since the epoch as float64, NaN where unparsable (integer s or ms, or ISO 8601)."""
    n = len(raw)
    out = np.full(n, np.nan)
    is_int = _np_mask(pc.match_substring_regex(raw, _INT_RE))
    if is_int.any():
        ints = _cast_numbers(raw.filter(pa.array(is_int)), pa.int64())
        ints = np.where(np.abs(ints) < _SECONDS_LIMIT, ints * 1000.0, ints)
        out[is_int] = ints
    other = ~is_int & _np_mask(pc.is_valid(raw))
    if other.any():
        parsed = _parse_iso(raw.filter(pa.array(other)).to_pylist())
        out[other] = np.array([np.nan if p is None else float(p) for p in parsed])
    return out


def _canonical_events(raw: pa.Array) -> pa.Array:
    lowered = pc.utf8_lower(raw)
    names = list(s.EVENT_TYPES) + list(s.EVENT_SYNONYMS)
    targets = list(s.EVENT_TYPES) + list(s.EVENT_SYNONYMS.values())
    pos = pc.index_in(lowered, value_set=pa.array(names))
    return pc.take(pa.array(targets), pos)


def validate(raw: pa.Table, rules: Rules, now_ms: int | None = None) -> tuple[pa.Table, pa.Table]:
    """Split raw rows into (accepted, rejected).

    accepted: canonical columns typed as INTERACTION_SCHEMA but still holding the raw `user_id`, plus
    source/line/split. rejected: raw fields plus `reason` and `detail`, raw `user_id` still present; the caller
    pseudonymises both before anything is written.
    """
    n = raw.num_rows
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cols = {c: raw.column(c).combine_chunks() for c in raw.column_names}
    cols.setdefault(s.USER_KEY, pa.nulls(n, pa.string()))
    for c in (*s.CANONICAL_COLUMNS, s.USER_KEY):
        cols[c] = _blank_to_null(cols[c])
    code = np.full(n, len(_PRECEDENCE), dtype=np.int8)  # len(_PRECEDENCE) = accepted
    detail = np.full(n, None, dtype=object)

    def flag(reason: str, mask: np.ndarray, why: str | np.ndarray | None = None) -> None:
        rank = _PRECEDENCE.index(reason)
        hit = mask & (code > rank)
        if not hit.any():
            return
        code[hit] = rank
        # The detail belongs to the winning reason: a reason that takes a row over clears the one before.
        detail[hit] = why[hit] if isinstance(why, np.ndarray) else why

    # Reasons the reader already found (an unreadable chunk, a line that is not CSV or JSON, a JSON value that is
    # no usable field), with their detail when the reader gave one (the optional `detail` column).
    pre = cols[s.REASON]
    if pre.null_count < n:
        pre_detail = cols[s.DETAIL].to_numpy(zero_copy_only=False) if s.DETAIL in cols else None
        for reason in _PRECEDENCE:
            hit = _np_mask(pc.equal(pre, reason))
            if hit.any():
                flag(reason, hit, pre_detail)
    flag(Reason.MISSING_USER, _np_mask(pc.is_null(cols[s.USER_ID])) & _np_mask(pc.is_null(cols[s.USER_KEY])))
    given_key = cols[s.USER_KEY]
    if given_key.null_count < n:
        flag(Reason.BAD_USER_KEY, _np_mask(pc.invert(pc.match_substring_regex(given_key, USER_KEY_RE))),
             "user_key is not 32 lowercase hex characters")
    flag(Reason.MISSING_ITEM, _np_mask(pc.is_null(cols[s.ITEM_ID])))
    flag(Reason.MISSING_EVENT, _np_mask(pc.is_null(cols[s.EVENT])))
    for c in (s.USER_ID, s.ITEM_ID, s.CATEGORY_ID, s.BRAND_ID, s.SESSION_ID):
        flag(Reason.ID_TOO_LONG, _np_mask(pc.greater(pc.utf8_length(cols[c]), rules.max_id_length)),
             f"{c} longer than {rules.max_id_length} characters")
    events = _canonical_events(cols[s.EVENT])
    flag(Reason.UNKNOWN_EVENT, _np_mask(pc.is_null(events)) & _np_mask(pc.is_valid(cols[s.EVENT])))
    ts = parse_timestamps(cols[s.TS])
    flag(Reason.BAD_TIMESTAMP, np.isnan(ts))
    flag(Reason.TIMESTAMP_TOO_OLD, ts < s.MIN_TS_MS, "before 2000-01-01")
    flag(Reason.TIMESTAMP_IN_FUTURE, ts > now_ms + rules.max_future_s * 1000,
         f"more than {rules.max_future_s} s after ingestion time")
    price_raw = cols[s.PRICE]
    price_ok = _np_mask(pc.match_substring_regex(price_raw, _FLOAT_RE))
    price_given = _np_mask(pc.is_valid(price_raw))
    flag(Reason.BAD_PRICE, price_given & ~price_ok, "not a number")
    price = np.full(n, np.nan)
    if price_ok.any():
        price[price_ok] = _cast_numbers(price_raw.filter(pa.array(price_ok)), pa.float64())
    flag(Reason.BAD_PRICE, price_ok & ~np.isfinite(price), "not a finite number")  # "1e999" overflows to inf
    flag(Reason.BAD_PRICE, price_ok & (price < 0), "negative")

    ok = code == len(_PRECEDENCE)
    ok_mask = pa.array(ok)
    ts_ms = ts[ok].astype(np.int64)  # only accepted rows: their times are in range by now
    accepted = pa.table(
        {
            s.USER_ID: cols[s.USER_ID].filter(ok_mask),
            s.USER_KEY: cols[s.USER_KEY].filter(ok_mask),
            s.ITEM_ID: cols[s.ITEM_ID].filter(ok_mask),
            s.EVENT: events.filter(ok_mask),
            s.TS: pa.array(ts_ms, pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
            s.CATEGORY_ID: cols[s.CATEGORY_ID].filter(ok_mask),
            s.BRAND_ID: cols[s.BRAND_ID].filter(ok_mask),
            s.PRICE: pa.array(price[ok], pa.float64(), from_pandas=True),
            s.SESSION_ID: cols[s.SESSION_ID].filter(ok_mask),
            s.SOURCE: cols[s.SOURCE].filter(ok_mask),
            s.LINE: cols[s.LINE].filter(ok_mask),
            s.SPLIT: cols[s.SPLIT].filter(ok_mask),
        }
    )
    bad = ~ok
    bad_mask = pa.array(bad)
    reasons = np.array(_PRECEDENCE, dtype=object)[code[bad]]
    rejected = pa.table(
        {
            s.REASON: pa.array(reasons, pa.string()),
            s.DETAIL: pa.array(detail[bad], pa.string()),
            s.SOURCE: cols[s.SOURCE].filter(bad_mask),
            s.LINE: cols[s.LINE].filter(bad_mask),
            s.USER_ID: cols[s.USER_ID].filter(bad_mask),
            s.USER_KEY: cols[s.USER_KEY].filter(bad_mask),
            s.ITEM_ID: cols[s.ITEM_ID].filter(bad_mask),
            s.EVENT: cols[s.EVENT].filter(bad_mask),
            s.TS: cols[s.TS].filter(bad_mask),
            s.CATEGORY_ID: cols[s.CATEGORY_ID].filter(bad_mask),
            s.BRAND_ID: cols[s.BRAND_ID].filter(bad_mask),
            s.PRICE: price_raw.filter(bad_mask),
        }
    )
    return accepted, rejected
