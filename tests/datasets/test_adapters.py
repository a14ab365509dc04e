"""Every adapter, without Ray: files cut into chunks on line starts, rows read with their true line numbers, and
lines that cannot be read marked for rejection rather than lost."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from datasets import schema as s
from datasets.adapters import SourceError, load_attributes, plan_chunks, read_chunk
from datasets.schema import Reason

FS = pafs.LocalFileSystem()


def _read(path: Path, fmt: str, chunk_bytes: int = 1 << 20, **opts) -> pa.Table:
    chunks = plan_chunks(FS, str(path), str(path), fmt, chunk_bytes, **opts)
    return pa.concat_tables([read_chunk(FS, c) for c in chunks]).sort_by(s.LINE)


def test_taobao_rows_keep_their_line_numbers_across_chunks(tmp_path: Path) -> None:
    lines = [f"{u},{100 + u},{u % 5},{'pv' if u % 2 else 'buy'},{1511544070 + u}" for u in range(200)]
    lines.insert(50, "not,a,line")
    lines.insert(120, "")  # a blank line is no row
    path = tmp_path / "tb.csv"
    path.write_text("\n".join(lines) + "\n")
    table = _read(path, "taobao", chunk_bytes=256)  # many small chunks
    assert len(plan_chunks(FS, str(path), str(path), "taobao", 256)) > 10
    assert table.num_rows == 201
    bad = table.filter(pa.compute.equal(table[s.REASON], Reason.BAD_LINE))
    assert bad[s.LINE].to_pylist() == [51] and bad[s.USER_ID].to_pylist() == ["not"]
    good = table.filter(pa.compute.is_null(table[s.REASON]))
    assert good[s.USER_ID].to_pylist()[:3] == ["0", "1", "2"]
    assert good.filter(pa.compute.equal(good[s.USER_ID], "199"))[s.LINE].to_pylist() == [202]
    assert good[s.CATEGORY_ID].to_pylist()[1] == "1" and good[s.EVENT].to_pylist()[:2] == ["buy", "pv"]


def test_events_csv_with_a_header_renamed_columns_quotes_and_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "ev.csv"
    body = "who,what,kind,when,cat\n"
    body += 'u1,i1,view,1700000000,"c,1"\n'
    body += "u2,i2,click,1700000001\n"  # a field short
    path.write_bytes(body.encode() + b"u3,i\xff3,view,1700000002,c2\n")
    columns = (("category_id", "cat"), ("event", "kind"), ("item_id", "what"), ("ts", "when"), ("user_id", "who"))
    table = _read(path, "events", columns=columns)
    assert table[s.LINE].to_pylist() == [2, 3, 4]
    assert table[s.CATEGORY_ID].to_pylist()[0] == "c,1"  # the quoted comma stays in the field
    assert table[s.REASON].to_pylist() == [None, Reason.BAD_LINE, Reason.INVALID_UTF8]


def test_events_csv_without_the_required_columns_is_refused_as_a_whole(tmp_path: Path) -> None:
    path = tmp_path / "headless.csv"
    path.write_text("who,what\n1,2\n")
    with pytest.raises(SourceError, match="user_id"):
        plan_chunks(FS, str(path), str(path), "events", 1 << 20)


def test_events_jsonl_reads_objects_and_marks_broken_lines(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    path.write_text(json.dumps({"user_id": "u1", "item_id": 7, "event": "fav", "ts": 1700000000}) + "\n"
                    + "[1, 2]\n{broken\n"
                    + json.dumps({"user_id": "u2", "item_id": "i2", "event": "cart", "ts": "2024-01-01T00:00:00Z"})
                    + "\n")
    table = _read(path, "events")
    assert table[s.REASON].to_pylist() == [None, Reason.BAD_LINE, Reason.BAD_LINE, None]
    assert table[s.ITEM_ID].to_pylist()[0] == "7"  # every field is a string until validation


def test_events_parquet_takes_timestamps_and_already_pseudonymised_rows(tmp_path: Path) -> None:
    path = tmp_path / "live.parquet"
    pq.write_table(pa.table({
        "user_key": ["k" * 32, "j" * 32], "item_id": ["i1", "i2"], "event": ["view", "purchase"],
        "ts": pa.array([1_700_000_000_000, 1_700_000_001_000], pa.timestamp("ms", tz="UTC")),
    }), path)
    table = _read(path, "events")
    assert table[s.USER_KEY].to_pylist() == ["k" * 32, "j" * 32] and table[s.USER_ID].null_count == 2
    assert table[s.TS].to_pylist() == ["1700000000000", "1700000001000"]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(SourceError, match="Parquet"):
        plan_chunks(FS, str(broken), str(broken), "events", 1 << 20)


def test_lightgcn_lists_become_one_row_per_item(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("0 10 11 12\n1 13\n\n2\n")
    table = _read(path, "lightgcn", default_event="purchase", split="holdout")
    assert table[s.USER_ID].to_pylist() == ["0", "0", "0", "1"]
    assert table[s.ITEM_ID].to_pylist() == ["10", "11", "12", "13"]
    assert table[s.LINE].to_pylist() == [1, 1, 1, 2] and set(table[s.SPLIT].to_pylist()) == {"holdout"}
    assert set(table[s.EVENT].to_pylist()) == {"purchase"}


def test_sequences_take_their_position_as_the_clock_and_attributes_as_category_and_brand(tmp_path: Path) -> None:
    path = tmp_path / "seq.txt"
    path.write_text("u1 a b c\nu2 c\n")
    attrs = tmp_path / "attrs.json"
    attrs.write_text(json.dumps({"a": ["cat-a", "brand-a"], "b": ["cat-b"], "c": []}))
    attributes = load_attributes(FS, str(attrs), str(attrs))
    table = _read(path, "sequence", attributes=attributes)
    ts = [int(t) for t in table[s.TS].to_pylist()]
    assert ts[1] - ts[0] == 1000 and ts[2] - ts[1] == 1000 and ts[3] == ts[0]
    assert table[s.CATEGORY_ID].to_pylist() == ["cat-a", "cat-b", None, None]
    assert table[s.BRAND_ID].to_pylist() == ["brand-a", None, None, None]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SourceError, match="must map item ids"):
        load_attributes(FS, str(bad), str(bad))
