"""What a replica serves from: one verified checkpoint version, swapped as a whole when a newer one is published.

A `ServingModel` is immutable once built; a request takes the current reference once and finishes on it, so a
swap never mixes two versions in one answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import torch

import registry
from core.config import EventName
from core.storage import Storage

log = logging.getLogger("serve_app.model_store")
EXCLUSION_BLOCK_USERS = 262_144
EVENT_TYPES: tuple[str, ...] = get_args(EventName)  # the order of the evidence's counts (registry EVIDENCE)


@dataclass(frozen=True)
class ServingModel:
    version: str
    users: torch.Tensor  # [U, d]
    items: torch.Tensor  # [I, d]
    item_ids: list[str]
    item_row: dict[str, int]
    seen_indptr: np.ndarray  # every item each user touched (the evidence behind profiles and explanations)
    seen_indices: np.ndarray
    excluded_indptr: np.ndarray  # the part of it never recommended again: items with an event of data.seen_events
    excluded_indices: np.ndarray
    popular: np.ndarray  # item rows by popularity, most popular first
    popular_by_category: dict[str, np.ndarray]  # category id -> its item rows by popularity
    item_category: np.ndarray  # category index per item row, -1 when none
    category_index: dict[str, int]
    item_brand: np.ndarray  # brand index per item row, -1 when none
    user_keys: registry.UserKeys  # row -> user_key (None: a deleted user); .row(key) -> row
    category_ids: list[str]  # category index -> the category's id
    brand_ids: list[str]
    category_vectors: np.ndarray | None  # float32 [categories, d]; None in format-1 versions
    brand_vectors: np.ndarray | None
    seen_evidence: dict[str, np.ndarray] | None  # aligned with seen_indices (registry EVIDENCE); None: not carried
    watermark_ms: int  # newest event time the model learned from
    live_through_ms: int | None  # live events received before this are in the model (None: older versions)
    loaded_s: float
    item_norms: torch.Tensor  # [I]: cosine for /similar without a pass over every item per request
    index: Any = None  # the version's approximate index over `items` (registry.item_index); None: exact only

    def seen(self, row: int) -> np.ndarray:
        return self.seen_indices[self.seen_indptr[row] : self.seen_indptr[row + 1]]

    def excluded(self, row: int) -> np.ndarray:
        return self.excluded_indices[self.excluded_indptr[row] : self.excluded_indptr[row + 1]]


def exclusion_csr(indptr: np.ndarray, indices: np.ndarray, evidence: dict[str, np.ndarray] | None,
                  seen_events: Collection[str]) -> tuple[np.ndarray, np.ndarray]:
    """The seen items whose evidence holds an event of one of `seen_events`. A version without events by type (older,
    or from a log with one event type) excludes every seen item, as it always did. In blocks of users, so the
    temporaries follow a block, not every seen item of 10M shoppers."""
    if evidence is None or "counts" not in evidence or set(EVENT_TYPES) <= set(seen_events):
        return indptr, indices
    cols = [EVENT_TYPES.index(e) for e in seen_events]
    counts = evidence["counts"]
    n_users = len(indptr) - 1
    out = np.zeros(len(indptr), np.int64)
    kept = []
    for start in range(0, n_users, EXCLUSION_BLOCK_USERS):
        end = min(start + EXCLUSION_BLOCK_USERS, n_users)
        lo, hi = int(indptr[start]), int(indptr[end])
        keep = (np.asarray(counts[lo:hi])[:, cols] > 0).any(axis=1)
        running = np.concatenate(([0], np.cumsum(keep)))
        out[start + 1 : end + 1] = out[start] + running[np.asarray(indptr[start + 1 : end + 1]) - lo]
        kept.append(np.asarray(indices[lo:hi])[keep])
    return out, np.concatenate(kept) if kept else indices[:0].copy()


def build_serving_model(loaded: registry.LoadedVersion, seen_events: Collection[str] = EVENT_TYPES) -> ServingModel:
    """Everything a request reads, from the version alone (category names included); `seen_events`: which event
    types make an item seen (data.seen_events)."""
    started = time.time()
    excluded_indptr, excluded_indices = exclusion_csr(loaded.seen_indptr, loaded.seen_indices, loaded.seen_evidence,
                                                      seen_events)
    cat_keys = loaded.category_ids
    pop = loaded.popularity
    scores = pop.column("score").to_numpy()
    cat_of = pop.column("category_idx").to_numpy()
    rows = pop.column("item_idx").to_numpy()
    order = rows[np.argsort(-scores, kind="stable")]
    item_category = np.full(len(loaded.item_ids), -1, dtype=np.int64)
    item_category[rows] = cat_of
    item_brand = np.full(len(loaded.item_ids), -1, dtype=np.int64)
    item_brand[rows] = pop.column("brand_idx").to_numpy()
    by_category: dict[str, np.ndarray] = {}
    ordered_cats = item_category[order]
    for c in np.unique(cat_of[cat_of >= 0]):
        if c < len(cat_keys):
            by_category[cat_keys[c]] = order[ordered_cats == c]
    model = ServingModel(
        version=loaded.version,
        users=torch.from_numpy(loaded.user_vectors),
        items=torch.from_numpy(loaded.item_vectors),
        item_ids=loaded.item_ids,
        item_row={k: i for i, k in enumerate(loaded.item_ids)},
        seen_indptr=loaded.seen_indptr,
        seen_indices=loaded.seen_indices,
        excluded_indptr=excluded_indptr,
        excluded_indices=excluded_indices,
        popular=order,
        popular_by_category=by_category,
        item_category=item_category,
        category_index={k: i for i, k in enumerate(cat_keys)},
        item_brand=item_brand,
        user_keys=loaded.user_keys,
        category_ids=cat_keys,
        brand_ids=loaded.brand_ids,
        category_vectors=loaded.category_vectors,
        brand_vectors=loaded.brand_vectors,
        seen_evidence=loaded.seen_evidence,
        watermark_ms=int(loaded.watermark_ms or 0),
        live_through_ms=loaded.coverage.get("live_through_ms"),
        loaded_s=0.0,
        item_norms=torch.from_numpy(loaded.item_vectors).norm(dim=1).clamp_min(1e-12),
        index=loaded.item_index,
    )
    object.__setattr__(model, "loaded_s", time.time() - started)
    return model


class ModelWatcher:
    """Polls checkpoints/LATEST and swaps in each newer, verified version; refuses damaged ones and keeps serving.

    Loading happens on a background thread: requests keep being answered from the current model meanwhile, so the
    replica never leaves rotation (unlike Serve's `reconfigure`, which blocks the replica while it runs).
    """

    def __init__(self, storage: Storage, poll_interval_s: float, warm: Callable[[ServingModel], None],
                 on_swap: Callable[[ServingModel], None] | None = None,
                 on_refuse: Callable[[str, str], None] | None = None,
                 seen_events: Collection[str] = EVENT_TYPES) -> None:
        self.storage = storage
        self.seen_events = tuple(seen_events)
        self.poll_interval_s = poll_interval_s
        self._warm, self._on_swap, self._on_refuse = warm, on_swap, on_refuse
        self.current: ServingModel | None = None
        self.refused: set[str] = set()
        self.latest_problem: str | None = None  # why LATEST could not be used, last time it could not
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> bool:
        """Swap in the newest version that verifies, if it is newer than what is served; True when a swap happened.

        Normally that is what LATEST names. When LATEST is unreadable or names a damaged version, the newest other
        version that verifies is served instead (a replica that starts then still serves), and each damaged
        version is refused once, logged and counted."""
        current = self.current
        started = time.time()
        loaded, refused = registry.load_newest_good(self.storage, newer_than=current.version if current else None,
                                                    skip=self.refused)
        for version, why in refused.items():
            if version == "LATEST":  # the pointer itself: said once per distinct problem, nothing to remember
                if why != self.latest_problem:
                    log.error("checkpoints/LATEST is unusable (%s); serving the newest version that verifies", why)
                    self.latest_problem = why
                    self._refuse(version, why)
                continue
            self.refused.add(version)
            log.error("refused checkpoint %s: %s (still serving %s)", version, why,
                      current.version if current else "nothing")
            self._refuse(version, why)
        if loaded is None:
            return False
        try:
            model = build_serving_model(loaded, self.seen_events)
            self._warm(model)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            self.refused.add(loaded.version)
            log.error("refused checkpoint %s: %s (still serving %s)", loaded.version, err,
                      current.version if current else "nothing")
            self._refuse(loaded.version, str(err))
            return False
        object.__setattr__(model, "loaded_s", time.time() - started)
        self.current = model  # one reference swap: in-flight requests keep the model they took
        log.info("serving checkpoint %s (loaded, verified and warmed in %.2f s)", loaded.version, model.loaded_s)
        if self._on_swap:
            self._on_swap(model)
        return True

    def _refuse(self, version: str, why: str) -> None:
        if self._on_refuse:
            self._on_refuse(version, why)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="checkpoint-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the watcher must outlive a flaky read of LATEST
                log.exception("checking for a new checkpoint failed")

    def stop(self) -> None:
        self._stop.set()
