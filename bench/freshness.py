"""`python -m bench.freshness`: from POST /events to a changed /recommend answer, p50 and p95 over many users.

Serves the latest Gowalla version (run `bench.train_gowalla` first) with two replicas. Background load from hey
(its own process, `bench.load`) keeps asking /recommend, a different user every 5 s, while the probe, user after
user: reads the user's current answer, posts three purchases of random items, and asks again until the answer
differs. The time from sending the POST to the first changed answer is that user's freshness; the POST's own round
trip (validated, written durably, applied on every replica) is reported too. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time

import numpy as np
import requests

from bench.load import hey, require_hey
from bench.serve import OUT, _free_port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__)
    p.add_argument("--root", default=str(OUT / "gowalla-root"))
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--background-clients", type=int, default=4)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--mode", choices=["default", "ha"], default="default")
    args = p.parse_args(argv)
    require_hey()
    os.environ.setdefault("IG_PSEUDONYM_KEY", "bench-key")
    os.environ.setdefault("IG_EVENTS_TOKEN", "bench-events-token")  # before Ray starts: replicas inherit it
    if args.mode == "ha":
        from core.runtime import HIGH_THROUGHPUT_ENV

        os.environ.update(HIGH_THROUGHPUT_ENV)
    import ray
    import yaml
    from ray import serve

    import registry
    from core.storage import Storage
    from serve_app.app import AppArgs, build_app
    from serve_app.live_state import kill_shards

    latest = registry.load_latest(Storage(args.root))
    if latest is None:
        raise SystemExit(f"no published version under {args.root}: run python -m bench.train_gowalla first")
    cfg_path = OUT / "freshness-bench.yaml"
    cfg_path.write_text(yaml.safe_dump({"data": {"root": args.root}, "serve": {
        "min_replicas": args.replicas, "max_replicas": args.replicas, "num_cpus": 0.5, "poll_interval_s": 1.0,
        "max_ongoing_requests": 64}}))
    ray.init(num_cpus=2, include_dashboard=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(config_path=str(cfg_path))), name="ig", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(0)
    # Raw ids: the bench's log ingested Gowalla's user numbers as ids, so "17" is user 17 to the API.
    users = [str(u) for u in rng.choice(len(latest.user_keys), args.users, replace=False)]
    items = latest.item_ids
    for _ in range(20):
        requests.get(f"{url}/recommend/{users[0]}", timeout=30)

    stop = threading.Event()
    background: dict = {}

    def load() -> None:  # hey in its own process, 5 s at a time, a different user each time
        n = 0
        while not stop.is_set():
            background.update(hey(f"{url}/recommend/{(n * 7919) % len(latest.user_keys)}?k=20", 5.0,
                                  concurrency=args.background_clients))
            n += 1

    loader = threading.Thread(target=load)
    loader.start()
    session = requests.Session()
    fresh_ms, post_ms, unchanged = [], [], 0
    for user in users:
        before = session.get(f"{url}/recommend/{user}?k=20", timeout=30).json()["items"]
        now = int(time.time() * 1000)
        events = [{"user_id": user, "item_id": items[int(i)], "event": "purchase", "ts": now}
                  for i in rng.choice(len(items), 3, replace=False)]
        sent = time.perf_counter()
        r = session.post(f"{url}/events", json=events, timeout=30,
                         headers={"Authorization": f"Bearer {os.environ['IG_EVENTS_TOKEN']}"})
        post_ms.append((time.perf_counter() - sent) * 1000)
        r.raise_for_status()
        while True:
            after = session.get(f"{url}/recommend/{user}?k=20", timeout=30).json()["items"]
            waited = time.perf_counter() - sent
            if after != before:
                fresh_ms.append(waited * 1000)
                break
            if waited > 10:
                unchanged += 1
                break
    stop.set()
    loader.join()
    fresh = np.array(fresh_ms)
    out = {"mode": args.mode, "users": len(users), "replicas": args.replicas,
           "background_clients": args.background_clients,
           "fresh_p50_ms": round(float(np.percentile(fresh, 50)), 1),
           "fresh_p95_ms": round(float(np.percentile(fresh, 95)), 1),
           "fresh_max_ms": round(float(fresh.max()), 1),
           "post_p50_ms": round(float(np.percentile(post_ms, 50)), 1),
           "post_p95_ms": round(float(np.percentile(post_ms, 95)), 1),
           "unchanged_after_10s": unchanged, "background": background}
    print(json.dumps(out))
    serve.shutdown()
    kill_shards(args.root, 2)
    ray.shutdown()
    shutil.rmtree(os.path.join(args.root, "raw", "live"), ignore_errors=True)  # keep the bench root as trained
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
