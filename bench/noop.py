"""The baseline of bench.serve: a no-op Serve deployment behind the same proxy (code Ray ships to replicas)."""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

noop_api = FastAPI()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
@serve.ingress(noop_api)
class NoOp:
    @noop_api.get("/")
    async def ok(self) -> dict[str, int]:
        return {"ok": 1}


def build_noop() -> Application:
    return NoOp.bind()
