"""A replica's scoring: exact top-k over the item embeddings, batched across concurrent requests, or, for a
version that carries one (catalogues of at least serve.index_min_items), through its approximate index.

Exact scoring is one [batch, d] x [d, items] product: its cost grows with the catalogue, so past the switch point
a request searches the version's inverted file instead (serve.index_nprobe of its lists, a few percent of the
items at 1M). Both paths keep the same promises: seen items excluded, the category filter, live folding, /similar;
both precompute known users' answers after a swap.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import torch
from ray import serve

from core.config import AppConfig
from core.storage import storage_for
from serve_app import audience, profiles, ranking
from serve_app.answers import Answers, precompute, precompute_indexed
from serve_app.live_state import Coverage, LiveEvent
from serve_app.model_store import ModelWatcher, ServingModel

log = logging.getLogger("serve_app.scorer")
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]


class Metrics:
    """Prometheus metrics through Ray's metrics export (scraped from each node's metrics agent).

    A request only adds one to a local tally, flushed into `ig_requests_total` once a second by the replica's
    event loop, and one request in LATENCY_SAMPLE_EVERY is timed into `ig_request_latency_ms`: recording every
    request through Ray's metric API cost about as much as answering one from the precomputed answers. Ray Serve
    times every request per route itself (`ray_serve_deployment_processing_latency_ms`)."""

    LATENCY_SAMPLE_EVERY = 16
    FLUSH_S = 1.0

    def __init__(self) -> None:
        from ray.util import metrics

        self.latency = metrics.Histogram("ig_request_latency_ms", "request latency by endpoint and answering path "
                                         f"(one request in {self.LATENCY_SAMPLE_EVERY})",
                                         boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("endpoint", "path"))
        self.requests = metrics.Counter("ig_requests_total", "requests answered, by endpoint and answering path",
                                        tag_keys=("endpoint", "path"))
        self.version = metrics.Gauge("ig_model_version", "checkpoint version number served by this replica",
                                     tag_keys=("replica",))
        self.swaps = metrics.Counter("ig_model_swaps_total", "checkpoint versions swapped in")
        self.refused = metrics.Counter("ig_refused_versions_total", "checkpoint versions refused (damaged, partial)")
        self.tally: collections.Counter[tuple[str, str]] = collections.Counter()
        self._answered = 0
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on

    def answered(self, endpoint: str, path: str, started: float) -> None:
        """Count one answer. Called on the event loop that also flushes, so counting and flushing never race."""
        self.tally[(endpoint, path)] += 1
        self._answered += 1
        if self._answered % self.LATENCY_SAMPLE_EVERY == 0:
            self.latency.observe((time.perf_counter() - started) * 1000, tags={"endpoint": endpoint, "path": path})
        loop = asyncio.get_running_loop()
        if self._flush_on is not loop:  # none scheduled, or on a loop that has closed since
            self._flush_on = loop
            loop.call_later(self.FLUSH_S, self.flush)

    def flush(self) -> None:
        self._flush_on = None
        for (endpoint, path), n in self.tally.items():
            self.requests.inc(n, tags={"endpoint": endpoint, "path": path})
        self.tally.clear()


class Scorer:
    """The scoring state of one replica: the served model, its watcher and metrics. HTTP lives in `serve_app.app`."""

    def __init__(self, cfg: AppConfig, on_swap: Callable[[ServingModel], None] | None = None) -> None:
        self._on_swap = on_swap
        self.event_weights = dict(cfg.data.event_weights)
        self.half_life_s = cfg.serve.live_half_life_s
        self.prior_weight = cfg.serve.live_prior_weight
        self.max_share = cfg.serve.live_max_share
        self.replica = os.environ.get("RAY_SERVE_REPLICA_ID", str(os.getpid()))
        self.precompute_depth, self.precompute_max_users = cfg.serve.precompute_depth, cfg.serve.precompute_max_users
        self.index_min_items, self.nprobe = cfg.serve.index_min_items, cfg.serve.index_nprobe
        self.answers: Answers | None = None  # the served version's precomputed answers, once ready
        self._cancel_precompute = threading.Event()
        self.metrics = Metrics()
        storage = storage_for(cfg)
        self.seen_events = frozenset(cfg.data.seen_events)
        self.watcher = ModelWatcher(storage, cfg.serve.poll_interval_s, warm=self._warm, on_swap=self._swapped,
                                    on_refuse=lambda v, why: self.metrics.refused.inc(),
                                    seen_events=self.seen_events)
        try:  # a replica started later serves the newest good version from its first request
            self.watcher.poll_once()
        except OSError:  # storage unreachable for now: the watcher's thread keeps trying; requests get 503 till then
            log.exception("reading checkpoints failed; retrying every %.1f s", cfg.serve.poll_interval_s)
        self.watcher.start()

    def indexed(self, model: ServingModel) -> bool:
        """Whether requests on `model` go through its approximate index (else: exact scoring)."""
        return model.index is not None and len(model.item_ids) >= self.index_min_items

    def _warm(self, model: ServingModel) -> None:
        """One real query on the new model before it takes traffic (first-touch costs, shape errors)."""
        if len(model.users):
            ranking.top_k(model, model.users[:1] @ model.items.T, 0, min(10, len(model.item_ids)), True, None)
            if self.indexed(model):
                ranking.top_k_indexed(model, model.users[0], 0, min(10, len(model.item_ids)), True, None, None,
                                      self.nprobe)

    def precomputes(self, model: ServingModel) -> bool:
        """Whether `model`'s answers for known users are precomputed (through the index where it answers)."""
        return 0 < self.precompute_depth and 0 < len(model.users) <= self.precompute_max_users

    def answers_for(self, model: ServingModel) -> Answers | None:
        """The precomputed answers of `model`, once ready."""
        answers = self.answers
        return answers if answers is not None and answers.version == model.version else None

    def _swapped(self, model: ServingModel) -> None:
        from registry import version_number

        self._cancel_precompute.set()  # the previous version's, if still running
        if self.precomputes(model):
            self._cancel_precompute = threading.Event()
            threading.Thread(target=self._precompute, args=(model, self._cancel_precompute), name="precompute",
                             daemon=True).start()
        self.metrics.swaps.inc()
        self.metrics.version.set(version_number(model.version), tags={"replica": self.replica})
        if self._on_swap is not None:
            self._on_swap(model)

    def _precompute(self, model: ServingModel, cancelled: threading.Event) -> None:
        started = time.time()
        try:
            if self.indexed(model):  # users x items scoring per version is what the index avoids
                answers = precompute_indexed(model, self.precompute_depth, self.nprobe, cancelled)
            else:
                answers = precompute(model, self.precompute_depth, cancelled)
        except (RuntimeError, MemoryError) as err:  # requests keep being scored exactly
            log.error("precomputing answers for %s failed: %s", model.version, err)
            return
        if answers is not None and self.watcher.current is model:
            self.answers = answers
            log.info("precomputed the top %d of %d users for %s in %.2f s", answers.depth, len(answers.rows),
                     model.version, time.time() - started)

    def _personal(self, model: ServingModel, user_key: str, live: list[LiveEvent] | None, deleted: bool
                  ) -> tuple[int | None, list[LiveEvent]]:
        """The user's row in the model and their live events it does not cover yet; nothing for a deleted user."""
        if deleted:
            return None, []
        covered = Coverage(model.live_through_ms, model.watermark_ms)
        fresh = [e for e in live or () if not covered.covers(e) and e.item_id in model.item_row]
        return model.user_keys.row(user_key), fresh

    def _vector(self, model: ServingModel, row: int | None, fresh: list[LiveEvent], now_ms: float
                ) -> tuple[torch.Tensor | None, np.ndarray]:
        """The vector that scores for this user (trained, folded with their live events) and the live items' rows."""
        vector = model.users[row] if row is not None else None
        rows = np.array([model.item_row[e.item_id] for e in fresh], dtype=np.int64)
        if fresh:
            vector = ranking.fold(model, vector, rows, fresh, self.event_weights, self.half_life_s,
                                  self.prior_weight, now_ms, self.max_share)
        return vector, rows

    async def recommend(self, user_key: str, k: int, exclude_seen: bool, category: str | None,
                        live: list[LiveEvent] | None = None, deleted: bool = False, explain: bool = False
                        ) -> dict[str, Any]:
        """Top-k for one user. `live`: their live events (folded in while the served version does not cover them);
        `deleted`: a deleted user, who only gets non-personalised answers; `explain`: each item says why."""
        started = time.perf_counter()
        model = self.watcher.current
        if model is None:
            return {"status": 503, "detail": "no model published yet"}
        cat_idx = None
        if category is not None:
            cat_idx = model.category_index.get(category)
            if cat_idx is None or category not in model.popular_by_category:
                return {"status": 404, "detail": f"category {category!r} does not exist"}
        row, fresh = self._personal(model, user_key, live, deleted)
        answers = self.answers_for(model)
        if (row is not None and not fresh and cat_idx is None and exclude_seen and not explain
                and answers is not None and k <= answers.depth):
            items = _scored(model, *answers.top(row, k))  # exact scoring's answer, computed once per version
            self.metrics.answered("recommend", "personalised", started)
            return {"status": 200, "items": items, "version": model.version, "path": "personalised",
                    "replica": self.replica}
        if row is None and not fresh:
            pool = model.popular if cat_idx is None else model.popular_by_category[category]
            items = [{"item_id": model.item_ids[i], "score": None} for i in pool[:k]]
            if explain:
                for it in items:
                    it["because"] = [{"source": "popular"}]
            path = "popular"
        else:
            now_ms = time.time() * 1000
            vector, live_rows = self._vector(model, row, fresh, now_ms)
            live_seen = ranking.seen_live(live_rows, fresh, self.seen_events)
            if self.indexed(model):
                rows, vals = ranking.top_k_indexed(model, vector, row, k, exclude_seen, cat_idx, live_seen,
                                                   self.nprobe)
            else:
                scores = await self._scores((model, vector))
                rows, vals = ranking.top_k(model, scores, row, k, exclude_seen, cat_idx, live_seen)
            items = _scored(model, rows, vals)
            if explain:
                why = await asyncio.to_thread(self._explain, model, row, live_rows, fresh, vector, now_ms, rows)
                for it, because in zip(items, why, strict=True):
                    it["because"] = because
            path = "personalised" if row is not None else "folded"
        self.metrics.answered("recommend", path, started)
        return {"status": 200, "items": items, "version": model.version, "path": path, "replica": self.replica}

    def _explain(self, model: ServingModel, row: int | None, live_rows: np.ndarray, fresh: list[LiveEvent],
                 vector: torch.Tensor, now_ms: float, rows: list[int]) -> list[list[dict]]:
        x = profiles.explainer(model, row, live_rows, fresh, vector, self.event_weights, self.half_life_s,
                               self.prior_weight, now_ms, self.max_share)
        return [profiles.explain(model, x, r) for r in rows]

    async def interests(self, user_key: str, k: int, live: list[LiveEvent] | None = None, deleted: bool = False
                        ) -> dict[str, Any]:
        """The user's interest profile (see `serve_app.profiles`); 404 for a user the model and the live state do
        not know, and for a deleted one (nothing personal, as for /recommend)."""
        started = time.perf_counter()
        model = self.watcher.current
        if model is None:
            return {"status": 503, "detail": "no model published yet"}
        row, fresh = self._personal(model, user_key, live, deleted)
        if row is None and not fresh:
            return {"status": 404, "detail": "no interest profile for this user (unknown, or no events yet)"}
        vector, _ = self._vector(model, row, fresh, time.time() * 1000)
        ev = profiles.evidence(model, row, fresh, self.event_weights)
        out = profiles.profile(model, ev, vector, k)
        path = "personalised" if row is not None else "folded"
        self.metrics.answered("interests", path, started)
        return {"status": 200, "version": model.version, "path": path, "replica": self.replica, **out}

    async def audience(self, category: str | None, brand: str | None, top: int, deleted: Collection[str] = ()
                       ) -> dict[str, Any]:
        """The `top` users most drawn to a category or brand, scored like the audience job (the served version)."""
        model = self.watcher.current
        if model is None:
            return {"status": 503, "detail": "no model published yet"}
        try:
            target = audience.target_of(model, category, brand)
        except audience.AudienceError as err:
            return {"status": 404 if isinstance(err, audience.UnknownTarget) else 400, "detail": str(err)}
        best = await asyncio.to_thread(audience.audience_of, model, target, top, deleted)
        return {"status": 200, "version": model.version, target.kind: target.name, "top": top,
                "users": [{"user_key": key, "affinity": round(float(a), 6), "rank": int(r)} for key, a, r in
                          zip(best["user_key"].to_pylist(), best["affinity"].to_pylist(), best["rank"].to_pylist(),
                              strict=True)]}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
    async def _scores(self, requests: list[tuple[ServingModel, torch.Tensor]]) -> list[torch.Tensor]:
        """Concurrent requests share one matrix product per model version in the batch."""
        out: list[torch.Tensor | None] = [None] * len(requests)
        by_model: dict[int, list[int]] = {}
        for i, (model, _) in enumerate(requests):
            by_model.setdefault(id(model), []).append(i)
        for positions in by_model.values():
            model = requests[positions[0]][0]
            vectors = torch.stack([requests[p][1] for p in positions])
            scores = vectors @ model.items.T
            for j, p in enumerate(positions):
                out[p] = scores[j]
        return out  # type: ignore[return-value]

    async def similar(self, item_id: str, k: int) -> dict[str, Any]:
        started = time.perf_counter()
        model = self.watcher.current
        if model is None:
            return {"status": 503, "detail": "no model published yet"}
        row = model.item_row.get(item_id)
        if row is None:
            return {"status": 404, "detail": f"item {item_id!r} is not in model {model.version}"}
        if self.indexed(model):
            rows, vals = ranking.similar_indexed(model, row, k, self.nprobe)
        else:
            rows, vals = ranking.similar(model, row, k)
        self.metrics.answered("similar", "personalised", started)
        return {"status": 200, "version": model.version, "path": "personalised", "replica": self.replica,
                "items": _scored(model, rows, vals)}

    def coverage(self) -> Coverage | None:
        model = self.watcher.current
        return Coverage(model.live_through_ms, model.watermark_ms) if model else None

    def version(self) -> dict[str, Any]:
        model = self.watcher.current
        return {"version": model.version if model else None, "replica": self.replica,
                "scoring": None if model is None else "index" if self.indexed(model) else "exact",
                "loaded_s": round(model.loaded_s, 3) if model else None, "refused": sorted(self.watcher.refused),
                # true once ready, false while being computed, null for a version that is not precomputed
                "precomputed": None if model is None or not self.precomputes(model) else
                self.answers_for(model) is not None}

    def close(self) -> None:
        self.watcher.stop()
        self.metrics.flush()  # the last second's counts


def _scored(model: ServingModel, rows: list[int], vals: list[float] | np.ndarray) -> list[dict[str, Any]]:
    """An answer's items: ids and scores (6 decimals), best first."""
    ids = model.item_ids
    scores = np.round(np.asarray(vals, dtype=np.float64), 6).tolist()  # one vector op, not a round() per item
    return [{"item_id": ids[i], "score": s} for i, s in zip(rows, scores, strict=True)]
