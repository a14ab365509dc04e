"""`python -m bench.train_gowalla`: Recall@20 / NDCG@20 against wall time on Gowalla's official split.

Side by side in one run on the same machine: popularity, GF-CF (the training-free graph filter, `bench.gfcf`;
published at 0.1849 / 0.1518 on this split), implicit's iALS (factors 256, regularization 1.0, alpha 10, 15
iterations) and our model trained by `trainers.train` on Ray Train (2 CPU workers by default) under a fixed time
budget, with the shipped `ray_config.yaml` as it is (only the storage root, the workers and the budget, a cap on the
shipped epochs, differ; `--set train.KEY=VALUE` overrides a key for an experiment, e.g. `--set epochs=10000` to train
until the budget, and the JSON says which). All are
scored by the same full-ranking metric code with training items masked. `--only` runs a subset.
Prints one JSON object per ranker and a final JSON list.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import scipy.sparse as sp
import torch

from bench.defaults import shipped, train_overrides
from core.config import AppConfig
from core.storage import Storage
from datasets.ingest import Request, run_ingest
from trainers.baselines import popularity_metrics
from trainers.data import load_graph, split
from trainers.metrics import recall_ndcg_at_k
from trainers.train import TrainOptions, run_train

OUT = Path(__file__).resolve().parent / "out"
RANKERS = ("popularity", "gfcf", "ials", "ours")


class PeakMemory:
    """Peak rise of the machine's used memory while the block runs (every process, Ray's included)."""

    def __enter__(self) -> PeakMemory:
        self.base = psutil.virtual_memory().used
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, psutil.virtual_memory().used - self.base)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return round(self.peak / 2**30, 2)


def ingest_once(cfg: AppConfig, data: Path) -> None:
    if Storage(cfg.data.root).exists("graph", "meta.json"):
        return
    d = data / "gowalla"
    run_ingest(cfg, Request(source=str(d / "train.txt"), fmt="lightgcn", holdout=str(d / "test.txt")))


def _matrices(cfg: AppConfig) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Binary training and test matrices of the official split (users x items)."""
    graph = load_graph(Storage(cfg.data.root))
    s = split(graph, "official")

    def csr(u: np.ndarray, i: np.ndarray) -> sp.csr_matrix:
        m = sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(graph.num_users, graph.num_items))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    return csr(s.train_user, s.train_item), csr(s.test_user, s.test_item)


def gfcf(cfg: AppConfig) -> dict:
    from bench.gfcf import gfcf_metrics

    train, test = _matrices(cfg)
    with PeakMemory() as mem:
        out = gfcf_metrics(train, test, k=20, rank=256, alpha=0.3)
    return {**out, "published": {"recall@20": 0.1849, "ndcg@20": 0.1518}, "peak_gib": mem.gib}


def ials(cfg: AppConfig, threads: int) -> dict:
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    user_items, test_m = _matrices(cfg)
    # implicit parallelises over users itself; a multi-threaded BLAS inside that loop only fights it.
    with PeakMemory() as mem, threadpool_limits(1, "blas"):
        started = time.perf_counter()
        model = AlternatingLeastSquares(factors=256, regularization=1.0, alpha=10.0, iterations=15,
                                        num_threads=threads, random_state=0)
        model.fit(user_items, show_progress=False)
        fit_s = time.perf_counter() - started
    users, items = torch.from_numpy(np.asarray(model.user_factors)), torch.from_numpy(np.asarray(model.item_factors))
    m = recall_ndcg_at_k(lambda b: users[b] @ items.T, user_items, test_m, 20, 2048)
    return {"ranker": "iALS (implicit)", "seconds": round(fit_s, 1), "recall@20": m["recall@20"],
            "ndcg@20": m["ndcg@20"], "peak_gib": mem.gib}


def ours(cfg: AppConfig, workers: int, budget: float, overrides: dict) -> dict:
    with PeakMemory() as mem:
        summary = run_train(cfg, TrainOptions(num_workers=workers, time_budget_s=budget))
    import registry

    history = registry.read_manifest(Storage(cfg.data.root), summary["version"])["extra"]["history"]
    epoch_s = np.diff([0.0] + [h["seconds"] for h in history])
    best = max(history, key=lambda h: h.get("recall@20", -1))
    return {"ranker": f"InterestGCN ({workers} Ray Train workers)", "overrides": overrides,
            "seconds": summary["train_seconds"],
            "command_seconds": summary["seconds"], "recall@20": summary["metrics"]["recall@20"],
            "ndcg@20": summary["metrics"]["ndcg@20"], "best_recall@20": best["recall@20"],
            "epochs": summary["epochs"], "median_epoch_s": round(float(np.median(epoch_s)), 1),
            "peak_gib": mem.gib, "version": summary["version"],
            "curve": [{"s": h["seconds"], "recall@20": round(h.get("recall@20", float("nan")), 4)}
                      for h in history]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_gowalla", description=__doc__)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("IG_REAL_DATA", "../shared/data")))
    p.add_argument("--budget-s", type=float, default=900.0, help="training budget of our model")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a train key of the shipped config for ours (YAML value), e.g. --set lr=0.01")
    p.add_argument("--only", default=",".join(RANKERS), help=f"comma-separated subset of {','.join(RANKERS)}")
    args = p.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := sorted(set(only) - set(RANKERS)):
        p.error(f"--only: unknown ranker(s) {', '.join(unknown)}; choose from {', '.join(RANKERS)}")
    os.environ.setdefault("IG_PSEUDONYM_KEY", "bench-key")
    OUT.mkdir(exist_ok=True)
    try:
        overrides = train_overrides(args.set)
    except ValueError as e:
        p.error(f"--set {e}")
    cfg = shipped(OUT / "gowalla-root",
                  train={**overrides, "use_gpu": args.use_gpu, "num_workers": args.workers, "eval_every": 1})
    ingest_once(cfg, args.data)
    results = []
    for name in only:
        if name == "popularity":
            graph = load_graph(Storage(cfg.data.root))
            pop = popularity_metrics(graph, split(graph, "official"), 20)
            results.append({"ranker": "popularity", "seconds": 0.0, **pop})
        elif name == "gfcf":
            results.append(gfcf(cfg))
        elif name == "ials":
            results.append(ials(cfg, threads=psutil.cpu_count() or 2))
        else:
            results.append(ours(cfg, args.workers, args.budget_s, overrides))
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
