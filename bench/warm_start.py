"""`python -m bench.warm_start`: warm-start update versus full retrain, slice by slice, in the same run.

Taobao UserBehavior (head sample) is replayed day by day: the first days train a parent, then each later day is
one new slice. Amazon Beauty: everything but each shopper's last purchase trains the parent, the last purchases
are the newest slice. For every slice the same files go into two storage roots: one runs an update cycle as
`trainers.update --every` does (ingest + warm start from LATEST on the resident Ray Train workers, started once
after the parent's training and timed apart; the slices' cycles run back to back), the other ingests and retrains
from scratch on all data so far, as a full training job does. Both are scored on the same holdout of the new
graph (the new day's first-time pairs; the last purchases). Prints JSON lines.

`--stream` replays what a production `--every` job sees instead: after the parent, the rest of the log in time order
in small increments (`--cycles` of `--min-events` to `--max-events` events each), one update cycle per increment on
the resident workers, each gated against its parent on the same holdout. On the Taobao head sample and on a
synthetic log (`datasets.synth`). Prints a line per cycle and one summary per data set: how many cycles published,
how many had nothing new to learn, and the worst child/parent Recall@20.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

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
            update: dict, attributes: str | None, profile: Path | None = None) -> list[dict]:
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
        updates.append((_update(warm, resident, profile, f"{name}-{path.stem}"), time.time() - started))
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
            "new_pairs": w.get("new_pairs"), "new_share": w.get("new_share"), "touched_only": w.get("touched_only"),
            "warm_candidate_recall": (w.get("candidate_metrics") or w.get("metrics") or {}).get(k),
            "warm_ingest_timings": w["ingested"]["timings"], "resident_start_s": resident.started_s,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _update(cfg: AppConfig, resident: ResidentTrainer, profile: Path | None, name: str) -> dict:
    """One update cycle on the resident workers; with `profile`, the driver's cProfile of it goes to
    `profile/<name>.prof` (read it with `pstats`: where a cycle's time goes outside the workers' own timings)."""
    if profile is None:
        return run_update(cfg, resident=resident)
    import cProfile

    profile.mkdir(parents=True, exist_ok=True)
    pr = cProfile.Profile()
    try:
        return pr.runcall(run_update, cfg, resident=resident)
    finally:
        pr.dump_stats(str(profile / f"{name}.prof"))


def _train_seconds(cfg: AppConfig, summary: dict) -> float | None:
    if not summary.get("version"):
        return None
    import registry
    from core.storage import Storage

    return registry.read_manifest(Storage(cfg.data.root), summary["version"])["extra"]["train_seconds"]


def increments(rows: list[str], cycles: int, low: int, high: int, out: Path, header: str | None, seed: int
               ) -> list[Path]:
    """`cycles` files of consecutive rows (already in time order), each of low..high rows, drawn with `seed`."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = np.random.default_rng(seed).integers(low, high + 1, size=cycles)
    if sizes.sum() > len(rows):
        raise ValueError(f"{cycles} increments of up to {high} events need {sizes.sum()} rows; the log has {len(rows)}")
    files, at = [], 0
    for i, n in enumerate(sizes.tolist()):
        path = out / f"increment-{i + 1:03d}.csv"
        path.write_text((header + "\n" if header else "") + "\n".join(rows[at : at + n]) + "\n")
        files.append(path)
        at += n
    return files


def taobao_stream(data: Path, out: Path, first_days: int, cycles: int, low: int, high: int) -> tuple[list[Path],
                                                                                                       list[Path]]:
    """(the first days' files, the increments): the later days' rows in time order, cut into small files."""
    days = taobao_days(data, out / "days")
    later = [line for d in days[first_days:] for line in d.read_text().splitlines()]
    later.sort(key=lambda line: int(line.rsplit(",", 1)[1]))
    return days[:first_days], increments(later, cycles, low, high, out / "increments", None, seed=1)


def synthetic_stream(out: Path, cycles: int, low: int, high: int) -> tuple[Path, list[Path]]:
    """(the parent's log, the increments) from one synthetic log: all but its last day train the parent."""
    from datasets.synth import generate

    shutil.rmtree(out, ignore_errors=True)
    # A fixed calendar: the generator's weekly rhythm follows real dates, so "the last 8 days before today" gave a
    # different last day (and too few rows for 20 increments) on other weekdays. This is the log of 2026-11-29.
    generate(out / "log", users=3_000, items=2_000, events=80_000, days=8, seed=11,
             start=datetime(2026, 11, 21, tzinfo=UTC))
    header, *rows = (line for f in sorted((out / "log").glob("*.csv")) for line in f.read_text().splitlines()
                     if line)
    rows = [r for r in rows if r != header]  # every day's file repeats the header
    ts_col = header.split(",").index("ts")
    rows.sort(key=lambda r: int(r.split(",")[ts_col]))
    cut = int(rows[-1].split(",")[ts_col]) - 86_400_000
    head = [r for r in rows if int(r.split(",")[ts_col]) <= cut]
    (out / "parent.csv").write_text(header + "\n" + "\n".join(head) + "\n")
    return out / "parent.csv", increments(rows[len(head):], cycles, low, high, out / "increments", header, seed=2)


def stream(name: str, base: Path, first: list[tuple[Path, str]], slices: list[Path], fmt: str, train: dict,
           update: dict, gap_s: float = 0.0, profile: Path | None = None) -> dict:
    """The parent, then one `--every` cycle per increment on resident workers, `gap_s` apart (0: back to back)."""
    shutil.rmtree(base, ignore_errors=True)
    warm = config(base / "warm", train, update, {})
    ensure_ray(warm, long_lived=True)
    for path, f in first:
        run_ingest(warm, Request(source=str(path), fmt=f, holdout=None))
    parent = run_train(warm, TrainOptions())
    resident = ResidentTrainer(warm, TrainOptions())
    resident.start()
    print(json.dumps({"dataset": name, "mode": "stream", "cycle": 0, "full_train": parent}), flush=True)
    k = f"recall@{warm.train.k}"
    rows = []
    try:
        for i, path in enumerate(slices):
            if i and gap_s:
                time.sleep(gap_s)  # the workers wait between cycles, as in an --every job
            warm.data.source.path, warm.data.source.format = str(path), fmt
            started = time.time()
            s = _update(warm, resident, profile, f"{name}-stream-{i + 1:02d}")
            before = (s.get("parent_metrics") or {}).get(k)
            after = (s.get("candidate_metrics") or s.get("metrics") or {}).get(k) if before is not None else None
            row = {"dataset": name, "mode": "stream", "cycle": i + 1, "events": s["ingested"]["input_rows"],
                   "new_pairs": s.get("new_pairs", 0), "new_share": s.get("new_share"),
                   "touched_only": s.get("touched_only"), "steps": s.get("steps"), "parent_recall": before,
                   "recall": after, "ratio": round(after / before, 4) if before and after is not None else None,
                   "published": s["version"], "reason": s.get("reason"), "seconds": round(time.time() - started, 2),
                   "timings": s.get("timings")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        resident.close()
    trained = [r for r in rows if r["parent_recall"] is not None]
    ratios = [r["ratio"] for r in trained if r["ratio"] is not None]
    published = sum(r["published"] is not None for r in rows)
    summary = {"dataset": name, "mode": "stream", "summary": True, "cycles": len(rows), "published": published,
               "nothing_new": len(rows) - len(trained),
               "refused": sum(r["published"] is None for r in trained),
               "publish_share": round(published / max(len(rows), 1), 3),
               "worst_ratio": min(ratios) if ratios else None, "tolerance": warm.update.tolerance,
               "first_recall": trained[0]["parent_recall"] if trained else None,
               "last_recall": trained[-1]["recall"] if trained else None,
               "mean_cycle_s": round(sum(r["seconds"] for r in rows) / max(len(rows), 1), 2), "gap_s": gap_s,
               "update": warm.update.model_dump()}
    print(json.dumps(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.warm_start", description=__doc__)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("IG_REAL_DATA", "../shared/data")))
    p.add_argument("--first-days", type=int, default=6, help="taobao: days that train the parent")
    p.add_argument("--epochs", type=int, help="epochs of each full (re)training (default: train.epochs)")
    p.add_argument("--update-epochs", type=float, help="passes of each warm start (default: update.epochs)")
    p.add_argument("--steps", type=int, help="most optimiser steps of each warm start (default: update.max_steps)")
    p.add_argument("--update-lr", type=float, help="learning rate of each warm start (default: update.lr)")
    p.add_argument("--touched-only-below", type=float,
                   help="share of new pairs under which a cycle moves only touched rows (default: the config's)")
    p.add_argument("--datasets", nargs="+", choices=["taobao", "beauty", "synthetic"],
                   help="default: taobao and beauty day by day; taobao and synthetic with --stream")
    p.add_argument("--stream", action="store_true", help="small increments in time order instead of whole days")
    p.add_argument("--cycles", type=int, default=20, help="--stream: increments per data set")
    p.add_argument("--min-events", type=int, default=100, help="--stream: smallest increment")
    p.add_argument("--max-events", type=int, default=1000, help="--stream: largest increment")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="write the driver's cProfile of every update cycle to DIR/<data set>-<slice>.prof")
    p.add_argument("--gap-s", type=float, default=0.0,
                   help="--stream: seconds the workers wait between cycles (an --every job waits update.every_s)")
    args = p.parse_args(argv)
    os.environ.setdefault("IG_PSEUDONYM_KEY", "bench-key")
    train = {"num_workers": 2, **({"epochs": args.epochs, "eval_every": args.epochs} if args.epochs else {})}
    given = {"epochs": args.update_epochs, "max_steps": args.steps, "lr": args.update_lr,
             "touched_only_below": args.touched_only_below}
    update = {k: v for k, v in given.items() if v is not None}
    if args.stream:
        datasets = args.datasets or ["taobao", "synthetic"]
        window = {"holdout": "last_days", "holdout_days": 1.0}
        summaries = []
        if "taobao" in datasets:
            first, incs = taobao_stream(args.data, OUT / "taobao-stream-files", args.first_days, args.cycles,
                                        args.min_events, args.max_events)
            summaries.append(stream("taobao", OUT / "taobao-stream", [(d, "taobao") for d in first], incs, "taobao",
                                    {**train, **window}, update, args.gap_s, args.profile))
        if "synthetic" in datasets:
            parent_log, incs = synthetic_stream(OUT / "synthetic-stream-files", args.cycles, args.min_events,
                                                args.max_events)
            summaries.append(stream("synthetic", OUT / "synthetic-stream", [(parent_log, "events")], incs, "events",
                                    {**train, **window}, update, args.gap_s, args.profile))
        print(json.dumps(summaries))
        return 0
    args.datasets = args.datasets or ["taobao", "beauty"]
    if "synthetic" in args.datasets:
        p.error("--datasets synthetic: the synthetic log is replayed with --stream only")
    rows: list[dict] = []
    if "taobao" in args.datasets:
        days = taobao_days(args.data, OUT / "taobao-days")
        first = [(d, "taobao") for d in days[: args.first_days]]
        rows += compare("taobao", OUT / "taobao", first, [(d, "taobao") for d in days[args.first_days :]],
                        {**train, "holdout": "last_days", "holdout_days": 1.0}, update, None, args.profile)
    if "beauty" in args.datasets:
        history, last = beauty_split(args.data, OUT / "beauty-split")
        attrs = str(args.data / "amazon_beauty" / "Beauty_item2attributes.json")
        rows += compare("amazon_beauty", OUT / "beauty", [(history, "sequence")], [(last, "events")],
                        {**train, "holdout": "leave_one_out"}, update, attrs, args.profile)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
