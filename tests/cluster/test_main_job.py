"""The README's run command in a short mode: it ingests, trains, serves, updates at least once while live events
flow, and shuts down with nothing left running."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_main_job_serves_updates_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "ray_config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(tmp_path / "data" / "root"), "shards": 2},
        "train": {"num_workers": 1, "embedding_dim": 16, "num_layers": 2, "batch_size": 512, "holdout_days": 1.0},
        "update": {"max_steps": 20},
        # Live files are sealed after 3 s (30 s by default), so the 20-second demo's cycles take its live events.
        "serve": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.2, "poll_interval_s": 0.5, "port": port,
                  "live_seal_s": 3.0},
    }))  # no cluster.num_cpus: the long-lived job counts its resident workers, Serve and ingestion itself
    temp_dir = f"/tmp/ig-main-{uuid.uuid4().hex[:6]}"  # this run's Ray, told apart from any other on the machine
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_TMPDIR": temp_dir, "IG_PSEUDONYM_KEY": "main-job-key"})
    done = subprocess.run(
        [sys.executable, "-m", "cluster.main", "--config", str(config), "--users", "200", "--items", "300",
         "--events", "20000", "--days", "4", "--epochs", "2", "--update-every", "5", "--duration-s", "20",
         "--live-events-per-s", "5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    shutil.rmtree(temp_dir, ignore_errors=True)  # only logs; every process is checked below by its command line
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    stages = {line.get("stage"): line for line in lines if "stage" in line}
    assert stages["ingest"]["accepted"] > 15_000
    assert stages["train"]["version"] == "v000001"
    serving = stages["serving"]
    assert serving["url"] == f"http://127.0.0.1:{port}" and serving["look_at"]["ray dashboard"]
    assert serving["examples"] and all(e["path"] in ("personalised", "folded", "popular")
                                       for e in serving["examples"].values())
    cycles = [line for line in lines if "cycle" in line]
    assert cycles and all("error" not in c for c in cycles), cycles
    final = stages["done"]
    assert final["served"] > 0 and final["update_cycles"] >= 1 and final["live_events_sent"] > 0
    assert final["live_events_failed"] == 0, final["live_events_failures"]
    assert any(c["ingested"]["accepted"] > 0 for c in cycles)  # the live events reached an update

    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
            if any(temp_dir in part for part in p.info["cmdline"] or ())]
    assert not left, f"still running: {left}"
    with socket.socket() as s:
        # Free again: nothing listens on it. SO_REUSEADDR, as every server sets, so that connections the stopped
        # server closed (TIME_WAIT for a minute) do not count as holding it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
