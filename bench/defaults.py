"""`python -m bench.defaults`: the shipped `ray_config.yaml`, unchanged, on every real data set.

One set of defaults has to serve every catalogue: a gain on Gowalla bought by settings that only suit Gowalla
would show here as a loss elsewhere. Each data set is ingested through the product's adapters into a root of its
own and trained by `trainers.train` on Ray Train with the shipped training settings (only the storage root, and
the number of workers when asked, differ), then scored on its own holdout:

- amazon_beauty: purchase sequences in time order, each shopper's last item held out (leave-one-out);
- taobao: the UserBehavior head sample, pairs first seen in the last day held out (time split);
- gowalla: the official split (optional, `--datasets gowalla`; the Gowalla bench runs it against its baselines).

Popularity is scored on the same holdout. Prints one JSON object per data set and a final JSON list.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import yaml

from core.config import AppConfig, parse_config
from datasets.ingest import Request, run_ingest
from trainers.train import TrainOptions, run_train

OUT = Path(__file__).resolve().parent / "out" / "defaults"
CONFIG = Path(__file__).resolve().parent.parent / "ray_config.yaml"
DATASETS = ("beauty", "taobao", "gowalla")


def shipped(root: Path, source: dict | None = None, train: dict | None = None) -> AppConfig:
    """The shipped config with its storage root replaced, and `source` / `train` keys set over it."""
    raw = yaml.safe_load(CONFIG.read_text())
    raw["data"]["root"] = str(root)
    raw["data"]["source"] = {**raw["data"].get("source", {}), **(source or {})}
    raw["train"].update(train or {})
    return parse_config(raw)


def train_overrides(items: list[str]) -> dict:
    """`KEY=VALUE` strings (YAML values, keys of the train section, `train.` optional) as a dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        out[key.removeprefix("train.")] = yaml.safe_load(value)
    return out


def requests(name: str, data: Path) -> tuple[dict, list[Request]]:
    """(source settings, ingestion requests) of a data set as its adapter reads it."""
    if name == "beauty":
        d = data / "amazon_beauty"
        return ({"attributes": str(d / "Beauty_item2attributes.json")},
                [Request(source=str(d / "Beauty.txt"), fmt="sequence", holdout=None)])
    if name == "taobao":
        path = data / "taobao_userbehavior" / "UserBehavior_head.csv"
        return {}, [Request(source=str(path), fmt="taobao", holdout=None)]
    d = data / "gowalla"
    return {}, [Request(source=str(d / "train.txt"), fmt="lightgcn", holdout=str(d / "test.txt"))]


def run(name: str, data: Path, workers: int | None, train: dict | None = None) -> dict:
    root = OUT / name
    shutil.rmtree(root, ignore_errors=True)
    source, reqs = requests(name, data)
    cfg = shipped(root, source, train)
    started = time.time()
    for req in reqs:
        run_ingest(cfg, req)
    ingest_s = time.time() - started
    summary = run_train(cfg, TrainOptions(num_workers=workers))
    k = cfg.train.k
    return {"dataset": name, "holdout": summary["split"]["mode"], "test_pairs": summary["split"]["test_pairs"],
            f"recall@{k}": round(summary["metrics"][f"recall@{k}"], 4),
            f"ndcg@{k}": round(summary["metrics"][f"ndcg@{k}"], 4),
            f"popularity_recall@{k}": round(summary["popularity_metrics"][f"recall@{k}"], 4),
            "epochs": summary["epochs"], "train_seconds": summary["train_seconds"],
            "ingest_seconds": round(ingest_s, 1), "seconds": summary["seconds"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.defaults", description=__doc__)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("IG_REAL_DATA", "../shared/data")))
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=["beauty", "taobao"])
    p.add_argument("--workers", type=int, help="Ray Train workers (default: the shipped train.num_workers)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a train setting over the shipped one (to compare a candidate default), repeatable")
    args = p.parse_args(argv)
    train = train_overrides(args.overrides)
    os.environ.setdefault("IG_PSEUDONYM_KEY", "bench-key")
    results = []
    for name in args.datasets:
        results.append({**run(name, args.data, args.workers, train), "overrides": args.overrides})
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
