"""`python -m bench.seen_events`: which event types should make an item "seen" (data.seen_events), measured on
purchase prediction.

Taobao UserBehavior (../shared/data/taobao_userbehavior), split in time: everything before the last `--test-days`
days is ingested and trained on through the product path (`datasets.ingest`, `trainers.train` on Ray Train, the
shipped ray_config.yaml's hyper-parameters, `--set` overriding a train key); the purchases of the last days are the
targets. The one published
version is then asked for each buyer's top 20 the way a replica answers, once per candidate setting of
data.seen_events (what a replica excludes, `serve_app.model_store.exclusion_csr`), and Recall@20 / NDCG@20 of the
purchases are reported side by side, with popularity under the same exclusions. Prints JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

OUT = Path(__file__).resolve().parent / "out"
SETTINGS = {
    "every type (before)": None,  # serve_app.model_store.EVENT_TYPES
    "purchase": ["purchase"],
    "cart, purchase": ["cart", "purchase"],
    "nothing": [],
}


def split_log(source: Path, train_csv: Path, test_days: float) -> tuple[list[tuple[str, str]], int]:
    """Write the rows before the cutoff to `train_csv`; return the (user, item) purchases after it, and the cutoff."""
    with source.open() as f:
        rows = [r for r in csv.reader(f) if len(r) == 5 and r[4].lstrip("-").isdigit()]
    cutoff = max(int(r[4]) for r in rows) - int(test_days * 86_400)
    with train_csv.open("w", newline="") as f:
        csv.writer(f).writerows(r for r in rows if int(r[4]) < cutoff)
    return [(r[0], r[1]) for r in rows if int(r[4]) >= cutoff and r[3] == "buy"], cutoff


def evaluate(loaded, purchases: list[tuple[str, str]], key: bytes, k: int) -> list[dict]:
    from datasets.pseudonym import pseudonymise
    from serve_app.model_store import EVENT_TYPES, build_serving_model, exclusion_csr
    from trainers.metrics import recall_ndcg_at_k

    base = build_serving_model(loaded)
    pairs = {(row, base.item_row[i]) for raw, i in purchases
             if (row := base.user_keys.row(pseudonymise(raw, key))) is not None and i in base.item_row}
    users, items = (np.array(x, dtype=np.int64) for x in zip(*sorted(pairs), strict=True))
    n_users, n_items = base.users.shape[0], base.items.shape[0]
    test = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(n_users, n_items))
    popular = torch.zeros(n_items)
    popular[torch.from_numpy(base.popular.astype(np.int64))] = -torch.arange(len(base.popular), dtype=torch.float32)
    out = []
    for name, types in SETTINGS.items():
        types = list(EVENT_TYPES) if types is None else types
        # what a replica built with data.seen_events = types excludes (the same function it calls)
        indptr, indices = exclusion_csr(loaded.seen_indptr, loaded.seen_indices, loaded.seen_evidence, types)
        masked = sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(n_users, n_items))
        ours = recall_ndcg_at_k(lambda b: base.users[b] @ base.items.T, masked, test, k)
        pop = recall_ndcg_at_k(lambda b: popular.expand(len(b), -1).clone(), masked, test, k)
        out.append({"seen_events": name, "types": types, "excluded_pairs": int(len(indices)),
                    f"recall@{k}": round(ours[f"recall@{k}"], 4), f"ndcg@{k}": round(ours[f"ndcg@{k}"], 4),
                    f"popularity_recall@{k}": round(pop[f"recall@{k}"], 4), "buyers": ours["users"],
                    "purchases": len(users)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.seen_events", description=__doc__)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("IG_REAL_DATA", "../shared/data")))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a train key of the shipped config (YAML value), e.g. --set relations=by_event")
    p.add_argument("--test-days", type=float, default=2.0, help="the last N days' purchases are the targets")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    source = args.data / "taobao_userbehavior" / "UserBehavior_head.csv"
    if not source.is_file():
        p.error(f"{source} not found: --data must name ../shared/data")
    os.environ.setdefault("IG_PSEUDONYM_KEY", "bench-key")
    import registry
    from bench.defaults import shipped, train_overrides
    from core.storage import storage_for
    from datasets.ingest import Request, run_ingest
    from trainers.train import TrainOptions, run_train

    work = OUT / "seen-events"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    purchases, cutoff = split_log(source, work / "train.csv", args.test_days)
    try:
        cfg = shipped(work / "root", train=train_overrides(args.set))
    except ValueError as e:
        p.error(f"--set {e}")
    started = time.perf_counter()
    ingested = run_ingest(cfg, Request(source=str(work / "train.csv"), fmt="taobao", holdout=None))
    trained = run_train(cfg, TrainOptions(num_workers=args.workers))
    loaded = registry.load_version(storage_for(cfg), trained["version"])
    results = evaluate(loaded, purchases, os.environ["IG_PSEUDONYM_KEY"].encode(), cfg.train.k)
    for r in results:
        print(json.dumps(r), flush=True)
    print(json.dumps({"bench": "seen_events", "overrides": args.set, "cutoff_unix_s": cutoff,
                      "test_days": args.test_days,
                      "accepted": ingested["accepted"], "train_seconds": trained["train_seconds"],
                      "seconds": round(time.perf_counter() - started, 1), "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
