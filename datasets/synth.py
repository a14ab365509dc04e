"""A synthetic e-commerce behaviour log, in the canonical event columns, as daily CSV files.

    python -m datasets.synth --users N --items M --events E --days D --seed S --out PATH
                             [--start YYYY-MM-DD] [--files-per-day K]

The log is meant to exercise the whole pipeline at any scale (1M users, 1M items, 50M events) without real data:
Zipf item popularity, items grouped into categories and brands with fixed prices, shoppers whose 1-3 interest
categories drift from day to day, sessions of views with a view -> click -> (fav, cart -> purchase) funnel behind
them, and a daily and weekly rhythm. It is generated in time-ordered chunks with numpy and streamed to disk, so
memory stays bounded by the number of users and items, not events.

Same arguments give byte-identical files. Without --start the log covers the D days before today's UTC midnight,
so it is the same all day and moves on at midnight. Event times never pass now minus a minute: a window that
would is cut there. Files are written under a hidden temporary name and renamed when complete, and a folder
holding events-*.csv files this run would not replace is refused rather than mixed with them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from datasets.schema import CANONICAL_COLUMNS, EVENT_CODE, EVENT_TYPES, MIN_TS_MS

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Part of the output's identity: changing it changes the bytes written for the same arguments.
CHUNK_EVENTS = 1_000_000
# The newest event stays this far behind the wall clock, so validation never sees the future.
NOW_MARGIN_MS = MINUTE_MS
SESSION_GAP_MS = 30 * MINUTE_MS
MAX_FILES_PER_DAY = 1440
# Dense per-user and per-item arrays must fit in memory, and user numbers must fit the 27 bits the session
# sort key leaves them.
MAX_USERS = 100_000_000
MAX_ITEMS = 100_000_000

ITEM_ZIPF_EXPONENT = 1.0
CATEGORY_SIZE_EXPONENT = 0.7
BRAND_SIZE_EXPONENT = 0.9
USER_ACTIVITY_SIGMA = 1.0  # lognormal: a few heavy shoppers, a long tail of occasional ones
MAX_INTERESTS = 3
DRIFT_PROB = 0.3  # per user and day: one interest category is replaced

SESSION_END_PROB = 0.22  # geometric views per session, mean about 4.5
P_SESSION_CATEGORY = 0.75  # a view stays in the session's category...
P_OTHER_INTEREST = 0.15  # ...or wanders to another interest; the rest explores any category
P_CLICK = 0.25
P_FAV = 0.12  # given a click
P_CART = 0.30  # given a click
P_PURCHASE = 0.45  # given a cart
VIEW_GAP_MEAN_MS = 40_000
CLICK_DELAY_MEAN_MS = 8_000
FAV_DELAY_MEAN_MS = 20_000
CART_DELAY_MEAN_MS = 45_000
PURCHASE_DELAY_MEAN_MS = 150_000
_MEAN_EVENTS_PER_SESSION = (1 / SESSION_END_PROB) * (1 + P_CLICK * (1 + P_FAV + P_CART * (1 + P_PURCHASE)))

# Relative activity per UTC hour: quiet at night, peaking in the evening.
HOUR_WEIGHTS = (
    0.35, 0.25, 0.18, 0.14, 0.13, 0.16, 0.28, 0.45, 0.62, 0.72, 0.80, 0.86,
    0.90, 0.88, 0.84, 0.84, 0.88, 0.95, 1.05, 1.18, 1.28, 1.25, 1.00, 0.62,
)  # fmt: skip
WEEKDAY_WEIGHTS = (1.0, 0.98, 0.98, 1.0, 1.06, 1.22, 1.16)  # Monday first

# Funnel steps in generation order (each depends on the one before) and their event names.
_STEPS = ("view", "click", "fav", "cart", "purchase")
_STEP_CODE = np.array([EVENT_CODE[s] for s in _STEPS], dtype=np.int64)

_HEADER = (",".join(CANONICAL_COLUMNS) + "\n").encode()
# Two hex characters per byte value, as they lie in memory: one gather writes two characters.
_HEX_PAIRS = np.frombuffer("".join(f"{v:02x}" for v in range(256)).encode(), dtype=np.uint16)
_MASK48 = (1 << 48) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijection on uint64, so distinct inputs never share an id."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix48(x: np.ndarray) -> np.ndarray:
    """A bijection on 48-bit values (odd multipliers and right xorshifts), for unique 12-hex-digit user ids."""
    m = np.uint64(_MASK48)
    x = x & m
    x = x ^ (x >> np.uint64(23))
    x = (x * np.uint64(0x9E3779B97F4B)) & m
    x = x ^ (x >> np.uint64(21))
    x = (x * np.uint64(0xC2B2AE3D27D5)) & m
    return x ^ (x >> np.uint64(24))


def _hex_strings(prefix: str, values: np.ndarray, digits: int) -> pa.StringArray:
    """prefix + the low `digits` (even) hex digits of each value, built straight into an arrow buffer."""
    p = np.frombuffer(prefix.encode(), dtype=np.uint8)
    width = len(p) + digits
    n = len(values)
    # Big-endian bytes of each value, most significant first, each looked up as its two hex characters.
    be = values.astype(">u8").view(np.uint8).reshape(n, 8)[:, 8 - digits // 2 :]
    buf = np.empty((n, width), dtype=np.uint8)
    buf[:, : len(p)] = p
    buf[:, len(p) :] = _HEX_PAIRS[be].view(np.uint8)
    offsets = np.arange(n + 1, dtype=np.int32) * np.int32(width)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buf))


def _int64s(values: np.ndarray) -> pa.Array:
    """numpy -> arrow without pa.array, whose first call imports pandas (0.4 s) just to rule out a DataFrame."""
    values = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def _strings(values: list[str]) -> pa.StringArray:
    data = [v.encode() for v in values]
    offsets = np.cumsum([0] + [len(d) for d in data], dtype=np.int32)
    return pa.StringArray.from_buffers(len(data), pa.py_buffer(offsets), pa.py_buffer(b"".join(data)))


def _join(*parts: pa.Array | str) -> pa.Array:
    """Element-wise concatenation; Python strings become arrow scalars first (pyarrow's own conversion of them
    is what would import pandas)."""
    arrow = [_strings([p])[0] if isinstance(p, str) else p for p in parts]
    return pc.binary_join_element_wise(*arrow, _strings([""])[0])


def _numbered(prefix: str, numbers: np.ndarray) -> pa.Array:
    return _join(prefix, pc.cast(_int64s(numbers), pa.string()))


class _Cdf:
    """Weighted draws from a cumulative sum, through a guide table.

    np.searchsorted with a million random needles in a million-entry table is cache-bound (about 0.3 s here);
    the guide table lands each needle next to its answer, so a draw costs a couple of array passes.
    Results equal min(searchsorted(cum, q, "right"), len - 1) exactly.
    """

    def __init__(self, cum: np.ndarray) -> None:
        self.cum = np.asarray(cum, dtype=np.float64)
        self.last = len(self.cum) - 1
        self.total = float(self.cum[-1])
        self.buckets = 2 * len(self.cum)
        self.scale = self.buckets / self.total
        starts = np.arange(self.buckets) / self.scale
        self.guide = np.minimum(np.searchsorted(self.cum, starts, side="right"), self.last)

    def find(self, q: np.ndarray) -> np.ndarray:
        # One bucket back, so float rounding can never put the starting point past the answer.
        bucket = np.clip((q * self.scale).astype(np.int64) - 1, 0, self.buckets - 1)
        idx = self.guide[bucket]
        todo = np.flatnonzero((idx < self.last) & (self.cum[idx] <= q))
        while todo.size:
            idx[todo] += 1
            i = idx[todo]
            todo = todo[(i < self.last) & (self.cum[i] <= q[todo])]
        return idx

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.find(rng.random(n) * self.total)


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    return np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)


class _Clock:
    """Activity density over time (hour of day, UTC): its integral and inverse, for allocation and sampling."""

    def __init__(self) -> None:
        self.hour = np.asarray(HOUR_WEIGHTS, dtype=np.float64)
        self.cum = np.concatenate([[0.0], np.cumsum(self.hour)])
        self.per_day = float(self.cum[-1])

    def integral(self, t_ms: np.ndarray | int) -> np.ndarray:
        t = np.asarray(t_ms, dtype=np.int64)
        day, rem = np.divmod(t, DAY_MS)
        hour, frac = np.divmod(rem, HOUR_MS)
        return day * self.per_day + self.cum[hour] + frac / HOUR_MS * self.hour[hour]

    def mass(self, a_ms: int, b_ms: int) -> float:
        return float(self.integral(b_ms) - self.integral(a_ms))

    def sample(self, rng: np.random.Generator, n: int, a_ms: int, b_ms: int) -> np.ndarray:
        lo, hi = self.integral(a_ms), self.integral(b_ms)
        u = lo + rng.random(n) * (hi - lo)
        day = np.floor(u / self.per_day)
        rem = u - day * self.per_day
        hour = np.clip(np.searchsorted(self.cum, rem, side="right") - 1, 0, 23)
        frac = np.clip((rem - self.cum[hour]) / self.hour[hour], 0.0, 1.0)
        t = day.astype(np.int64) * DAY_MS + hour * HOUR_MS + (frac * HOUR_MS).astype(np.int64)
        return np.clip(t, a_ms, b_ms - 1)


# (user, item, event code, ts) as parallel arrays.
_Events = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _no_events() -> _Events:
    empty = np.empty(0, dtype=np.int64)
    return empty, empty, empty, empty


@dataclass
class _World:
    """Everything fixed for a run (catalogue, shoppers) plus the state carried from chunk to chunk."""

    user_cdf: _Cdf
    user_ids: pa.Array  # indexed by user index (activity rank)
    n_interests: np.ndarray
    interests: np.ndarray  # (users, MAX_INTERESTS) category numbers, -1 where unused
    cat_cdf: _Cdf
    sorted_items: np.ndarray  # item indices grouped by category, most popular first within each
    sorted_cum: _Cdf  # cumulative popularity along sorted_items
    cat_lo: np.ndarray
    cat_hi: np.ndarray
    cat_base: np.ndarray
    cat_total: np.ndarray
    item_ids: pa.Array  # this and the next three: indexed by item index (popularity rank)
    item_cat: pa.Array
    item_brand: pa.Array
    item_price: pa.Array
    session_key: np.uint64
    last_ts: np.ndarray  # per user: newest event written so far, for sessions that span chunks
    sessions: np.ndarray  # per user: sessions started so far
    # Session tails that ran past their chunk's window, waiting for the window they fall in (across files and
    # days).
    pending: _Events
    n_categories: int
    n_brands: int


def _skewed_assignment(rng: np.random.Generator, n: int, groups: int, exponent: float) -> np.ndarray:
    """Group of each of n members: every group gets one, the rest follow Zipf group sizes, order shuffled."""
    out = np.empty(n, dtype=np.int64)
    out[:groups] = np.arange(groups)
    out[groups:] = rng.permutation(groups)[_Cdf(_zipf_cdf(groups, exponent)).sample(rng, n - groups)]
    return rng.permutation(out)


def _build_world(rng: np.random.Generator, users: int, items: int) -> _World:
    # Sizes from the brief (about M/50 categories, M/20 brands); a group cannot be empty, so never more than M.
    n_cat = min(items, max(5, round(items / 50)))
    n_brand = min(items, max(3, round(items / 20)))
    cat_of_item = _skewed_assignment(rng, items, n_cat, CATEGORY_SIZE_EXPONENT)
    brand_of_item = _skewed_assignment(rng, items, n_brand, BRAND_SIZE_EXPONENT)
    # Items (and users) are indexed internally by popularity (activity) rank, so the hot rows of every lookup
    # table sit together in cache (a random-order string gather from 1M items was the slowest step); the names
    # shown outside are shuffled, so item-0 is not automatically the best seller.
    weight = (np.arange(items) + 1.0) ** -ITEM_ZIPF_EXPONENT
    item_numbers = rng.permutation(items)

    # Prices cluster by category (phone cases vs. phones), then spread per item.
    cat_log_price = rng.normal(3.2, 0.8, n_cat)
    price = np.exp(cat_log_price[cat_of_item] + rng.normal(0.0, 0.5, items))
    cents = np.maximum(1, np.rint(price * 100)).astype(np.int64)
    whole = pc.cast(_int64s(cents // 100), pa.string())
    frac = pc.utf8_lpad(pc.cast(_int64s(cents % 100), pa.string()), 2, "0")
    item_price = _join(whole, ".", frac)

    sorted_items = np.argsort(cat_of_item, kind="stable")
    sorted_cum = np.cumsum(weight[sorted_items])
    counts = np.bincount(cat_of_item, minlength=n_cat)
    cat_hi = np.cumsum(counts)
    cat_lo = cat_hi - counts
    cat_base = np.where(cat_lo > 0, sorted_cum[np.maximum(cat_lo - 1, 0)], 0.0)
    cat_total = sorted_cum[cat_hi - 1] - cat_base
    cat_cdf = _Cdf(np.cumsum(cat_total))

    user_cdf = _Cdf(np.cumsum(np.sort(rng.lognormal(0.0, USER_ACTIVITY_SIGMA, users))[::-1]))
    key_in, key_out = (int(k) for k in rng.integers(0, 1 << 48, 2))
    user_ids = _hex_strings(
        "shopper-", _mix48(np.arange(users, dtype=np.uint64) ^ np.uint64(key_in)) ^ np.uint64(key_out), 12
    )
    n_interests = rng.integers(1, MAX_INTERESTS + 1, users)
    interests = cat_cdf.sample(rng, users * MAX_INTERESTS).reshape(users, MAX_INTERESTS)
    interests[np.arange(MAX_INTERESTS)[None, :] >= n_interests[:, None]] = -1

    cat_names = _numbered("cat-", np.arange(n_cat))
    brand_names = _numbered("brand-", np.arange(n_brand))
    return _World(
        user_cdf=user_cdf,
        user_ids=user_ids,
        n_interests=n_interests,
        interests=interests,
        cat_cdf=cat_cdf,
        sorted_items=sorted_items,
        sorted_cum=_Cdf(sorted_cum),
        cat_lo=cat_lo,
        cat_hi=cat_hi,
        cat_base=cat_base,
        cat_total=cat_total,
        item_ids=_numbered("item-", item_numbers),
        item_cat=cat_names.take(_int64s(cat_of_item)),
        item_brand=brand_names.take(_int64s(brand_of_item)),
        item_price=item_price,
        session_key=np.uint64(int(rng.integers(0, 1 << 63))),
        last_ts=np.full(users, np.iinfo(np.int64).min // 2, dtype=np.int64),
        sessions=np.zeros(users, dtype=np.int64),
        pending=_no_events(),
        n_categories=n_cat,
        n_brands=n_brand,
    )


def _drift(rng: np.random.Generator, world: _World, prob: float) -> None:
    """Overnight, some shoppers swap one interest category for another."""
    users = np.flatnonzero(rng.random(len(world.n_interests)) < prob)
    slot = (rng.random(len(users)) * world.n_interests[users]).astype(np.int64)
    world.interests[users, slot] = world.cat_cdf.sample(rng, len(users))


def _sample_items(rng: np.random.Generator, world: _World, cats: np.ndarray) -> np.ndarray:
    """A Zipf-popular item within each given category: a search confined to that category's stretch."""
    target = world.cat_base[cats] + rng.random(len(cats)) * world.cat_total[cats]
    pos = world.sorted_cum.find(target)
    pos = np.clip(pos, world.cat_lo[cats], world.cat_hi[cats] - 1)
    return world.sorted_items[pos]


def _sessions(rng: np.random.Generator, world: _World, clock: _Clock, n_sessions: int, a_ms: int, b_ms: int) -> _Events:
    """Events of n_sessions shopping sessions as (user, item, event code, ts), grouped by session."""
    user = world.user_cdf.sample(rng, n_sessions)
    start = clock.sample(rng, n_sessions, a_ms, b_ms)
    n_views = rng.geometric(SESSION_END_PROB, n_sessions)
    n_total = int(n_views.sum())
    first = np.cumsum(n_views) - n_views
    sess = np.repeat(np.arange(n_sessions), n_views)

    gap = rng.exponential(VIEW_GAP_MEAN_MS, n_total) + 2_000.0
    gap[first] = 0.0
    cum = np.cumsum(gap)
    view_ts = start[sess] + (cum - cum[first][sess]).astype(np.int64)

    k = world.n_interests[user]
    sess_cat = world.interests[user, (rng.random(n_sessions) * k).astype(np.int64)]
    cat = sess_cat[sess]
    r = rng.random(n_total)
    other = np.flatnonzero((r >= P_SESSION_CATEGORY) & (r < P_SESSION_CATEGORY + P_OTHER_INTEREST))
    other_user = user[sess[other]]
    cat[other] = world.interests[other_user, (rng.random(len(other)) * k[sess[other]]).astype(np.int64)]
    explore = np.flatnonzero(r >= P_SESSION_CATEGORY + P_OTHER_INTEREST)
    cat[explore] = world.cat_cdf.sample(rng, len(explore))
    item = _sample_items(rng, world, cat)

    click = rng.random(n_total) < P_CLICK
    fav = click & (rng.random(n_total) < P_FAV)
    cart = click & (rng.random(n_total) < P_CART)
    purchase = cart & (rng.random(n_total) < P_PURCHASE)
    click_ts = view_ts + (1_000 + rng.exponential(CLICK_DELAY_MEAN_MS, n_total)).astype(np.int64)
    fav_ts = click_ts + (1_000 + rng.exponential(FAV_DELAY_MEAN_MS, n_total)).astype(np.int64)
    cart_ts = click_ts + (1_000 + rng.exponential(CART_DELAY_MEAN_MS, n_total)).astype(np.int64)
    purchase_ts = cart_ts + (5_000 + rng.exponential(PURCHASE_DELAY_MEAN_MS, n_total)).astype(np.int64)

    # Row-major nonzero keeps each view's funnel right behind it, so truncating a batch keeps funnel prefixes.
    present = np.stack([np.ones(n_total, dtype=bool), click, fav, cart, purchase], axis=1)
    row, step = np.nonzero(present)
    ts = np.stack([view_ts, click_ts, fav_ts, cart_ts, purchase_ts], axis=1)[row, step]
    return user[sess[row]], item[row], _STEP_CODE[step], ts


def _sort_order(key: np.ndarray, bits: int) -> np.ndarray:
    """The order that sorts `key`, ties broken by position: the position rides in the low bits of one int64
    sort key, because np.sort of a unique key is about twice as fast as argsort here and is deterministic
    whatever sorting algorithm numpy picks."""
    n = len(key)
    low = max(1, (n - 1).bit_length())
    if bits + low > 63:
        raise ValueError("sort key does not fit 63 bits; use smaller chunks")
    packed = np.sort((key << low) | np.arange(n, dtype=np.int64))
    return packed & ((1 << low) - 1)


def _assign_sessions(world: _World, user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Session number of each event (given in time order): a user's new session starts after a gap, and the
    per-user state carries sessions across chunks."""
    n = len(user)
    order = _sort_order(user, len(world.sessions).bit_length())
    u = user[order]
    t = ts[order]
    head = np.empty(n, dtype=bool)
    head[0] = True
    head[1:] = u[1:] != u[:-1]
    prev = np.empty(n, dtype=np.int64)
    prev[1:] = t[:-1]
    heads = np.flatnonzero(head)
    prev[heads] = world.last_ts[u[heads]]
    new = (t - prev) > SESSION_GAP_MS
    cum = np.cumsum(new)
    group = np.cumsum(head) - 1
    within = cum - (cum - new)[heads][group]
    number = np.empty(n, dtype=np.int64)
    number[order] = world.sessions[u] - 1 + within
    tails = np.append(heads[1:], n) - 1
    world.sessions[u[heads]] += within[tails]
    world.last_ts[u[heads]] = t[tails]
    return number


def _events(rng: np.random.Generator, world: _World, clock: _Clock, n: int, a_ms: int, b_ms: int) -> _Events:
    """Exactly n events of sessions starting in [a_ms, b_ms), in no particular order; the tails of sessions that
    start near b_ms lie past it."""
    parts = [_no_events()]
    have = 0
    while have < n:
        # A little over the expected need, so one batch almost always suffices.
        n_sessions = max(8, math.ceil((n - have) / _MEAN_EVENTS_PER_SESSION * 1.08))
        parts.append(_sessions(rng, world, clock, n_sessions, a_ms, b_ms))
        have += len(parts[-1][0])
    # Batches hold whole view funnels one after the other, so a cut keeps funnel prefixes (no purchase
    # without its view).
    user, item, code, ts = (np.concatenate(cols)[:n] for cols in zip(*parts, strict=True))
    return user, item, code, ts


def _table(world: _World, events: _Events, a_ms: int, b_ms: int) -> pa.Table | None:
    """Events that all lie in [a_ms, b_ms), in time order and with session ids, in the canonical columns."""
    user, item, code, ts = events
    if len(user) == 0:
        return None
    order = _sort_order(ts - a_ms, int(b_ms - a_ms).bit_length())
    user, item, code, ts = user[order], item[order], code[order], ts[order]
    number = _assign_sessions(world, user, ts)
    session = _mix64(
        ((user.astype(np.uint64) << np.uint64(24)) | (number.astype(np.uint64) & np.uint64(0xFFFFFF)))
        ^ world.session_key
    )
    items = _int64s(item)
    return pa.Table.from_arrays(
        [
            world.user_ids.take(_int64s(user)),
            world.item_ids.take(items),
            _strings(list(EVENT_TYPES)).take(_int64s(code)),
            _int64s(ts),
            world.item_cat.take(items),
            world.item_brand.take(items),
            world.item_price.take(items),
            _hex_strings("sess-", session, 16),
        ],
        names=list(CANONICAL_COLUMNS),
    )


def _file_tables(
    rng: np.random.Generator, world: _World, clock: _Clock, counts: np.ndarray, bounds: list[int], last: bool
) -> Iterator[pa.Table]:
    """One file's chunks: counts[i] fresh events for [bounds[i], bounds[i + 1]), plus what spilled into it."""
    for i, n in enumerate(counts):
        a_ms, b_ms = bounds[i], bounds[i + 1]
        fresh = _events(rng, world, clock, int(n), a_ms, b_ms)
        user, item, code, ts = (np.concatenate(c) for c in zip(world.pending, fresh, strict=True))
        if last and i == len(counts) - 1:
            # The log ends here (at most at now minus a minute): events that would spill past it are replaced
            # by fresh ones rather than piled onto its last millisecond.
            for _ in range(100):
                late = ts >= b_ms
                if not late.any():
                    break
                extra = _events(rng, world, clock, int(late.sum()), a_ms, b_ms)
                user, item, code, ts = (
                    np.concatenate([c[~late], e]) for c, e in zip((user, item, code, ts), extra, strict=True)
                )
            ts = np.minimum(ts, b_ms - 1)  # a last resort, never needed in practice
        due = ts < b_ms
        world.pending = (user[~due], item[~due], code[~due], ts[~due])
        table = _table(world, (user[due], item[due], code[due], ts[due]), a_ms, b_ms)
        if table is not None:
            yield table


def _write_atomically(path: Path, tables: Iterable[pa.Table]) -> tuple[int, int | None, int | None]:
    """Stream the tables into one CSV file; returns rows, first ts, last ts.

    Written under a name no reader globs, then renamed: a folder watcher never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    rows = 0
    first: int | None = None
    last: int | None = None
    options = pacsv.WriteOptions(include_header=False, quoting_style="none", batch_size=65_536)
    try:
        with pa.OSFile(str(tmp), "wb") as sink:
            sink.write(_HEADER)  # the writer's own header would quote the names
            writer = None
            for table in tables:
                if writer is None:
                    writer = pacsv.CSVWriter(sink, table.schema, write_options=options)
                writer.write_table(table)
                rows += table.num_rows
                ts = table.column("ts")
                first = ts[0].as_py() if first is None else first
                last = ts[-1].as_py()
            if writer is not None:
                writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows, first, last


def _to_ms(moment: datetime) -> int:
    if moment.tzinfo is None:  # a naive time is taken as UTC, like every ts in the log
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _iso(ms: int) -> str:
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat().replace("+00:00", "Z")


def default_start(days: int, now: datetime | None = None) -> datetime:
    """UTC midnight `days` days before today: the log then ends at today's midnight, just before now."""
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight - timedelta(days=days)


def _plan(
    rng: np.random.Generator, clock: _Clock, events: int, days: int, files_per_day: int, start_ms: int, end_ms: int
) -> list[tuple[int, list[tuple[str, int, int, int]]]]:
    """Per day, the files to write: (name, events, window start, window end), events shared by activity."""
    windows = []
    for d in range(days):
        day_a = start_ms + d * DAY_MS
        if day_a >= end_ms:  # the clamp to now cut this day off entirely
            break
        day_b = min(day_a + DAY_MS, end_ms)
        date = _EPOCH + timedelta(milliseconds=day_a)
        files = []
        for k in range(files_per_day):
            a = day_a + k * DAY_MS // files_per_day
            b = min(day_a + (k + 1) * DAY_MS // files_per_day, day_b)
            if a >= b:
                break
            # Zero-padded so that name order is time order.
            suffix = f"-{k:0{len(str(files_per_day - 1))}d}" if files_per_day > 1 else ""
            files.append((f"events-{date:%Y%m%d}{suffix}.csv", a, b))
        weight = clock.mass(day_a, day_b) * WEEKDAY_WEIGHTS[date.weekday()]
        windows.append((d, weight, files))
    per_day = rng.multinomial(events, _normalised([w for _, w, _ in windows]))
    plan = []
    for (d, _, files), n_day in zip(windows, per_day, strict=True):
        per_file = rng.multinomial(n_day, _normalised([clock.mass(a, b) for _, a, b in files]))
        plan.append((d, [(name, int(n), a, b) for (name, a, b), n in zip(files, per_file, strict=True)]))
    return plan


def _normalised(weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def _check(users: int, items: int, events: int, days: int, seed: int, files_per_day: int) -> None:
    for name, value, top in (
        ("users", users, MAX_USERS),
        ("items", items, MAX_ITEMS),
        ("events", events, None),
        ("days", days, None),
        ("files-per-day", files_per_day, MAX_FILES_PER_DAY),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        if top is not None and value > top:
            raise ValueError(f"--{name} must be at most {top}, got {value}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")


def generate(
    out: Path,
    users: int,
    items: int,
    events: int,
    days: int,
    seed: int,
    start: datetime | None = None,
    files_per_day: int = 1,
    *,
    now: datetime | None = None,
    drift: float = DRIFT_PROB,
    chunk_events: int = CHUNK_EVENTS,
) -> dict:
    """Write the log under `out` and return a summary. Raises ValueError on bad arguments."""
    began = time.perf_counter()
    _check(users, items, events, days, seed, files_per_day)
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"drift must be a probability, got {drift!r}")
    if chunk_events <= 0:
        raise ValueError(f"chunk_events must be positive, got {chunk_events!r}")
    now_ms = _to_ms(now or datetime.now(UTC))
    start_ms = _to_ms(start if start is not None else default_start(days, now))
    end_ms = min(start_ms + days * DAY_MS, now_ms - NOW_MARGIN_MS)
    if start_ms < MIN_TS_MS:
        raise ValueError(f"--start {_iso(start_ms)} is before 2000-01-01, which ingestion rejects")
    if start_ms >= end_ms:
        raise ValueError(f"--start {_iso(start_ms)} is in the future (or within a minute of now)")

    out = Path(out)
    rng = np.random.default_rng(seed)
    clock = _Clock()
    plan = _plan(rng, clock, events, days, files_per_day, start_ms, end_ms)
    names = {name for _, files in plan for name, *_ in files}
    if out.exists():
        # Left-over files of another run would silently mix two logs into one ingest.
        stale = sorted(p.name for p in out.glob("events-*.csv") if p.name not in names)
        if stale:
            raise ValueError(
                f"{out} already holds {len(stale)} events-*.csv file(s) this run would not replace "
                f"(e.g. {stale[0]}); remove them or choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    world = _build_world(rng, users, items)

    written = 0
    first_ts: int | None = None
    last_ts: int | None = None
    final_file = plan[-1][1][-1][0]
    for d, files in plan:
        if d > 0:
            _drift(rng, world, drift)
        for name, n_file, a, b in files:
            n_chunks = max(1, math.ceil(n_file / chunk_events))
            bounds = [a + (b - a) * i // n_chunks for i in range(n_chunks + 1)]
            counts = rng.multinomial(
                n_file, _normalised([clock.mass(x, y) for x, y in zip(bounds, bounds[1:], strict=False)])
            )
            tables = _file_tables(rng, world, clock, counts, bounds, last=name == final_file)
            n, lo, hi = _write_atomically(out / name, tables)
            written += n
            first_ts = lo if first_ts is None else first_ts
            last_ts = hi if hi is not None else last_ts

    if written != events:  # the exact count is a promise; never hand back a log that breaks it silently
        raise RuntimeError(f"wrote {written} events instead of {events}")
    seconds = time.perf_counter() - began
    return {
        "events": written,
        "users": users,
        "active_users": int(np.count_nonzero(world.sessions)),
        "items": items,
        "categories": world.n_categories,
        "brands": world.n_brands,
        "days": days,
        "files": len(names),
        "start": _iso(start_ms),
        "end": _iso(end_ms),
        "first_ts": first_ts,
        "last_ts": last_ts,
        "seed": seed,
        "out": str(out),
        "seconds": round(seconds, 3),
        "events_per_s": round(written / seconds) if seconds > 0 else None,
    }


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line on stderr (argparse's default adds the whole usage block).
        self.exit(2, f"{self.prog}: error: {message}\n")


def _date(text: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m datasets.synth", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, required=True, help="shoppers in the population")
    parser.add_argument("--items", type=int, required=True, help="catalogue size")
    parser.add_argument("--events", type=int, required=True, help="events to write, exactly")
    parser.add_argument("--days", type=int, required=True, help="days the log spans")
    parser.add_argument("--seed", type=int, required=True, help="same arguments and seed, same bytes")
    parser.add_argument("--out", type=Path, required=True, help="folder for events-YYYYMMDD[-k].csv")
    parser.add_argument(
        "--start", type=_date, default=None, help="UTC date of the first day (default: today minus D days)"
    )
    parser.add_argument("--files-per-day", type=int, default=1, help="files per day, each a slice of the day")
    args = parser.parse_args(argv)
    try:
        summary = generate(
            args.out, args.users, args.items, args.events, args.days, args.seed, args.start, args.files_per_day
        )
    except (ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
