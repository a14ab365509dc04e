"""`python -m bench.train_gowalla`: Recall@20 / NDCG@20 against wall time on Gowalla's official split.

Side by side in one run on the same machine: popularity, implicit's iALS (factors 256, regularization 1.0,
alpha 10, 15 iterations) and our model trained by `trainers.train` on Ray Train (2 CPU workers by default) under a
fixed time budget. All three are scored by the same full-ranking metric code with training items masked.
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
import torch

from core.config import AppConfig, parse_config
from core.storage import Storage
from datasets.ingest import Request, run_ingest
from trainers.baselines import popularity_metrics
from trainers.data import load_graph, split
from trainers.metrics import recall_ndcg_at_k
from trainers.sampling import csr_from_pairs
from trainers.train import TrainOptions, run_train

OUT = Path(__file__).resolve().parent / "out"


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


def ials(cfg: AppConfig, threads: int) -> dict:
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    graph = load_graph(Storage(cfg.data.root))
    s = split(graph, "official")
    user_items = sp.csr_matrix((np.ones(len(s.train_user), np.float32), (s.train_user, s.train_item)),
                               shape=(graph.num_users, graph.num_items))
    # implicit parallelises over users itself; a multi-threaded BLAS inside that loop only fights it.
    with PeakMemory() as mem, threadpool_limits(1, "blas"):
        started = time.perf_counter()
        model = AlternatingLeastSquares(factors=256, regularization=1.0, alpha=10.0, iterations=15,
                                        num_threads=threads, random_state=0)
        model.fit(user_items, show_progress=False)
        fit_s = time.perf_counter() - started
    users, items = torch.from_numpy(np.asarray(model.user_factors)), torch.from_numpy(np.asarray(model.item_factors))
    train = csr_from_pairs(s.train_user, s.train_item, graph.num_users, graph.num_items)
    test = csr_from_pairs(s.test_user, s.test_item, graph.num_users, graph.num_items)
    m = recall_ndcg_at_k(lambda b: users[b] @ items.T, train, test, 20, 2048)
    return {"ranker": "iALS (implicit)", "seconds": round(fit_s, 1), "recall@20": m["recall@20"],
            "ndcg@20": m["ndcg@20"], "peak_gib": mem.gib}


def ours(cfg: AppConfig, workers: int, budget: float) -> dict:
    with PeakMemory() as mem:
        summary = run_train(cfg, TrainOptions(num_workers=workers, epochs=10_000, time_budget_s=budget))
    import registry

    history = registry.read_manifest(Storage(cfg.data.root), summary["version"])["extra"]["history"]
    epoch_s = np.diff([0.0] + [h["seconds"] for h in history])
    best = max(history, key=lambda h: h.get("recall@20", -1))
    return {"ranker": f"InterestGCN ({workers} Ray Train workers)", "seconds": summary["train_seconds"],
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
    p.add_argument("--batch-size", type=int, default=8192, help="per worker (2 workers: 16384 a step)")
    args = p.parse_args(argv)
    os.environ.setdefault("IG_PSEUDONYM_KEY", "bench-key")
    OUT.mkdir(exist_ok=True)
    cfg = parse_config({"data": {"root": str(OUT / "gowalla-root")},
                        "train": {"batch_size": args.batch_size, "use_gpu": args.use_gpu,
                                  "num_workers": args.workers, "eval_every": 1}})
    ingest_once(cfg, args.data)
    graph = load_graph(Storage(cfg.data.root))
    pop = popularity_metrics(graph, split(graph, "official"), 20)
    results = [{"ranker": "popularity", "seconds": 0.0, **pop}]
    print(json.dumps(results[-1]), flush=True)
    results.append(ials(cfg, threads=psutil.cpu_count() or 2))
    print(json.dumps(results[-1]), flush=True)
    results.append(ours(cfg, args.workers, args.budget_s))
    print(json.dumps(results[-1]), flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
