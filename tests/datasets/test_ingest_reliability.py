"""Ingestion that nothing stalls and nothing races: concurrent runs on one root, files no adapter can read, clocks
that run ahead."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datasets.ingest import Request, run_ingest
from datasets.schema import Reason
from tests.helpers import make_config, read_dir

HEADER = "user_id,item_id,event,ts,category_id,brand_id,price,session_id\n"


def _log(path: Path, tag: str, rows: int, ts_s: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + "".join(f"{tag}-user-{i % 37},{tag}-item-{i % 53},view,{ts_s - i},c{i % 5},,,\n"
                                     for i in range(rows)))
    return path


def test_two_ingestions_at_once_lose_nothing_and_count_every_row_once(ray_session, tmp_path: Path) -> None:
    root = tmp_path / "root"
    now_s = int(time.time()) - 600
    sources = [_log(tmp_path / f"logs-{k}" / "events.csv", f"s{k}", 3000, now_s) for k in range(2)]
    cfg = make_config(root, data={"writer_wait_s": 300})
    results: list[dict] = []
    errors: list[BaseException] = []

    def ingest(source: Path) -> None:
        try:
            results.append(run_ingest(cfg, Request(source=str(source), fmt="events", holdout=None)))
        except BaseException as err:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=ingest, args=(src,)) for src in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert len(results) == 2 and all(r["input_rows"] == 3000 for r in results)
    for r in results:
        assert r["input_rows"] == r["accepted"] + r["rejected"]["total"] + r["duplicates"]
    stored = read_dir(root / "interactions")
    assert stored.num_rows == sum(r["accepted"] for r in results) == 6000  # every row once: no two alike
    items = set(stored.column("item_id").to_pylist())
    assert {f"s0-item-{i}" for i in range(53)} | {f"s1-item-{i}" for i in range(53)} == items


def test_a_file_no_adapter_can_read_is_quarantined_not_fatal(ray_session, tmp_path: Path) -> None:
    root = tmp_path / "root"
    good = _log(tmp_path / "logs" / "good.csv", "g", 200, int(time.time()) - 600)
    broken = root / "raw" / "dropped.parquet"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"PAR1 this is not parquet at all")
    cfg = make_config(root)
    first = run_ingest(cfg, Request(source=str(good), fmt="events", holdout=None))
    assert first["accepted"] == 200 and first["files"] == 1
    assert [u["file"] for u in first["unreadable_files"]] == [str(broken)]
    assert "Parquet" in first["unreadable_files"][0]["reason"]
    again = run_ingest(cfg, Request(source=str(good), fmt="events", holdout=None))
    assert again["unreadable_files"] == [] and again["input_rows"] == 0  # not retried while unchanged
    pq.write_table(pa.table({"user_id": ["fixed-user"], "item_id": ["i1"], "event": ["view"],
                                     "ts": [int(time.time() * 1000) - 60_000]}), broken)
    fixed = run_ingest(cfg, Request(source=str(good), fmt="events", holdout=None))
    assert fixed["unreadable_files"] == [] and fixed["accepted"] == 1  # changed: tried again, and read


def test_a_clock_running_ahead_is_refused_not_learned(ray_session, tmp_path: Path) -> None:
    now_s = int(time.time())
    path = tmp_path / "logs" / "ahead.csv"
    path.parent.mkdir()
    rows = [f"u1,i1,view,{now_s - 60},,,,", f"u2,i2,view,{now_s + 120},,,,", f"u3,i3,view,{now_s + 86000},,,,"]
    path.write_text(HEADER + "\n".join(rows) + "\n")
    summary = run_ingest(make_config(tmp_path / "root"), Request(source=str(path), fmt="events", holdout=None))
    # Two minutes ahead is clock skew (data.max_future_s, 5 minutes); a day ahead is not, and says so.
    assert summary["accepted"] == 2 and summary["rejected"]["by_reason"] == {Reason.TIMESTAMP_IN_FUTURE: 1}
    assert summary["watermark_ms"] <= (now_s + 300) * 1000


def test_an_ingestion_that_cannot_get_the_root_says_so_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from core.storage import Storage
    from core.writer_lock import exclusive_writer

    root = tmp_path / "root"
    source = _log(tmp_path / "logs" / "e.csv", "x", 10, int(time.time()) - 600)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data:\n  root: {root}\n  writer_wait_s: 0.5\n")
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with exclusive_writer(Storage(str(root)), "an update cycle", 5):
            held.set()
            release.wait(120)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    try:
        done = subprocess.run([sys.executable, "-m", "datasets.ingest", "--config", str(config), "--source",
                               str(source)], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                              timeout=120)
    finally:
        release.set()
        t.join()
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and str(root) in last and "an update cycle" in last
