"""HTTP load from a compiled load generator in its own process (`hey`, Debian's package), never Python threads in
the benchmark: what a serving figure measures is then the server, not the client.

`make bench-deps` installs hey. Each run reports the client's own CPU seconds, so a reader sees whether the client
was the bottleneck (it should stay far from the machine's cores).
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
from collections import Counter

INSTALL = "apt-get install -y hey  (or: make bench-deps)"


def require_hey() -> str:
    path = shutil.which("hey")
    if path is None:
        raise SystemExit(f"the serving benchmarks drive load with hey, which is not installed: {INSTALL}")
    return path


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def hey(url: str, seconds: float, concurrency: int = 8, method: str = "GET", headers: dict[str, str] | None = None,
        body: str | None = None, timeout_s: int = 20, qps_per_worker: float | None = None) -> dict:
    """Run hey for `seconds` with `concurrency` connections (keep-alive); its summary, parsed: requests/s,
    p50/p99 ms, status codes, connection errors, and hey's own CPU seconds."""
    cmd = [require_hey(), "-z", f"{seconds}s", "-c", str(concurrency), "-m", method, "-t", str(timeout_s)]
    if qps_per_worker:
        cmd += ["-q", str(qps_per_worker)]
    for name, value in (headers or {}).items():
        cmd += ["-H", f"{name}: {value}"]
    if body is not None:
        cmd += ["-d", body, "-T", "application/json"]
    before = _children_cpu_s()
    done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + timeout_s + 60)
    cpu = _children_cpu_s() - before
    out = parse_summary(done.stdout)
    out["client_cpu_s"] = round(cpu, 2)
    out["client_cpu_share"] = round(cpu / max(seconds, 1e-9), 3)  # of one core, averaged over the run
    return out


def parse_summary(text: str) -> dict:
    """hey's text summary: rps, latency percentiles, status codes and errors."""
    def number(pattern: str) -> float | None:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else None

    statuses: Counter = Counter()
    section = None
    errors = 0
    for line in text.splitlines():
        if line.startswith("Status code distribution"):
            section = "status"
            continue
        if line.startswith("Error distribution"):
            section = "errors"
            continue
        m = re.match(r"\s*\[(\d+)\]\s+(\d+) responses", line)
        if section == "status" and m:
            statuses[int(m.group(1))] += int(m.group(2))
        m = re.match(r"\s*\[(\d+)\]\s", line)
        if section == "errors" and m:
            errors += int(m.group(1))
    p50, p99 = number(r"50% in ([\d.]+) secs"), number(r"99% in ([\d.]+) secs")
    answered = sum(statuses.values())
    return {
        "requests": answered + errors,
        "rps": number(r"Requests/sec:\s+([\d.]+)"),
        "p50_ms": None if p50 is None else round(p50 * 1000, 2),
        "p99_ms": None if p99 is None else round(p99 * 1000, 2),
        "status": dict(sorted(statuses.items())),
        "non_2xx": sum(n for code, n in statuses.items() if not 200 <= code < 300) + errors,
        "errors": errors,
    }
