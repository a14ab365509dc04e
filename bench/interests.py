"""`python -m bench.interests`: interest profiles and audiences against their baselines, on Taobao with a time split.

The Taobao UserBehavior head sample is ingested up to its second-to-last day and a version is trained on it; the
sample's last day is held out (never ingested). The model's own evaluation holdout is made tiny
(`train.holdout_days` = 0.01: the pairs first seen in the last quarter hour), so the version's evidence is nearly
every ingested event; the baselines read all the ingested days straight from the CSV (so they see that quarter hour
too: the comparison leans their way, if anywhere). The profile and audience code that serves requests
(`serve_app.profiles`, the `serve_app.audience` Ray Data job) runs on the published version.

- Profile hit@5: for every (shopper, category) pair engaged with on the held-out day, by a shopper the version
  knows, whether the category is in the shopper's top 5. Four top-5 lists: the profile (explicit interests by
  evidence weight), the profile with latent interests (its top 4 and the nearest untouched category), the
  shopper's most frequent categories (event counts, ties to the most recent), and global category popularity.
- Latent interests alone, on the pairs whose category is new to the shopper: the 5 nearest untouched categories
  against the 5 most popular categories the shopper has not touched.
- Audience precision@100 for the 10 largest categories (by training events): of the 100 shoppers the audience job
  returns, how many engage with the category on the held-out day; against the popularity audience (the 100 most
  active shoppers).

Prints one JSON line per measurement and a summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out" / "interests"
TAOBAO_EVENTS = {"pv": "view", "fav": "fav", "cart": "cart", "buy": "purchase"}
DAY_S = 86_400


def _read_days(files: list[Path]) -> list[tuple[str, str, str, str, int]]:
    rows = []
    for f in files:
        for line in f.read_text().splitlines():
            user, item, cat, behaviour, ts = line.split(",")
            rows.append((user, item, cat, TAOBAO_EVENTS.get(behaviour, behaviour), int(ts)))
    return rows


def _top(scores: dict[str, float], last: dict[str, int], k: int) -> list[str]:
    return sorted(scores, key=lambda c: (-scores[c], -last[c], c))[:k]


def profile_hits(model, cfg, train_rows, held_pairs, key: bytes) -> dict:
    from datasets.pseudonym import pseudonymise
    from serve_app.profiles import evidence, profile

    counts: dict[str, Counter] = defaultdict(Counter)
    last: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    global_counts: Counter = Counter()
    for user, _, cat, _, ts in train_rows:
        counts[user][cat] += 1
        last[user][cat] = max(last[user][cat], ts)
        global_counts[cat] += 1
    popular = [c for c, _ in global_counts.most_common()]
    hits = Counter()
    new_hits = Counter()
    pairs = new_pairs = 0
    started = time.perf_counter()
    profiles_built = 0
    by_user: dict[str, set[str]] = defaultdict(set)
    for user, cat in held_pairs:
        by_user[user].add(cat)
    for user, cats in sorted(by_user.items()):
        row = model.user_keys.row(pseudonymise(user, key))
        if row is None or user not in counts:
            continue
        prof = profile(model, evidence(model, row, [], cfg.data.event_weights), model.users[row], 5)
        profiles_built += 1
        explicit = [c["category"] for c in prof["categories"]]
        latent = [c["category"] for c in prof["latent"]["categories"]]
        combined = explicit[:4] + [c for c in latent if c not in explicit[:4]][: 5 - len(explicit[:4])]
        frequent = _top(dict(counts[user]), last[user], 5)
        untouched_popular = [c for c in popular if c not in counts[user]][:5]
        lists = {"profile": explicit, "profile_with_latent": combined, "most_frequent": frequent,
                 "global_popularity": popular[:5]}
        for cat in cats:
            pairs += 1
            for name, top in lists.items():
                hits[name] += cat in top
            if cat not in counts[user]:
                new_pairs += 1
                new_hits["latent"] += cat in latent
                new_hits["popular_untouched"] += cat in untouched_popular
    seconds = time.perf_counter() - started
    return {"pairs": pairs, "shoppers": profiles_built,
            "hit@5": {name: round(hits[name] / max(pairs, 1), 4) for name in
                      ("profile", "profile_with_latent", "most_frequent", "global_popularity")},
            "new_category_pairs": new_pairs,
            "new_category_hit@5": {name: round(new_hits[name] / max(new_pairs, 1), 4) for name in
                                   ("latent", "popular_untouched")},
            "profile_ms_per_shopper": round(1000 * seconds / max(profiles_built, 1), 3)}


def audience_precision(cfg, train_rows, held_pairs, key: bytes, top: int = 100, categories: int = 10) -> dict:
    import pyarrow.parquet as pq

    from datasets.pseudonym import pseudonymise
    from serve_app.audience import build_audience

    sizes = Counter(cat for _, _, cat, _, _ in train_rows)
    activity = Counter(user for user, *_ in train_rows)
    popularity_audience = {pseudonymise(u, key) for u, _ in activity.most_common(top)}
    engaged: dict[str, set[str]] = defaultdict(set)
    for user, cat in held_pairs:
        engaged[cat].add(pseudonymise(user, key))
    rows = []
    for cat, events in sizes.most_common(categories):
        summary = build_audience(cfg, cat, None, top)
        audience = set(pq.read_table(summary["path"])["user_key"].to_pylist())
        positives = engaged[cat]
        rows.append({"category": cat, "training_events": events, "engaged_on_held_out_day": len(positives),
                     "precision@100": round(len(audience & positives) / top, 4),
                     "popularity_precision@100": round(len(popularity_audience & positives) / top, 4),
                     "job_seconds": summary["seconds"]})
    return {"categories": rows,
            "wins": sum(r["precision@100"] > r["popularity_precision@100"] for r in rows),
            "mean_precision@100": round(float(np.mean([r["precision@100"] for r in rows])), 4),
            "mean_popularity_precision@100": round(float(np.mean([r["popularity_precision@100"] for r in rows])), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.interests", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("IG_REAL_DATA", "../shared/data")))
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args(argv)
    os.environ.setdefault("IG_PSEUDONYM_KEY", "bench-key")
    key = os.environ["IG_PSEUDONYM_KEY"].encode()

    import registry
    from bench.warm_start import taobao_days
    from core.config import parse_config
    from core.storage import storage_for
    from datasets.ingest import Request, run_ingest
    from serve_app.model_store import build_serving_model
    from trainers.train import TrainOptions, run_train

    shutil.rmtree(OUT, ignore_errors=True)
    *days, held_day = taobao_days(args.data, OUT / "days")
    held_day = held_day.rename(OUT / "held-out-day.txt")  # out of the ingested folder
    root = OUT / "root"
    cfg = parse_config({"data": {"root": str(root), "shards": 4, "source": {"path": str(OUT / "days" / "*.csv"),
                                                                            "format": "taobao"}},
                        "train": {"epochs": args.epochs, "batch_size": 4096, "num_workers": 2,
                                  "eval_every": args.epochs, "holdout": "last_days", "holdout_days": 0.01}})
    started = time.time()
    run_ingest(cfg, Request(source=str(OUT / "days" / "*.csv"), fmt="taobao", holdout=None))
    trained = run_train(cfg, TrainOptions())
    build_s = time.time() - started
    loaded = registry.load_version(storage_for(cfg), trained["version"])
    model = build_serving_model(loaded)
    train_rows = _read_days(days)
    held_pairs = sorted({(u, c) for u, _, c, _, _ in _read_days([held_day])})
    out = {"dataset": "taobao_userbehavior (head)", "version": trained["version"], "train_days": len(days),
           "build_seconds": round(build_s, 1), "users": len(loaded.user_keys), "categories": len(loaded.category_ids)}
    out["profiles"] = profile_hits(model, cfg, train_rows, held_pairs, key)
    print(json.dumps({"profiles": out["profiles"]}), flush=True)
    out["audiences"] = audience_precision(cfg, train_rows, held_pairs, key)
    print(json.dumps({"audiences": out["audiences"]}), flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
