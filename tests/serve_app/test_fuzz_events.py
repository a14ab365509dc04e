"""Hostile POST /events bodies through the pure layer (`parse_batch`, `check`), without Ray: never a 5xx.

Every body either raises `BatchError` with a 4xx status, or becomes a `Checked` whose accepted rows and refusals
cover every event of the batch exactly once, with a known reason code each, and whose accepted rows can be stored
(Parquet) and folded (`by_user`). Bodies: arbitrary bytes, JSON of any shape and nesting depth (thousands of levels),
huge and non-finite numbers, lone surrogates (escaped and as raw bytes), wrong types in every field, and batches
around the size limit. Derandomized, nothing stored between runs; `make fuzz` runs them random (tests/fuzzing.py).
"""

from __future__ import annotations

import io
import json
import math
import random

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from datasets import schema as s
from datasets.pseudonym import pseudonymise
from datasets.validate import Rules, json_field
from serve_app.events import LIVE_SCHEMA, BatchError, by_user, check, parse_batch
from tests.fuzzing import fuzz_settings

KEY = b"fuzz-pseudonym-key"
REQUIRED = (s.USER_ID, s.ITEM_ID, s.EVENT, s.TS)
MAX_EVENTS = 60
RULES = Rules(max_id_length=64, max_future_s=3600)
ALL_REASONS = set(s.ALL_REASONS)
FUZZ = fuzz_settings(600, HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example)
ANY_CHAR = st.characters(exclude_categories=())  # lone surrogates included
HOSTILE = ["", " ", "\x00", "\ud800", "a\udfffb", "\ufffd", "é", "🙂", "x" * 65, "x" * 5000, "1e999", "nan",
           "Infinity", "-0", "9" * 19, "1" * 20, "1" * 400, "9223372036854775808", "2026-01-01T00:00:00Z",
           "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "pv", "buy", "teleport", "0123456789abcdef" * 2]
NUMBERS = [0, -0.0, 1.5, 10**19, 2**63, -(2**63) - 1, 10**30, 10**4000, math.inf, -math.inf, math.nan, 5e-324,
           1e308, 1_767_225_000, 1_767_225_000_000, 9_999_999_999_999_999_999]


def _pick(values: list) -> st.SearchStrategy:
    return st.integers(0, len(values) - 1).map(lambda i: values[i])  # small reprs, even for long values


def _now_s() -> int:
    import time

    return int(time.time())


def _plausible(col: str, r: random.Random) -> object:
    if col == s.USER_ID:
        return f"user-{r.randrange(20)}"
    if col == s.ITEM_ID:
        return f"item-{r.randrange(60)}"
    if col == s.EVENT:
        return r.choice(["view", "click", "cart", "fav", "purchase", "pv", "buy"])
    if col == s.TS:
        t = _now_s() - r.randrange(86400)
        return r.choice([t, t * 1000, str(t)])
    if col == s.PRICE:
        return r.choice([round(r.uniform(0, 100), 2), "9.99"])
    return f"{col}-{r.randrange(5)}"


def _random_value(r: random.Random, col: str, depth: int = 0) -> object:
    k = r.randrange(12)
    if k < 6:
        return _plausible(col, r)
    if k == 6:
        return r.choice(HOSTILE)
    if k == 7:
        return r.choice(NUMBERS)
    if k == 8:
        return r.choice([None, True, False])
    if k == 9 and depth < 3:
        return [_random_value(r, col, depth + 1) for _ in range(r.randrange(3))]
    if k == 10 and depth < 3:
        return {col: _random_value(r, col, depth + 1)}
    return "".join(chr(r.randrange(0x110000)) for _ in range(r.randrange(6)))


def _random_event(r: random.Random) -> object:
    if r.random() < 0.004:
        return r.choice([[], "event", 1, None])  # not an object: the whole batch is refused
    event = {c: _plausible(c, r) for c in s.CANONICAL_COLUMNS if c in REQUIRED or r.random() < 0.5}
    for _ in range(r.choice([0, 0, 1, 2, 4])):  # about a third of the events are clean
        c = r.choice(s.CANONICAL_COLUMNS)
        if r.random() < 0.1:
            event.pop(c, None)
        else:
            event[c] = _random_value(r, c)
    return event


JSON_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(ANY_CHAR, max_size=8), _pick(HOSTILE),
              _pick(NUMBERS)),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
    max_leaves=8,
)
EVENT = st.fixed_dictionaries({}, optional={c: JSON_VALUE for c in s.CANONICAL_COLUMNS})


def _dumps(doc: object, ascii_only: bool) -> bytes:
    # ensure_ascii=False writes lone surrogates as the invalid UTF-8 that json.loads still takes (surrogatepass).
    text = json.dumps(doc, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def batch_body(draw: st.DrawFn) -> bytes:
    r = draw(st.randoms(use_true_random=True))
    drawn = draw(st.lists(EVENT, max_size=2))
    size = draw(st.sampled_from([0, 1, 3, 10, MAX_EVENTS - 1, MAX_EVENTS, MAX_EVENTS + 1, 2 * MAX_EVENTS]))
    events = drawn + [_random_event(r) for _ in range(max(size - len(drawn), 0))]
    r.shuffle(events)
    doc = {"events": events} if draw(st.booleans()) else events
    return _dumps(doc, draw(st.booleans()))


@st.composite
def nested_body(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(1, 20_000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'{"events":', b"}")]))
    inner = draw(st.sampled_from([b"1", b"{}", b'{"user_id": "u", "item_id": "i", "event": "view", "ts": 1}']))
    closed = draw(st.booleans())
    return opener * depth + inner + (closer * depth if closed else b"")


BODY = st.one_of(
    batch_body(), batch_body(), batch_body(), batch_body(),
    nested_body(),
    st.binary(max_size=64),
    JSON_VALUE.flatmap(lambda v: st.booleans().map(lambda a: _dumps(v, a))),
    st.lists(EVENT, min_size=1, max_size=3).flatmap(lambda v: st.booleans().map(lambda a: _dumps(v, a))),
    st.sampled_from([b"", b"null", b"{}", b"[]", b'{"events": {}}', b"1" * 5000, b"[" + b"1" * 5000 + b"]",
                     b"NaN", b"[NaN]", b'"\xed\xa0\x80"', b"\xff\xfe[\x00]\x00", b"\xef\xbb\xbf[]", b"\x00" * 8,
                     b'[{"ts": 1e999}]', b'[{"user_id": "\\ud800"}]']),
)


def _deleted(user_key: str) -> bool:
    return user_key.startswith(("0", "1", "2"))  # about 3 in 16 users are deleted


@FUZZ
@given(BODY)
def test_every_body_is_answered_with_4xx_or_every_event_accounted_for(body: bytes) -> None:
    try:
        events = parse_batch(body, MAX_EVENTS)
    except BatchError as err:
        assert 400 <= err.status < 500, err.status
        return
    assert isinstance(events, list) and 1 <= len(events) <= MAX_EVENTS
    checked = check(events, RULES, KEY, _deleted)
    indices = [r["index"] for r in checked.refused]
    assert len(indices) == len(set(indices)) and all(0 <= i < len(events) for i in indices)
    assert checked.accepted.num_rows + len(indices) == len(events)  # the accepted ones are the rest, once each
    assert {r["reason"] for r in checked.refused} <= ALL_REASONS
    assert all(r["detail"] is None or isinstance(r["detail"], str) for r in checked.refused)
    json.dumps(checked.refused)  # what the 422 answer carries must serialise
    assert checked.accepted.schema == LIVE_SCHEMA
    pq.write_table(checked.accepted, io.BytesIO())  # what write_live stores
    by_user(checked.accepted)  # what the live-state shards get


@FUZZ
@given(st.text(max_size=8), st.one_of(JSON_VALUE, _pick(NUMBERS), st.just(5000).map(lambda d: 10**d)))
def test_a_json_value_becomes_text_or_a_reason_never_an_exception(name: str, value: object) -> None:
    for column in (name, s.TS, s.PRICE, s.USER_ID):
        text, reason, detail = json_field(column, value)
        assert reason is None or reason in ALL_REASONS
        assert (text is None) == (value is None or reason is not None)
        if text is not None:
            text.encode("utf-8")  # arrow can hold it


@pytest.mark.parametrize(("body", "status"), [
    (b"[" * 100_000, 400),  # deeper than the parser's recursion limit
    (b"[" + b"1" * 5000 + b"]", 400),  # past Python's int digit limit
    (b"\xff\xfe\x00", 400),
    (b'{"events": []}', 422),
    (json.dumps([{}] * (MAX_EVENTS + 1)).encode(), 413),
])
def test_bodies_that_once_made_a_500_are_refused_with_a_4xx(body: bytes, status: int) -> None:
    with pytest.raises(BatchError) as err:
        parse_batch(body, MAX_EVENTS)
    assert err.value.status == status


def test_fields_that_once_made_a_500_refuse_only_their_event() -> None:
    t = _now_s() - 60
    good = {"user_id": "u1", "item_id": "i1", "event": "view", "ts": t}
    body = json.dumps([good, {**good, "user_id": "\ud800"}, {**good, "ts": 9_999_999_999_999_999_999},
                       {**good, "ts": 9_223_372_036_854_775_808}, {**good, "ts": math.inf},
                       {**good, "price": math.nan}, {**good, "price": 1e308 * 10}, {**good, "item_id": [1]},
                       {**good, "user_id": True}], allow_nan=True).encode("utf-8", "surrogatepass")
    checked = check(parse_batch(body, MAX_EVENTS), RULES, KEY, lambda k: False)
    assert checked.accepted.num_rows == 1
    assert checked.accepted.column(s.USER_KEY).to_pylist() == [pseudonymise("u1", KEY)]
    assert [(r["index"], r["reason"]) for r in checked.refused] == [
        (1, s.Reason.INVALID_UTF8), (2, s.Reason.TIMESTAMP_IN_FUTURE), (3, s.Reason.TIMESTAMP_IN_FUTURE),
        (4, s.Reason.BAD_TIMESTAMP), (5, s.Reason.BAD_PRICE), (6, s.Reason.BAD_PRICE), (7, s.Reason.BAD_LINE),
        (8, s.Reason.BAD_LINE)]
