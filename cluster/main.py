"""`python -m cluster.main` (`make run`): the whole loop on an embedded local Ray.

Generates a synthetic behaviour log (unless --source names one) and ingests it, printing each stage's JSON summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cluster.cli import run_command
from cluster.config import AppConfig
from datasets.adapters import SourceError
from datasets.ingest import resolve_request, run_ingest


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
    return p


def _main_job(args: argparse.Namespace, cfg: AppConfig) -> None:
    if args.source is None:
        from datasets.synth import generate

        logs = Path(cfg.data.root).parent / "demo-logs"
        if not any(logs.glob("events-*.csv")):
            info = generate(logs, users=args.users, items=args.items, events=args.events, days=args.days,
                            seed=args.seed)
            print(json.dumps({"stage": "synth", **info}), flush=True)
        args.source, args.format = str(logs / "events-*.csv"), "events"
    summary = run_ingest(cfg, resolve_request(cfg, args))
    print(json.dumps({"stage": "ingest", **summary}), flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, _main_job, errors=(SourceError,))


if __name__ == "__main__":
    raise SystemExit(main())
