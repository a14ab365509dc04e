"""The synthetic log generator: exact counts, determinism, time bounds, and the behaviour it is meant to mimic."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from datasets import synth
from datasets.schema import CANONICAL_COLUMNS, EVENT_TYPES

REPO = Path(__file__).resolve().parents[2]
START = datetime(2024, 3, 1, tzinfo=UTC)
START_MS = int(START.timestamp() * 1000)
USERS, ITEMS, EVENTS, DAYS = 300, 3000, 150_000, 8
USER_ID = re.compile(r"shopper-[0-9a-f]{12}")
FILE_NAME = re.compile(r"events-(\d{8})-([01])\.csv")
_STRING_COLUMNS = [c for c in CANONICAL_COLUMNS if c != "ts"]


def _read(path: Path) -> pd.DataFrame:
    types = {c: pa.string() for c in _STRING_COLUMNS} | {"ts": pa.int64()}
    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types)).to_pandas()


def _load(folder: Path) -> pd.DataFrame:
    return pd.concat([_read(p) for p in sorted(folder.glob("events-*.csv"))], ignore_index=True)


def _run(out: Path, **kwargs) -> dict:
    # Small chunks so that every file spans several chunks and their seams get exercised.
    args = dict(users=USERS, items=ITEMS, events=EVENTS, days=DAYS, seed=11, start=START, files_per_day=2)
    return synth.generate(out, **(args | {"chunk_events": 4_000} | kwargs))


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, pd.DataFrame]:
    out = tmp_path_factory.mktemp("synth") / "raw"  # not there yet: generate creates it
    summary = _run(out)
    return out, summary, _load(out)


def _views_by_day(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    views = df[df.event == "view"]
    return views, (views.ts - START_MS) // synth.DAY_MS


def _share_of_users_that_drift(df: pd.DataFrame) -> float:
    """Among users with enough views on the first and the last day, the share whose view-category distribution
    moved by a total variation distance over 0.4."""
    views, day = _views_by_day(df)
    first, last = views[day == 0], views[day == DAYS - 1]
    n_first, n_last = first.user_id.value_counts(), last.user_id.value_counts()
    users = [u for u in n_first.index if n_first[u] >= 20 and n_last.get(u, 0) >= 20]
    assert len(users) >= 50, "too few active users to judge drift"
    p = first.groupby("user_id").category_id.value_counts(normalize=True)
    q = last.groupby("user_id").category_id.value_counts(normalize=True)
    tv = [0.5 * p[u].sub(q[u], fill_value=0).abs().sum() for u in users]
    return float(np.mean(np.array(tv) > 0.4))


def test_exact_event_count_files_and_header(log: tuple[Path, dict, pd.DataFrame]) -> None:
    out, summary, df = log
    assert len(df) == EVENTS
    assert summary["events"] == EVENTS
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == DAYS * 2 == summary["files"]
    assert all(FILE_NAME.fullmatch(n) for n in names), names  # and no temporary files left behind
    for path in out.iterdir():
        with path.open("rb") as f:
            assert f.readline() == b"user_id,item_id,event,ts,category_id,brand_id,price,session_id\n"


def test_same_arguments_same_bytes(tmp_path: Path) -> None:
    kwargs = dict(events=30_000, chunk_events=700)
    _run(tmp_path / "a", **kwargs)
    _run(tmp_path / "b", **kwargs)
    _run(tmp_path / "c", seed=12, **kwargs)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert any((tmp_path / "a" / n).read_bytes() != (tmp_path / "c" / n).read_bytes() for n in names)


def test_files_hold_their_window_in_time_order(log: tuple[Path, dict, pd.DataFrame]) -> None:
    out, _, _ = log
    for path in out.iterdir():
        date, part = FILE_NAME.fullmatch(path.name).groups()
        day_start = int(datetime.strptime(date, "%Y%m%d").replace(tzinfo=UTC).timestamp() * 1000)
        a = day_start + int(part) * synth.DAY_MS // 2
        ts = _read(path).ts.to_numpy()
        assert len(ts) > 0
        assert np.all(np.diff(ts) >= 0), path.name
        assert a <= ts[0] and ts[-1] < a + synth.DAY_MS // 2, path.name


def test_name_order_is_time_order(log: tuple[Path, dict, pd.DataFrame], tmp_path: Path) -> None:
    out, _, _ = log
    assert np.all(np.diff(_load(out).ts.to_numpy()) >= 0)  # _load reads files in name order
    synth.generate(tmp_path, 30, 100, 3_000, 1, 2, START, files_per_day=12)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"events-20240301-{k:02d}.csv" for k in range(12)]
    assert np.all(np.diff(_load(tmp_path).ts.to_numpy()) >= 0)


def test_events_within_start_and_now(log: tuple[Path, dict, pd.DataFrame], tmp_path: Path) -> None:
    _, _, df = log
    assert df.ts.min() >= START_MS
    assert df.ts.max() < START_MS + DAYS * synth.DAY_MS

    # Default start: D days before today's UTC midnight, never after now.
    before = datetime.now(UTC)
    summary = synth.generate(tmp_path / "default", 50, 200, 5_000, 3, 1)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    default = _load(tmp_path / "default")
    assert len(default) == 5_000 and summary["files"] == 3
    assert default.ts.min() >= int(synth.default_start(3, before).timestamp() * 1000)
    assert default.ts.max() <= now_ms - synth.NOW_MARGIN_MS

    # A window reaching past now is cut at now minus a minute: no events, and no files, in the future.
    now = datetime(2024, 3, 5, 13, 37, tzinfo=UTC)
    summary = synth.generate(tmp_path / "clamped", 50, 200, 5_000, 3, 1, datetime(2024, 3, 4, tzinfo=UTC), now=now)
    clamped = _load(tmp_path / "clamped")
    assert len(clamped) == 5_000
    assert clamped.ts.max() <= int(now.timestamp() * 1000) - synth.NOW_MARGIN_MS
    assert sorted(p.name for p in (tmp_path / "clamped").iterdir()) == ["events-20240304.csv", "events-20240305.csv"]


def test_event_names_and_item_attributes(log: tuple[Path, dict, pd.DataFrame]) -> None:
    _, summary, df = log
    assert set(df.event) == set(EVENT_TYPES)
    assert df[_STRING_COLUMNS].notna().all().all()
    assert df.item_id.str.fullmatch(r"item-\d+").all()
    assert df.category_id.str.fullmatch(r"cat-\d+").all()
    assert df.brand_id.str.fullmatch(r"brand-\d+").all()
    assert df.price.str.fullmatch(r"\d+\.\d\d").all()
    assert (df.price.astype(float) > 0).all()
    # An item's category, brand and price never change.
    assert (df.groupby("item_id")[["category_id", "brand_id", "price"]].nunique() == 1).all().all()
    assert summary["categories"] == ITEMS // 50 and summary["brands"] == ITEMS // 20
    assert df.category_id.nunique() > 0.9 * summary["categories"]


def test_funnel(log: tuple[Path, dict, pd.DataFrame]) -> None:
    _, _, df = log
    counts = df.event.value_counts()
    assert counts["view"] > counts["click"] > counts["cart"] > counts["purchase"] > 0
    assert counts["fav"] > 0
    assert counts["purchase"] < 0.1 * counts["view"]
    # Every purchase follows a view of the same item by the same user.
    first_view = df[df.event == "view"].groupby(["user_id", "item_id"]).ts.min().rename("first_view")
    purchases = df[df.event == "purchase"].join(first_view, on=["user_id", "item_id"])
    assert (purchases.first_view <= purchases.ts).all()


def test_item_popularity_is_heavy_tailed(log: tuple[Path, dict, pd.DataFrame]) -> None:
    _, _, df = log
    views = df[df.event == "view"].item_id.value_counts()
    top = views.iloc[: ITEMS // 10].sum() / views.sum()
    assert top > 0.4, f"top 10% of items got only {top:.0%} of views"


def test_user_interests_drift(log: tuple[Path, dict, pd.DataFrame], tmp_path: Path) -> None:
    _, _, df = log
    drifting = _share_of_users_that_drift(df)
    assert drifting > 0.6
    # The same log without drift: what remains is sampling noise, so the change above is the drift's doing.
    _run(tmp_path, drift=0.0)
    still = _share_of_users_that_drift(_load(tmp_path))
    assert still < 0.35 and drifting - still > 0.4, (drifting, still)


def test_user_ids_are_distinctive(log: tuple[Path, dict, pd.DataFrame]) -> None:
    _, summary, df = log
    assert df.user_id.str.fullmatch(USER_ID.pattern).all()
    assert df.user_id.nunique() == summary["active_users"] <= USERS
    others = "\n".join(df[[c for c in _STRING_COLUMNS if c != "user_id"]].drop_duplicates().to_csv().splitlines())
    assert USER_ID.search(others) is None  # e.g. session ids do not embed the raw user id


def test_sessions(log: tuple[Path, dict, pd.DataFrame]) -> None:
    _, _, df = log
    assert df.session_id.str.fullmatch(r"sess-[0-9a-f]{16}").all()
    assert (df.groupby("session_id").user_id.nunique() == 1).all()
    s = df.sort_values(["user_id", "ts"], kind="stable")
    same_user = s.user_id.eq(s.user_id.shift())
    gap = s.ts.diff()
    changed = s.session_id.ne(s.session_id.shift())
    # Within a user, a session changes exactly where the gap exceeds 30 minutes, across file and chunk seams too.
    assert (changed[same_user] == (gap[same_user] > synth.SESSION_GAP_MS)).all()
    assert df.session_id.nunique() < len(df) / 3


def test_bad_arguments_one_line_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = ["--users", "5", "--items", "20", "--events", "10", "--days", "1", "--seed", "0", "--out", str(tmp_path)]
    cases = [
        (["--users", "0"], "--users"),
        (["--events", "-3"], "--events"),
        (["--days", "x"], "--days"),
        (["--files-per-day", "0"], "--files-per-day"),
        (["--start", "2024-13-01"], "--start"),
        (["--start", "2999-01-01"], "future"),
    ]
    for extra, expected in cases:
        try:
            rc = synth.main(good + extra)
        except SystemExit as exc:
            rc = exc.code
        err = capsys.readouterr().err
        assert rc != 0, extra
        assert len(err.strip().splitlines()) == 1 and expected in err, (extra, err)
    assert not list(tmp_path.iterdir())


def test_refuses_to_mix_with_another_run(tmp_path: Path) -> None:
    (tmp_path / "events-20200101.csv").write_text("stale\n")
    with pytest.raises(ValueError, match="events-20200101.csv"):
        synth.generate(tmp_path, 5, 20, 10, 1, 0, START)


def test_cli_prints_summary_last(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["--users", "20", "--items", "100", "--events", "1000", "--days", "2", "--seed", "3"]
    proc = subprocess.run(
        [sys.executable, "-m", "datasets.synth", *args, "--out", str(out), "--start", "2024-01-30"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["events"] == 1000 and summary["users"] == 20 and summary["items"] == 100
    assert summary["files"] == 2 and summary["seconds"] >= 0
    assert sorted(p.name for p in out.iterdir()) == ["events-20240130.csv", "events-20240131.csv"]
    assert len(_load(out)) == 1000
