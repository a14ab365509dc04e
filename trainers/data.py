"""What the trainer reads from ingestion's output (graph/, idmaps/, holdout/) and how it splits it for evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.storage import GRAPH, HOLDOUT, Storage
from datasets import idmaps
from datasets import schema as s

HOLDOUT_MODES = ("auto", "official", "leave_one_out", "last_days")


class GraphMissingError(RuntimeError):
    pass


@dataclass
class InterestGraph:
    num_users: int
    num_items: int
    num_categories: int
    num_brands: int
    ui_user: np.ndarray  # int64, one entry per (user, item) pair
    ui_item: np.ndarray
    ui_weight: np.ndarray  # float32
    ui_count: np.ndarray | None  # int32 events behind the pair (None when loaded for training only)
    ui_first_ts: np.ndarray  # int64 ms
    ui_last_ts: np.ndarray
    ic_item: np.ndarray
    ic_cat: np.ndarray
    ib_item: np.ndarray
    ib_brand: np.ndarray
    watermark_ms: int
    formats: list[str]
    official_user: np.ndarray  # holdout/ pairs (lightgcn test file); empty when none
    official_item: np.ndarray
    # Arrival: the last ingestion run (1-based) that brought each pair an event, and how many runs the graph holds;
    # None for a graph built before arrival was recorded (then "new" falls back to event time).
    ui_last_run: np.ndarray | None = None
    runs: int | None = None
    live_through_ms: int | None = None  # every live event received before this is in the graph
    # Evidence per pair (None for graphs built before it was kept): the weight with a short half-life (trends), and
    # the events by type, int32 [pairs, len(EVENT_TYPES)].
    ui_weight_recent: np.ndarray | None = None
    ui_event_counts: np.ndarray | None = None
    event_weights: dict[str, float] | None = None  # data.event_weights the graph was built with (meta.json)

    def relation_weights(self) -> np.ndarray:
        """Each event type's weight, in the order of `ui_event_counts`' columns (1 each when not recorded)."""
        return np.array([(self.event_weights or {}).get(t, 1.0) for t in s.EVENT_TYPES], dtype=np.float32)


@dataclass
class Split:
    train_user: np.ndarray
    train_item: np.ndarray
    train_weight: np.ndarray
    train_last_ts: np.ndarray  # newest event behind each training pair (warm starts train on the recent ones)
    test_user: np.ndarray
    test_item: np.ndarray
    mode: str
    test_mask: np.ndarray  # over the graph's edges: which are held out (all False for the official file)
    train_event_counts: np.ndarray | None = None  # events by type behind each training pair (None: not recorded)


def _ints(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy().astype(np.int64)


# What a training worker reads of each edge (load_graph(evidence=False)); the rest is for publishing and updates.
TRAINING_COLUMNS = (s.USER_IDX, s.ITEM_IDX, s.WEIGHT, s.FIRST_TS, s.LAST_TS)


def graph_meta(storage: Storage) -> dict:
    """graph/meta.json, or a GraphMissingError saying what to run first."""
    meta = storage.read_json(storage.path(GRAPH, s.GRAPH_META))
    if meta is None:
        raise GraphMissingError(f"no graph under {storage.path(GRAPH)}: run `python -m datasets.ingest` first")
    return meta


def load_graph(storage: Storage, evidence: bool = True, event_counts: bool = False) -> InterestGraph:
    """The graph as ingestion wrote it. Without `evidence`, only what training reads (pairs, weights and times;
    events by type with `event_counts`): at 38M pairs that is 2 GB less for every training worker."""
    meta = graph_meta(storage)
    files = storage.list_files(GRAPH, s.UI_EDGES, suffix=".parquet")
    columns = None
    if not evidence and files:  # a graph written before the events by type were kept has no such columns
        present = set(storage.parquet_columns(files[0]))
        columns = [c for c in (*TRAINING_COLUMNS, *(s.EVENT_COUNTS if event_counts else ())) if c in present]
    edges = storage.read_parquet(files, columns=columns, schema=s.USER_ITEM_EDGE_SCHEMA)
    ic = storage.read_parquet([storage.path(GRAPH, s.ITEM_CATEGORY_FILE)])
    ib = storage.read_parquet([storage.path(GRAPH, s.ITEM_BRAND_FILE)])
    counts = meta["num_nodes"]
    official_user = official_item = np.zeros(0, dtype=np.int64)
    holdout_files = storage.list_files(HOLDOUT, suffix=".parquet")
    if holdout_files:
        rows = storage.read_parquet(holdout_files, columns=[s.USER_KEY, s.ITEM_ID])
        users, items = idmaps.load(storage, "user"), idmaps.load(storage, "item")
        official_user = idmaps.lookup(users, rows.column(s.USER_KEY)).to_numpy(zero_copy_only=False)
        official_item = idmaps.lookup(items, rows.column(s.ITEM_ID)).to_numpy(zero_copy_only=False)
        official_user, official_item = official_user.astype(np.int64), official_item.astype(np.int64)
    return InterestGraph(
        num_users=counts["user"], num_items=counts["item"], num_categories=counts["category"],
        num_brands=counts["brand"],
        ui_user=_ints(edges, s.USER_IDX), ui_item=_ints(edges, s.ITEM_IDX),
        ui_weight=edges.column(s.WEIGHT).to_numpy().astype(np.float32),
        ui_count=edges.column(s.COUNT).to_numpy().astype(np.int32) if s.COUNT in edges.column_names else None,
        ui_first_ts=pc.cast(edges.column(s.FIRST_TS), pa.int64()).to_numpy(),
        ui_last_ts=pc.cast(edges.column(s.LAST_TS), pa.int64()).to_numpy(),
        ic_item=_ints(ic, s.ITEM_IDX), ic_cat=_ints(ic, s.CATEGORY_IDX),
        ib_item=_ints(ib, s.ITEM_IDX), ib_brand=_ints(ib, s.BRAND_IDX),
        watermark_ms=int(meta["watermark_ms"]), formats=list(meta.get("formats", [])),
        official_user=official_user, official_item=official_item,
        ui_last_run=_ints(edges, s.LAST_RUN) if s.LAST_RUN in edges.column_names and "runs" in meta else None,
        runs=meta.get("runs"), live_through_ms=meta.get("live_through_ms"),
        ui_weight_recent=(edges.column(s.WEIGHT_RECENT).to_numpy().astype(np.float32)
                          if s.WEIGHT_RECENT in edges.column_names else None),
        ui_event_counts=(np.stack([edges.column(n).to_numpy() for n in s.EVENT_COUNTS], axis=1).astype(np.int32)
                         if all(n in edges.column_names for n in s.EVENT_COUNTS) else None),
        event_weights=meta.get("event_weights"),
    )


def resolve_mode(graph: InterestGraph, mode: str) -> str:
    if mode != "auto":
        return mode
    if len(graph.official_user):
        return "official"
    if "sequence" in graph.formats:
        return "leave_one_out"
    return "last_days"


def _test_mask(graph: InterestGraph, mode: str, holdout_days: float, watermark_ms: int,
               present: np.ndarray) -> np.ndarray:
    """Which of the `present` edges a split at `watermark_ms` holds out (leave_one_out and last_days)."""
    u = graph.ui_user
    test = np.zeros(len(u), dtype=bool)
    idx = np.flatnonzero(present)
    if mode == "leave_one_out":
        sub_u, sub_ts = u[idx], graph.ui_last_ts[idx]
        order = np.lexsort((sub_ts, sub_u))  # by user, newest last
        last_of_user = np.ones(len(idx), dtype=bool)
        last_of_user[:-1] = sub_u[order][1:] != sub_u[order][:-1]
        counts = np.bincount(sub_u, minlength=graph.num_users)
        chosen = order[last_of_user]
        test[idx[chosen[counts[sub_u[chosen]] >= 2]]] = True
    elif mode == "last_days":
        cutoff = watermark_ms - int(holdout_days * 86_400_000)
        recent = present & (graph.ui_first_ts >= cutoff)
        has_old = np.bincount(u[present & ~recent], minlength=graph.num_users) > 0
        # Pairs of users who are entirely new in the window still train (they are not evaluable).
        test = recent & has_old[u]
    else:
        raise ValueError(f"unknown holdout mode {mode!r}; expected one of {HOLDOUT_MODES}")
    return test


def evaluated_pairs(sp: Split, max_users: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The held-out (user, item) pairs an evaluation scores: every test user's, or those of a seeded sample of
    `max_users` test users when there are more. Full ranking costs users x items, which at a million of each is
    out of reach for every user; the model and its baselines are scored on the same sample."""
    users = np.unique(sp.test_user)
    if max_users is None or len(users) <= max_users:
        return sp.test_user, sp.test_item
    chosen = np.random.default_rng(seed).choice(users, size=max_users, replace=False)
    keep = np.isin(sp.test_user, chosen)
    return sp.test_user[keep], sp.test_item[keep]


def parent_holdout(graph: InterestGraph, mode: str, holdout_days: float, parent_watermark_ms: int) -> np.ndarray:
    """Edges the parent version held out of its training: a warm start must learn them, as a retrain would."""
    mode = resolve_mode(graph, mode)
    if mode == "official":
        return np.zeros(len(graph.ui_user), dtype=bool)
    return _test_mask(graph, mode, holdout_days, parent_watermark_ms, graph.ui_first_ts <= parent_watermark_ms)


def split(graph: InterestGraph, mode: str = "auto", holdout_days: float = 1.0) -> Split:
    """Train pairs and held-out pairs.

    official: the lightgcn test file; leave_one_out: each user's newest pair (users with at least two);
    last_days: pairs first seen in the last `holdout_days` before the watermark, for users with older pairs.
    A pair first seen earlier and repeated in the window stays in train: the holdout asks for new items.
    """
    mode = resolve_mode(graph, mode)
    u, i, w = graph.ui_user, graph.ui_item, graph.ui_weight
    if mode == "official":
        if not len(graph.official_user):
            raise GraphMissingError("holdout mode 'official' needs a holdout file (ingest with --holdout)")
        return Split(u, i, w, graph.ui_last_ts, graph.official_user, graph.official_item, mode,
                     np.zeros(len(u), dtype=bool), graph.ui_event_counts)
    test = _test_mask(graph, mode, holdout_days, graph.watermark_ms, np.ones(len(u), dtype=bool))
    counts = None if graph.ui_event_counts is None else graph.ui_event_counts[~test]
    return Split(u[~test], i[~test], w[~test], graph.ui_last_ts[~test], u[test], i[test], mode, test, counts)
