"""Joining a Ray cluster, or starting an embedded local one, the same way for every command."""

from __future__ import annotations

import logging
import os

import ray

from cluster.config import AppConfig

log = logging.getLogger(__name__)


def ensure_ray(cfg: AppConfig) -> None:
    """Connect to cluster.address / RAY_ADDRESS when given (as under `ray job submit`), else start Ray here."""
    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    kwargs: dict[str, object] = {"include_dashboard": False}
    if cfg.cluster.num_cpus:
        kwargs["num_cpus"] = cfg.cluster.num_cpus
    if cfg.cluster.object_store_mb:
        kwargs["object_store_memory"] = cfg.cluster.object_store_mb << 20
    ray.init(**kwargs)
