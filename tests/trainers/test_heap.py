"""The training steps' malloc settings, in a process started as a training worker is (trainers.heap.WORKER_ENV)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from trainers import heap

_PROBE = """
import json, resource
import torch
from trainers import heap

def faults(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        block = torch.ones(24 << 20)  # 96 MB: over every mmap threshold glibc has by default
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

with heap.reusing_freed_blocks() as took:
    faults(10)  # the heap grows to what the loop needs
    within = faults(5)
    held = rss()
print(json.dumps({"took": took, "within": within, "given_back": held - rss()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_within_the_steps_a_freed_block_is_reused_and_after_them_its_pages_go_back() -> None:
    env = {**os.environ, **heap.WORKER_ENV}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True,
                         timeout=120)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    pages = (96 << 20) // 4096
    assert got["took"]
    # Within: the block freed is the next one's, its pages already there (a few faults at most, not 24k a block).
    assert got["within"] < pages // 10, got
    # After: the heap's free pages are given back, so an evaluation's peak does not come on top of them.
    assert got["given_back"] >= 0.9 * (96 << 20), got
