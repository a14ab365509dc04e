"""`python -m trainers.update (--once | --every SECONDS)`: warm-start updates from the latest published version.

A cycle ingests what arrived since the last watermark (files under raw/, flushed by the live API, included),
grows the parent's embedding table to the new users and items, trains from the parent's parameters on the new
interactions plus a replay sample of older ones for `update.epochs` passes (at most `update.max_steps` steps) on
Ray Train, and publishes a child version only if Recall@K on the newest holdout holds at least
(1 - update.tolerance) of the parent's on the same holdout. Without a published version the first cycle is a full
training. Each cycle prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import registry
from core.cli import positive, run_command
from core.config import AppConfig
from core.storage import storage_for
from core.writer_lock import WriterBusy, exclusive_writer
from datasets.adapters import SourceError
from datasets.ingest import Request, run_ingest
from trainers.data import GraphMissingError
from trainers.resident import Stopped
from trainers.train import TrainOptions
from trainers.worker_inputs import GrowFrom, WarmStart

log = logging.getLogger("trainers.update")


def _ingest(cfg: AppConfig) -> dict:
    src = cfg.data.source
    return run_ingest(cfg, Request(source=src.path, fmt=src.format, holdout=src.holdout))


def run_update(cfg: AppConfig, opts: TrainOptions | None = None, resident: Any = None, **extra: Any) -> dict:
    """One cycle; returns its JSON summary (`version` null when nothing was published, with `reason`).

    With `resident` (a `trainers.resident.ResidentTrainer`) the cycle trains on its waiting workers; without,
    it starts a Ray Train run of its own. `extra` goes to the workers' inputs (tests: session_wrapper). The cycle
    holds data.root's writer lock throughout, so no other ingestion changes the graph its workers read.
    """
    storage = storage_for(cfg)
    with exclusive_writer(storage, "update cycle", cfg.data.writer_wait_s):
        return _cycle(cfg, storage, opts, resident, **extra)


def _cycle(cfg: AppConfig, storage: Any, opts: TrainOptions | None, resident: Any, **extra: Any) -> dict:
    import ray

    from core.runtime import ensure_ray
    from datasets.tombstones import load_tombstones
    from trainers.data import load_graph, split
    from trainers.loop import steps_per_pass
    from trainers.publish import blanked, prepare, publish_and_prune, publish_from_checkpoint
    from trainers.train import fitted, run_train, worker_inputs
    from trainers.train_state import as_arrays
    from trainers.warm_start import extended_state, touched_rows, update_pair_index, update_steps

    started = time.time()
    # Resident workers were started with their own options: the cycle's step count must use the same world size.
    opts = resident.opts if resident is not None else (opts or TrainOptions())
    # The parent does not depend on the increment (the cycle holds the writer lock, and ingestion writes no
    # version): it is loaded and verified while the increment is ingested, whose driver mostly waits on Ray Data.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="update-parent") as pool:
        newest = pool.submit(registry.load_newest_good, storage)
        ingested = _ingest(cfg)
        timings = {"ingest": round(time.time() - started, 3)}  # where a cycle's time goes (filled in as it runs)
        loaded, refused = newest.result()
        timings["parent"] = round(time.time() - started - timings["ingest"], 3)  # what ingestion did not cover
    base: dict[str, Any] = {"mode": "warm", "timings": timings, "ingested": {
        k: ingested[k] for k in ("input_rows", "accepted", "new_users", "new_items", "watermark_ms", "timings",
                                 "unreadable_files")}}
    if refused:  # a damaged LATEST or version: the newest that verifies is the parent (said and counted)
        log.error("update cycle: refused %s; parent is %s", refused, loaded.version if loaded else None)
        base["parent_refused"] = refused
    if loaded is None:
        if registry.list_versions(storage):
            raise registry.CheckpointError(f"no published version verifies: {refused}")
        summary = run_train(cfg, opts, **extra)
        return {**base, **summary, "mode": "full", "seconds": round(time.time() - started, 3)}
    parent = loaded.version
    graph = load_graph(storage)
    tombstones = load_tombstones(storage)

    def unchanged(reason: str) -> dict:
        """Nothing to learn: no version (unless the parent holds a deleted user: then it is published again,
        blanked, so the deletion reaches the served version this cycle)."""
        out = {**base, "parent": parent, "reason": reason, "metrics": loaded.metrics}
        forgotten = blanked(loaded, tombstones)
        if forgotten is None:
            return {**out, "version": None, "seconds": round(time.time() - started, 3)}
        version, _ = publish_and_prune(cfg, storage, forgotten)
        log.info("published %s: %s with its deleted users blanked (%s)", version, parent, reason)
        return {**out, "version": version, "blanked": True, "seconds": round(time.time() - started, 3)}

    mark = time.time()
    sp = split(graph, cfg.train.holdout, cfg.train.holdout_days)
    pair_index, new_pairs = update_pair_index(graph, sp, cfg, loaded.watermark_ms or 0, loaded.coverage.get("runs"),
                                              bool(loaded.coverage.get("holdout_learned")))
    if not new_pairs:
        return unchanged("no new training pairs since the parent")
    parent_state = loaded.load_state(mapped=True)  # checked again (its stat, once hashed): the workers map it unchecked
    parent_hparams = parent_state["hparams"]
    if storage.is_local:  # each worker maps the parent's file, or its own copy of it, and grows the table into its own
        kept = resident.kept_cycle(parent) if resident is not None else None
        init: Any = GrowFrom(folder=loaded.folder, sha=loaded.manifest["files"][registry.MODEL],
                             label=registry.version_label(parent), counts=dict(loaded.node_counts), kept=kept)
    else:
        init = as_arrays(extended_state(parent_state["state_dict"], loaded.node_counts, graph, sp.train_user,
                                        sp.train_item))
    del parent_state  # the parent's model.pt stays mapped no longer than it is read
    timings["prepare"] = round(time.time() - mark, 3)  # load the parent and graph, split (and grow the table)
    ensure_ray(cfg)
    if not isinstance(init, GrowFrom):
        init = ray.put(init)
    # A small increment moves only the rows it touched: a fresh Adam moves every row that gets any gradient by about
    # lr per step, and through the propagation a few hundred new pairs reach most of the table (most such cycles
    # fell below their parent); a day's worth needs every row (bench.warm_start --stream and day by day).
    new_share = new_pairs / max(len(sp.train_user), 1)
    world = opts.num_workers or cfg.train.num_workers
    # A large increment (a day's worth) is not reached by a few small steps from the parent: the filter of the grown
    # graph is, in the time of its SVD (bench.warm_start, day by day).
    refilter = new_share >= cfg.update.refilter_above and cfg.train.init == "spectral"
    trainable = None
    if new_share < cfg.update.touched_only_below and not refilter:
        trainable = ray.put(touched_rows(graph, sp.train_user, sp.train_item, pair_index, new_pairs,
                                         loaded.node_counts))
    if refilter:
        passes = cfg.update.refilter_passes
        warm = WarmStart(init_state=init, pair_index=None, refilter=True, passes=passes,
                         steps=math.ceil(passes * steps_per_pass(len(sp.train_user), world, cfg.train.batch_size)))
    else:
        warm = WarmStart(init_state=init, pair_index=ray.put(pair_index),
                         steps=update_steps(cfg, world, len(pair_index)), passes=cfg.update.epochs,
                         trainable=trainable)
    # The architecture is the parent's (a full retrain is how a config change of it takes effect); one "epoch" of
    # `steps` steps, evaluated once at its end.
    train = cfg.train.model_copy(update={"embedding_dim": parent_hparams["embedding_dim"],
                                         "num_layers": parent_hparams["num_layers"],
                                         "epochs": 1, "eval_every": 1,
                                         "lr": cfg.train.lr if refilter else cfg.update.lr})
    inputs = worker_inputs(cfg, opts, started, warm=warm, train=train, **extra)
    name = time.strftime("update-%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    mark = time.time()
    with ExitStack() as stack:
        # The version's pieces that do not come from training are made while the workers train (one thread, mostly
        # numpy; the workers' collectives leave it room).
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish-prepare"))
        prepared = pool.submit(prepare, cfg, storage, graph, sp)
        try:
            checkpoint, _ = stack.enter_context(
                resident.fitted(inputs) if resident is not None else fitted(cfg, opts, inputs, name))
        except Stopped as err:  # told to stop before this cycle's workers were up: the cycle did not run
            return {**base, "parent": parent, "version": None, "reason": str(err),
                    "seconds": round(time.time() - started, 3)}
        state = checkpoint.state
        # Worker start-up (none on resident workers), training, evaluation, the checkpoint's way back.
        timings["ray_train"] = round(time.time() - mark, 3)
        timings["worker_loop"] = round(state.history[-1]["seconds"], 3)
        timings["worker"] = state.phases
        k = cfg.train.k
        final = state.history[-1]
        metrics = {f"recall@{k}": final[f"recall@{k}"], f"ndcg@{k}": final[f"ndcg@{k}"]}
        parent_metrics = {f"recall@{k}": state.parent_metrics[f"recall@{k}"],
                          f"ndcg@{k}": state.parent_metrics[f"ndcg@{k}"]}
        floor = (1.0 - cfg.update.tolerance) * parent_metrics[f"recall@{k}"]
        base.update({"metrics": metrics, "parent_metrics": parent_metrics, "steps": state.steps,
                     "train_pairs": state.split["train_pairs"], "new_pairs": new_pairs,
                     "new_share": round(new_share, 4),
                     "resident": resident is not None, "touched_only": trainable is not None,
                     "refilter": refilter})
        if metrics[f"recall@{k}"] < floor:
            reason = (f"recall@{k} {metrics[f'recall@{k}']:.4f} is below (1 - {cfg.update.tolerance}) x the parent's "
                      f"{parent_metrics[f'recall@{k}']:.4f} on the same holdout; LATEST stays {parent}")
            log.warning("update refused: %s", reason)
            return {**unchanged(reason), "candidate_metrics": metrics}
        mark = time.time()
        # On resident workers the checkpoint's tensors are read-only views of the object store: publishing only
        # reads them (blanking a deleted user's rows works on copies).
        version, _, as_trained = publish_from_checkpoint(cfg, storage, checkpoint, parent=parent,
                                                         num_workers=opts.num_workers or cfg.train.num_workers,
                                                         graph=graph, sp=sp, curve=False,
                                                         prepared=prepared.result())
        timings["publish"] = round(time.time() - mark, 3)
        if resident is not None:
            resident.note_published(version, as_trained)
    log.info("published %s (parent %s): %s", version, parent, metrics)
    return {**base, "parent": parent, "version": version, "seconds": round(time.time() - started, 3)}


def run_every(cfg: AppConfig, every_s: float, stop: threading.Event, max_cycles: int | None = None,
              emit: Any = print, **extra: Any) -> int:
    """Cycles until `stop` is set (checked between cycles); a failed cycle is logged and the next one runs.

    With update.resident the cycles share one Ray Train run whose workers wait between cycles.
    """
    from trainers.resident import ResidentTrainer

    resident = ResidentTrainer(cfg, TrainOptions(), stop) if cfg.update.resident else None
    cycles = failures = 0
    try:
        while not stop.is_set():
            cycles += 1
            try:
                emit(json.dumps({"cycle": cycles, **run_update(cfg, resident=resident, **extra)}))
            except Exception as err:  # noqa: BLE001 - a long-lived job must outlive one bad cycle
                failures += 1
                log.exception("update cycle %d failed", cycles)
                emit(json.dumps({"cycle": cycles, "version": None, "error": f"{type(err).__name__}: {err}"}))
            if max_cycles is not None and cycles >= max_cycles:
                break
            stop.wait(every_s)
    finally:
        if resident is not None:
            resident.close()
    return failures


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainers.update", description=__doc__)
    p.add_argument("--config", default="ray_config.yaml", help="the app's configuration")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--once", action="store_true", help="run one cycle and exit")
    mode.add_argument("--every", type=float, metavar="SECONDS", help="run a cycle every SECONDS until SIGTERM")
    p.add_argument("--root", help="storage root (overrides data.root)")
    return p


def _update_command(args: argparse.Namespace, cfg: AppConfig) -> dict | None:
    positive("--every", args.every)
    if args.once:
        return run_update(cfg)
    from core.runtime import ensure_ray

    # Ray installs its own SIGTERM handler (which aborts) when it starts: start it first, then take the signal.
    ensure_ray(cfg, long_lived=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_every(cfg, args.every, stop)
    log.info("stopped")
    return None


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, _update_command,
                       errors=(SourceError, GraphMissingError, registry.CheckpointError, WriterBusy))


if __name__ == "__main__":
    raise SystemExit(main())
