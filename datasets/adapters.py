"""Source adapters: each turns one chunk of a behaviour-log file into raw rows (datasets.schema.RAW_SCHEMA).

Text files are cut into chunks at line boundaries by `plan_chunks`, which also counts lines so every row keeps
its true line number. Parsing is vectorised arrow compute over the chunk's lines; a chunk with quoted CSV fields
takes Python's csv module instead, since arrow's splitter does not know quotes.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from datasets import schema as s
from datasets.schema import Reason

ADAPTERS = ("taobao", "events", "lightgcn", "sequence")
TAOBAO_COLUMNS = (s.USER_ID, s.ITEM_ID, s.CATEGORY_ID, s.EVENT, s.TS)
# lightgcn and sequence data carry no clock: rows get this base time (plus their position, for sequences).
UNTIMED_BASE_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z
_PLAN_BLOCK = 16 << 20


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
    info = fs.get_file_info(fs_path)
    if info.type != pafs.FileType.File:
        raise SourceError(f"{display}: not a readable file")
    if kind == "parquet":
        try:
            names = tuple(pq.read_schema(fs_path, filesystem=fs).names)
        except (pa.ArrowInvalid, OSError) as err:
            raise SourceError(f"{display}: not a readable Parquet file ({err})") from None
        _check_columns(display, names, dict(opts.get("columns", ())))  # type: ignore[arg-type]
        return [Chunk(display, fs_path, fmt, kind, 0, info.size, 1, **opts)]  # type: ignore[arg-type]
    header: tuple[str, ...] = ()
    bounds = [(0, 1)]  # (byte offset, first line) of each chunk
    with fs.open_input_stream(fs_path) as f:
        pos, lines, target = 0, 0, chunk_bytes
        while True:
            block = f.read(_PLAN_BLOCK)
            if not block:
                break
            if pos == 0 and fmt == "events" and not _is_jsonl(fs_path):
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
    if header:
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
        names = next(csv.reader([first.decode("utf-8")], delimiter=delimiter))
    except (UnicodeDecodeError, StopIteration):
        raise SourceError(f"{display}: unreadable CSV header") from None
    return tuple(n.strip() for n in names)


def read_chunk(fs: pafs.FileSystem, chunk: Chunk) -> pa.Table:
    if chunk.kind == "parquet":
        return _read_parquet(fs, chunk)
    with fs.open_input_file(chunk.fs_path) as f:
        f.seek(chunk.offset)
        data = f.read(chunk.length)
    lines = _split_lines(data, chunk.first_line)
    if chunk.fmt == "events" and chunk.header and chunk.offset == 0:
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
               columns: dict[str, pa.Array]) -> pa.Table:
    null = pa.nulls(n, pa.string())
    data = {c: columns[c] if c in columns else null for c in (*s.CANONICAL_COLUMNS, s.USER_KEY)}
    data[s.SOURCE] = pa.array(np.full(n, chunk.path, dtype=object), pa.string())
    data[s.LINE] = pa.array(numbers, pa.int64())
    data[s.SPLIT] = pa.array(np.full(n, chunk.split, dtype=object), pa.string())
    data[s.REASON] = pa.array(reasons, pa.string()) if reasons is not None else null
    return pa.table(data, schema=s.RAW_SCHEMA)


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
    rows = list(csv.reader(io.StringIO("\n".join(lines.text.to_pylist())), delimiter=chunk.delimiter))
    good = np.array([len(r) == len(header) for r in rows], dtype=bool)
    ok_rows = [r for r, g in zip(rows, good, strict=True) if g]
    cols = {c: pa.array([r[header.index(src)] for r in ok_rows], pa.string())
            for c, src in source_of.items() if src in header}
    ok, bad = lines.filter(good), lines.filter(~good)
    tables = [_raw_table(len(ok), chunk, ok.numbers, _utf8_reasons(ok), cols)]
    if len(bad):
        tables.append(_bad_lines(bad, chunk, None))
    return pa.concat_tables(tables)


def _parse_jsonl(lines: _Lines, chunk: Chunk, source_of: dict[str, str]) -> pa.Table:
    values: dict[str, list[str | None]] = {c: [] for c in s.CANONICAL_COLUMNS}
    bad = np.zeros(len(lines), dtype=bool)
    for i, line in enumerate(lines.text.to_pylist()):
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError:
            bad[i] = True
            obj = {}
        for c in s.CANONICAL_COLUMNS:
            v = obj.get(source_of[c])
            values[c].append(None if v is None else str(v))
    reasons = np.where(lines.bad_utf8, Reason.INVALID_UTF8, np.where(bad, Reason.BAD_LINE, None)).astype(object)
    cols = {c: pa.array(v, pa.string()) for c, v in values.items()}
    return _raw_table(len(lines), chunk, lines.numbers, reasons, cols)


def _read_parquet(fs: pafs.FileSystem, chunk: Chunk) -> pa.Table:
    mapping = dict(chunk.columns)
    try:
        table = pq.read_table(chunk.fs_path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise SourceError(f"{chunk.path}: not a readable Parquet file ({err})") from None
    cols = {}
    for c in s.CANONICAL_COLUMNS:
        src = mapping.get(c, c)
        if src in table.column_names:
            col = table.column(src)
            if pa.types.is_timestamp(col.type):
                col = pc.cast(pc.cast(col, pa.timestamp("ms")), pa.int64())
            cols[c] = pc.cast(col, pa.string()).combine_chunks()
    if s.USER_KEY in table.column_names and s.USER_ID not in cols:  # already pseudonymised (raw/live/)
        cols[s.USER_KEY] = pc.cast(table.column(s.USER_KEY), pa.string()).combine_chunks()
    n = table.num_rows
    return _raw_table(n, chunk, np.arange(1, n + 1, dtype=np.int64), None, cols)


def _parse_lists(lines: _Lines, chunk: Chunk) -> pa.Table:
    """`user item item ...`: one row per item; sequence files take the position as the clock."""
    parts = pc.utf8_split_whitespace(lines.text)
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
    except (OSError, ValueError) as err:
        raise SourceError(f"{display}: unreadable item-attribute JSON ({err})") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{display}: item-attribute JSON must map item ids to lists")
    return tuple((str(k), tuple(str(a) for a in v)) for k, v in raw.items() if isinstance(v, list))
