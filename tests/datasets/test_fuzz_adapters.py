"""Hostile files through every adapter and the stage step, without Ray: nothing in a file's bytes may raise.

Each adapter gets generated files (arbitrary bytes and text, lone surrogates and other invalid UTF-8, NULs, carriage
returns, quotes and delimiters, extreme and malformed numbers, oversized fields, wrong field counts, nested JSON,
Parquet columns of every type) pushed through the real in-process path: `plan_chunks` -> `read_chunk` for every chunk
(small chunk sizes cut the files) -> `StageBlock` on each chunk's table, with a local Storage. A whole-file problem
may raise `SourceError` at planning, and nothing else does; every block accounts for each of its rows
(rows = accepted + rejected, every reason a known code), no line is lost or read twice, and what is staged as
accepted carries a real pseudonym (as does every reject that has a key: no raw id reaches disk).

Generation: in each example Hypothesis draws a handful of lines (or Parquet columns) field by field, and a seeded
`random.Random` fills the rest of the file from the same pools of hostile values. Drawing every one of thousands
of rows through Hypothesis would spend most of a minute in its engine; this way each adapter sees at least
MIN_ROWS rows (checked at the end of each test) in a few seconds. Rare whole-file choices (a broken header, a file
damaged after planning) also come from the seeded generator: Hypothesis favours its simplest values, which would
make them common. Examples are derandomized and nothing is stored between runs, so CI sees the same files every
time (Hypothesis also mixes in constants from the loaded modules, so a different selection of tests can see other
files). `make fuzz` runs them with random seeds and ten times the examples (tests/fuzzing.py).
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from core.storage import TMP, Storage
from datasets import schema as s
from datasets.adapters import SourceError, load_attributes, plan_chunks, read_chunk
from datasets.pseudonym import pseudonymise
from datasets.schema import Reason
from datasets.stage import STAGED_ACCEPTED, STAGED_REJECTS, StageBlock
from datasets.validate import Rules
from tests.fuzzing import fuzz_settings

FS = pafs.LocalFileSystem()
KEY = b"fuzz-pseudonym-key"
NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
NOW_S = NOW_MS // 1000
SHARDS = 3
LINES_PER_EXAMPLE = 60
EXAMPLES = 50
MIN_ROWS = 2_000
FUZZ = fuzz_settings(EXAMPLES, HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example)
ALL_REASONS = set(s.ALL_REASONS)
PSEUDONYM = r"^[0-9a-f]{32}$"
COLUMNS = (s.USER_ID, s.ITEM_ID, s.EVENT, s.TS, s.CATEGORY_ID, s.BRAND_ID, s.PRICE, s.SESSION_ID)

# Values that broke, or could break, a parser somewhere: numbers at and past every limit, calendar extremes,
# quoting, delimiters, whitespace arrow and Python disagree on, markers and oversized fields.
HOSTILE_TEXT = [
    "", " ", "\t", '"', '""', '"a,b"', 'a"b', '"a"b', ",", ";", "|", "\\", "\x00", "a\x00b", "\r", "a\rb", "\x0b",
    "\x1c", "\x85", "\u2028", "\u3000", "\ufeff", "\ufffd", "é", "日本", "🙂", "x" * 129, "x" * 200_000,
    "1e999", "-1e999", "1e308", "1.7976931348623157e309", "1e-400", "nan", "NaN", "inf", "-inf", "Infinity", "-0",
    "+0", "0", "-1", "-5.0", ".5", "5.", "+.5e+3", "0x1f", "1_000", "１２３", "9223372036854775807",
    "9223372036854775808", "-9223372036854775808", "-9223372036854775809", "1" * 19, "9" * 19, "1" * 20, "1" * 400,
    "1" * 5000, "0." + "1" * 400, "1511544070", "1511544070000", str(NOW_S), str(NOW_MS), str(NOW_S + 10 * 86400),
    "2026-01-01T00:00:00Z", "2026-01-01", "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59", "2026-13-45",
    "2026-01-01T25:00:00", "2020-01-01ZZ", "pv", "buy", "view", "BUY", "fav", "cart", "teleport", "null", "None",
    "true", "[]", "{}", "[[[[", '{"a":', "0123456789abcdef" * 2, "K" * 32, "\ud800", "a\udfffb",
]
BAD_BYTES = [b"\xff", b"\xfe\xff", b"\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80",
             b"\xe6\x97", b"\xf0\x9f\x99", b"a\xffb", b"\x00\xff\x00"]
ANY_CHAR = st.characters(exclude_categories=())  # lone surrogates included


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes the invalid UTF-8 that carries it


def _pick(values: list) -> st.SearchStrategy:
    # By index: a strategy over the values themselves would carry (and print) their megabytes in its repr.
    return st.integers(0, len(values) - 1).map(lambda i: values[i])


# What a real log holds, per column: most rows should get far enough to be accepted (or refused late).
def _plausible(col: str, r: random.Random) -> str:
    if col == s.USER_ID:
        return f"u{r.randrange(30)}"
    if col == s.ITEM_ID:
        return f"i{r.randrange(50)}"
    if col == s.EVENT:
        return r.choice(["pv", "buy", "cart", "fav", "view", "click", "purchase"])
    if col == s.TS:
        return str(NOW_S - r.randrange(400 * 86400)) if r.random() < 0.5 else str(NOW_MS - r.randrange(10**9))
    if col == s.PRICE:
        return repr(round(r.uniform(0, 1e4), 2))
    return f"{(col or 'x')[0]}{r.randrange(10)}"


PLAUSIBLE = {col: st.randoms(use_true_random=True).map(lambda r, c=col: _plausible(c, r)) for col in COLUMNS}


def _field(col: str) -> st.SearchStrategy[bytes]:
    """A field drawn by Hypothesis: plausible half the time, else hostile text, bytes, or numbers."""
    plausible = PLAUSIBLE.get(col, PLAUSIBLE[s.USER_ID]).map(str.encode)
    return st.one_of(
        plausible, plausible, plausible,
        _pick(HOSTILE_TEXT).map(_encode),
        _pick(BAD_BYTES),
        st.text(ANY_CHAR, max_size=6).map(_encode),
        st.integers().map(lambda i: str(i).encode()),
        st.floats().map(lambda f: repr(f).encode()),
        st.binary(max_size=6),
    )


def _random_number(r: random.Random) -> str:
    if r.random() < 0.5:
        digits = r.randrange(1, 25)
        return str(r.randrange(-(10**digits), 10**digits))
    return repr(r.choice([r.uniform(-1e300, 1e300), math.inf, -math.inf, math.nan, -0.0, 5e-324, r.random()]))


def _random_field(r: random.Random, col: str) -> bytes:
    """The same kinds of field as `_field`, from a seeded generator (cheap, for the bulk of a file)."""
    k = r.randrange(10)
    if k < 5:
        return _plausible(col, r).encode()
    if k == 5:
        return _encode(r.choice(HOSTILE_TEXT))
    if k == 6:
        return r.choice(BAD_BYTES)
    if k == 7:
        return _encode("".join(chr(r.randrange(0x110000)) for _ in range(r.randrange(6))))
    if k == 8:
        return _random_number(r).encode()
    return r.randbytes(r.randrange(6))


def _file(drawn: list[bytes], r: random.Random, cheap: Callable[[random.Random], bytes], newline: bytes,
          final_newline: bool, lines: int = LINES_PER_EXAMPLE) -> bytes:
    """`lines` lines: the drawn ones and cheap ones interleaved, blank lines here and there."""
    out = []
    for _ in range(lines):
        k = r.random()
        if k < 0.07:
            out.append(r.choice([b"", b" ", b"\t", b"\r", b" \r"]))
        elif k < 0.45 and drawn:
            out.append(r.choice(drawn))
        else:
            out.append(cheap(r))
    return newline.join(out) + (newline if final_newline else b"")


def _lines_file(line: st.SearchStrategy[bytes], cheap: Callable[[random.Random], bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(_file, st.lists(line, min_size=1, max_size=8), st.randoms(use_true_random=True), st.just(cheap),
                     st.sampled_from([b"\n", b"\r\n"]), st.booleans())


CHUNK_BYTES = st.sampled_from([1 << 20, 1 << 20, 1 << 20, 2048, 256, 48])  # some files cut, a few finely


def _nonblank_lines(data: bytes) -> list[str]:
    """The file's non-blank lines as the adapters define blank (arrow's Unicode whitespace), decoded leniently."""
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in data.split(b"\n")]
    text = pa.array([ln.decode("utf-8", "replace") for ln in lines], pa.string())
    blank = pc.equal(pc.utf8_trim_whitespace(text), "").to_numpy(zero_copy_only=False)
    return [t for t, b in zip(text.to_pylist(), blank, strict=True) if not b]


class Harness:
    """One example: a file in a fresh folder, planned, read chunk by chunk and staged, with every check."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fuzz-"))
        self.storage = Storage(str(self.dir / "root"))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def write(self, name: str, data: bytes | pa.Table) -> Path:
        path = self.dir / name
        if isinstance(data, pa.Table):
            pq.write_table(data, path)
        else:
            path.write_bytes(data)
        return path

    def plan(self, path: Path, fmt: str, chunk_bytes: int, **opts: object) -> list | None:
        try:
            return plan_chunks(FS, str(path), str(path), fmt, chunk_bytes, **opts)
        except SourceError:
            return None  # a whole-file problem: the caller quarantines the file; anything else fails the test

    def read_and_stage(self, chunks: list, tombstones: tuple[str, ...] = ()) -> int:
        """Every chunk read and staged; returns the rows read, after checking each block's accounting."""
        stage = StageBlock(self.storage, "run", KEY, Rules(max_id_length=64, max_future_s=3600), SHARDS, NOW_MS,
                           pa.array(list(tombstones), pa.string()))
        read = accepted = rejected = 0
        for chunk in chunks:
            table = read_chunk(FS, chunk)
            assert set(table.column(s.REASON).drop_null().to_pylist()) <= ALL_REASONS
            counts = stage(table).to_pylist()
            assert len(counts) == 1
            c = counts[0]
            assert c["rows"] == table.num_rows == c["accepted"] + c["rejected"], c
            by_reason = json.loads(c["by_reason"])
            assert set(by_reason) <= ALL_REASONS, by_reason
            assert sum(by_reason.values()) == c["rejected"], c
            read += table.num_rows
            accepted += c["accepted"]
            rejected += c["rejected"]
        self._check_staged(accepted, rejected)
        return read

    def _check_staged(self, accepted: int, rejected: int) -> None:
        files = self.storage.list_files(TMP, "run", STAGED_ACCEPTED, suffix=".parquet")
        rows = self.storage.read_parquet(files, schema=s.INTERACTION_SCHEMA)
        assert rows.num_rows == accepted
        keys = rows.column(s.USER_KEY)
        assert keys.null_count == 0 and pc.all(pc.match_substring_regex(keys, PSEUDONYM)).as_py() in (True, None)
        files = self.storage.list_files(TMP, "run", STAGED_REJECTS, suffix=".parquet")
        rejects = self.storage.read_parquet(files, schema=s.REJECT_SCHEMA)
        assert rejects.num_rows == rejected
        assert set(rejects.column(s.REASON).to_pylist()) <= ALL_REASONS
        keys = rejects.column(s.USER_KEY).drop_null()
        assert pc.all(pc.match_substring_regex(keys, PSEUDONYM)).as_py() in (True, None)


def _fuzz(make: Callable[..., int], *strategies: st.SearchStrategy) -> None:
    """Run `make(harness, *drawn)` for each example; it returns the rows it generated. Checks the volume at the end."""
    total: list[int] = []

    @FUZZ
    @given(st.tuples(*strategies))
    def example(drawn: tuple) -> None:
        harness = Harness()
        try:
            total.append(make(harness, *drawn))
        finally:
            harness.close()

    example()
    assert sum(total) >= MIN_ROWS, f"only {sum(total)} rows generated"


# --- taobao ---------------------------------------------------------------------------------------------------------

TAOBAO = (s.USER_ID, s.ITEM_ID, s.CATEGORY_ID, s.EVENT, s.TS)
TAOBAO_LINE = st.one_of(st.tuples(*[_field(c) for c in TAOBAO]).map(list),
                        st.lists(_field(s.USER_ID), max_size=8)).map(b",".join)


def _taobao_line(r: random.Random) -> bytes:
    cols = TAOBAO if r.random() < 0.8 else [s.USER_ID] * r.randrange(9)  # now and then the wrong field count
    return b",".join(_random_field(r, c) for c in cols)


def test_taobao_files_never_raise() -> None:
    def make(h: Harness, data: bytes, chunk_bytes: int) -> int:
        chunks = h.plan(h.write("log.csv", data), "taobao", chunk_bytes)
        assert chunks is not None  # a taobao file has no header: nothing about it can be refused as a whole
        expected = len(_nonblank_lines(data))
        assert h.read_and_stage(chunks) == expected
        return expected

    _fuzz(make, _lines_file(TAOBAO_LINE, _taobao_line), CHUNK_BYTES)


# --- events: CSV with a header --------------------------------------------------------------------------------------

def _quote(r: random.Random, field: bytes) -> bytes:
    k = r.randrange(8)
    if k == 0:
        return b'"' + field.replace(b'"', b'""') + b'"'
    if k == 1:
        return b'"' + field  # a quote left open
    if k == 2:
        return b'"' + field + b'"x'  # text after the closing quote
    return field


@st.composite
def events_csv(draw: st.DrawFn) -> tuple[bytes, dict]:
    optional = draw(st.lists(st.sampled_from(COLUMNS[4:]), unique=True))
    header = list(draw(st.permutations(list(COLUMNS[:4]) + optional)))
    if draw(st.booleans()):
        header.append(draw(st.sampled_from(["extra", s.USER_ID, "é", ""])))  # extra and duplicated columns
    rename = draw(st.booleans())
    names = [f"src_{c}" if rename and c in COLUMNS else c for c in header]
    delimiter = draw(st.sampled_from([",", ";", "\t", "|"]))
    d = delimiter.encode()
    head = d.join(n.encode() for n in names)
    if draw(st.randoms(use_true_random=True)).random() < 0.07:  # now and then the header is broken, or marked
        head = draw(st.sampled_from([b"", b"\xff", b"user_id", b'"user_id', b"\xef\xbb\xbf" + head, b" \r"]))

    def cheap(r: random.Random) -> bytes:
        cols = header if r.random() < 0.85 else [s.USER_ID] * r.randrange(len(header) + 3)
        return d.join(_quote(r, _random_field(r, c)) for c in cols)

    drawn_line = st.tuples(*[_field(c) for c in header]).map(d.join)
    body = draw(_lines_file(drawn_line, cheap))
    opts: dict = {"delimiter": delimiter}
    if rename:
        opts["columns"] = tuple(sorted((c, f"src_{c}") for c in COLUMNS if c in header))
    return head + b"\n" + body, opts


def test_events_csv_files_never_raise() -> None:
    def make(h: Harness, file: tuple[bytes, dict], chunk_bytes: int) -> int:
        data, opts = file
        chunks = h.plan(h.write("events.csv", data), "events", chunk_bytes, **opts)
        if chunks is None:
            return 0
        expected = len(_nonblank_lines(data)) - 1  # the header (planned, so not blank) is no row
        assert h.read_and_stage(chunks) == expected
        return expected

    _fuzz(make, events_csv(), CHUNK_BYTES)


# --- events: JSONL ---------------------------------------------------------------------------------------------------

RAW_JSON_LINES = [b"[" * 100_000, b"{" * 50_000, b"1" * 5000, b'{"ts": ' + b"1" * 5000 + b"}", b"[1, 2]", b'"text"',
                  b"{broken", b"nul\x00l", b'{"user_id": "u1",}', b"NaN", b'{"a": ' * 3000 + b"1" + b"}" * 3000,
                  b"\xff{}", b'{"user_id": "\xed\xa0\x80", "item_id": "i1", "event": "view", "ts": 1767225000}',
                  b'{"user_id": "u1", "item_id": "i1", "event": "view", "ts": 1767225000, "price": 1e999}']
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(ANY_CHAR, max_size=6),
                        _pick(HOSTILE_TEXT), st.sampled_from([10**30, -(10**19), 2**63, -0.0]))
JSON_VALUE = st.recursive(JSON_SCALAR, lambda kids: st.lists(kids, max_size=3)
                          | st.dictionaries(st.text(max_size=3), kids, max_size=3), max_leaves=5)


def _random_json(r: random.Random, depth: int = 0) -> object:
    k = r.randrange(10)
    if k == 0 and depth < 3:
        return [_random_json(r, depth + 1) for _ in range(r.randrange(3))]
    if k == 1 and depth < 3:
        return {r.choice(["a", "ts", ""]): _random_json(r, depth + 1) for _ in range(r.randrange(3))}
    if k == 2:
        return r.choice([None, True, False, math.inf, -math.inf, math.nan, 10**40, -(2**63) - 1])
    if k == 3:
        return float(_random_number(r))
    if k == 4:
        return r.randrange(-(10 ** r.randrange(1, 40)), 10 ** r.randrange(1, 40))
    return _random_field(r, s.USER_ID).decode("utf-8", "surrogateescape")  # undecodable bytes: lone surrogates


def _json_object(values: dict, ascii_only: bool) -> bytes:
    return _encode(json.dumps(values, ensure_ascii=ascii_only))  # ensure_ascii=False: surrogates as raw bytes


@st.composite
def jsonl_line(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(_pick(RAW_JSON_LINES))
    obj: dict = {}
    for col in COLUMNS:
        choice = draw(st.integers(0, 4))
        if choice in (1, 2):
            obj[col] = draw(PLAUSIBLE[col])
        elif choice == 3:
            obj[col] = draw(JSON_VALUE)
    return _json_object(obj, draw(st.booleans()))


def _jsonl_line(r: random.Random) -> bytes:
    if r.random() < 0.1:
        return r.choice(RAW_JSON_LINES)
    obj: dict = {}
    for col in COLUMNS:
        k = r.randrange(6)
        if k in (1, 2, 3):
            value: object = _plausible(col, r)
            obj[col] = int(value) if col == s.TS and r.random() < 0.5 else value
        elif k == 4:
            obj[col] = _random_json(r)
    return _json_object(obj, r.random() < 0.5)


def test_events_jsonl_files_never_raise() -> None:
    def make(h: Harness, data: bytes, chunk_bytes: int) -> int:
        chunks = h.plan(h.write("events.jsonl", data), "events", chunk_bytes)
        assert chunks is not None
        expected = len(_nonblank_lines(data))
        assert h.read_and_stage(chunks) == expected
        return expected

    _fuzz(make, _lines_file(jsonl_line(), _jsonl_line), CHUNK_BYTES)


# --- events: Parquet -------------------------------------------------------------------------------------------------

def _invalid_utf8_strings(values: list[bytes | None]) -> pa.Array:
    """A string column whose bytes are not UTF-8: Parquet writers and readers let it through unchecked."""
    data = b"".join(v or b"" for v in values)
    offsets = np.cumsum([0] + [len(v or b"") for v in values]).astype(np.int32)
    valid = pa.array([v is not None for v in values]).buffers()[1]
    return pa.Array.from_buffers(pa.string(), len(values), [valid, pa.py_buffer(offsets), pa.py_buffer(data)])


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _random_column(r: random.Random, col: str, n: int) -> pa.Array:
    """A column of any type a Parquet file may hold, with nulls: most are no text, some not even scalars."""
    def values(make: Callable[[], object]) -> list:
        return [None if r.random() < 0.15 else make() for _ in range(n)]

    kind = r.randrange(13)
    if kind < 3:
        return pa.array(values(lambda: _text(_random_field(r, col))), pa.string())
    if kind == 3:
        return pa.array(values(lambda: _text(_random_field(r, col))), pa.string()).dictionary_encode()
    if kind == 4:
        return _invalid_utf8_strings(values(lambda: r.choice([*BAD_BYTES, _random_field(r, col)])))
    if kind == 5:
        return pa.array(values(lambda: r.randbytes(r.randrange(5))), pa.binary())
    if kind == 6:
        return pa.array(values(lambda: r.randrange(-(2**63), 2**63)), pa.int64())
    if kind == 7:
        return pa.array(values(lambda: float(_random_number(r))), pa.float64())
    if kind == 8:
        return pa.array(values(lambda: r.random() < 0.5), pa.bool_())
    if kind == 9:
        unit = r.choice(["ms", "us", "ns"])
        scale = {"ms": 1, "us": 1000, "ns": 1_000_000}[unit]
        return pa.array(values(lambda: r.randrange(-(2**63), 2**63) if r.random() < 0.3
                               else (NOW_MS - r.randrange(10**9)) * scale + r.randrange(scale)),
                        pa.timestamp(unit, tz=r.choice([None, "UTC"])))
    if kind == 10:
        return pa.array(values(lambda: [r.randrange(9) for _ in range(r.randrange(3))]), pa.list_(pa.int64()))
    if kind == 11:
        return pa.array(values(lambda: {"a": r.randrange(9)}), pa.struct([("a", pa.int64())]))
    return pa.array(values(lambda: r.randrange(-(10**6), 10**6)), pa.int32()).cast(pa.date32())


@st.composite
def events_parquet(draw: st.DrawFn) -> tuple[pa.Table, bool]:
    r = draw(st.randoms(use_true_random=True))
    n = draw(st.integers(LINES_PER_EXAMPLE - 20, LINES_PER_EXAMPLE + 20))
    with_key = draw(st.booleans())
    names, arrays = [], []
    for col in COLUMNS:
        if col == s.USER_ID and with_key:
            continue  # already pseudonymised rows (raw/live/) carry user_key instead
        if col not in COLUMNS[:4] and draw(st.booleans()):
            continue
        how = draw(st.integers(0, 2))
        if how == 0:  # what a real file holds
            arrays.append(pa.array([_plausible(col, r) for _ in range(n)], pa.string()))
        elif how == 1:  # drawn value by value
            arrays.append(pa.array(draw(st.lists(_field(col), min_size=n, max_size=n).map(
                lambda v: [_text(b) for b in v])), pa.string()))
        else:
            arrays.append(_random_column(r, col, n))
        names.append(col)
    if with_key:
        keys = [r.choice([pseudonymise(f"u{r.randrange(20)}", KEY), "k" * 32, "0" * 31, None,
                          _text(_random_field(r, s.USER_ID))]) for _ in range(n)]
        arrays.append(pa.array(keys, pa.string()) if draw(st.booleans()) else _random_column(r, s.USER_KEY, n))
        names.append(s.USER_KEY)
    if r.random() < 0.1:  # a duplicated column name
        names.append(names[0])
        arrays.append(arrays[0])
    return pa.Table.from_arrays(arrays, names=names), r.random() < 0.07


def test_events_parquet_files_never_raise() -> None:
    def make(h: Harness, file: tuple[pa.Table, bool]) -> int:
        table, corrupt_later = file
        path = h.write("events.parquet", table)
        chunks = h.plan(path, "events", 1 << 20)
        assert chunks is not None  # the required columns are always there
        if corrupt_later:  # damaged between planning and reading: one unreadable row stands for the file
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            assert h.read_and_stage(chunks) == 1
            return 1
        assert h.read_and_stage(chunks) == table.num_rows
        return table.num_rows

    _fuzz(make, events_parquet())


def test_a_file_that_is_not_parquet_is_refused_as_a_whole(tmp_path: Path) -> None:
    for i, data in enumerate([b"", b"PAR1", b"not parquet", b"PAR1" + b"\x00" * 100 + b"PAR1"]):
        path = tmp_path / f"bad{i}.parquet"
        path.write_bytes(data)
        with pytest.raises(SourceError):
            plan_chunks(FS, str(path), str(path), "events", 1 << 20)


# --- lightgcn and sequence ------------------------------------------------------------------------------------------

SEPARATORS = [b" ", b" ", b"\t", b"  ", b"\x0b", b"\x0c", _encode("\u3000"), _encode("\u00a0"), _encode("\x85"),
              b"\x1c", b","]


@st.composite
def list_line(draw: st.DrawFn) -> bytes:
    tokens = draw(st.lists(_field(s.ITEM_ID), min_size=1, max_size=8))
    out = tokens[0]
    for token in tokens[1:]:
        out += draw(_pick(SEPARATORS)) + token
    return out


def _list_line(r: random.Random) -> bytes:
    out = _random_field(r, s.USER_ID)
    for _ in range(r.randrange(9)):
        out += r.choice(SEPARATORS) + _random_field(r, s.ITEM_ID)
    return out


def _list_rows(data: bytes) -> int:
    """One row per item: every whitespace-separated token of a non-blank line but the first (the user); whitespace
    at either end of a line makes an empty token, as Python's re.split does."""
    return sum(len(re.split(r"\s+", line)) - 1 for line in _nonblank_lines(data))


def test_lightgcn_files_never_raise() -> None:
    def make(h: Harness, data: bytes, chunk_bytes: int, holdout: bool) -> int:
        chunks = h.plan(h.write("train.txt", data), "lightgcn", chunk_bytes, split="holdout" if holdout else "train")
        assert chunks is not None
        expected = _list_rows(data)
        assert h.read_and_stage(chunks) == expected
        return expected

    _fuzz(make, _lines_file(list_line(), _list_line), CHUNK_BYTES, st.booleans())


@st.composite
def attribute_file(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 14)) == 0:
        return draw(st.sampled_from([b"[1, 2]", b"{", b"[" * 100_000, b"\xff", b'{"a": ' + b"1" * 5000 + b"}"]))
    r = draw(st.randoms(use_true_random=True))
    attributes = {f"i{i}" if r.random() < 0.8 else _random_field(r, s.ITEM_ID).decode("utf-8", "surrogateescape"):
                  [_random_json(r) if r.random() < 0.3 else _plausible(s.CATEGORY_ID, r) for _ in range(r.randrange(4))]
                  if r.random() < 0.9 else _random_json(r) for i in range(r.randrange(60))}
    return _json_object(attributes, draw(st.booleans()))


def test_sequence_files_with_attributes_never_raise() -> None:
    def make(h: Harness, data: bytes, attrs: bytes, chunk_bytes: int) -> int:
        attr_path = h.write("attrs.json", attrs)
        try:
            attributes = load_attributes(FS, str(attr_path), str(attr_path))
        except SourceError:
            attributes = ()  # the attribute file as a whole is refused; the sequences are still read
        chunks = h.plan(h.write("seq.txt", data), "sequence", chunk_bytes, attributes=attributes,
                        default_event="view")
        assert chunks is not None
        expected = _list_rows(data)
        assert h.read_and_stage(chunks, tombstones=(pseudonymise("u1", KEY),)) == expected
        return expected

    _fuzz(make, _lines_file(list_line(), _list_line), attribute_file(), CHUNK_BYTES)


# --- the safety net of the stage step -------------------------------------------------------------------------------

def test_a_block_that_cannot_be_staged_is_rejected_as_unreadable(tmp_path: Path, monkeypatch) -> None:
    """Whatever a bug the rules did not foresee throws, the block's rows are accounted for, never a failed task."""
    import datasets.stage as stage_module

    path = tmp_path / "log.csv"
    path.write_text(f"u1,i1,c1,pv,{NOW_S - 60}\nu2,i2,c1,buy,{NOW_S - 60}\n")
    table = read_chunk(FS, plan_chunks(FS, str(path), str(path), "taobao", 1 << 20)[0])

    def broken(*args: object, **kwargs: object) -> None:
        raise RecursionError("something the rules did not foresee")

    monkeypatch.setattr(stage_module, "validate", broken)
    storage = Storage(str(tmp_path / "root"))
    stage = StageBlock(storage, "run", KEY, Rules(), SHARDS, NOW_MS, pa.array([], pa.string()))
    counts = stage(table).to_pylist()[0]
    assert counts["rows"] == counts["rejected"] == 2 and counts["accepted"] == 0
    assert json.loads(counts["by_reason"]) == {Reason.UNREADABLE: 2}
    rejects = storage.read_parquet(storage.list_files(TMP, "run", STAGED_REJECTS, suffix=".parquet"))
    assert rejects.column(s.LINE).to_pylist() == [1, 2]
    assert set(rejects.column(s.DETAIL).to_pylist()) == {"RecursionError: something the rules did not foresee"}
    assert rejects.column(s.USER_KEY).null_count == 2  # nothing of the row but where it came from reaches disk


def test_a_storage_error_while_staging_still_raises(tmp_path: Path, monkeypatch) -> None:
    """A full disk is no row's fault: the task fails (and Ray retries it) instead of rejecting good rows."""
    path = tmp_path / "log.csv"
    path.write_text(f"u1,i1,c1,pv,{NOW_S - 60}\n")
    table = read_chunk(FS, plan_chunks(FS, str(path), str(path), "taobao", 1 << 20)[0])
    storage = Storage(str(tmp_path / "root"))

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Storage, "write_parquet", full)
    with pytest.raises(OSError, match="No space"):
        StageBlock(storage, "run", KEY, Rules(), SHARDS, NOW_MS, pa.array([], pa.string()))(table)
