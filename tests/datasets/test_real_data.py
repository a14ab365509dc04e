"""Ingestion of the shared real data sets, checked against direct counts of the files (IG_REAL_DATA)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

from datasets.ingest import Request, run_ingest
from tests.helpers import make_config, read_dir

pytestmark = pytest.mark.realdata


def test_taobao_counts_match_a_direct_count_and_rerun_adds_nothing(ray_session, real_data: Path, tmp_path: Path
                                                                    ) -> None:
    path = real_data / "taobao_userbehavior" / "UserBehavior_head.csv"
    direct = pacsv.read_csv(path, read_options=pacsv.ReadOptions(
        column_names=["user", "item", "category", "behavior", "ts"]),
        convert_options=pacsv.ConvertOptions(column_types={c: "string" for c in ("user", "item", "category")}))
    distinct_rows = direct.group_by(direct.column_names).aggregate([]).num_rows
    behaviour = {d["values"]: d["counts"] for d in pc.value_counts(
        direct.group_by(direct.column_names).aggregate([]).column("behavior")).to_pylist()}

    cfg = make_config(tmp_path)
    summary = run_ingest(cfg, Request(source=str(path), fmt="taobao", holdout=None))

    assert summary["input_rows"] == direct.num_rows
    assert summary["input_rows"] == summary["accepted"] + summary["rejected"]["total"] + summary["duplicates"]
    assert summary["rejected"]["total"] == 0
    assert summary["accepted"] == distinct_rows
    assert summary["total_users"] == len(pc.unique(direct.column("user")))
    assert summary["total_items"] == len(pc.unique(direct.column("item")))
    assert summary["total_categories"] == len(pc.unique(direct.column("category")))
    renamed = {"pv": "view", "buy": "purchase", "cart": "cart", "fav": "fav"}
    assert summary["by_event"] == {renamed[k]: v for k, v in behaviour.items()}

    again = run_ingest(cfg, Request(source=str(path), fmt="taobao", holdout=None))
    assert again["input_rows"] == 0 and again["accepted"] == 0
    assert read_dir(tmp_path / "interactions").num_rows == distinct_rows


def test_gowalla_with_official_test_file(ray_session, real_data: Path, tmp_path: Path) -> None:
    d = real_data / "gowalla"
    summary = run_ingest(make_config(tmp_path), Request(source=str(d / "train.txt"), fmt="lightgcn",
                                                        holdout=str(d / "test.txt")))
    assert summary["total_users"] == 29_858 and summary["total_items"] == 40_981
    assert summary["accepted"] == 810_128 + 217_242 and summary["holdout"] == 217_242
    assert summary["rejected"]["total"] == 0 and summary["duplicates"] == 0
    assert read_dir(tmp_path / "holdout").num_rows == 217_242
    assert read_dir(tmp_path / "interactions").num_rows == 810_128


def test_amazon_beauty_sequences_with_attributes(ray_session, real_data: Path, tmp_path: Path) -> None:
    d = real_data / "amazon_beauty"
    cfg = make_config(tmp_path, data={"source": {"format": "sequence",
                                                 "attributes": str(d / "Beauty_item2attributes.json")}})
    summary = run_ingest(cfg, Request(source=str(d / "Beauty.txt"), fmt="sequence", holdout=None))
    assert summary["total_users"] == 22_363 and summary["total_items"] == 12_101
    assert summary["accepted"] == 198_502 and summary["rejected"]["total"] == 0
    assert summary["total_categories"] > 0 and summary["total_brands"] > 0
    rows = read_dir(tmp_path / "interactions")
    # The position in the line is the clock: each user's events are strictly increasing in time.
    first_user = rows.filter(pc.equal(rows.column("user_key"), rows.column("user_key")[0]))
    ts = first_user.column("ts").cast("int64").to_pylist()
    assert ts == sorted(ts) and len(set(ts)) == len(ts)
