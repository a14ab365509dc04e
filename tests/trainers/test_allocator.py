"""The training workers' allocator: jemalloc preloaded into them where the machine has it, nothing otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_config
from trainers import allocator
from trainers.allocator import find_jemalloc, in_use, worker_env


def test_system_allocator_sets_nothing() -> None:
    assert worker_env("system", library="libjemalloc.so.2") == {}


def test_a_machine_without_jemalloc_runs_the_system_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    assert worker_env("jemalloc") == {}


def test_jemalloc_is_preloaded_with_large_blocks_kept_for_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert worker_env("jemalloc", library="libjemalloc.so.2") == {
        "LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": "oversize_threshold:0"}


def test_a_preload_already_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    assert worker_env("jemalloc", library="libjemalloc.so.2")["LD_PRELOAD"] == "libjemalloc.so.2 libother.so"


def test_a_process_ray_starts_with_the_worker_env_runs_on_jemalloc(ray_session) -> None:
    """The mechanism the Ray Train workers get (`trainer_for`'s worker_runtime_env): a Ray worker process started
    with this environment runs on jemalloc, and one started without it on the system's malloc. .ci/run installs it
    (Debian: libjemalloc2)."""
    import ray

    assert find_jemalloc() is not None, "libjemalloc is missing: apt-get install -y libjemalloc2"
    with_env = ray.remote(num_cpus=0.1, runtime_env={"env_vars": worker_env("jemalloc")})(in_use)
    without = ray.remote(num_cpus=0.1)(in_use)
    assert ray.get([with_env.remote(), without.remote()], timeout=120) == ["jemalloc", "system"]


def test_training_workers_get_the_allocator_env(tmp_path: Path) -> None:
    from trainers.loop import train_loop_per_worker
    from trainers.train import TrainOptions, trainer_for

    jemalloc = trainer_for(make_config(tmp_path), TrainOptions(), train_loop_per_worker, {}, "env-check")
    assert jemalloc.run_config.worker_runtime_env == {"env_vars": worker_env("jemalloc")}
    system = trainer_for(make_config(tmp_path, train={"allocator": "system"}), TrainOptions(),
                         train_loop_per_worker, {}, "env-check")
    assert not system.run_config.worker_runtime_env
