"""Joining a Ray cluster, or starting an embedded local one, the same way for every command."""

from __future__ import annotations

import logging
import os
import shutil

import ray

from cluster.config import AppConfig

log = logging.getLogger(__name__)


HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def serve_env(cfg: AppConfig) -> dict[str, str]:
    """Environment for Serve's high-throughput mode (HAProxy ingress, direct gRPC between replicas).

    Only where it works: the HA proxy needs the `haproxy` binary on every node; without it Serve keeps its own proxy.
    """
    if not cfg.serve.high_throughput:
        return {}
    if shutil.which("haproxy") is None and not os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        log.warning("serve.high_throughput: no haproxy binary found, so Serve uses its default proxy")
        return {}
    return dict(HIGH_THROUGHPUT_ENV)


def ensure_ray(cfg: AppConfig) -> None:
    """Connect to cluster.address / RAY_ADDRESS when given (as under `ray job submit`), else start Ray here."""
    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Serve reads these when it starts inside this Ray, so they must be in place before ray.init.
    os.environ.update(serve_env(cfg))
    kwargs: dict[str, object] = {"include_dashboard": False}
    if cfg.cluster.num_cpus:
        kwargs["num_cpus"] = cfg.cluster.num_cpus
    if cfg.cluster.object_store_mb:
        kwargs["object_store_memory"] = cfg.cluster.object_store_mb << 20
    ray.init(**kwargs)
