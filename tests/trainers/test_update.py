"""Warm-start updates: a child version with new users and items, refusals, and the long-lived --every loop."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest

import registry
from core.config import AppConfig
from core.storage import Storage
from datasets.ingest import Request, run_ingest
from datasets.pseudonym import pseudonymise
from datasets.synth import generate
from tests.helpers import make_config
from trainers.faults import Fault, InjectFaults
from trainers.train import TrainOptions, run_train
from trainers.update import run_every, run_update

ROOT = Path(__file__).resolve().parents[2]
HEADER = "user_id,item_id,event,ts,category_id,brand_id,price,session_id\n"
TRAIN = {"epochs": 4, "batch_size": 512, "lr": 0.01, "embedding_dim": 32, "num_layers": 2, "holdout_days": 1.0,
         "num_workers": 1}
KEY = os.environ["IG_PSEUDONYM_KEY"].encode()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("update")
    logs = base / "logs"
    generate(logs, users=300, items=400, events=30_000, days=6, seed=5)
    cfg = make_config(base / "root", data={"source": {"path": str(logs / "*.csv"), "format": "events"}},
                      train=TRAIN,
                      # 30 steps at a gentle rate (a few dozen new pairs would be 4 steps at the defaults). These
                      # tests are about lineage, indices and recovery: on this small synthetic log a few dozen new
                      # pairs swing Recall@20 by up to 12% either way, so the gate is loose here; the bench holds
                      # updates to 2% on real data, and a cycle at a destructive rate is held to the gate below.
                      update={"epochs": 30, "max_steps": 30, "lr": 0.005, "replay_ratio": 1.0, "tolerance": 0.2})
    run_ingest(cfg, Request(source=str(logs / "*.csv"), fmt="events", holdout=None))
    first = run_train(cfg, TrainOptions())
    return {"cfg": cfg, "logs": logs, "first": first, "base": base}


@pytest.fixture
def own(trained: dict, tmp_path: Path) -> dict:
    """This test's copy of the trained root (Ray Train's run folders left behind), whose source is a folder of its
    own for new events: tests that add events or versions never see each other's."""
    root, new = tmp_path / "root", tmp_path / "new"
    shutil.copytree(trained["cfg"].data.root, root, ignore=shutil.ignore_patterns("train_runs"))
    new.mkdir()
    (new / "events-none.csv").write_text(HEADER)  # a configured source must match a file
    cfg = trained["cfg"].model_copy(deep=True)
    cfg.data.root, cfg.data.source.path = str(root), str(new / "*.csv")
    return {"cfg": cfg, "new": new}


def _catalogue(logs: Path) -> dict[str, str]:
    table = pacsv.read_csv(sorted(logs.glob("events-*.csv"))[0])
    return dict(zip(table.column("item_id").to_pylist(), table.column("category_id").to_pylist(), strict=False))


def test_update_publishes_a_child_with_new_users_and_items_and_learns_late_events(trained: dict, own: dict) -> None:
    """New shoppers and items grow the parent; an event dated before the parent's watermark that arrives after it
    is new to the update too: chosen by arrival, where event time would have passed it over."""
    from trainers.data import load_graph, split
    from trainers.warm_start import update_pair_index

    cfg: AppConfig = own["cfg"]
    storage = Storage(cfg.data.root)
    parent = registry.load_latest(storage)
    catalogue = _catalogue(trained["logs"])
    by_cat: dict[str, list[str]] = {}
    for item, cat in catalogue.items():
        by_cat.setdefault(cat, []).append(item)
    # The smallest category that can still fill a top-10, so a hit rate far above its share means something.
    target = min((c for c in by_cat if len(by_cat[c]) >= 15), key=lambda c: len(by_cat[c]))
    touched = by_cat[target][:4]
    now_s = int(time.time()) - 120
    rows = [f"shopper-brandnew{u},{item},view,{now_s + 3 * j + u},{target},,," for u in range(3)
            for j, item in enumerate(touched)]
    rows += [f"shopper-brandnew0,item-fresh-{n},view,{now_s + 50 + n},cat-fresh,brand-fresh,1.0," for n in range(3)]
    (own["new"] / "events-new.csv").write_text(HEADER + "\n".join(rows) + "\n")
    late_s = parent.watermark_ms // 1000 - 3 * 86400  # three days before what the parent saw last
    late_rows = [f"shopper-late{u},item-late-{u},purchase,{late_s + u},cat-late,,," for u in range(8)]
    (own["new"] / "events-late.csv").write_text(HEADER + "\n".join(late_rows) + "\n")

    # The parent learned its held-out last day once it was scored (train.refit), so only what arrived since is new
    # to this cycle: a small increment, touched rows only (before the refit, that day was a sixth of the pairs here
    # and moved every row).
    assert parent.coverage.get("holdout_learned") == 1 and parent.extra["refit"]["held_out_pairs"] > 0
    summary = run_update(cfg)

    assert summary["version"] is not None, summary.get("reason")
    assert summary["steps"] == 30 and not summary["resident"] and summary["new_pairs"] > 0
    assert summary["touched_only"] and 0 < summary["new_share"] < cfg.update.touched_only_below
    assert summary["parent"] == parent.version and summary["ingested"]["new_users"] == 3 + 8
    t = summary["timings"]
    assert set(t) == {"ingest", "parent", "prepare", "ray_train", "worker_loop", "worker", "publish"}
    assert {"setup", "eval_parent", "eval"} <= set(t["worker"])
    spent = t["ingest"] + t["parent"] + t["prepare"] + t["ray_train"] + t["publish"]
    assert 0 < t["worker_loop"] < t["ray_train"] and spent <= summary["seconds"] + 0.01
    child = registry.load_version(storage, summary["version"])
    assert child.parent == parent.version and registry.latest_version(storage) == child.version
    # A cycle's history is one evaluation: no training curve is drawn for it (the full training's version has one).
    assert registry.CURVE not in child.manifest["files"] and child.load_curve_png() is None
    assert registry.CURVE in parent.manifest["files"]
    assert child.user_keys[: len(parent.user_keys)] == parent.user_keys
    assert child.item_ids[: len(parent.item_ids)] == parent.item_ids
    assert {f"item-fresh-{n}" for n in range(3)} <= set(child.item_ids)
    user = child.user_keys.index(pseudonymise("shopper-brandnew1", KEY))
    scores = child.user_vectors[user] @ child.item_vectors.T
    scores[child.seen_items(user)] = -np.inf
    top = [child.item_ids[i] for i in np.argsort(-scores)[:10]]
    in_target = sum(catalogue.get(i) == target for i in top)
    share = len(by_cat[target]) / len(catalogue)
    assert in_target >= 5 and in_target / 10 > 2 * share, (in_target, share, top)

    graph = load_graph(storage)
    items = storage.read_parquet(storage.list_files("idmaps", "item", suffix=".parquet"))
    late_items = {i for k, i in zip(items["key"].to_pylist(), items["idx"].to_pylist(), strict=True)
                  if k.startswith("item-late-")}
    late = np.flatnonzero(np.isin(graph.ui_item, list(late_items)))
    assert len(late) == 8 and (graph.ui_last_ts[late] < parent.watermark_ms).all()  # old by event time ...
    assert (graph.ui_last_run[late] > parent.coverage["runs"]).all()  # ... new by arrival
    sp = split(graph, cfg.train.holdout, cfg.train.holdout_days)
    index, _ = update_pair_index(graph, sp, cfg, parent.watermark_ms, parent.coverage["runs"])
    trained_on = set(zip(sp.train_user[index].tolist(), sp.train_item[index].tolist(), strict=True))
    assert {(graph.ui_user[e], graph.ui_item[e]) for e in late} <= trained_on


def _later_clicks(folder: Path, storage: Storage) -> None:
    """Twenty clicks by new shoppers a minute after the newest event the parent saw: a cycle's worth of new pairs,
    whose day-long holdout also holds the log's last day. Dated by the clock instead (the log ends at UTC midnight),
    just before the next midnight they came a day after the log's end, the holdout held them alone, and nobody in
    it had a history to be scored on (the parent's Recall@20 was 0)."""
    after_s = registry.read_manifest(storage, registry.latest_version(storage))["watermark_ms"] // 1000 + 60
    (folder / "events-more.csv").write_text(
        HEADER + "\n".join(f"shopper-later{u},item-{u % 50},click,{after_s + u},,,," for u in range(20)) + "\n")


def test_a_cycle_at_a_destructive_rate_is_held_to_the_gate(own: dict) -> None:
    """A cycle at a rate no table survives: refused when its candidate falls below (1 - tolerance) x the parent on
    the same holdout (LATEST kept, the candidate's figure said), published only at or above that floor. Both ways
    are checked because this log's holdout is a few dozen pairs: a blown-up table ranks by the items' degree scale
    and scored above the parent there in some runs (it refused in most), so only the gate's rule is certain."""
    cfg: AppConfig = own["cfg"]
    storage = Storage(cfg.data.root)
    before = registry.latest_version(storage)
    _later_clicks(own["new"], storage)
    cfg.update.lr = 50.0
    summary = run_update(cfg)
    floor = (1 - cfg.update.tolerance) * summary["parent_metrics"]["recall@20"]
    if summary["version"] is None:
        assert "below" in summary["reason"], summary
        assert summary["candidate_metrics"]["recall@20"] < floor
        assert registry.latest_version(storage) == before
    else:
        assert summary["metrics"]["recall@20"] >= floor
        assert registry.latest_version(storage) == summary["version"] != before


def test_a_large_increment_refilters_and_is_still_gated(own: dict) -> None:
    """A cycle whose new pairs reach update.refilter_above (here 0: every cycle) starts again from the filter of
    the grown graph, takes no step after it (update.refilter_passes 0), and is gated against its parent like any
    other cycle."""
    cfg: AppConfig = own["cfg"]
    storage = Storage(cfg.data.root)
    parent = registry.latest_version(storage)
    _later_clicks(own["new"], storage)
    cfg.update.refilter_above = 0.0
    summary = run_update(cfg)
    assert summary["refilter"] and not summary["touched_only"] and summary["new_pairs"] > 0
    assert "refilter" in summary["timings"]["worker"] and summary["parent_metrics"]["recall@20"] > 0
    assert summary["steps"] == 0
    floor = (1 - cfg.update.tolerance) * summary["parent_metrics"]["recall@20"]
    if summary["version"] is None:  # refused: said why, LATEST kept
        assert summary["candidate_metrics"]["recall@20"] < floor and registry.latest_version(storage) == parent
    else:
        assert summary["metrics"]["recall@20"] >= floor
        assert registry.load_version(storage, summary["version"]).parent == parent


def test_every_mode_survives_a_crashed_cycle(own: dict) -> None:
    """A cycle that fails (here: the ingest state is unreadable, until the operator restores it) is logged and
    reported, and the next cycle runs. Bad input files no longer fail a cycle at all: they are quarantined."""
    cfg: AppConfig = own["cfg"]
    state = Path(cfg.data.root) / "state" / "ingest.json"
    good = state.read_bytes()
    state.write_bytes(b"{ not json")
    lines: list[dict] = []

    def emit(line: str) -> None:
        lines.append(json.loads(line))
        state.write_bytes(good)  # the operator fixes it after the first failure

    failures = run_every(cfg, 0.1, threading.Event(), max_cycles=2, emit=emit)
    assert failures == 1
    assert "error" in lines[0] and "JSONDecodeError" in lines[0]["error"], lines[0]
    assert "error" not in lines[1] and lines[1]["cycle"] == 2


def test_resident_workers_survive_a_failed_cycle_and_a_lost_worker(own: dict, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """--every keeps one Ray Train run across cycles: a cycle that raises on a worker is reported and the group
    replaced; a worker that dies mid-cycle has its cycle run again by the replacement group, which publishes. The
    first start rehearses a cycle (outside the fault wrapper); the replacements do not."""
    caplog.set_level(logging.INFO, logger="trainers.resident")
    cfg: AppConfig = own["cfg"]
    # Survival and lineage are the point here; the quality gate is tested above and by bench.warm_start --stream
    # (25 pairs on this small log swung the candidate past the loose 0.2 once in CI: a refusal, not a crash).
    cfg.update.tolerance = 1.0
    storage = Storage(cfg.data.root)
    before = registry.latest_version(storage)
    runs = Path(cfg.data.root) / "train_runs"
    earlier = set(runs.glob("resident-*"))
    now_s = int(time.time()) - 30
    (own["new"] / "events-resident.csv").write_text(
        HEADER + "\n".join(f"shopper-resident{u},item-{u % 40},cart,{now_s + u},,,," for u in range(25)) + "\n")
    raised, died = tmp_path / "raised", tmp_path / "died"
    faults = InjectFaults((Fault(rank=0, epoch=0, marker=str(raised), raise_error=True),
                           Fault(rank=0, epoch=0, marker=str(died))))
    lines: list[dict] = []
    failures = run_every(cfg, 0.1, threading.Event(), max_cycles=2, emit=lambda line: lines.append(json.loads(line)),
                         session_wrapper=faults)
    assert failures == 1 and raised.exists() and died.exists()
    assert "injected fault" in lines[0]["error"], lines[0]
    assert lines[1]["version"] is not None and lines[1]["parent"] == before and lines[1]["resident"], (
        lines[1].get("reason"), lines[1].get("candidate_metrics"), lines[1].get("parent_metrics"))
    assert registry.latest_version(storage) == lines[1]["version"]
    # Both cycles, and both replacement groups, belonged to one Ray Train run.
    assert len(set(runs.glob("resident-*")) - earlier) == 1
    assert caplog.text.count("rehearsed a cycle") == 1, caplog.text


def test_resident_ddp_group_runs_cycle_after_cycle_and_outlives_a_lost_rank(own: dict, tmp_path: Path) -> None:
    """Two ranks (DDP over gloo) kept across cycles. Rank 1 dies in the first cycle: that cycle either runs again on
    the replacement group or fails with the survivor's collective error; either way the job goes on, and the next
    cycle publishes on the same Ray Train run."""
    cfg: AppConfig = own["cfg"]
    cfg.train.num_workers, cfg.train.cpus_per_worker = 2, 0.5  # leaves a CPU of the test Ray for ingestion
    cfg.update.tolerance = 1.0  # survival of the group is the point here; quality gates are tested above
    storage = Storage(cfg.data.root)
    runs = Path(cfg.data.root) / "train_runs"
    earlier = set(runs.glob("resident-*"))
    now_s = int(time.time()) - 20

    def arrive(tag: str) -> None:
        (own["new"] / f"events-{tag}.csv").write_text(
            HEADER + "\n".join(f"shopper-{tag}{u},item-{u % 30},click,{now_s + u},,,," for u in range(20)) + "\n")

    arrive("ddp-a")
    died = tmp_path / "died"
    lines: list[dict] = []

    def emit(line: str) -> None:
        lines.append(json.loads(line))
        arrive(f"ddp-{len(lines)}")  # something new for the next cycle

    run_every(cfg, 0.1, threading.Event(), max_cycles=2, emit=emit,
              session_wrapper=InjectFaults((Fault(rank=1, epoch=0, marker=str(died)),)))
    assert died.exists()
    assert lines[0].get("version") is not None or "rank" in lines[0].get("error", ""), lines[0]
    assert lines[1]["version"] is not None and lines[1]["resident"], lines[1]
    assert registry.latest_version(storage) == lines[1]["version"]
    assert registry.load_version(storage, lines[1]["version"]).manifest["extra"]["num_workers"] == 2
    assert len(set(runs.glob("resident-*")) - earlier) == 1


def test_every_mode_stops_cleanly_on_sigterm(own: dict, tmp_path: Path) -> None:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(f"data:\n  root: {own['cfg'].data.root}\n  shards: 4\n")
    proc = subprocess.Popen([sys.executable, "-m", "trainers.update", "--config", str(cfg_file), "--every", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = proc.stdout.readline()
    while first and not first.startswith("{"):  # training progress lines come first
        first = proc.stdout.readline()
    assert json.loads(first)["cycle"] == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_a_version_published_by_the_old_code_warm_starts_a_child(ray_session, tmp_path: Path) -> None:
    """A root written before the registry package (format-1 version, tests/fixtures/legacy_root) keeps working:
    an update grows its model and publishes a child in the current format."""
    root = tmp_path / "root"
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "legacy_root", root)
    new = tmp_path / "new"
    new.mkdir()
    now_s = int(time.time()) - 120
    (new / "events-later.csv").write_text(HEADER + "\n".join(
        f"shopper-after-upgrade{u},item-late-{u % 3},view,{now_s + u},cat-late,,," for u in range(12)) + "\n")
    cfg = make_config(root, data={"shards": 2, "source": {"path": str(new / "*.csv"), "format": "events"}},
                      train={"num_workers": 1, "batch_size": 256, "holdout_days": 1.0},
                      update={"tolerance": 1.0})  # lineage and format here; quality is the bench's
    summary = run_update(cfg)
    assert summary["mode"] == "warm" and summary["parent"] == "v000001", summary
    assert summary["version"] == "v000002", summary
    child = registry.load_version(Storage(str(root)), "v000002")
    assert child.format == registry.FORMAT and child.parent == "v000001"
    assert "cat-late" in child.category_ids and child.category_vectors.shape[0] == len(child.category_ids)
