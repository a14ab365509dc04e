"""`python -m bench.faults`: faults under load on a 2-replica app, and whether anything acknowledged is lost.

Steady `/recommend` load from hey (its own process) and a producer posting one live event per request (each for a
new shopper, so every acknowledged event can be checked one by one). Four phases of `--phase-s` seconds, the fault
two seconds into each: none; one recommender replica killed (Serve replaces it); one live-state shard killed (Ray
restarts it, and it rebuilds from raw/live); the whole app deleted and deployed again. Then: non-2xx answers per
phase, acknowledged events missing from the next ingestion (target 0), and acknowledged events missing from
folding after recovery (each such shopper's /recommend must say "folded"; target 0). Prints JSON lines and a list.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.load import hey, require_hey

OUT = Path(__file__).resolve().parent / "out"
APP = "interest-graph"
PHASES = ("steady", "kill a replica", "kill a live shard", "restart the app")


class Producer(threading.Thread):
    """Posts one event at a time, each for a new shopper, and remembers what was acknowledged. Failures are counted
    per phase, never raised: a refused write is what the benchmark measures."""

    def __init__(self, url: str, token: str, items: list[str], rate: float) -> None:
        super().__init__(name="producer", daemon=True)
        self.url, self.items, self.rate = url, items, rate
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.phase, self.stop = PHASES[0], threading.Event()
        self.acked: list[dict] = []
        self.failed: dict[str, int] = dict.fromkeys(PHASES, 0)
        self.sent: dict[str, int] = dict.fromkeys(PHASES, 0)

    def run(self) -> None:
        n = 0
        while not self.stop.wait(1.0 / self.rate):
            n += 1
            phase = self.phase
            event = {"user_id": f"faults-shopper-{n}", "item_id": self.items[n % len(self.items)], "event": "cart",
                     "ts": int(time.time() * 1000)}
            self.sent[phase] += 1
            try:
                ok = self.session.post(f"{self.url}/events", json=[event], timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            if ok:
                self.acked.append(event)
            else:
                self.failed[phase] += 1


def _replica_actors() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "SERVE_REPLICA" in a["name"] and "Recommender" in a["name"]]


def _deploy(config: Path):
    from ray import serve

    from serve_app.app import AppArgs, build_app

    serve.run(build_app(AppArgs(config_path=str(config))), name=APP, route_prefix="/")


def _wait_serving(url: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).json().get("version"):
                return
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not serve within {timeout_s} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    p.add_argument("--phase-s", type=float, default=20.0)
    p.add_argument("--clients", type=int, default=4, help="hey connections on /recommend")
    p.add_argument("--rate", type=float, default=10.0, help="live events posted per second")
    args = p.parse_args(argv)
    require_hey()
    os.environ.setdefault("IG_PSEUDONYM_KEY", "bench-key")
    os.environ.setdefault("IG_EVENTS_TOKEN", "bench-events-token")  # before Ray starts: replicas inherit them
    import pyarrow.compute as pc
    import ray
    import yaml
    from ray import serve

    from core.config import parse_config
    from core.storage import storage_for
    from datasets.ingest import Request, run_ingest
    from datasets.pseudonym import pseudonymise, resolve_key
    from datasets.synth import generate
    from serve_app.live_state import NAMESPACE, kill_shards, shard_names
    from trainers.train import TrainOptions, run_train

    base = OUT / "faults"
    shutil.rmtree(base, ignore_errors=True)
    generate(base / "logs", users=1000, items=1500, events=60_000, days=5, seed=3)
    raw = {"data": {"root": str(base / "root"), "shards": 2},
           "train": {"epochs": 3, "num_workers": 1, "embedding_dim": 32, "num_layers": 2, "batch_size": 2048},
           "serve": {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.25, "live_seal_s": 5.0,
                     "poll_interval_s": 1.0}}
    config = base / "ray_config.yaml"
    config.write_text(yaml.safe_dump(raw))
    cfg = parse_config(raw)
    ray.init(num_cpus=4, include_dashboard=False)
    run_ingest(cfg, Request(source=str(base / "logs" / "*.csv"), fmt="events", holdout=None))
    run_train(cfg, TrainOptions())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    _deploy(config)
    _wait_serving(url)
    items = sorted({line.split(",")[1] for f in (base / "logs").glob("*.csv")
                    for line in f.read_text().splitlines()[1:200]})
    known_user = (base / "logs").glob("*.csv").__next__().read_text().splitlines()[1].split(",")[0]
    producer = Producer(url, os.environ["IG_EVENTS_TOKEN"], items, args.rate)
    producer.start()
    results = []
    pool = ThreadPoolExecutor(max_workers=1)  # hey runs in its own process; this only waits for it
    for phase in PHASES:
        producer.phase = phase
        loader = pool.submit(hey, f"{url}/recommend/{known_user}?k=20", args.phase_s, args.clients)
        time.sleep(2.0)
        fault_at = time.time()
        if phase == "kill a replica":
            ray.kill(ray.get_actor(_replica_actors()[0], namespace="serve"), no_restart=True)
        elif phase == "kill a live shard":
            ray.kill(ray.get_actor(shard_names(str(base / "root"), 2)[0], namespace=NAMESPACE), no_restart=False)
        elif phase == "restart the app":
            serve.delete(APP)
            kill_shards(str(base / "root"), 2)
            _deploy(config)
        fault_s = round(time.time() - fault_at, 2)
        row = {"phase": phase, "fault_s": fault_s, "recommend": loader.result(),
               "events_posted": producer.sent[phase], "events_failed": producer.failed[phase]}
        print(json.dumps(row), flush=True)
        results.append(row)
    producer.stop.set()
    producer.join(timeout=30)
    acked = producer.acked

    key, _ = resolve_key(True)
    time.sleep(cfg.serve.live_seal_s + 2)  # every acknowledged event's file is sealed: the next ingestion takes it
    ingested = run_ingest(cfg, Request(source=None, fmt="events", holdout=None))
    stored = storage_for(cfg).read_parquet(storage_for(cfg).list_files("interactions", suffix=".parquet"))
    have = set(zip(stored.column("user_key").to_pylist(), stored.column("item_id").to_pylist(),
                   pc.cast(stored.column("ts"), "int64").to_pylist(), strict=True))
    missing_ingested = sum((pseudonymise(e["user_id"], key), e["item_id"], e["ts"]) not in have for e in acked)
    not_folded = 0
    for e in acked:
        body = requests.get(f"{url}/recommend/{e['user_id']}", params={"k": 5}, timeout=30).json()
        not_folded += body.get("path") != "folded"
    final = {"acknowledged_events": len(acked), "missing_from_next_ingestion": missing_ingested,
             "missing_from_folding_after_recovery": not_folded, "ingested_accepted": ingested["accepted"],
             "phases": results}
    print(json.dumps(final), flush=True)
    serve.shutdown()
    kill_shards(str(base / "root"), 2)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
