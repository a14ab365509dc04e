"""Bad command-line input exits non-zero with one line saying what and where, before touching storage; files no
adapter can read are quarantined and said in a last line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _ingest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "datasets.ingest", "--config", str(ROOT / "ray_config.yaml"),
           "--root", str(tmp_path / "root"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()
    assert len(last) == 1, res.stderr
    for n in needles:
        assert n in last[0]


def test_missing_source(tmp_path: Path) -> None:
    _one_line_error(_ingest(tmp_path), "no source")
    _one_line_error(_ingest(tmp_path, "--source", str(tmp_path / "nothing-*.csv")), "no file matches")


def test_unknown_format(tmp_path: Path) -> None:
    f = tmp_path / "x.csv"
    f.write_text("a,b\n")
    _one_line_error(_ingest(tmp_path, "--source", str(f), "--format", "xml"), "--format", "xml")


def test_unreadable_files_are_quarantined_and_said_in_one_last_line(tmp_path: Path) -> None:
    """A file no adapter can read does not fail the run (it would stall every later one): it is quarantined, the
    summary lists it, and the command exits 3 with one last line saying which and why."""
    import json

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet")
    headless = tmp_path / "headless.csv"
    headless.write_text("who,what\n1,2\n")
    for path, why in ((broken, "Parquet"), (headless, "user_id")):
        res = _ingest(tmp_path, "--source", str(path))
        assert res.returncode == 3, res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and str(path) in last and why in last
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        assert [u["file"] for u in summary["unreadable_files"]] == [str(path)] and summary["accepted"] == 0
    assert not (tmp_path / "root" / "interactions").exists()
