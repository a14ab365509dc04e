"""Ingestion end to end on a real (session) Ray runtime, real files, real Parquet."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from datasets import schema as s
from datasets.ingest import Request, run_ingest
from datasets.pseudonym import pseudonymise
from datasets.schema import Reason
from datasets.synth import generate
from tests.helpers import make_config, read_dir

HEADER = "user_id,item_id,event,ts,category_id,brand_id,price,session_id\n"
KEY = b"test-pseudonym-key"


def _ingest(root: Path, source: Path | str, fmt: str = "events", **req) -> dict:
    cfg = make_config(root)
    return run_ingest(cfg, Request(source=str(source), fmt=fmt, holdout=req.get("holdout")))


def _identity(summary: dict) -> None:
    assert summary["input_rows"] == summary["accepted"] + summary["rejected"]["total"] + summary["duplicates"]


def test_bad_rows_each_land_in_rejects_with_their_reason(ray_session, tmp_path: Path) -> None:
    now_s = int(time.time())
    good = [f"good-user-{i},item-{i % 7},view,{now_s - 3600 - i},cat-1,brand-1,9.99,sess-{i}" for i in range(40)]
    bad = {
        Reason.BAD_LINE: "bad-user-1,item-1,view",
        Reason.MISSING_USER: f",item-1,view,{now_s},,,,",
        Reason.MISSING_ITEM: f"bad-user-2,,view,{now_s},,,,",
        Reason.MISSING_EVENT: f"bad-user-3,item-1,,{now_s},,,,",
        Reason.UNKNOWN_EVENT: f"bad-user-4,item-1,teleport,{now_s},,,,",
        Reason.BAD_TIMESTAMP: "bad-user-5,item-1,view,yesterday,,,,",
        Reason.TIMESTAMP_TOO_OLD: "bad-user-6,item-1,view,915148800,,,,",
        Reason.TIMESTAMP_IN_FUTURE: f"bad-user-7,item-1,view,{now_s + 3 * 86400},,,,",
        Reason.ID_TOO_LONG: f"bad-user-8,{'x' * 129},view,{now_s},,,,",
        Reason.BAD_PRICE: f"bad-user-9,item-1,view,{now_s},,,-5.0,",
    }
    lines = list(good)
    expected_line: dict[str, int] = {}
    for i, row in enumerate(bad.values()):
        lines.insert(3 + 4 * i, row)
    for reason, row in bad.items():
        expected_line[reason] = lines.index(row) + 2  # 1-based, after the header
    body = (HEADER + "\n".join(lines) + "\n").encode()
    # Not-a-number price and invalid UTF-8 as two more rows at the end.
    body += f"bad-user-10,item-1,view,{now_s},,,abc,\n".encode()
    body += b"bad-user-11,item-\xff\xfe,view," + str(now_s).encode() + b",,,,\n"
    log = tmp_path / "logs" / "mixed.csv"
    log.parent.mkdir()
    log.write_bytes(body)

    summary = _ingest(tmp_path / "root", log)

    _identity(summary)
    assert summary["accepted"] == len(good)
    assert summary["rejected"]["total"] == len(bad) + 2
    by_reason = summary["rejected"]["by_reason"]
    assert by_reason[Reason.BAD_PRICE] == 2
    assert by_reason[Reason.INVALID_UTF8] == 1
    rejects = read_dir(tmp_path / "root" / "rejects")
    assert rejects.schema.names == s.REJECT_SCHEMA.names
    rows = rejects.to_pylist()
    assert {r["source"] for r in rows} == {str(log.resolve())}
    got = {(r["reason"], r["line"]) for r in rows}
    for reason, line in expected_line.items():
        assert (reason, line) in got, reason
    n_lines = len(lines) + 1
    assert (Reason.BAD_PRICE, n_lines + 1) in got and (Reason.INVALID_UTF8, n_lines + 2) in got
    # Readable users are pseudonymised in rejects; the missing one stays null.
    by_line = {r["line"]: r for r in rows}
    assert by_line[expected_line[Reason.UNKNOWN_EVENT]]["user_key"] == pseudonymise("bad-user-4", KEY)
    assert by_line[expected_line[Reason.MISSING_USER]]["user_key"] is None
    accepted = read_dir(tmp_path / "root" / "interactions")
    assert accepted.num_rows == len(good)
    assert set(accepted.column("user_key").to_pylist()) == {pseudonymise(f"good-user-{i}", KEY) for i in range(40)}


def test_taobao_and_jsonl_adapters_reject_unparsable_lines(ray_session, tmp_path: Path) -> None:
    taobao = tmp_path / "tb.csv"
    taobao.write_text("1,100,7,pv,1511544070\n2,101,7,buy,1511544071\nnot a line\n3,102,8,fly,1511544072\n\n"
                      "4,103,8,cart,1511544073\n")
    summary = _ingest(tmp_path / "r1", taobao, fmt="taobao")
    _identity(summary)
    assert summary["accepted"] == 3 and summary["by_event"] == {"view": 1, "purchase": 1, "cart": 1}
    assert summary["rejected"]["by_reason"] == {Reason.BAD_LINE: 1, Reason.UNKNOWN_EVENT: 1}
    lines = {r["reason"]: r["line"] for r in read_dir(tmp_path / "r1" / "rejects").to_pylist()}
    assert lines == {Reason.BAD_LINE: 3, Reason.UNKNOWN_EVENT: 4}

    jsonl = tmp_path / "ev.jsonl"
    now_s = int(time.time())
    jsonl.write_text(json.dumps({"user_id": "u1", "item_id": "i1", "event": "click", "ts": now_s}) + "\n"
                     + "{broken json\n"
                     + json.dumps({"user_id": "u2", "item_id": "i2", "event": "fav", "ts": "2024-05-01T10:00:00Z"})
                     + "\n")
    summary = _ingest(tmp_path / "r2", jsonl)
    _identity(summary)
    assert summary["accepted"] == 2 and summary["rejected"]["by_reason"] == {Reason.BAD_LINE: 1}


@pytest.fixture(scope="module")
def synthetic_run(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("synth")
    logs = base / "logs"
    info = generate(logs, users=300, items=500, events=20_000, days=4, seed=7)
    root = base / "root"
    first = _ingest(root, logs / "*.csv")
    return {"base": base, "logs": logs, "root": root, "info": info, "first": first}


def _own_root(synthetic_run: dict, tmp_path: Path) -> Path:
    """A copy of the module's ingested root, for a test that adds to it (the logs stay shared, read-only)."""
    root = tmp_path / "root"
    shutil.copytree(synthetic_run["root"], root)
    return root


def test_synthetic_log_accounting_and_rerun_adds_nothing(synthetic_run: dict, tmp_path: Path) -> None:
    first = synthetic_run["first"]
    _identity(first)
    assert first["input_rows"] == synthetic_run["info"]["events"]
    assert first["rejected"]["total"] == 0
    root = _own_root(synthetic_run, tmp_path)
    again = _ingest(root, synthetic_run["logs"] / "*.csv")
    assert again["input_rows"] == 0 and again["accepted"] == 0 and again["skipped_files"] == first["files"]
    assert again["total_users"] == first["total_users"] and again["total_items"] == first["total_items"]
    assert read_dir(root / "interactions").num_rows == first["accepted"]


def test_no_raw_user_id_anywhere_under_root(synthetic_run: dict) -> None:
    raw_ids: set[str] = set()
    for f in synthetic_run["logs"].glob("events-*.csv"):
        raw_ids |= set(pacsv.read_csv(f).column("user_id").to_pylist())
    assert len(raw_ids) > 100
    root = synthetic_run["root"]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in files)
    for path in files:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            for name in table.column_names:
                col = table.column(name)
                if pa.types.is_string(col.type):
                    values = set(col.to_pylist())
                    assert not values & raw_ids, f"raw user id in {path}:{name}"
                    # Substrings too (a raw id embedded in a longer value), for a sample of ids.
                    assert not any(r in v for v in values if v for r in sorted(raw_ids)[:50]), path
        else:
            text = path.read_bytes().decode("utf-8", errors="replace")
            assert not any(r in text for r in raw_ids), f"raw user id in {path}"


def test_shards_partition_users_and_graph_aggregates_pairs(synthetic_run: dict) -> None:
    root = synthetic_run["root"]
    owner: dict[str, str] = {}
    for shard_dir in (root / "interactions").iterdir():
        for key in set(read_dir(shard_dir).column("user_key").to_pylist()):
            assert owner.setdefault(key, shard_dir.name) == shard_dir.name
    assert len({v for v in owner.values()}) == 4
    edges = read_dir(root / "graph" / "user_item")
    inter = read_dir(root / "interactions")
    assert pc.sum(edges.column("count")).as_py() == inter.num_rows
    pairs = inter.group_by(["user_key", "item_id"]).aggregate([])
    assert edges.num_rows == pairs.num_rows
    users = read_dir(root / "idmaps" / "user")
    assert pc.max(edges.column("user_idx")).as_py() < users.num_rows
    assert pc.min(edges.column("weight")).as_py() > 0
    item_cat = pq.read_table(root / "graph" / "item_category.parquet")
    assert item_cat.num_rows >= read_dir(root / "idmaps" / "item").num_rows * 0.9


def test_new_file_adds_exactly_its_rows_and_keeps_old_indices(synthetic_run: dict, tmp_path: Path) -> None:
    root = _own_root(synthetic_run, tmp_path)
    before = {n: dict(zip(*read_dir(root / "idmaps" / n).select(["key", "idx"]).to_pydict().values(), strict=True))
              for n in ("user", "item")}
    rows_before = read_dir(root / "interactions").num_rows
    now_s = int(time.time())
    extra = tmp_path / "later" / "extra.csv"
    extra.parent.mkdir()
    new_rows = [f"shopper-newcomer{i:04d},item-new-{i % 3},purchase,{now_s - 60 - i},cat-new,brand-new,5,s" for i in
                range(25)]
    old_user = pacsv.read_csv(next(synthetic_run["logs"].glob("events-*.csv"))).column("user_id")[0].as_py()
    new_rows.append(f"{old_user},item-new-0,cart,{now_s - 30},cat-new,brand-new,5,s")
    new_rows.append(new_rows[0])  # an exact duplicate
    extra.write_text(HEADER + "\n".join(new_rows) + "\n")
    summary = _ingest(root, extra)
    _identity(summary)
    assert summary["files"] == 1 and summary["input_rows"] == 27
    assert summary["accepted"] == 26 and summary["duplicates"] == 1
    assert summary["new_users"] == 25 and summary["new_items"] == 3
    assert read_dir(root / "interactions").num_rows == rows_before + 26
    for n in ("user", "item"):
        after = dict(zip(*read_dir(root / "idmaps" / n).select(["key", "idx"]).to_pydict().values(), strict=True))
        assert all(after[k] == v for k, v in before[n].items())
        assert sorted(after.values()) == list(range(len(after)))


def test_gone_run_leaves_nothing_counted(synthetic_run: dict, tmp_path: Path) -> None:
    """Files of a run that died before committing are removed by the next run, not counted."""
    root = _own_root(synthetic_run, tmp_path)
    shard = next((root / "interactions").iterdir())
    stray = shard / "part-r20990101T000000-deadbeef.parquet"
    pq.write_table(read_dir(shard).slice(0, 5), stray)
    summary = _ingest(root, synthetic_run["logs"] / "*.csv")
    assert not stray.exists() and summary["accepted"] == 0
    counts = Counter(read_dir(root / "interactions").column("event").to_pylist())
    assert sum(counts.values()) == sum(pq.read_table(f).num_rows for f in (root / "interactions").rglob("*.parquet"))
