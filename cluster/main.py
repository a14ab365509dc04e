"""`python -m cluster.main` (`make run`): the whole loop on an embedded local Ray.

Generates a behaviour log (unless --source names yours), ingests it, trains and publishes a first model, serves it
on http://<serve.host>:<serve.port>, then keeps the graph fresh: a periodic warm-start update loop in the
background and a small stream of live events posted to the app. Prints example recommendations and where to look,
and serves until Ctrl-C (or --duration-s), then shuts everything down. Each stage prints a JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

from core.cli import positive, run_command
from core.config import AppConfig
from datasets.adapters import SourceError
from datasets.ingest import resolve_request, run_ingest

log = logging.getLogger("cluster.main")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cluster.main", description=__doc__)
    p.add_argument("--config", default="ray_config.yaml", help="the app's configuration")
    p.add_argument("--source", help="your own behaviour log (path or glob); default: a generated one")
    p.add_argument("--format", help="adapter of --source (taobao, events, lightgcn, sequence)")
    p.add_argument("--holdout", help="lightgcn: the evaluation holdout file")
    p.add_argument("--root", help="storage root (overrides data.root)")
    p.add_argument("--users", type=int, default=2_000, help="generated log: shoppers")
    p.add_argument("--items", type=int, default=3_000, help="generated log: items")
    p.add_argument("--events", type=int, default=200_000, help="generated log: events")
    p.add_argument("--days", type=int, default=7, help="generated log: days of history")
    p.add_argument("--seed", type=int, default=0, help="generated log: random seed")
    p.add_argument("--epochs", type=int, help="first training's epochs (default: train.epochs)")
    p.add_argument("--update-every", type=float, default=60.0, help="seconds between warm-start update cycles")
    p.add_argument("--live-events-per-s", type=float, default=2.0, help="rate of the demo live-event stream")
    p.add_argument("--duration-s", type=float, help="stop after this long (default: serve until Ctrl-C)")
    p.add_argument("--no-serve", action="store_true", help="ingest and train only")
    return p


def _emit(stage: str, **fields: Any) -> None:
    print(json.dumps({"stage": stage, **fields}), flush=True)


def _prepare_source(args: argparse.Namespace, cfg: AppConfig) -> None:
    if args.source is None:
        from datasets.synth import generate

        logs = Path(cfg.data.root).resolve().parent / "demo-logs"
        if not any(logs.glob("events-*.csv")):
            info = generate(logs, users=args.users, items=args.items, events=args.events, days=args.days,
                            seed=args.seed)
            _emit("synth", **info)
        args.source, args.format = str(logs / "events-*.csv"), "events"
    req = resolve_request(cfg, args)
    # The update loop re-reads the same source (new files appear there) plus raw/, where live events land.
    cfg.data.source.path, cfg.data.source.format, cfg.data.source.holdout = req.source, req.fmt, req.holdout


def _known_shoppers(args: argparse.Namespace, n: int = 3) -> list[str]:
    """A few raw ids from a generated log (a user-supplied one is read only through ingestion)."""
    if args.format != "events" or "demo-logs" not in str(args.source):
        return []
    days = sorted(Path(args.source).parent.glob("events-*.csv"))
    if not days:
        return []
    ids: list[str] = []
    for line in days[-1].read_text().splitlines()[1:2000]:  # recent shoppers: the model knows them
        user = line.split(",", 1)[0]
        if user not in ids:
            ids.append(user)
        if len(ids) == n:
            break
    return ids


RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})  # the server's "later"; any other 4xx refuses the event


def retry_after(header: str | None, default_s: float = 1.0, most_s: float = 5.0) -> float:
    """Seconds a `Retry-After` header asks for (delta-seconds; a date or nonsense: `default_s`), at most `most_s`.
    A refused write's stall (a slow disk under a publish's fsync) outlasted the one second the demo used to wait."""
    try:
        seconds = float(header) if header is not None else default_s
    except ValueError:
        return default_s
    return min(max(seconds, 0.0), most_s) if math.isfinite(seconds) else default_s


class LiveStream(threading.Thread):
    """Demo shoppers clicking around: POST /events at a steady rate, for new and known shoppers."""

    def __init__(self, url: str, items: list[str], known: list[str], rate: float, stop: threading.Event,
                 token: str) -> None:
        super().__init__(name="live-events", daemon=True)
        self.url, self.items, self.known, self.rate, self.stop, self.token = url, items, known, rate, stop, token
        self.shoppers = [f"live-shopper-{i}" for i in range(3)] + known
        self.sent = self.retried = 0
        self.failures: dict[str, int] = {}  # by status code or exception: what a failed POST met

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def run(self) -> None:
        import random

        import requests

        rng = random.Random(0)
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.token}"
        while not self.stop.wait(1.0 / self.rate):
            event = {"user_id": rng.choice(self.shoppers), "item_id": rng.choice(self.items),
                     "event": rng.choice(["view", "view", "click", "cart", "purchase"]),
                     "ts": int(time.time() * 1000)}
            for _attempt in range(2):  # as a producer does: once more, after the server's Retry-After
                wait = 1.0
                try:
                    answer = session.post(f"{self.url}/events", json=[event], timeout=10)
                    status, wait = answer.status_code, retry_after(answer.headers.get("Retry-After"))
                    why, again = (None, False) if status == 200 else (str(status), status in RETRIED_STATUSES)
                except requests.RequestException as err:
                    why, again = type(err).__name__, True
                if not again or self.stop.wait(wait):
                    break
                self.retried += 1
            if why is None:
                self.sent += 1
            else:
                self.failures[why] = self.failures.get(why, 0) + 1


def _serve_and_refresh(args: argparse.Namespace, cfg: AppConfig, dashboard: str | None) -> dict:
    import requests
    from ray import serve

    import registry
    from core.storage import storage_for
    from datasets import idmaps
    from serve_app.app import EVENTS_TOKEN_ENV, AppArgs, build_app
    from serve_app.live_state import kill_shards
    from trainers.update import run_every

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())  # Ctrl-C: finish the cycle in progress, then stop
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    storage = storage_for(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(AppArgs(config_path=args.config, root=cfg.data.root)), name="interest-graph",
              route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    items = idmaps.load(storage, "item").column("key").to_pylist()[:500]
    known = _known_shoppers(args)
    stream = LiveStream(url, items, known, args.live_events_per_s, stop, os.environ.get(EVENTS_TOKEN_ENV, ""))
    stream.start()
    updates: list[dict] = []

    def emit(line: str) -> None:
        updates.append(json.loads(line))
        print(line, flush=True)

    updater = threading.Thread(target=run_every, args=(cfg, args.update_every, stop), kwargs={"emit": emit},
                               name="update-loop", daemon=True)
    time.sleep(min(3.0, args.update_every))  # let a few live events arrive before the first cycle
    updater.start()
    time.sleep(1.0)
    examples = {}
    for user in [*known[:2], "live-shopper-0"]:
        body = requests.get(f"{url}/recommend/{user}", params={"k": 5}, timeout=30).json()
        examples[user] = {"path": body.get("path"), "version": body.get("version"),
                          "items": [x["item_id"] for x in body.get("items", [])]}
    _emit("serving", url=url, examples=examples, version=registry.latest_version(storage),
          look_at={"recommendations": f"{url}/recommend/<user id>?k=20", "served version": f"{url}/version",
                   "health": f"{url}/healthz", "ray dashboard": dashboard,
                   "metrics": "ig_* Prometheus metrics through Ray's metrics export (dashboard > Metrics)"},
          stop="Ctrl-C" if args.duration_s is None else f"after {args.duration_s:.0f} s")
    deadline = None if args.duration_s is None else time.time() + args.duration_s
    served = 0
    while not stop.is_set() and (deadline is None or time.time() < deadline):
        stop.wait(5.0)
        try:
            served += requests.get(f"{url}/recommend/live-shopper-0", timeout=30).status_code == 200
        except requests.RequestException:
            pass
    stop.set()
    log.info("stopping: waiting for the update cycle in progress, then shutting Serve and Ray down")
    updater.join()
    stream.join(timeout=10)
    serve.shutdown()
    kill_shards(storage.root, cfg.serve.live_shards)
    return {"served": served, "live_events_sent": stream.sent, "live_events_failed": stream.failed,
            "live_events_failures": stream.failures,
            "live_events_retried": stream.retried,
            "update_cycles": len(updates), "published": [u["version"] for u in updates if u.get("version")],
            "latest": registry.latest_version(storage)}


def _main_job(args: argparse.Namespace, cfg: AppConfig) -> dict:
    import ray

    from core.runtime import ensure_ray
    from trainers.train import TrainOptions, run_train

    positive("--update-every", args.update_every)
    positive("--live-events-per-s", args.live_events_per_s)
    positive("--duration-s", args.duration_s)
    from serve_app.app import EVENTS_TOKEN_ENV

    _prepare_source(args, cfg)
    if not os.environ.get(EVENTS_TOKEN_ENV) and not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        # The demo posts live events to its own embedded app, which needs a producer token: one for this run only
        # (replicas inherit it because it is set before Ray starts). On a cluster the nodes carry the real one.
        os.environ[EVENTS_TOKEN_ENV] = secrets.token_hex(16)
        log.info("%s is not set: this run's app takes a one-off producer token", EVENTS_TOKEN_ENV)
    dashboard = ensure_ray(cfg, dashboard=True, long_lived=True)
    try:
        _emit("ingest", **run_ingest(cfg, resolve_request(cfg, args)))
        _emit("train", **run_train(cfg, TrainOptions(epochs=args.epochs)))
        if args.no_serve:
            return {"stage": "done"}
        return {"stage": "done", **_serve_and_refresh(args, cfg, dashboard)}
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    from core.writer_lock import WriterBusy
    from trainers.data import GraphMissingError

    return run_command(build_parser(), argv, _main_job, errors=(SourceError, GraphMissingError, WriterBusy))


if __name__ == "__main__":
    raise SystemExit(main())
