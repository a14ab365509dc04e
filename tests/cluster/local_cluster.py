"""A real local Ray cluster for end-to-end tests: `ray start --head` on free ports with its own temp dir and auth
token (so it runs beside the test session's embedded Ray), jobs submitted the way a user submits them, and a stop
that ends only this cluster's processes (`ray stop` would end every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import requests

from cluster.jobs import last_json
from tests.helpers import free_ports

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def local_cluster(name: str, num_cpus: int, extra_env: dict[str, str] | None = None,
                  head_args: tuple[str, ...] = (), gcs_port: int | None = None) -> Iterator[dict]:
    """A head node; yields its dashboard address, the environment every client command needs, its GCS address and
    its temp dir. Removed with all its processes on exit."""
    temp_dir = f"/tmp/ig-{name}-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # Token authentication on, with this cluster's own token: the cluster and every client agree on it, whatever
    # ~/.ray/auth_token holds on this machine.
    env.update({"PATH": f"{BIN}:{env['PATH']}", "PYTHONPATH": str(ROOT), "IG_PSEUDONYM_KEY": "e2e-key",
                "IG_ADMIN_TOKEN": "e2e-admin", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
                **(extra_env or {})})
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    picked = free_ports(len(flags) + 2, avoid=frozenset({gcs_port} if gcs_port else ()))
    dashboard, gcs_port = picked[0], gcs_port or picked[1]
    ports = [f"--{flag}={port}" for flag, port in zip(flags, picked[2:], strict=True)]
    try:
        run(str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", *ports, f"--num-cpus={num_cpus}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", *head_args, env=env, timeout=120)
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "gcs_port": gcs_port, "temp_dir": temp_dir}
    finally:  # the whole cluster goes, Serve with it: no `serve shutdown` first (it waits on every replica)
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def run(*cmd: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def submit_command(address: str, *args: str, working_dir: bool = True) -> list[str]:
    """`ray job submit --working-dir . -- python -m ...` as a user types it (without the working dir where every node
    already has the project on its PYTHONPATH)."""
    where = ["--working-dir", "."] if working_dir else []
    return [str(BIN / "ray"), "job", "submit", "--address", address, *where, "--", "python", "-m", *args]


def job_submit(address: str, env: dict, *args: str, working_dir: bool = True) -> dict:
    """A job submitted as a user submits it; returns the job's JSON summary after checking its status."""
    done = run(*submit_command(address, *args, working_dir=working_dir), env=env)
    job_id = next(w.strip("'") for line in done.stdout.splitlines() for w in line.split()
                  if w.strip("'").startswith("raysubmit_"))
    status = run(str(BIN / "ray"), "job", "status", "--address", address, job_id, env=env)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status.stdout
    summary = last_json(done.stdout)
    assert summary is not None, done.stdout[-3000:]
    return summary


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_cluster(temp_dir: str) -> None:
    """Stop only the cluster this test started (`ray stop` would stop every Ray on the machine)."""
    roots = cluster_processes(temp_dir)
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


def wait_for_version(url: str, version: str, timeout_s: float) -> float:
    started = time.time()
    while time.time() - started < timeout_s:
        try:
            if requests.get(f"{url}/version", timeout=5).json().get("version") == version:
                return time.time() - started
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not serve {version} within {timeout_s} s")
