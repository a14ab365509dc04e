"""How an embedded Ray is sized: long-lived jobs must still schedule ingestion next to their held workers."""

from __future__ import annotations

from core.config import parse_config
from core.runtime import detected_cpus, embedded_cpus


def test_short_jobs_keep_rays_own_count_and_an_explicit_count_always_wins() -> None:
    assert embedded_cpus(parse_config({}), long_lived=False) is None
    assert embedded_cpus(parse_config({"cluster": {"num_cpus": 3}}), long_lived=True) == 3


def test_long_lived_job_counts_resident_workers_serve_and_one_task() -> None:
    huge = parse_config({"train": {"num_workers": 64, "cpus_per_worker": 4.0}})
    assert embedded_cpus(huge, long_lived=True) == 64 * 4 + 2 * 0.5 + 1  # more than any machine here
    cfg = parse_config({"train": {"num_workers": 3, "cpus_per_worker": 2.0},
                        "serve": {"max_replicas": 3, "num_cpus": 0.5}})
    # 6 CPUs of update workers + 1.5 of replicas, rounded up, + 1 for a Ray Data task.
    assert embedded_cpus(cfg, long_lived=True) == max(detected_cpus(), 9)
    small = parse_config({"train": {"num_workers": 1}, "serve": {"max_replicas": 1, "num_cpus": 0.2}})
    assert embedded_cpus(small, long_lived=True) == max(detected_cpus(), 3)
