"""How an embedded Ray is sized: long-lived jobs must still schedule ingestion next to their held workers."""

from __future__ import annotations

import os

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


def test_an_embedded_ray_gets_train_settings_for_one_node_and_a_users_own_value_wins(monkeypatch) -> None:
    from core.runtime import EMBEDDED_TRAIN_ENV, set_embedded_env

    for name in EMBEDDED_TRAIN_ENV:  # set, then removed: monkeypatch restores the variable's state after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "7")
    set_embedded_env()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "7"
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
