"""The Serve app: a FastAPI ingress in front of autoscaling recommender replicas.

`serve run serve_app.app:build_app config_path=ray_config.yaml`, or `serve deploy cluster/serve_config.yaml`.
Callers use their own user ids; the ingress pseudonymises them exactly as ingestion did (DESIGN 3.4).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from cluster.config import AppConfig, load_config
from datasets.pseudonym import pseudonymise, resolve_key
from serve_app.recommender import Recommender

log = logging.getLogger("serve_app")
api = FastAPI(title="interest-graph recommendations")


class AppArgs(BaseModel):
    """Arguments of `build_app`, validated by Serve from the command line or a deploy config."""

    config_path: str = Field("ray_config.yaml", description="the app's configuration")
    root: str | None = Field(None, description="storage root (overrides data.root)")


def _check_id(kind: str, value: str, limit: int) -> None:
    if not value.strip():
        raise HTTPException(400, f"{kind} must not be empty")
    if len(value) > limit:
        raise HTTPException(400, f"{kind} is longer than {limit} characters")


def _answer(result: dict[str, Any]) -> dict[str, Any]:
    status = result.pop("status")
    if status != 200:
        raise HTTPException(status, result["detail"])
    return result


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, recommender: DeploymentHandle, config_path: str, root: str | None = None) -> None:
        cfg = load_config(config_path)
        self.recommender = recommender
        self.max_k = cfg.serve.max_k
        self.max_id = cfg.data.max_id_length
        self.key, self.dev_key = resolve_key(cfg.privacy.allow_dev_key)

    def _k(self, k: int) -> int:
        if k < 1 or k > self.max_k:
            raise HTTPException(400, f"k must be between 1 and {self.max_k}, got {k}")
        return k

    @api.get("/recommend/{user_id}")
    async def recommend(self, user_id: str, k: int = Query(20), category: str | None = Query(None),
                        exclude_seen: bool = Query(True)) -> dict[str, Any]:
        _check_id("user_id", user_id, self.max_id)
        if category is not None:
            _check_id("category", category, self.max_id)
        result = await self.recommender.recommend.remote(pseudonymise(user_id, self.key), self._k(k), exclude_seen,
                                                         category)
        return _answer(result)

    @api.get("/similar/{item_id}")
    async def similar(self, item_id: str, k: int = Query(20)) -> dict[str, Any]:
        _check_id("item_id", item_id, self.max_id)
        return _answer(await self.recommender.similar.remote(item_id, self._k(k)))

    @api.get("/version")
    async def version(self) -> dict[str, Any]:
        return await self.recommender.version.remote()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        served = await self.recommender.version.remote()
        return {"status": "ok" if served["version"] else "no model", "version": served["version"],
                "pseudonym_key": "development (NOT private)" if self.dev_key else "from IG_PSEUDONYM_KEY"}


def deployment_options(cfg: AppConfig) -> dict[str, Any]:
    """The recommender's Serve options, from serve.* in ray_config.yaml (cluster/ files are checked against it)."""
    s = cfg.serve
    return {
        "autoscaling_config": {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
        },
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    }


def build_app(args: AppArgs) -> Application:
    cfg = load_config(args.config_path)
    recommender = serve.deployment(Recommender).options(**deployment_options(cfg)).bind(args.config_path, args.root)
    return Ingress.options(ray_actor_options={"num_cpus": cfg.serve.ingress_cpus}).bind(
        recommender, args.config_path, args.root)
