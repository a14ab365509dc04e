"""`python -m bench.warm_start`: warm-start update versus full retrain, slice by slice, in the same run.

Taobao UserBehavior (head sample) is replayed day by day: the first days train a parent, then each later day is
one new slice. Amazon Beauty: everything but each shopper's last purchase trains the parent, the last purchases
are the newest slice. For every slice the same files go into two storage roots: one runs an update cycle as
`trainers.update --every` does (ingest + warm start from LATEST on the resident Ray Train workers, started once
after the parent's training and timed apart; the slices' cycles run back to back), the other ingests and retrains
from scratch on all data so far, as a full training job does. Both are scored on the same holdout of the new
graph (the new day's first-time pairs; the last purchases). Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from core.config import AppConfig, parse_config
from core.runtime import ensure_ray
from datasets.ingest import Request, run_ingest
from trainers.resident import ResidentTrainer
from trainers.train import TrainOptions, run_train
from trainers.update import run_update

OUT = Path(__file__).resolve().parent / "out" / "warm"


def taobao_days(data: Path, out: Path) -> list[Path]:
    """One taobao-format file per UTC day (the few stray rows before the official window join the first day)."""
    out.mkdir(parents=True, exist_ok=True)
    by_day: dict[str, list[str]] = {}
    for line in (data / "taobao_userbehavior" / "UserBehavior_head.csv").read_text().splitlines():
        ts = int(line.rsplit(",", 1)[1])
        day = max(datetime.fromtimestamp(ts, UTC).strftime("%Y%m%d"), "20171125")
        by_day.setdefault(day, []).append(line)
    files = []
    for day in sorted(by_day):
        path = out / f"day-{day}.csv"
        path.write_text("\n".join(by_day[day]) + "\n")
        files.append(path)
    return files


def beauty_split(data: Path, out: Path) -> tuple[Path, Path]:
    """(sequences without each user's last item, the last items as canonical events).

    Sequences carry no time, so ingestion gives a user's n-th item the time base + n seconds. The last items are
    the newest slice: they get a time after every history row (base + longest sequence + 1 s), so the slice
    arrives after the parent's watermark, as a day of new events would, and stays each user's latest item.
    """
    from datasets.adapters import UNTIMED_BASE_MS

    out.mkdir(parents=True, exist_ok=True)
    attrs = json.loads((data / "amazon_beauty" / "Beauty_item2attributes.json").read_text())
    head, tail = [], ["user_id,item_id,event,ts,category_id,brand_id,price,session_id"]
    lines = (data / "amazon_beauty" / "Beauty.txt").read_text().splitlines()
    ts = UNTIMED_BASE_MS + (max(len(line.split()) for line in lines) + 1) * 1000
    for line in lines:
        user, *items = line.split()
        head.append(" ".join([user, *items[:-1]]))
        a = attrs.get(items[-1]) or []
        cat, brand = (a[0] if a else ""), (a[-1] if len(a) > 1 else "")
        tail.append(f"{user},{items[-1]},purchase,{ts},{cat},{brand},,")
    (out / "history.txt").write_text("\n".join(head) + "\n")
    (out / "last.csv").write_text("\n".join(tail) + "\n")
    return out / "history.txt", out / "last.csv"


def config(root: Path, train: dict, update: dict, source: dict) -> AppConfig:
    return parse_config({"data": {"root": str(root), "shards": 4, "source": source}, "train": train,
                         "update": update})


def compare(name: str, base: Path, first: list[tuple[Path, str]], slices: list[tuple[Path, str]], train: dict,
            update: dict, attributes: str | None) -> list[dict]:
    shutil.rmtree(base, ignore_errors=True)
    warm = config(base / "warm", train, update, {"attributes": attributes})
    full = config(base / "full", train, update, {"attributes": attributes})
    # An update job is long-lived, so its workers are: they hold their CPUs, which an embedded Ray must count.
    ensure_ray(warm, long_lived=True)
    for path, fmt in first:
        for cfg in (warm, full):
            run_ingest(cfg, Request(source=str(path), fmt=fmt, holdout=None))
    parent = run_train(warm, TrainOptions())
    resident = ResidentTrainer(warm, TrainOptions())
    resident.start()
    print(json.dumps({"dataset": name, "slice": "initial", "full_train": parent,
                      "resident_start_s": resident.started_s}), flush=True)
    # The warm lineage first, cycle after cycle as an `--every` job runs them; then the retrains, as separate jobs.
    # Interleaved, every retrain's workers would evict the update job's idle Ray Data workers between its cycles
    # (3-5 s more ingestion per cycle), which a running update job does not see.
    updates = []
    for path, fmt in slices:
        # The warm side reads the slice through its config, as `trainers.update --every` would.
        warm.data.source.path, warm.data.source.format = str(path), fmt
        started = time.time()
        updates.append((run_update(warm, resident=resident), time.time() - started))
    resident.close()
    rows = []
    for i, ((path, fmt), (w, warm_s)) in enumerate(zip(slices, updates, strict=True)):
        started = time.time()
        run_ingest(full, Request(source=str(path), fmt=fmt, holdout=None))
        f = run_train(full, TrainOptions())
        full_s = time.time() - started
        k = f"recall@{warm.train.k}"
        row = {
            "dataset": name, "slice": i + 1, "file": path.name,
            "warm_s": round(warm_s, 1), "full_s": round(full_s, 1), "time_ratio": round(warm_s / full_s, 3),
            "warm_train_s": w.get("train_seconds") or _train_seconds(warm, w), "full_train_s": f["train_seconds"],
            "warm_recall": w["metrics"][k], "full_recall": f["metrics"][k],
            "quality_ratio": round(w["metrics"][k] / f["metrics"][k], 3) if f["metrics"][k] else None,
            "warm_published": w["version"], "parent_recall": (w.get("parent_metrics") or {}).get(k),
            "warm_steps": w.get("steps"), "warm_timings": w.get("timings"),
            "warm_ingest_timings": w["ingested"]["timings"], "resident_start_s": resident.started_s,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _train_seconds(cfg: AppConfig, summary: dict) -> float | None:
    if not summary.get("version"):
        return None
    import registry
    from core.storage import Storage

    return registry.read_manifest(Storage(cfg.data.root), summary["version"])["extra"]["train_seconds"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.warm_start", description=__doc__)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("IG_REAL_DATA", "../shared/data")))
    p.add_argument("--first-days", type=int, default=6, help="taobao: days that train the parent")
    p.add_argument("--epochs", type=int, default=30, help="epochs of each full (re)training")
    p.add_argument("--update-epochs", type=float, help="passes of each warm start (default: update.epochs)")
    p.add_argument("--steps", type=int, help="most optimiser steps of each warm start (default: update.max_steps)")
    p.add_argument("--update-lr", type=float, help="learning rate of each warm start (default: update.lr)")
    p.add_argument("--datasets", nargs="+", default=["taobao", "beauty"], choices=["taobao", "beauty"])
    args = p.parse_args(argv)
    os.environ.setdefault("IG_PSEUDONYM_KEY", "bench-key")
    train = {"epochs": args.epochs, "batch_size": 4096, "num_workers": 2, "eval_every": args.epochs}
    given = {"epochs": args.update_epochs, "max_steps": args.steps, "lr": args.update_lr}
    update = {k: v for k, v in given.items() if v is not None}
    rows: list[dict] = []
    if "taobao" in args.datasets:
        days = taobao_days(args.data, OUT / "taobao-days")
        first = [(d, "taobao") for d in days[: args.first_days]]
        rows += compare("taobao", OUT / "taobao", first, [(d, "taobao") for d in days[args.first_days :]],
                        {**train, "holdout": "last_days", "holdout_days": 1.0}, update, None)
    if "beauty" in args.datasets:
        history, last = beauty_split(args.data, OUT / "beauty-split")
        attrs = str(args.data / "amazon_beauty" / "Beauty_item2attributes.json")
        rows += compare("amazon_beauty", OUT / "beauty", [(history, "sequence")], [(last, "events")],
                        {**train, "holdout": "leave_one_out"}, update, attrs)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
