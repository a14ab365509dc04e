"""`python -m bench.train_scale`: memory and step time of the model and adjacency at 1M users, 1M items, 50M events.

A synthetic graph at that scale (50M power-law events aggregated into user-item pairs, 5k categories, 20k brands)
goes through the same code as training: normalised adjacency, spectral start skipped (noise start), negative
sampler, a few full-graph BPR steps with Adam. Reports peak resident memory of the process and the time per step,
from which the time per epoch follows. The reference: LightGCN's code needs more than 240 GiB for the adjacency
alone at 1M users.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import numpy as np
import torch

from trainers.graph import build_norm_adjacency, node_offsets
from trainers.losses import bpr_loss, l2_reg
from trainers.model import InterestGCN
from trainers.sampling import NegativeSampler, csr_from_pairs


def peak_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_scale", description=__doc__)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--events", type=int, default=50_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    out: dict = {"users": args.users, "items": args.items, "events": args.events}

    started = time.time()
    # Events in chunks so the raw 50M never sit in memory twice; power-law items, uniform users.
    keys = []
    for start in range(0, args.events, 10_000_000):
        n = min(10_000_000, args.events - start)
        u = rng.integers(0, args.users, n, dtype=np.int64)
        i = np.minimum((rng.pareto(1.2, n) * 1000).astype(np.int64), args.items - 1)
        keys.append(np.unique(u * args.items + i))
    pairs = np.unique(np.concatenate(keys))
    del keys
    users, items = pairs // args.items, pairs % args.items
    del pairs
    weight = np.ones(len(users), dtype=np.float32)
    cats, brands = 5_000, 20_000
    all_items = np.arange(args.items, dtype=np.int64)
    out.update({"pairs": int(len(users)), "generate_s": round(time.time() - started, 1)})

    started = time.time()
    adj = build_norm_adjacency(args.users, args.items, cats, brands, users, items, weight,
                               all_items, all_items % cats, all_items, all_items % brands)
    out.update({"adjacency_s": round(time.time() - started, 1), "adjacency_nnz": int(adj._nnz()),
                "peak_gib_after_adjacency": peak_gib()})

    offsets = node_offsets(args.users, args.items, cats, brands)
    model = InterestGCN(offsets.num_nodes, args.dim, args.layers)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    csr = csr_from_pairs(users, items, args.users, args.items)
    sampler = NegativeSampler(csr.indptr, csr.indices, args.items)
    step_s = []
    for _ in range(args.steps):
        started = time.time()
        idx = rng.integers(0, len(users), args.batch)
        u, pos = users[idx], items[idx]
        neg = sampler.sample(u, rng)
        u_t, p_t, n_t = (torch.from_numpy(a) for a in (u, pos + offsets.item, neg + offsets.item))
        emb = model(adj)
        ego = model.ego
        loss = bpr_loss(emb[u_t], emb[p_t], emb[n_t]) + 1e-4 * l2_reg(ego[u_t], ego[p_t], ego[n_t], args.batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        step_s.append(time.time() - started)
    step = float(np.median(step_s))
    steps_per_epoch = math.ceil(len(users) / args.batch)
    out.update({"step_s": round(step, 2), "steps_per_epoch": steps_per_epoch,
                "epoch_s_estimate": round(step * steps_per_epoch), "peak_gib": peak_gib()})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
