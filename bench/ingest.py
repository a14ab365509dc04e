"""`python -m bench.ingest`: ingestion speed and peak memory against a plain single-process pyarrow script.

Both sides get the same generated log and do the same validation (datasets.validate), pseudonymisation, exact-
duplicate removal and id mapping, and write Parquet. Each runs as its own process so peak memory is its own:
for the Ray side that is the sum over the driver and every Ray process (raylet, workers, object store), sampled.
Prints one JSON object per measurement and a final JSON list.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from datasets.synth import generate

OUT = Path(__file__).resolve().parent / "out"


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _ray_rss() -> int:
    """RSS of Ray's own processes (raylet, workers, GCS), which are not children of the driver."""
    total = 0
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd or "ray/_private" in cmd:
                total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Wall time and peak memory of a command and everything it starts; its last stdout line as JSON."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})
    ps = psutil.Process(proc.pid)
    base_used = psutil.virtual_memory().used
    peak_tree = peak_used = 0
    while proc.poll() is None:
        peak_tree = max(peak_tree, _tree_rss(ps) + _ray_rss())
        peak_used = max(peak_used, psutil.virtual_memory().used - base_used)
        time.sleep(0.2)
    out = proc.stdout.read() if proc.stdout else ""
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
    summary = json.loads(out.strip().splitlines()[-1])
    return {"seconds": round(seconds, 2), "peak_rss_gib": round(peak_tree / 2**30, 2),
            "peak_used_gib": round(peak_used / 2**30, 2), "summary": summary}


def ensure_log(events: int) -> Path:
    logs = OUT / f"log-{events}"
    if not any(logs.glob("events-*.csv")):
        users, items = max(1000, events // 50), max(2000, events // 25)
        generate(logs, users=users, items=items, events=events, days=10, seed=1)
    return logs


def run(events: int, sides: list[str], shards: int) -> list[dict]:
    logs = ensure_log(events)
    results = []
    for side in sides:
        root = Path(tempfile.mkdtemp(prefix=f"bench-ingest-{side}-", dir=OUT))
        if side == "ray":
            cfg = root / "cfg.yaml"
            cfg.write_text(f"data:\n  root: {root / 'data'}\n  shards: {shards}\n")
            cmd = [sys.executable, "-m", "datasets.ingest", "--config", str(cfg), "--source",
                   str(logs / "events-*.csv"), "--format", "events"]
        else:
            cmd = [sys.executable, "-m", "bench.ingest_baseline", "--source", str(logs), "--out", str(root)]
        m = measure(cmd)
        s = m["summary"]
        result = {"events": events, "side": side, "seconds": m["seconds"],
                  "events_per_s": round(events / m["seconds"]), "inner_seconds": s.get("seconds"),
                  "peak_rss_gib": m["peak_rss_gib"], "peak_used_gib": m["peak_used_gib"],
                  "accepted": s["accepted"], "duplicates": s["duplicates"]}
        print(json.dumps(result), flush=True)
        results.append(result)
        shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    p.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--sides", nargs="+", default=["baseline", "ray"], choices=["baseline", "ray"])
    p.add_argument("--shards", type=int, default=8)
    args = p.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    os.environ.setdefault("IG_PSEUDONYM_KEY", "bench-key")
    results = [r for n in args.events for r in run(n, args.sides, args.shards)]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
