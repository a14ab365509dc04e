"""`python -m cluster.jobs --address http://HEAD:8265 ingest|train|update|main [-- ARGS...]`: submit a job to a cluster.

The same as `ray job submit --address ... --working-dir . -- python -m <module> ARGS` (the README lists those
lines), plus waiting for the end and returning the job's own JSON summary (its last JSON line). Secrets are not
sent in the job's runtime_env (the dashboard shows it): the cluster's nodes carry IG_PSEUDONYM_KEY and
IG_ADMIN_TOKEN in their environment; `--env NAME` forwards a variable deliberately.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"ingest": "datasets.ingest", "train": "trainers.train", "update": "trainers.update", "main": "cluster.main"}
# Not shipped with the working dir: environments, generated data, benchmark output.
EXCLUDES = [".venv", ".git", "var", "bench/out", ".pytest_cache", ".ruff_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobError(RuntimeError):
    pass


def entrypoint(job: str, args: list[str]) -> str:
    if job not in JOBS:
        raise JobError(f"unknown job {job!r}; one of {', '.join(JOBS)}")
    return shlex.join(["python", "-m", JOBS[job], *args])


def last_json(logs: str) -> dict[str, Any] | None:
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def _status(client: Any, job_id: str) -> str:
    status = client.get_job_status(job_id)
    return str(getattr(status, "value", status))


def submit(address: str, job: str, args: list[str], working_dir: Path = ROOT, env: list[str] | None = None,
           wait: bool = True, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Submit; with `wait`, block until the job ends and return its status and JSON summary."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": EXCLUDES}
    forwarded = {name: os.environ[name] for name in env or () if name in os.environ}
    if forwarded:
        runtime_env["env_vars"] = forwarded
    job_id = client.submit_job(entrypoint=entrypoint(job, args), runtime_env=runtime_env)
    if not wait:
        return {"job_id": job_id, "status": "PENDING"}
    deadline = time.time() + timeout_s
    status = _status(client, job_id)
    while status not in TERMINAL:
        if time.time() > deadline:
            client.stop_job(job_id)
            raise JobError(f"job {job_id} ({job}) did not finish within {timeout_s:.0f} s; stopped it")
        time.sleep(1.0)
        status = _status(client, job_id)
    logs = client.get_job_logs(job_id)
    return {"job_id": job_id, "status": status, "summary": last_json(logs), "logs_tail": logs[-2000:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.jobs", description=__doc__)
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                   help="the cluster's dashboard address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    p.add_argument("--env", action="append", default=[], help="forward this environment variable to the job")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("job", choices=sorted(JOBS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the job's own arguments (after --)")
    ns = p.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    try:
        result = submit(ns.address, ns.job, args, env=ns.env, wait=not ns.no_wait)
    except (JobError, ConnectionError, RuntimeError) as err:
        print(f"cluster.jobs: {err}", file=sys.stderr)
        return 1
    result.pop("logs_tail", None)
    print(json.dumps(result))
    return 0 if result["status"] in ("SUCCEEDED", "PENDING") else 1


if __name__ == "__main__":
    raise SystemExit(main())
