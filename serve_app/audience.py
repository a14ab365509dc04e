"""`python -m serve_app.audience --category C | --brand B [--top N] [--version V]`: the shoppers most drawn to a
category or brand, for a campaign, from a published version.

Every user is scored with Ray Data over blocks of the version's users (in parallel), each block keeps its best N,
and the driver merges them. The output is a Parquet of `user_key`, `affinity` and `rank` under
`audiences/<version>/<category|brand>=<name>-top<N>.parquet`: only pseudonymous keys leave the system. A platform
joins them to its own ids by applying the same keyed hash (`datasets.pseudonym.pseudonymise`, the key in
IG_PSEUDONYM_KEY) to its own user list; no raw id is stored anywhere. The same version gives the same audience.

Affinity: the shopper's recent evidence in the category or brand (the weight of their events there with the short
half-life, `data.recent_half_life_days`), plus `LATENT` times the cosine of their vector and the category's, which
orders shoppers who never touched it. The HTTP API (`GET /audiences`, admin token) scores the same way for a small N.
Users deleted since the version was trained (tombstones) are left out; the next ingestion also removes them from the
exports already written.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

import registry
from core.cli import run_command
from core.config import AppConfig
from core.storage import AUDIENCES, Storage, storage_for
from datasets.tombstones import load_tombstones
from serve_app.model_store import ServingModel, build_serving_model

log = logging.getLogger("serve_app.audience")
LATENT = 0.1  # weight of the latent (vector) part against evidence weights of order 1-10: orders the untouched


class AudienceError(ValueError):
    """A request that cannot be answered: no published version, not exactly one of category and brand."""


class UnknownTarget(AudienceError):
    """The category or brand is not in the version."""


@dataclass(frozen=True)
class Target:
    kind: str  # "category" or "brand"
    index: int
    name: str


def target_of(model: ServingModel, category: str | None, brand: str | None) -> Target:
    if (category is None) == (brand is None):
        raise AudienceError("give exactly one of category and brand")
    kind, name = ("category", category) if category is not None else ("brand", brand)
    names = model.category_ids if kind == "category" else model.brand_ids
    if name not in names:
        raise UnknownTarget(f"{kind} {name!r} is not in version {model.version}")
    return Target(kind, names.index(name), name)


def affinity(users: np.ndarray, user_vectors: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
             recent: np.ndarray | None, item_attr: np.ndarray, target: int, target_vector: np.ndarray | None
             ) -> np.ndarray:
    """Affinity of each of `users` (int64 rows) for the target category or brand (see the module's docstring)."""
    starts, ends = indptr[users], indptr[users + 1]
    lengths = ends - starts
    owner = np.repeat(np.arange(len(users)), lengths)
    pos = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
    items = indices[pos]
    weight = recent[pos] if recent is not None else np.ones(len(pos), np.float32)
    explicit = np.bincount(owner, weights=weight * (item_attr[items] == target), minlength=len(users))
    out = explicit.astype(np.float64)
    if target_vector is not None and np.linalg.norm(target_vector) > 0:
        u = user_vectors[users].astype(np.float64)
        cos = (u @ target_vector) / np.maximum(np.linalg.norm(u, axis=1) * np.linalg.norm(target_vector), 1e-12)
        out += LATENT * np.maximum(cos, 0.0)
    return out


def inputs_for(model: ServingModel, target: Target) -> dict[str, Any]:
    """The keyword arguments of `affinity` for one target, from the version as served (the job's and a replica's)."""
    is_category = target.kind == "category"
    vectors = model.category_vectors if is_category else model.brand_vectors
    evidence = model.seen_evidence
    return {"user_vectors": model.users.numpy(), "indptr": model.seen_indptr, "indices": model.seen_indices,
            "recent": evidence["weight_recent"] if evidence is not None else None,
            "item_attr": model.item_category if is_category else model.item_brand, "target": target.index,
            "target_vector": None if vectors is None else vectors[target.index].astype(np.float64)}


def ranked(scores: np.ndarray, rows: np.ndarray, keys: registry.UserKeys, top: int,
           deleted: Collection[str] = ()) -> pa.Table:
    """The `top` best of these users, highest affinity first, ties broken by key (reproducible); deleted users (no
    key in the version, or a tombstone since) never appear."""
    keep = keys.present(rows)
    if deleted:
        keep &= ~np.isin(rows, keys.rows_of(deleted))
    rows, scores = rows[keep], scores[keep]
    if len(scores) > top > 0:  # only users scoring at least the top-th best can be in it (ties at the cut included)
        cut = np.partition(scores, len(scores) - top)[len(scores) - top]
        rows, scores = rows[scores >= cut], scores[scores >= cut]
    order = np.lexsort((keys.sortable(rows), -scores))[:top]
    return pa.table({"user_key": pa.array([keys[int(r)] for r in rows[order]], pa.string()),
                     "affinity": pa.array(scores[order].astype(np.float32)),
                     "rank": pa.array(np.arange(1, len(order) + 1, dtype=np.int32))})


class _BlockScorer:
    """Ray Data callable: one block of user rows in, that block's best `top` out (the driver merges blocks)."""

    def __init__(self, inputs_ref: Any, keys_ref: Any, deleted_ref: Any, top: int) -> None:
        import ray

        self.inputs, self.keys, self.top = ray.get(inputs_ref), ray.get(keys_ref), top
        self.deleted = ray.get(deleted_ref)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = batch["id"].astype(np.int64)
        scores = affinity(rows, **self.inputs)
        best = ranked(scores, rows, self.keys, self.top, self.deleted)
        return {"user_key": np.array(best["user_key"].to_pylist(), dtype=object),
                "affinity": best["affinity"].to_numpy()}


def audience_of(model: ServingModel, target: Target, top: int, deleted: Collection[str] = ()) -> pa.Table:
    """Every user of the model scored at once, the best `top` kept (a replica's small audiences)."""
    rows = np.arange(len(model.user_keys), dtype=np.int64)
    return ranked(affinity(rows, **inputs_for(model, target)), rows, model.user_keys, top, deleted)


def audience_path(storage: Storage, version: str, target: Target, top: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", target.name)[:80]
    return storage.path(AUDIENCES, version, f"{target.kind}={safe}-top{top}.parquet")


def build_audience(cfg: AppConfig, category: str | None, brand: str | None, top: int, version: str | None = None,
                   blocks: int = 8) -> dict:
    """Score every user of the version with Ray Data and write the audience; returns the job's summary."""
    import ray

    from core.runtime import ensure_ray

    started = time.time()
    storage = storage_for(cfg)
    loaded = registry.load_version(storage, version) if version else registry.load_latest(storage)
    if loaded is None:
        raise AudienceError("no published version yet")
    model = build_serving_model(loaded)
    target = target_of(model, category, brand)
    ensure_ray(cfg)
    deleted = frozenset(load_tombstones(storage).to_pylist())  # deleted since the version was trained
    inputs_ref, keys_ref, deleted_ref = ray.put(inputs_for(model, target)), ray.put(model.user_keys), ray.put(deleted)
    n = len(model.user_keys)
    parts = (ray.data.range(n, override_num_blocks=max(1, min(blocks, n)))
             .map_batches(_BlockScorer, fn_constructor_args=(inputs_ref, keys_ref, deleted_ref, top), batch_size=None,
                          batch_format="numpy", concurrency=1)
             .to_arrow_refs())
    candidates = pa.concat_tables([t for t in ray.get(parts) if t.num_rows])
    keys = registry.UserKeys(candidates["user_key"])  # each user is in one block: the blocks' keys are distinct
    best = ranked(candidates["affinity"].to_numpy().astype(np.float64), np.arange(len(keys)), keys, top)
    path = audience_path(storage, model.version, target, top)
    storage.write_parquet(path, best, durable=True)
    return {"version": model.version, target.kind: target.name, "top": top, "users_scored": n,
            "audience": best.num_rows, "path": path, "seconds": round(time.time() - started, 3)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve_app.audience", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="ray_config.yaml", help="the app's configuration")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--category", help="the category's id, as in the logs")
    which.add_argument("--brand", help="the brand's id, as in the logs")
    p.add_argument("--top", type=int, default=1000, help="how many shoppers (default 1000)")
    p.add_argument("--version", help="a published version (default: LATEST)")
    p.add_argument("--root", help="storage root (overrides data.root)")
    return p


def _command(args: argparse.Namespace, cfg: AppConfig) -> dict:
    if args.top < 1:
        raise AudienceError(f"--top: must be positive, got {args.top}")
    return build_audience(cfg, args.category, args.brand, args.top, args.version)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, _command, errors=(AudienceError, registry.CheckpointError))


if __name__ == "__main__":
    raise SystemExit(main())
