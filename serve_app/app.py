"""The Serve app: autoscaling recommender replicas that are their own FastAPI ingress.

`serve run serve_app.app:build_app config_path=ray_config.yaml`, or `serve deploy cluster/serve_config.yaml`.
Callers use their own user ids; a replica pseudonymises them exactly as ingestion did (DESIGN 3.4). A separate
ingress deployment in front cost half the throughput on 2 cores (one more actor hop per request), so the
recommender replicas take HTTP themselves and autoscale as one deployment.
"""

# No `from __future__ import annotations` here: FastAPI must see real types (a string `Request` becomes a query
# parameter under serve.ingress).
import asyncio
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from starlette.routing import Route

import registry
from core.config import AppConfig, load_config
from core.storage import LAST_INGEST, STATE, storage_for
from datasets.live_files import live_file_time_ms, write_deadline_s
from datasets.pseudonym import KEY_ENV, pseudonymise, resolve_key
from datasets.tombstones import add_tombstone, load_tombstones
from datasets.validate import Rules
from serve_app import query
from serve_app.events import BatchError, by_user, check, parse_batch, write_live
from serve_app.live_state import LiveEvent, LiveView, shard_handles
from serve_app.model_store import ServingModel
from serve_app.scorer import Scorer

ADMIN_TOKEN_ENV = "IG_ADMIN_TOKEN"
EVENTS_TOKEN_ENV = "IG_EVENTS_TOKEN"  # producers of POST /events
SHARD_RETRIES = 12  # about 20 s of backing off while a live shard restarts
EXPLORER = Path(__file__).with_name("explorer.html")
# The page's own script and styles only; data comes from this origin's API (admin calls carry the token by header).
EXPLORER_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
                "img-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

RECOMMEND_PARAMS = [
    query.Param("k", int, 20, "how many items (1 to serve.max_k)"),
    query.Param("category", str, None, "only items of this category"),
    query.Param("exclude_seen", bool, True, "leave out items the shopper has seen (data.seen_events)"),
    query.Param("explain", bool, False, "each item says why it was recommended"),
]

log = logging.getLogger("serve_app")
api = FastAPI(title="interest-graph recommendations")


async def _recommend_route(request: Request) -> Response:
    """GET /recommend/{user_id} in front of FastAPI's route for it: the same method, without FastAPI's dependency
    solving per request (the replica is Serve's, the user id the path's, the rest `query.read`). The FastAPI route
    stays what OpenAPI documents, and answers the same way were it ever reached."""
    replica = serve.get_replica_context().servable_object
    return await replica.recommend(request.path_params["user_id"], request)


# First in the router, and before the class below is decorated: serve.ingress deploys a frozen copy of `api` taken
# at decoration (a route added after it never reaches a replica), and includes the class's routes after this one.
api.router.routes.insert(0, Route("/recommend/{user_id}", _recommend_route, methods=["GET"]))


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


def _check_bearer(authorization: str | None, env: str, what: str) -> None:
    """A bearer token from `env`, compared in constant time. Fails closed: without the secret the feature is off."""
    expected = os.environ.get(env, "")
    if not expected:
        raise HTTPException(403, f"{what} is disabled: {env} is not set on the server")
    if not authorization or not authorization.lower().startswith("bearer "):
        raise HTTPException(401, f"{what} needs a bearer token", headers={"WWW-Authenticate": "Bearer"})
    given = authorization[7:].strip().encode("utf-8", "replace")
    if not hmac.compare_digest(given, expected.encode()):
        raise HTTPException(403, f"the token is not valid for {what}")


def _check_admin(authorization: str | None) -> None:
    _check_bearer(authorization, ADMIN_TOKEN_ENV, "this admin endpoint")


def _storage_unavailable(err: OSError, what: str) -> HTTPException:
    """Disk full, the store down: nothing was stored and the caller should retry; never a 500."""
    log.error("storing %s failed: %s", what, err)
    return HTTPException(503, f"{what} could not be stored durably right now ({type(err).__name__}); nothing was "
                              "stored, retry later", headers={"Retry-After": "5"})


# Module-level helpers the class calls must be defined above it: serve.ingress captures it when it is decorated.
@serve.deployment
@serve.ingress(api)
class Recommender:
    """One replica: HTTP, pseudonymisation and scoring in one process, so a request crosses no extra actor hop."""

    def __init__(self, config_path: str, root: str | None = None) -> None:
        cfg = load_config(config_path)
        if root:
            cfg.data.root = root
        s = cfg.serve
        self.max_k, self.max_id, self.max_audience = s.max_k, cfg.data.max_id_length, s.max_audience
        self.max_events, self.max_body, self.live_wait_s = s.max_events_per_batch, s.max_body_bytes, s.live_wait_s
        self.write_deadline_s = write_deadline_s(s.live_seal_s)
        self.rules = Rules(max_id_length=cfg.data.max_id_length, max_future_s=cfg.data.max_future_s)
        self.key, self.dev_key = resolve_key(cfg.privacy.allow_dev_key)
        if self.dev_key:
            log.warning("DEVELOPMENT pseudonym key in use: set %s; /healthz says so too", KEY_ENV)
        self.storage = storage_for(cfg)
        self.explorer = EXPLORER.read_text()  # the page, read once per replica
        self.shards = shard_handles(self.storage, s.live_shards, s.live_max_events_per_user, s.live_max_users,
                                    s.live_log_entries)
        self.live = LiveView(self.shards, s.live_max_events_per_user)
        self.live.deleted.update(load_tombstones(self.storage).to_pylist())  # deletions outlive the shard actors
        self.scorer = Scorer(cfg, on_swap=self._forget_covered)

    def _forget_covered(self, model: ServingModel) -> None:
        for shard in self.shards:  # fire and forget: the fold already ignores events the model covers
            shard.forget_covered.remote(model.live_through_ms, model.watermark_ms)

    def _k(self, k: int) -> int:
        if k < 1 or k > self.max_k:
            raise HTTPException(400, f"k must be between 1 and {self.max_k}, got {k}")
        return k

    @api.get("/recommend/{user_id}", response_class=Response, openapi_extra=query.openapi(RECOMMEND_PARAMS))
    async def recommend(self, user_id: str, request: Request) -> Response:
        """The shopper's top-k items (see DESIGN); the query parameters are RECOMMEND_PARAMS, read by hand."""
        p = query.read(request.query_params, RECOMMEND_PARAMS)
        _check_id("user_id", user_id, self.max_id)
        if p["category"] is not None:
            _check_id("category", p["category"], self.max_id)
        k = self._k(p["k"])
        user_key = pseudonymise(user_id, self.key)
        return query.json_response(_answer(await self.scorer.recommend(
            user_key, k, p["exclude_seen"], p["category"], live=self.live.events(user_key),
            deleted=self.live.is_deleted(user_key), explain=p["explain"])))

    @api.get("/interests/{user_id}")
    async def interests(self, user_id: str, k: int = Query(10)) -> dict[str, Any]:
        """The shopper's top categories and brands with their evidence and trend, and latent interests."""
        _check_id("user_id", user_id, self.max_id)
        user_key = pseudonymise(user_id, self.key)
        return _answer(await self.scorer.interests(user_key, self._k(k), live=self.live.events(user_key),
                                                   deleted=self.live.is_deleted(user_key)))

    @api.get("/audiences")
    async def audiences(self, category: str | None = Query(None), brand: str | None = Query(None),
                        top: int = Query(100), authorization: str | None = Header(None)) -> dict[str, Any]:
        """The shoppers most drawn to a category or brand (pseudonymous keys only); admin token."""
        _check_admin(authorization)
        for kind, value in (("category", category), ("brand", brand)):
            if value is not None:
                _check_id(kind, value, self.max_id)
        if top < 1 or top > self.max_audience:
            raise HTTPException(400, f"top must be between 1 and {self.max_audience} (larger audiences: the batch "
                                     f"job, python -m serve_app.audience), got {top}")
        return _answer(await self.scorer.audience(category, brand, top, frozenset(self.live.deleted)))

    @api.get("/ui", response_class=HTMLResponse)
    async def ui(self) -> HTMLResponse:
        """The explorer page for the people who run the system (its admin panels need the admin token)."""
        return HTMLResponse(self.explorer, headers={"Content-Security-Policy": EXPLORER_CSP,
                                                           "X-Content-Type-Options": "nosniff",
                                                           "Cache-Control": "no-store"})

    @api.get("/admin/users/{user_id}/live")
    async def user_live(self, user_id: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        """The shopper's live events as this replica holds them, newest first, and whether the model covers each."""
        _check_admin(authorization)
        _check_id("user_id", user_id, self.max_id)
        user_key = pseudonymise(user_id, self.key)
        replica = self.scorer.replica
        if self.live.is_deleted(user_key):
            return {"user_key": user_key, "deleted": True, "events": [], "replica": replica}
        covered = self.scorer.coverage()
        events = sorted(self.live.events(user_key), key=lambda e: -e.ts_ms)
        return {"user_key": user_key, "deleted": False, "replica": replica,
                "events": [{"item_id": e.item_id, "event": e.event, "ts_ms": e.ts_ms, "received_ms": e.received_ms,
                            "in_model": covered is not None and covered.covers(e)} for e in events]}

    @api.get("/admin/versions")
    async def versions(self, authorization: str | None = Header(None)) -> dict[str, Any]:
        """Published versions, newest first: lineage, metrics, whether a training curve was published."""
        _check_admin(authorization)
        return {"versions": await asyncio.to_thread(self._versions), "serving": self.scorer.version()["version"]}

    def _versions(self, limit: int = 50) -> list[dict[str, Any]]:
        serving = self.scorer.version()["version"]
        out = []
        for v in reversed(registry.list_versions(self.storage)[-limit:]):
            try:
                m = registry.read_manifest(self.storage, v)
            except registry.CheckpointError as err:
                out.append({"version": v, "damaged": str(err), "serving": False})
                continue
            out.append({"version": v, "parent": m["parent"], "created_at": m["created_at"], "metrics": m["metrics"],
                        "node_counts": m["node_counts"], "curve": registry.CURVE in m["files"],
                        "serving": v == serving, "refused": v in self.scorer.watcher.refused})
        return out

    @api.get("/admin/versions/{version}/curve.png")
    async def curve(self, version: str, authorization: str | None = Header(None)) -> Response:
        _check_admin(authorization)
        try:
            registry.version_number(version)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        try:
            png = await asyncio.to_thread(registry.read_curve, self.storage, version)
        except registry.CheckpointError as err:
            raise HTTPException(404, str(err)) from None
        if png is None:
            raise HTTPException(404, f"version {version} has no training curve")
        return Response(png, media_type="image/png")

    @api.get("/admin/ingestion")
    async def ingestion(self, authorization: str | None = Header(None)) -> dict[str, Any]:
        """The last ingestion that did something: its counts and rejects by reason."""
        _check_admin(authorization)
        try:
            last = await asyncio.to_thread(self.storage.read_json, self.storage.path(STATE, LAST_INGEST), None)
        except (OSError, ValueError) as err:  # the store down, a torn file: say so, retry later
            raise HTTPException(503, f"the ingestion summary cannot be read right now ({type(err).__name__})",
                                headers={"Retry-After": "5"}) from None
        return last or {"run": None}

    @api.get("/similar/{item_id}")
    async def similar(self, item_id: str, k: int = Query(20)) -> dict[str, Any]:
        _check_id("item_id", item_id, self.max_id)
        return _answer(await self.scorer.similar(item_id, self._k(k)))

    @api.post("/events")
    async def events(self, request: Request, authorization: str | None = Header(None)) -> dict[str, Any]:
        """Validate, write durably, then fold in on every replica before answering. Producers only: the platform's
        back end holds IG_EVENTS_TOKEN; browsers never post here."""
        _check_bearer(authorization, EVENTS_TOKEN_ENV, "POST /events")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise HTTPException(413, f"body is {declared} bytes; at most {self.max_body}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise HTTPException(413, f"body is over {self.max_body} bytes")
        try:
            batch = parse_batch(bytes(body), self.max_events)
        except BatchError as err:
            raise HTTPException(err.status, str(err)) from None
        checked = check(batch, self.rules, self.key, self.live.is_deleted)
        if not checked.accepted.num_rows:
            raise HTTPException(422, {"message": "no event in the batch is valid; nothing was stored",
                                      "accepted": 0, "refused": checked.refused})
        try:
            path = await self._persist(checked.accepted)
        except OSError as err:
            raise _storage_unavailable(err, "the events") from None
        received = live_file_time_ms(path) or int(time.time() * 1000)
        grouped: dict[int, dict[str, list[LiveEvent]]] = {}
        for user_key, rows in by_user(checked.accepted).items():
            grouped.setdefault(self.live.shard_of(user_key), {})[user_key] = [LiveEvent(*r, received) for r in rows]
        applied = await asyncio.gather(*[self._apply(i, users) for i, users in grouped.items()])
        return {"accepted": checked.accepted.num_rows, "refused": checked.refused, "stored": path,
                "applied_everywhere": all(applied)}

    async def _apply(self, shard: int, users: dict[str, list[LiveEvent]]) -> bool:
        """Hand durable events to their shard and wait until every replica has them. A shard that is restarting is
        retried for a while; one that stays away loses nothing (its restart rebuilds from the durable files, and
        the next update learns them): the write stands, `applied_everywhere` says false."""
        for attempt in range(SHARD_RETRIES):
            try:
                seq = await self.shards[shard].add.remote(users)
                break
            except ray.exceptions.RayError as err:
                if attempt == SHARD_RETRIES - 1:
                    log.error("live shard %d unavailable; %d users' events are durable but not applied: %s", shard,
                              len(users), err)
                    return False
                await asyncio.sleep(0.25 * (attempt + 1))
        try:
            return await self.shards[shard].wait_applied.remote(seq, self.live_wait_s)
        except ray.exceptions.RayError:  # applied on the shard; whether every replica has it yet is unknown
            return False

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _persist(self, tables: list[pa.Table]) -> list[str]:
        """Concurrent batches share one durable file (group commit); each answer waits for its file."""
        path = await asyncio.to_thread(write_live, self.storage, tables, self.scorer.replica, self.write_deadline_s)
        return [path] * len(tables)

    @api.delete("/users/{user_id}")
    async def delete_user(self, user_id: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        _check_admin(authorization)
        _check_id("user_id", user_id, self.max_id)
        user_key = pseudonymise(user_id, self.key)
        try:
            await asyncio.to_thread(add_tombstone, self.storage, user_key)
        except OSError as err:
            raise _storage_unavailable(err, "the deletion") from None
        self.live.apply_delete(user_key)
        shard = self.shards[self.live.shard_of(user_key)]
        seq = await shard.delete.remote(user_key)
        applied = await shard.wait_applied.remote(seq, self.live_wait_s)
        return {"deleted": True, "applied_everywhere": applied,
                "note": "personalisation stopped; the next ingestion and update drop the user's data"}

    @api.get("/version")
    async def version(self) -> dict[str, Any]:
        return self.scorer.version()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        served = self.scorer.version()
        return {"status": "ok" if served["version"] else "no model", "version": served["version"],
                "pseudonym_key": "development (NOT private)" if self.dev_key else f"from {KEY_ENV}"}

    def __del__(self) -> None:
        for part in ("scorer", "live"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close()


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
    return Recommender.options(**deployment_options(cfg)).bind(args.config_path, args.root)
