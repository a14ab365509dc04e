"""End to end on a real local cluster, the way a user runs it: `ray start --head`, `ray job submit` of ingest and
train, `serve deploy` of the config in cluster/, recommendations over HTTP, an update job whose version the
deployed app swaps in, and the cluster stopped again.

Every port of the cluster is chosen free, so it can run beside the test session's embedded Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from cluster.jobs import last_json
from datasets.synth import generate
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _run(*cmd: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _job_submit(address: str, env: dict, *args: str) -> dict:
    """`ray job submit --working-dir .` as a user types it; returns the job's JSON summary after checking its status."""
    done = _run(str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--", "python",
                "-m", *args, env=env)
    job_id = next(w.strip("'") for line in done.stdout.splitlines() for w in line.split()
                  if w.strip("'").startswith("raysubmit_"))
    status = _run(str(BIN / "ray"), "job", "status", "--address", address, job_id, env=env)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stdout
    summary = last_json(done.stdout)
    assert summary is not None, done.stdout[-3000:]
    return summary


def _cluster_processes(temp_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _stop_cluster(temp_dir: str) -> None:
    """Stop only the cluster this test started (`ray stop` would stop every Ray on the machine)."""
    roots = _cluster_processes(temp_dir)
    procs = {p.pid: p for p in roots}
    for p in roots:
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)  # then killed: only this test's logs remain
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:  # it exited between the wait and the kill
            pass
    psutil.wait_procs(alive, timeout=5)


def _wait_for_version(url: str, version: str, timeout_s: float) -> float:
    started = time.time()
    while time.time() - started < timeout_s:
        try:
            if requests.get(f"{url}/version", timeout=5).json().get("version") == version:
                return time.time() - started
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not serve {version} within {timeout_s} s")


@pytest.fixture()
def cluster(tmp_path: Path):
    temp_dir = f"/tmp/ig-e2e-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # Token authentication on, with this test's own token: the cluster and every client agree on it, whatever
    # ~/.ray/auth_token holds on this machine.
    env.update({"PATH": f"{BIN}:{env['PATH']}", "PYTHONPATH": str(ROOT), "IG_PSEUDONYM_KEY": "e2e-key",
                "IG_ADMIN_TOKEN": "e2e-admin", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex})
    dashboard = free_port()
    ports = [f"--{name}={free_port()}" for name in ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                    "metrics-export-port", "runtime-env-agent-port",
                                                    "ray-client-server-port", "node-manager-port",
                                                    "object-manager-port")]
    _run(str(BIN / "ray"), "start", "--head", *ports, "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats", env=env, timeout=120)
    try:
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "temp_dir": temp_dir}
    finally:  # the whole cluster goes, Serve with it: no `serve shutdown` first (it waits on every replica)
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_jobs_and_serve_deploy_on_a_real_cluster(cluster: dict, tmp_path: Path) -> None:
    address, env = cluster["address"], cluster["env"]
    logs, root = tmp_path / "logs", tmp_path / "root"
    generate(logs, users=300, items=400, events=20_000, days=6, seed=5)
    port = free_port()
    config = tmp_path / "ray_config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(root), "shards": 2, "source": {"path": str(logs / "*.csv"), "format": "events"}},
        "train": {"epochs": 2, "num_workers": 1, "embedding_dim": 16, "num_layers": 2, "batch_size": 512,
                  "holdout_days": 1.0},
        "update": {"max_steps": 20, "tolerance": 1.0},
        "serve": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.2, "poll_interval_s": 0.5},
    }))

    ingested = _job_submit(address, env, "datasets.ingest", "--config", str(config))
    assert ingested["input_rows"] == ingested["accepted"] + ingested["rejected"]["total"] + ingested["duplicates"]
    assert ingested["accepted"] > 15_000 and ingested["total_users"] > 0

    helper = _run(sys.executable, "-m", "cluster.jobs", "--address", address, "train", "--", "--config",
                  str(config), env=env)  # the thin helper, as a user runs it
    trained = json.loads(helper.stdout.strip().splitlines()[-1])
    assert trained["status"] == "SUCCEEDED", helper.stderr[-3000:]
    first = trained["summary"]["version"]
    assert first == "v000001" and trained["summary"]["metrics"]["recall@20"] >= 0

    deploy = tmp_path / "serve_config.yaml"
    doc = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    doc["http_options"] = {"host": "127.0.0.1", "port": port}
    doc["applications"][0]["args"]["config_path"] = str(config)
    deploy.write_text(yaml.safe_dump(doc))
    _run(str(BIN / "serve"), "deploy", str(deploy), "--address", address, env=env)
    url = f"http://127.0.0.1:{port}"
    _wait_for_version(url, first, 120)
    first_log = sorted(logs.glob("*.csv"))[0]
    user = first_log.read_text().splitlines()[1].split(",")[0]  # a shopper of the first day: known to the model
    body = requests.get(f"{url}/recommend/{user}", params={"k": 10}, timeout=30).json()
    assert body["path"] == "personalised" and body["version"] == first and len(body["items"]) == 10

    # A day later: new logs, an update job on the same cluster, and the deployed app serves its version.
    generate(tmp_path / "more", users=60, items=80, events=3_000, days=1, seed=6)
    for f in (tmp_path / "more").glob("*.csv"):
        f.rename(logs / f"later-{f.name}")
    updated = _job_submit(address, env, "trainers.update", "--config", str(config), "--once")
    assert updated["mode"] == "warm" and updated["parent"] == first and updated["ingested"]["accepted"] > 0
    assert updated["version"] is not None, updated  # update.tolerance 1.0 here: this test is about the swap
    assert _wait_for_version(url, updated["version"], 30) < 30
    again = requests.get(f"{url}/recommend/{user}", params={"k": 10}, timeout=30).json()
    assert again["version"] == updated["version"]
