"""`python -m bench.catalogue`: serving at catalogue scale, exact scoring against the version's approximate index.

For each catalogue size (default 100k, 1M and 5M items, 64 dims): synthetic item vectors with realistic clustering
(a few thousand interest clusters of power-law sizes, item lengths spread like popularity), shoppers drawn from
the same clusters with short seen lists, published as one real version with its index. Then, per size and in
one Serve instance behind one proxy (HAProxy mode where the binary exists, as in production): a no-op deployment,
the app with exact scoring (serve.index_min_items above the catalogue), the app through the index
(serve.index_min_items at or below it), both with precomputed answers off (this measures scoring per request),
and the app through the index as shipped (`index-precomputed`: known shoppers' answers precomputed through the
index after the swap, serve.precompute_depth), one replica each and one app at a time, each app's load phase
right after a no-op phase of its own, driven by hey (its own process; `bench.load`).

Reported per size: index build seconds and bytes, recall@20 of the index path against exact top-20 (seen items
excluded, as served) over sampled shoppers, for a request and for the precomputed answers, requests/s and p50/p99
per app, and each replica's resident memory (psutil, the replica's process) beside the version's matrices' sizes.
Prints one JSON object per size and a final JSON list.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.load import require_hey

if TYPE_CHECKING:
    from core.storage import Storage

OUT = Path(__file__).resolve().parent / "out"
DIM, CLUSTERS, USERS, SEEN = 64, 4000, 20_000, 30
BLOCK = 1_000_000


def synthetic(n_items: int, seed: int = 0, n_users: int = USERS, seen_per_user: int = SEEN, dim: int = DIM
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Item vectors, user vectors, seen lists (CSR: indptr, indices) and item clusters: clusters of Zipf-like
    sizes, lengths log-normal; everything in blocks of a million rows (10M shoppers' temporaries at once would not
    fit)."""
    rng = np.random.default_rng(seed)
    rows = BLOCK * DIM // max(dim, DIM)  # a block's float64 temporaries stay near 0.5 GB at any width
    centres = rng.normal(size=(CLUSTERS, dim)).astype(np.float32) / np.sqrt(dim)
    weights = 1.0 / np.arange(1, CLUSTERS + 1) ** 0.8
    weights /= weights.sum()
    cluster = rng.choice(CLUSTERS, n_items, p=weights).astype(np.int32)
    items = np.empty((n_items, dim), np.float32)
    for start in range(0, n_items, rows):
        end = min(start + rows, n_items)
        block = centres[cluster[start:end]] + rng.normal(0, 0.6 / np.sqrt(dim), (end - start, dim))
        items[start:end] = block * rng.lognormal(0, 0.25, (end - start, 1))
    users = np.empty((n_users, dim), np.float32)
    for start in range(0, n_users, rows):
        end = min(start + rows, n_users)
        likes = rng.choice(CLUSTERS, (end - start, 3), p=weights)
        users[start:end] = centres[likes].mean(axis=1) + rng.normal(0, 0.3 / np.sqrt(dim), (end - start, dim))
    counts, parts = np.zeros(n_users, np.int64), []
    for start in range(0, n_users, BLOCK):  # each shopper's distinct items, sorted (np.unique per row)
        end = min(start + BLOCK, n_users)
        drawn = np.sort(rng.integers(0, n_items, (end - start, seen_per_user)), axis=1)
        first = np.ones(drawn.shape, bool)
        first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
        counts[start:end] = first.sum(axis=1)
        parts.append(drawn[first].astype(np.int32))
    indptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return items, users, indptr, np.concatenate(parts) if parts else np.zeros(0, np.int32), cluster


def publish(root: str, items: np.ndarray, users: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
            cluster: np.ndarray, with_index: bool = True) -> tuple[str, float, int]:
    """One verified version with its index; returns it, the index's build seconds and bytes."""
    import pyarrow as pa

    import registry
    from core.storage import Storage
    from datasets.pseudonym import pseudonymise, resolve_key
    from registry.item_index import build

    key, _ = resolve_key()
    started = time.time()
    index = build(items) if with_index else None
    build_s = time.time() - started
    n = len(items)
    nnz = int(indptr[-1])
    # The evidence a real version carries per seen item (weights, counts by type, last time): part of its memory.
    # Every seen item viewed, one in ten bought (what the shipped data.seen_events, purchases, excludes).
    counts = np.zeros((nnz, 5), np.int32)
    counts[:, 0] = 1
    counts[::10, 4] = 1
    evidence = {"weight": np.ones(nnz, np.float32), "weight_recent": np.ones(nnz, np.float32),
                "counts": counts, "last_ts": np.full(nnz, 1_767_225_600_000, np.int64)}
    pop = pa.table({"item_idx": pa.array(np.arange(n, dtype=np.int32)),
                    "score": pa.array(np.linalg.norm(items, axis=1).astype(np.float32)),
                    "category_idx": pa.array((cluster % 100).astype(np.int32))})
    version = registry.publish(Storage(root), registry.ModelArtifacts(
        user_keys=pa.array([pseudonymise(f"u{u}", key) for u in range(len(users))]), user_vectors=users,
        item_ids=pa.array([f"i{i}" for i in range(n)]), item_vectors=items, seen_indptr=indptr,
        seen_indices=indices, popularity=pop, state_dict={}, hparams={},
        config_hash="bench-catalogue", metrics={}, k=20,
        node_counts={"user": len(users), "item": n, "category": 100, "brand": 0},
        category_ids=[f"c{c}" for c in range(100)], seen_evidence=evidence, item_index=index))
    return version, build_s, len(index) if index is not None else 0


_MEASURE = """
import gc, json, sys, time
import numpy as np
import psutil
import registry
from core.config import DataConfig
from core.storage import Storage
from serve_app.model_store import build_serving_model

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))

proc = psutil.Process()
before, anon_before = proc.memory_info().rss, status("RssAnon")
started = time.time()
model = build_serving_model(registry.load_latest(Storage(sys.argv[1])), DataConfig().seen_events)
load_s = time.time() - started
gc.collect()
rows = np.random.default_rng(0).integers(0, len(model.user_keys), 2000)
keys = [model.user_keys[int(r)] for r in rows]
started = time.perf_counter()
found = [model.user_keys.row(k) for k in keys]
lookup_us = (time.perf_counter() - started) / len(keys) * 1e6
assert found == rows.tolist()
from serve_app.ranking import top_k
started = time.perf_counter()
for row in found[:100]:  # answered as a replica scores a request exactly: seen items never come back
    items, _ = top_k(model, model.items @ model.users[row], row, 20, True, None, None)
    assert len(items) == 20 and not set(items) & set(model.excluded(row).tolist())
exact_ms = (time.perf_counter() - started) / 100 * 1e3
print(json.dumps({"rss_imports_mb": round(before / 2**20, 1), "rss_model_mb": round(proc.memory_info().rss / 2**20, 1),
                  "anon_imports_mb": round(anon_before, 1),
                  "anon_mb": round(status("RssAnon"), 1), "file_mapped_mb": round(status("RssFile"), 1),
                  "peak_mb": round(status("VmHWM"), 1),
                  "user_keys_mb": round(model.user_keys.nbytes / 2**20, 1), "load_s": round(load_s, 1),
                  "key_lookup_us": round(lookup_us, 2), "exact_request_ms": round(exact_ms, 1)}))
"""


def model_memory(root: str) -> dict:
    """What a replica holds for the version: a fresh process's resident memory before and after it loads the
    version as a replica does (`build_serving_model`, the shipped data.seen_events), and its peak while loading
    (VmHWM: getrusage's maxrss would count the parent's resident memory, which a forked child inherits)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _MEASURE, root], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def as_format_2(storage: Storage, version: str) -> None:
    """`version` as the format-2 code published it: the same files but the .npy vectors, which it did not write (it
    served the Parquet files' vectors). The replica memory before format 3, measured on the same version; the
    registry's tests use it for a format-2 version too."""
    import registry

    folder = Path(registry.version_folder(storage, version))
    manifest = json.loads((folder / registry.MANIFEST).read_text())
    for rel in (registry.USER_VECTORS, registry.ITEM_VECTORS):
        (folder / rel).unlink()
        del manifest["files"][rel]
    manifest["format"] = 2
    (folder / registry.MANIFEST).write_text(json.dumps(manifest))


def recall_at_20(root: str, sample: int, nprobe: int) -> dict:
    """The index path's top-20 against exact top-20, seen items excluded, over `sample` shoppers: per request, and
    in the answers a replica precomputes through the index (all shoppers, timed)."""
    import registry
    from core.config import ServeConfig
    from core.storage import Storage
    from serve_app import ranking
    from serve_app.answers import precompute_indexed
    from serve_app.model_store import build_serving_model

    model = build_serving_model(registry.load_latest(Storage(root)))
    rows = np.random.default_rng(1).choice(len(model.user_keys), sample, replace=False)
    started = time.perf_counter()
    answers = precompute_indexed(model, ServeConfig().precompute_depth, nprobe)
    precompute_s = time.perf_counter() - started
    assert answers is not None
    hits, precomputed_hits, took = [], [], []
    for row in rows.tolist():
        exact, _ = ranking.top_k(model, model.items @ model.users[row], row, 20, True, None)
        started = time.perf_counter()
        approx, _ = ranking.top_k_indexed(model, model.users[row], row, 20, True, None, None, nprobe)
        took.append(time.perf_counter() - started)
        hits.append(len(set(exact) & set(approx)) / 20)
        precomputed_hits.append(len(set(exact) & set(answers.top(row, 20)[0])) / 20)
    return {"recall@20_vs_exact": round(float(np.mean(hits)), 4),
            "precomputed_recall@20_vs_exact": round(float(np.mean(precomputed_hits)), 4),
            "index_query_ms_p50": round(float(np.median(took)) * 1000, 3), "users_sampled": sample,
            "precompute_s": round(precompute_s, 1), "precompute_users": len(model.user_keys)}


def replica_rss_mb(app: str) -> float | None:
    from bench.serve import replica_processes

    procs = replica_processes(app)
    return round(procs[0].memory_info().rss / 2**20, 1) if procs else None


def serve_phase(root: str, n_items: int, seconds: float, clients: int, users: int, nprobe: int) -> list[dict]:
    import ray
    import requests
    import yaml
    from ray import serve

    from bench.noop import build_noop
    from bench.serve import _free_port, load_phase, wait_precomputed
    from core.config import ServeConfig
    from serve_app.app import AppArgs, build_app

    ray.init(num_cpus=2, include_dashboard=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_noop(), name="noop", route_prefix="/noop")
    apps = {"exact": ("exact", n_items + 1, 0), "index": ("index", 1, 0),  # scoring, index_min_items, depth
            "index-precomputed": ("index", 1, ServeConfig().precompute_depth)}
    url = f"http://127.0.0.1:{port}"
    picked = [str(u) for u in range(0, USERS, USERS // users)][:users]  # the first USERS are in every model
    out = []
    # One app at a time beside the no-op (each replica holds the whole version: three at once do not fit 5M items
    # in this machine's memory), all behind the same proxy in the same Serve instance. Each app's phase follows a
    # no-op phase of its own, once the app is ready: this shared machine's speed drifts over minutes, so an app is
    # compared with the no-op measured next to it.
    for app, (scoring, min_items, depth) in apps.items():
        path = OUT / f"catalogue-{app}.yaml"
        path.write_text(yaml.safe_dump({"data": {"root": root}, "serve": {
            "min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5, "poll_interval_s": 1.0, "max_ongoing_requests": 64,
            "precompute_depth": depth, "index_min_items": min_items, "index_nprobe": nprobe}}))
        serve.run(build_app(AppArgs(config_path=str(path))), name=app, route_prefix=f"/{app}")
        wait_precomputed(f"{url}/{app}", 1, timeout_s=900)  # no phase shares the machine with loading or that
        info = requests.get(f"{url}/{app}/version", timeout=60).json()
        assert info["scoring"] == scoring and bool(info["precomputed"]) == (depth > 0), info
        urls = [f"{url}/{app}/recommend/u{u}?k=20" for u in picked]
        for u in urls[:3]:
            body = requests.get(u, timeout=120).json()
            if body.get("path") != "personalised":  # a miss would measure popularity lists
                raise RuntimeError(f"{u} answered {body.get('path')!r}, not a scored answer")
        noop = {"endpoint": f"noop (beside {app})", **load_phase([f"{url}/noop/"] * len(picked), clients, seconds)}
        r = {"endpoint": app, **load_phase(urls, clients, seconds), "replica_rss_mb": replica_rss_mb(app)}
        r["x_noop_rps"] = round(r["rps"] / noop["rps"], 3)
        r["x_noop_p99"] = None if r["p99_ms"] is None else round(r["p99_ms"] / noop["p99_ms"], 3)
        for row in (noop, r):
            print(json.dumps({"items": n_items, **row}), file=sys.stderr, flush=True)
        out += [noop, r]
        serve.delete(app)
    serve.shutdown()
    ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.catalogue", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000,5000000", help="catalogue sizes, comma-separated")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--users", type=int, default=2, help="distinct shoppers the load spreads over (a hey each)")
    p.add_argument("--nprobe", type=int, default=None, help="serve.index_nprobe (default: the config's)")
    p.add_argument("--recall-sample", type=int, default=300)
    p.add_argument("--model-users", type=int, default=USERS,
                   help="shoppers in each version (memory at scale: e.g. 1000000 with --sizes 1000000)")
    p.add_argument("--seen", type=int, default=SEEN, help="items drawn per shopper's seen list (distinct ones kept)")
    p.add_argument("--dim", type=int, default=DIM, help="vector width (the shipped model's: model.embedding_dim)")
    p.add_argument("--keep", action="store_true", help="keep each size's root under bench/out")
    p.add_argument("--memory-only", action="store_true",
                   help="publish and measure a replica's memory for the version; no recall, no serving")
    p.add_argument("--no-index", action="store_true", help="publish without the index (exact scoring's memory)")
    p.add_argument("--format-2", action="store_true",
                   help="--memory-only: also the same version as format 2 (vectors decoded from Parquet, as before)")
    args = p.parse_args(argv)
    require_hey()
    os.environ.setdefault("IG_PSEUDONYM_KEY", "bench-key")
    from core.config import ServeConfig
    from core.runtime import HIGH_THROUGHPUT_ENV, haproxy_binary

    if haproxy_binary() is not None:  # the production default (serve.high_throughput), as in bench.serve --mode ha
        os.environ.update(HIGH_THROUGHPUT_ENV)

    nprobe = args.nprobe or ServeConfig().index_nprobe
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        root = str(OUT / f"catalogue-{n}")
        shutil.rmtree(root, ignore_errors=True)
        items, users, indptr, indices, cluster = synthetic(n, n_users=max(args.model_users, USERS),
                                                           seen_per_user=args.seen, dim=args.dim)
        started = time.time()
        version, build_s, index_bytes = publish(root, items, users, indptr, indices, cluster,
                                                with_index=not args.no_index)
        publish_s = time.time() - started - build_s
        r = {"items": n, "users": len(users), "dim": args.dim, "version": version, "index_build_s": round(build_s, 1),
             "publish_s": round(publish_s, 1),
             "index_mb": round(index_bytes / 2**20, 1), "item_vectors_mb": round(items.nbytes / 2**20, 1),
             "user_vectors_mb": round(users.nbytes / 2**20, 1), "nprobe": nprobe}
        del items, users, indptr, indices, cluster
        if args.memory_only:
            r["replica_memory"] = model_memory(root)
            if args.format_2:
                import registry
                from core.storage import Storage

                storage = Storage(root)
                as_format_2(storage, registry.latest_version(storage))
                r["replica_memory_format_2"] = model_memory(root)
            print(json.dumps(r), flush=True)
            results.append(r)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
            continue
        r.update(recall_at_20(root, args.recall_sample, nprobe))
        gc.collect()  # the bench's own copy of the version, before the replicas load theirs
        r["serving"] = serve_phase(root, n, args.seconds, args.clients, args.users, nprobe)
        print(json.dumps(r), flush=True)
        results.append(r)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
