"""Source adapters: each turns one chunk of a behaviour-log file into raw rows (datasets.schema.RAW_SCHEMA).

Text files are cut into chunks at line boundaries by `plan_chunks`, which also counts lines so every row keeps
its true line number. Parsing is vectorised arrow compute over the chunk's lines; a chunk with quoted CSV fields
takes Python's csv module instead, since arrow's splitter does not know quotes.

Nothing in a file's bytes makes `read_chunk` raise: a line that cannot be parsed is a row with a reason code, and a
chunk that cannot be parsed at all is rows with reason `unreadable` (detail: the error). Only storage errors
(OSError opening or reading the file) and problems with a whole file found while planning (`SourceError`) raise.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from datasets import schema as s
from datasets.schema import Reason
from datasets.validate import REASON_RANK, json_field

log = logging.getLogger(__name__)

ADAPTERS = ("taobao", "events", "lightgcn", "sequence")
TAOBAO_COLUMNS = (s.USER_ID, s.ITEM_ID, s.CATEGORY_ID, s.EVENT, s.TS)
# lightgcn and sequence data carry no clock: rows get this base time (plus their position, for sequences).
UNTIMED_BASE_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z
_PLAN_BLOCK = 16 << 20
# Runs of Unicode whitespace, as `str.isspace` (and arrow's utf8_trim_whitespace) define it.
_WHITESPACE_RUN = r"[\t-\r\x{1c}-\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]+"


class SourceError(ValueError):
    """An input that cannot be read at all (as opposed to a bad row, which is rejected)."""


@dataclass(frozen=True)
class Chunk:
    path: str  # as recorded in rejects and state: absolute local path or s3://bucket/key
    fs_path: str  # path inside the filesystem
    fmt: str  # adapter name
    kind: str  # text | parquet
    offset: int
    length: int
    first_line: int  # 1-based line number of the chunk's first line
    split: str = "train"
    header: tuple[str, ...] = ()
    columns: tuple[tuple[str, str], ...] = ()  # canonical -> source column (events)
    delimiter: str = ","
    default_event: str = "purchase"
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), repr=False)


def file_kind(path: str, fmt: str) -> str:
    if fmt == "events" and path.endswith(".parquet"):
        return "parquet"
    return "text"


def _is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json", ".ndjson"))


def plan_chunks(fs: pafs.FileSystem, fs_path: str, display: str, fmt: str, chunk_bytes: int, **opts: object
                ) -> list[Chunk]:
    """Cut one file into chunks that start on line starts, counting lines on the way (one sequential read)."""
    kind = file_kind(fs_path, fmt)
    if not _encodable(fs_path):  # undecodable bytes in a local file name: pyarrow cannot even open it
        raise SourceError(f"{_safe_text(display)}: the file name is not valid UTF-8")
    info = fs.get_file_info(fs_path)
    if info.type != pafs.FileType.File:
        raise SourceError(f"{display}: not a readable file")
    if kind == "parquet":
        try:
            names = tuple(pq.read_schema(fs_path, filesystem=fs).names)
        except (pa.ArrowException, OSError) as err:
            raise SourceError(f"{display}: not a readable Parquet file ({_one_line(err)})") from None
        _check_columns(display, names, dict(opts.get("columns", ())))  # type: ignore[arg-type]
        return [Chunk(display, fs_path, fmt, kind, 0, info.size, 1, **opts)]  # type: ignore[arg-type]
    header: tuple[str, ...] = ()
    has_header = fmt == "events" and not _is_jsonl(fs_path)
    bounds = [(0, 1)]  # (byte offset, first line) of each chunk
    with fs.open_input_stream(fs_path) as f:
        pos, lines, target = 0, 0, chunk_bytes
        while True:
            block = f.read(_PLAN_BLOCK)
            if not block:
                break
            if pos == 0 and has_header:
                header = _csv_header(block, display, str(opts.get("delimiter", ",")))
            start = 0
            while pos + len(block) > target:
                cut = block.find(b"\n", max(start, target - pos))
                if cut < 0:
                    break
                lines += block.count(b"\n", start, cut + 1)
                start = cut + 1
                if pos + start < info.size:
                    bounds.append((pos + start, lines + 1))
                target = pos + start + chunk_bytes
            lines += block.count(b"\n", start)
            pos += len(block)
    if has_header and info.size:  # an empty header line names no column: the file is refused as a whole
        _check_columns(display, header, dict(opts.get("columns", ())))  # type: ignore[arg-type]
    offsets = [b[0] for b in bounds] + [info.size]
    return [
        Chunk(display, fs_path, fmt, kind, off, offsets[i + 1] - off, first, header=header, **opts)  # type: ignore[arg-type]
        for i, (off, first) in enumerate(bounds)
    ]


def _check_columns(display: str, names: tuple[str, ...], mapping: dict[str, str]) -> None:
    required = (s.USER_ID, s.ITEM_ID, s.EVENT, s.TS)
    missing = [mapping.get(c, c) for c in required if mapping.get(c, c) not in names
               and not (c == s.USER_ID and s.USER_KEY in names)]  # already pseudonymised (raw/live/)
    if missing:
        raise SourceError(f"{display}: no column(s) {missing} in the header (see data.source.columns)")


def _csv_header(block: bytes, display: str, delimiter: str) -> tuple[str, ...]:
    first = block.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        # utf-8-sig: a byte-order mark would otherwise become part of the first column's name.
        names = next(csv.reader([first.decode("utf-8-sig")], delimiter=delimiter))
    except (UnicodeDecodeError, StopIteration, csv.Error):
        raise SourceError(f"{display}: unreadable CSV header") from None
    return tuple(n.strip() for n in names)


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _safe_text(value: str) -> str:
    # A local path from os.walk keeps undecodable bytes as lone surrogates, which arrow cannot store.
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def read_chunk(fs: pafs.FileSystem, chunk: Chunk) -> pa.Table:
    """The chunk's raw rows (RAW_SCHEMA, plus a `detail` column when a reader has one to give)."""
    with fs.open_input_file(chunk.fs_path) as f:  # storage errors raise: they are no row's fault
        if chunk.kind == "parquet":
            data = f.read()
        else:
            f.seek(chunk.offset)
            data = f.read(chunk.length)
    try:
        return _parse_chunk(data, chunk)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - the last safety net: content never fails a read task
        log.warning("%s: chunk at line %d could not be parsed; its rows are rejected as unreadable: %s",
                    chunk.path, chunk.first_line, _one_line(err))
        return _unreadable(data, chunk, _one_line(err))


def _unreadable(data: bytes, chunk: Chunk, why: str) -> pa.Table:
    """Every non-blank line of a text chunk (its header aside), or a Parquet file as one row (line 0), rejected as
    unreadable."""
    if chunk.kind == "parquet":
        numbers = np.zeros(1, dtype=np.int64)
    else:
        try:
            numbers = _split_lines(data, chunk.first_line).numbers
        except Exception:  # noqa: BLE001 - not even lines: one row stands for the chunk
            numbers = np.array([chunk.first_line], dtype=np.int64)
        if _has_header_line(chunk):
            numbers = numbers[numbers != chunk.first_line]
    n = len(numbers)
    return _raw_table(n, chunk, numbers, np.full(n, Reason.UNREADABLE, dtype=object), {},
                      np.full(n, why, dtype=object))


def _has_header_line(chunk: Chunk) -> bool:
    return chunk.fmt == "events" and bool(chunk.header) and chunk.offset == 0


def _parse_chunk(data: bytes, chunk: Chunk) -> pa.Table:
    if chunk.kind == "parquet":
        return _read_parquet(data, chunk)
    lines = _split_lines(data, chunk.first_line)
    if _has_header_line(chunk):
        lines = lines.filter(lines.numbers != chunk.first_line)  # the header line is not a row
    if chunk.fmt == "taobao":
        return _delimited(lines, chunk, TAOBAO_COLUMNS, ",")
    if chunk.fmt == "events":
        return _parse_events(lines, chunk)
    return _parse_lists(lines, chunk)


@dataclass
class _Lines:
    text: pa.Array  # non-blank lines
    numbers: np.ndarray  # their 1-based line numbers
    bad_utf8: np.ndarray  # which were not valid UTF-8 (decoded with replacement characters)

    def filter(self, keep: np.ndarray) -> _Lines:
        return _Lines(self.text.filter(pa.array(keep)), self.numbers[keep], self.bad_utf8[keep])

    def __len__(self) -> int:
        return len(self.text)


def _split_lines(data: bytes, first_line: int) -> _Lines:
    buf = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate(([0], nl + 1)).astype(np.int64)
    ends = np.concatenate((nl, [len(buf)])).astype(np.int64)
    if b"\r" in data:
        ends = ends - ((ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13))
    numbers = np.arange(first_line, first_line + len(starts), dtype=np.int64)
    keep = ends > starts
    starts, ends, numbers = starts[keep], ends[keep], numbers[keep]
    # One binary array over the chunk whose even elements are the lines: no per-line Python objects.
    offsets = np.empty(2 * len(starts), dtype=np.int64)
    offsets[0::2], offsets[1::2] = starts, ends
    spans = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), max(len(offsets) - 1, 0), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    lines = spans.take(pa.array(np.arange(0, len(offsets) - 1, 2)))
    bad_utf8 = np.zeros(len(lines), dtype=bool)
    try:
        text = lines.cast(pa.large_string())
    except pa.ArrowInvalid:
        decoded = []
        for i, raw in enumerate(lines.to_pylist()):
            try:
                decoded.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                bad_utf8[i] = True
                decoded.append(raw.decode("utf-8", errors="replace"))
        text = pa.array(decoded, pa.large_string())
    out = _Lines(text.cast(pa.string()), numbers, bad_utf8)
    blank = _mask(pc.equal(pc.utf8_trim_whitespace(out.text), ""))
    return out.filter(~blank) if blank.any() else out


def _mask(arr: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _raw_table(n: int, chunk: Chunk, numbers: np.ndarray, reasons: np.ndarray | None,
               columns: dict[str, pa.Array], details: np.ndarray | None = None) -> pa.Table:
    null = pa.nulls(n, pa.string())
    data = {c: columns[c] if c in columns else null for c in (*s.CANONICAL_COLUMNS, s.USER_KEY)}
    data[s.SOURCE] = pa.array(np.full(n, _safe_text(chunk.path), dtype=object), pa.string())
    data[s.LINE] = pa.array(numbers, pa.int64())
    data[s.SPLIT] = pa.array(np.full(n, chunk.split, dtype=object), pa.string())
    data[s.REASON] = pa.array(reasons, pa.string()) if reasons is not None else null
    table = pa.table(data, schema=s.RAW_SCHEMA)
    if details is not None:  # rare: validation reads it as the detail of the reader's reason
        table = table.append_column(s.DETAIL, pa.array(details, pa.string()))
    return table


def _utf8_reasons(lines: _Lines) -> np.ndarray | None:
    if not lines.bad_utf8.any():
        return None
    return np.where(lines.bad_utf8, Reason.INVALID_UTF8, None).astype(object)


def _bad_lines(lines: _Lines, chunk: Chunk, first_field: pa.Array | None) -> pa.Table:
    """Lines with the wrong number of fields: rejected whole, keeping field 0 so the user can be pseudonymised."""
    reasons = np.where(lines.bad_utf8, Reason.INVALID_UTF8, Reason.BAD_LINE).astype(object)
    cols = {s.USER_ID: first_field} if first_field is not None else {}
    return _raw_table(len(lines), chunk, lines.numbers, reasons, cols)


def _delimited(lines: _Lines, chunk: Chunk, names: tuple[str, ...] | list[str], delimiter: str,
               source_of: dict[str, str] | None = None) -> pa.Table:
    parts = pc.split_pattern(lines.text, delimiter)
    good = pc.list_value_length(parts).to_numpy() == len(names)
    ok, bad = lines.filter(good), lines.filter(~good)
    ok_parts = parts.filter(pa.array(good))
    by_name = {name: pc.list_element(ok_parts, i) for i, name in enumerate(names)}
    source_of = source_of or {c: c for c in names}
    cols = {c: by_name[src] for c, src in source_of.items() if src in by_name}
    first_field = pc.list_element(parts.filter(pa.array(~good)), 0)
    user_pos = list(names).index(source_of[s.USER_ID]) if source_of.get(s.USER_ID) in names else -1
    tables = [_raw_table(len(ok), chunk, ok.numbers, _utf8_reasons(ok), cols)]
    if len(bad):
        tables.append(_bad_lines(bad, chunk, first_field if user_pos == 0 else None))
    return pa.concat_tables(tables)


def _parse_events(lines: _Lines, chunk: Chunk) -> pa.Table:
    mapping = dict(chunk.columns)
    source_of = {c: mapping.get(c, c) for c in s.CANONICAL_COLUMNS}
    if _is_jsonl(chunk.path):
        return _parse_jsonl(lines, chunk, source_of)
    header = list(chunk.header)
    quoted = len(lines) and pc.any(pc.match_substring(lines.text, '"')).as_py()
    if not quoted:
        return _delimited(lines, chunk, header, chunk.delimiter, source_of)
    rows = _csv_records(lines.text.to_pylist(), chunk.delimiter)
    good = np.array([r is not None and len(r) == len(header) for r in rows], dtype=bool)
    ok_rows = [r for r, g in zip(rows, good, strict=True) if g]
    position = {name: header.index(name) for name in header}
    cols = {c: pa.array([r[position[src]] for r in ok_rows], pa.string())  # type: ignore[index]
            for c, src in source_of.items() if src in position}
    ok, bad = lines.filter(good), lines.filter(~good)
    tables = [_raw_table(len(ok), chunk, ok.numbers, _utf8_reasons(ok), cols)]
    if len(bad):
        tables.append(_bad_lines(bad, chunk, None))
    return pa.concat_tables(tables)


def _csv_records(texts: list[str], delimiter: str) -> list[list[str] | None]:
    """One CSV record per line; None for a line that is not one record on its own.

    Lines were cut at every newline, so a quote left open must not swallow the lines after it: one reader over the
    chunk is the fast path, and if any record spans lines or the reader refuses something (a carriage return in an
    unquoted field, a field past csv's size limit, text after a closing quote) every line is read on its own.
    """
    reader = csv.reader(texts, delimiter=delimiter, strict=True)
    rows: list[list[str] | None] = []
    try:
        for row in reader:
            rows.append(row)
            if reader.line_num != len(rows):
                break
        else:
            if len(rows) == len(texts):
                return rows
    except csv.Error:
        pass
    return [_csv_record(text, delimiter) for text in texts]


def _csv_record(text: str, delimiter: str) -> list[str] | None:
    try:
        rows = list(csv.reader([text], delimiter=delimiter, strict=True))
    except csv.Error:
        return None
    return rows[0] if len(rows) == 1 else None


def _parse_jsonl(lines: _Lines, chunk: Chunk, source_of: dict[str, str]) -> pa.Table:
    n = len(lines)
    fields = [(c, source_of[c]) for c in s.CANONICAL_COLUMNS]
    values: dict[str, list[str | None]] = {c: [None] * n for c in s.CANONICAL_COLUMNS}
    reason: list[str | None] = [None] * n
    detail: list[str | None] = [None] * n
    for i, line in enumerate(lines.text.to_pylist()):
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as err:  # ints past Python's digit limit, nesting past its stack too
            reason[i], detail[i] = Reason.BAD_LINE, f"not JSON: {_one_line(err, 200)}"
            continue
        if not isinstance(obj, dict):
            reason[i], detail[i] = Reason.BAD_LINE, "not a JSON object"
            continue
        for c, src in fields:
            v = obj.get(src)
            if v is None:
                continue
            if type(v) is str and v.isascii():  # the common case, without a call
                values[c][i] = v
                continue
            text, problem, why = json_field(c, v)
            values[c][i] = text
            if problem is not None and (reason[i] is None or REASON_RANK[problem] < REASON_RANK[reason[i]]):
                reason[i], detail[i] = problem, why
    reasons = np.array(reason, dtype=object)
    details = np.array(detail, dtype=object)
    # Undecodable bytes come first: whatever else the line says was read through replacement characters.
    reasons[lines.bad_utf8], details[lines.bad_utf8] = Reason.INVALID_UTF8, None
    cols = {c: pa.array(v, pa.string()) for c, v in values.items()}
    return _raw_table(n, chunk, lines.numbers, reasons, cols, details if any(d is not None for d in details) else None)


def _read_parquet(data: bytes, chunk: Chunk) -> pa.Table:
    """Every column as text, whatever its Parquet type: values that cannot be text give their row a reason."""
    table = pq.ParquetFile(pa.BufferReader(data)).read()  # not read_table: its dataset layer refuses duplicate names
    n = table.num_rows
    mapping = dict(chunk.columns)
    wanted = [(c, mapping.get(c, c)) for c in s.CANONICAL_COLUMNS]
    if s.USER_KEY in table.column_names and mapping.get(s.USER_ID, s.USER_ID) not in table.column_names:
        wanted.append((s.USER_KEY, s.USER_KEY))  # already pseudonymised (raw/live/)
    reasons = np.full(n, None, dtype=object)
    details = np.full(n, None, dtype=object)
    rank = np.full(n, len(REASON_RANK), dtype=np.int64)
    cols = {}
    for c, src in wanted:
        found = table.schema.get_all_field_indices(src)
        if not found:
            continue
        cols[c], problems = _as_text(table.column(found[0]), c, src)  # a duplicated name: its first column
        for mask, problem, why in problems:
            hit = mask & (rank > REASON_RANK[problem])
            reasons[hit], details[hit], rank[hit] = problem, why, REASON_RANK[problem]
    given = rank < len(REASON_RANK)
    return _raw_table(n, chunk, np.arange(1, n + 1, dtype=np.int64), reasons if given.any() else None, cols,
                      details if given.any() else None)


_Problems = list[tuple[np.ndarray, str, str]]  # (rows, reason, detail)


def _as_text(col: pa.ChunkedArray, field_: str, src: str) -> tuple[pa.Array, _Problems]:
    arr = col.combine_chunks()
    while isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    if pa.types.is_timestamp(t):
        return _timestamp_ms_text(arr), []
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        try:
            arr.validate(full=True)  # a Parquet reader takes string columns on trust: check the UTF-8 once
            return pc.cast(arr, pa.string()), []
        except pa.ArrowInvalid:
            return _decode_each(arr, src)
    if (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
            or pa.types.is_fixed_size_binary(t)):
        try:
            return pc.cast(arr, pa.string()), []  # validates the UTF-8
        except pa.ArrowInvalid:
            return _decode_each(arr, src)
    if pa.types.is_floating(t):
        text = pc.cast(arr, pa.string())
        bad = _mask(pc.and_(pc.is_valid(arr), pc.invert(pc.is_finite(arr))))
        if not bad.any():
            return text, []
        text = pc.if_else(pa.array(bad), pa.scalar(None, pa.string()), text)
        return text, [(bad, _NOT_FINITE.get(field_, Reason.BAD_LINE), f"column {src}: not a finite number")]
    # Booleans, lists, structs, maps, unions, intervals: no id, event, time or price can be one (as in JSON).
    if not pa.types.is_boolean(t) and not pa.types.is_nested(t):
        try:
            return pc.cast(arr, pa.string()), []  # integers, decimals, dates, times, nulls
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
    try:
        given = _mask(pc.is_valid(arr))
    except pa.ArrowException:
        given = np.ones(len(arr), dtype=bool)
    return pa.nulls(len(arr), pa.string()), [(given, Reason.BAD_LINE, f"column {src}: {t} values are not text")]


_NOT_FINITE = {s.TS: Reason.BAD_TIMESTAMP, s.PRICE: Reason.BAD_PRICE}


def _decode_each(arr: pa.Array, src: str) -> tuple[pa.Array, _Problems]:
    """Values with invalid UTF-8, one by one (only columns that have some): kept with replacement characters, as
    text lines are, and their rows rejected as invalid_utf8."""
    raw = pc.cast(arr, pa.large_binary()).to_pylist()
    bad = np.zeros(len(raw), dtype=bool)
    out: list[str | None] = []
    for i, v in enumerate(raw):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError:
            bad[i] = True
            out.append(v.decode("utf-8", errors="replace"))
    return pa.array(out, pa.string()), [(bad, Reason.INVALID_UTF8, f"column {src}: not valid UTF-8")]


def _timestamp_ms_text(arr: pa.Array) -> pa.Array:
    """Milliseconds since the epoch as integer text, from a timestamp of any unit."""
    unit = arr.type.unit
    ints = arr.cast(pa.int64())
    if unit == "s":
        try:
            ints = pc.multiply_checked(ints, 1000)
        except pa.ArrowInvalid:  # past int64 as milliseconds: Python's ints write it, validation refuses it
            return pa.array([None if v is None else str(v * 1000) for v in ints.to_pylist()], pa.string())
    elif unit != "ms":  # finer units only lose digits (never overflow) on the way to milliseconds
        ints = pc.cast(arr, pa.timestamp("ms", tz=arr.type.tz), safe=False).cast(pa.int64())
    return pc.cast(ints, pa.string())


def split_whitespace(text: pa.Array) -> pa.Array:
    """Each string's tokens between runs of whitespace, as Python's `re.split(r"\\s+", s)`: whitespace at either end
    gives an empty token. Not arrow's `utf8_split_whitespace`, which splits the same way on most calls but not on
    all: in pyarrow 26, on one and the same array, the last string's trailing whitespace was now a token boundary
    and now part of its last token (a line of a fuzzed lightgcn file read as 6 rows or 7 from one call to the
    next)."""
    return pc.split_pattern_regex(text, _WHITESPACE_RUN)


def _parse_lists(lines: _Lines, chunk: Chunk) -> pa.Table:
    """`user item item ...`: one row per item; sequence files take the position as the clock."""
    parts = split_whitespace(lines.text)
    items = pc.list_slice(parts, 1)
    counts = pc.list_value_length(items).to_numpy().astype(np.int64)
    parent = np.repeat(np.arange(len(counts)), counts)
    item = pc.list_flatten(items)
    n = len(item)
    position = np.arange(n, dtype=np.int64) - (np.cumsum(counts) - counts)[parent]
    if chunk.fmt == "sequence":
        ts = UNTIMED_BASE_MS + position * 1000
    else:
        ts = np.full(n, UNTIMED_BASE_MS, dtype=np.int64)
    take = pa.array(parent)
    cols: dict[str, pa.Array] = {
        s.USER_ID: pc.take(pc.list_element(parts, 0), take),
        s.ITEM_ID: item,
        s.EVENT: pa.array(np.full(n, chunk.default_event, dtype=object), pa.string()),
        s.TS: pc.cast(pa.array(ts), pa.string()),
    }
    if chunk.attributes:
        keys = pa.array([k for k, _ in chunk.attributes], pa.string())
        first = pa.array([v[0] if v else None for _, v in chunk.attributes], pa.string())
        last = pa.array([v[-1] if len(v) > 1 else None for _, v in chunk.attributes], pa.string())
        pos = pc.index_in(item, value_set=keys)
        cols[s.CATEGORY_ID] = pc.take(first, pos)
        cols[s.BRAND_ID] = pc.take(last, pos)
    reasons = None
    if lines.bad_utf8.any():
        reasons = np.where(lines.bad_utf8[parent], Reason.INVALID_UTF8, None).astype(object)
    return _raw_table(n, chunk, lines.numbers[parent], reasons, cols)


def load_attributes(fs: pafs.FileSystem, fs_path: str, display: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Item-attribute JSON {item: [attr, ...]}: the first attribute is the category, the last the brand."""
    try:
        with fs.open_input_stream(fs_path) as f:
            raw = json.loads(f.read())
    except (OSError, ValueError, RecursionError) as err:
        raise SourceError(f"{display}: unreadable item-attribute JSON ({_one_line(err)})") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{display}: item-attribute JSON must map item ids to lists")
    out, dropped = [], 0
    for k, v in raw.items():
        if not isinstance(v, list):
            continue
        entry = (str(k), tuple(str(a) for a in v))
        # json.loads keeps "\ud800" (and such bytes) as lone surrogates, which no arrow string can hold.
        if all(_encodable(x) for x in (entry[0], *entry[1])):
            out.append(entry)
        else:
            dropped += 1
    if dropped:
        log.warning("%s: %d item(s) left without attributes: their ids or attributes are not valid UTF-8",
                    display, dropped)
    return tuple(out)


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
