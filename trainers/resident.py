"""A Ray Train run that stays up between warm-start cycles, so a cycle does not pay for starting its workers.

Starting a TorchTrainer (controller, placement group, worker processes, imports, the gloo or NCCL group) costs
10-20 s, more than a small update's training. `--every` keeps one run alive instead: its workers wait on a
`CycleBoard` actor, each cycle posts its `WorkerInputs` there, every rank runs the ordinary per-worker loop on
it, and rank 0 posts the final checkpoint back (in memory, through the object store). Scaling options are those
of full training.

Failures: a cycle that raises on a worker is posted back as failed, then the worker re-raises so Ray Train
replaces the whole group (a rank left inside a collective would hang otherwise). A worker that dies mid-cycle
leaves its cycle pending and the replacement group runs it again, unless surviving ranks post their collective's
failure first (any run of two or more workers): then the cycle fails and the next one runs on the new group. A run
that exhausts train.max_failures ends; the next cycle starts a new one.

A rank can finish a cycle without noticing that a peer died in it (the cycle's last collective came before the
death), then take the next cycle before Ray Train's health check has replaced the group. So every cycle of a group
of two or more starts with a barrier: a rank that meets a dead peer there leaves without posting anything, the
cycle stays pending, and the replacement group runs it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from core.config import AppConfig
from trainers.worker_inputs import GrowFrom, WorkerInputs

if TYPE_CHECKING:
    from trainers.train_state import Checkpoint

log = logging.getLogger("trainers.resident")
IDLE = "idle"  # what a worker's wait returns when no cycle came in time: it asks again
STOP_GRACE_S = 120.0  # how long a cycle under way may still run once the job is told to stop


class PeerLost(RuntimeError):
    """A rank's group lost a member before a cycle began: the group must be replaced, the cycle is not failed."""


class Stopped(RuntimeError):
    """The job was told to stop while a cycle waited for its workers: the cycle did not run (not a failure)."""


class CycleBoard:
    """Ray actor: one pending cycle at a time, handed to every rank; results by cycle number."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._pending: tuple[int, WorkerInputs | None] | None = None  # None: the start's readiness check
        self._results: dict[int, dict] = {}
        self._collected = 0  # cycles up to here were handed to the driver: late posts for them are dropped
        self._stopped = False

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def submit(self, cycle: int, inputs: WorkerInputs | None) -> None:
        self._pending = (cycle, inputs)
        await self._notify()

    async def next(self, after: int, timeout_s: float) -> tuple[int, WorkerInputs | None] | str | None:
        """The pending cycle if it is newer than `after`; None once stopped; IDLE after `timeout_s`."""

        def ready() -> bool:
            return self._stopped or (self._pending is not None and self._pending[0] > after)

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout_s)
            except TimeoutError:
                return IDLE
        return None if self._stopped else self._pending

    async def finish(self, cycle: int, result: dict) -> None:
        """Rank 0's final checkpoint and metrics, or {"error": ...} from any rank (the first word stands)."""
        if cycle <= self._collected:
            return
        self._results.setdefault(cycle, result)
        if self._pending is not None and self._pending[0] == cycle:
            self._pending = None
        await self._notify()

    async def result(self, cycle: int, timeout_s: float) -> dict | None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: cycle in self._results), timeout_s)
            except TimeoutError:
                return None
        self._collected = max(self._collected, cycle)
        return self._results.pop(cycle)

    async def stop(self) -> None:
        self._stopped = True
        await self._notify()


class _CycleSession:
    """One cycle's view of the resident run: ranks, device and process group from Ray Train; the final checkpoint
    is kept in memory (rank 0) for the board, not reported, so a restarted group never resumes an old cycle's
    state."""

    def __init__(self, train_session: Any) -> None:
        self._train = train_session
        self.rank, self.world, self.local_world = train_session.rank, train_session.world, train_session.local_world
        self.final: Checkpoint | None = None
        self.metrics: dict[str, Any] = {}

    def report(self, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> None:
        self.metrics = metrics
        if checkpoint is not None and metrics.get("final"):
            self.final = checkpoint

    def restored_dir(self) -> str | None:
        return None

    def device(self) -> Any:
        return self._train.device()


def resident_loop_per_worker(config: dict) -> None:
    """What each worker of the resident run executes: wait for a cycle, run it, repeat until stopped."""
    import ray

    from trainers.loop import RayTrainSession, keep_table, run_worker, session_for, warm_up

    board, session, done = config["board"], RayTrainSession(), 0
    # Before the readiness check the driver waits for.
    warm_up(config.get("predraw") if session.rank == 0 else None)
    while True:
        got = ray.get(board.next.remote(done, 30.0))
        if got is None:
            return
        if got == IDLE:
            continue
        cycle, inputs = got
        if inputs is None:  # the driver's readiness check
            if session.rank == 0:
                ray.get(board.finish.remote(cycle, {"final": None, "metrics": {}}))
            done = cycle
            continue
        _barrier(session.world)  # raises PeerLost with the cycle still pending
        capture = _CycleSession(session)
        try:
            keep_table(run_worker(inputs, session_for(inputs, capture)), cycle)
        except BaseException as err:
            ray.get(board.finish.remote(cycle, {"error": f"rank {session.rank}: {type(err).__name__}: {err}"}))
            raise
        if session.rank == 0:
            # The checkpoint travels as an object this worker owns (it lives on, waiting), not through the board's
            # heap; wrapped in a list, so the board holds the reference rather than the value.
            final = [ray.put(capture.final.portable())] if capture.final is not None else None
            ray.get(board.finish.remote(cycle, {"final": final, "metrics": capture.metrics}))
            del final  # this rank owns the object: a live reference would pin it in the store through the next cycle
        done = cycle
        del capture
        gc.collect()  # reference cycles would keep this cycle's model (and GPU memory) until a later sweep


def _newest(cfg: AppConfig) -> tuple[Any, str, dict] | None:
    """(storage, version, manifest) of the newest published version, or None: nothing published, or its manifest
    unreadable (the first cycle then finds out which version is its parent, as it always does)."""
    import registry
    from core.storage import storage_for

    storage = storage_for(cfg)
    try:
        version = registry.latest_version(storage)
        return None if version is None else (storage, version, registry.read_manifest(storage, version))
    except registry.CheckpointError:
        return None


def first_draw(cfg: AppConfig) -> tuple[int, int, int] | None:
    """(rows, width, seed) of the Gaussian draw a re-filter of the newest published graph makes, which rank 0 draws
    at start (`trainers.loop.warm_up`); None where no cycle re-filters, the filter is exact, or nothing verifiable is
    published yet (the first cycle is then a full training, and the draw is made when a re-filter needs it)."""
    return _draw_for(cfg, _newest(cfg))


def _draw_for(cfg: AppConfig, newest: tuple[Any, str, dict] | None) -> tuple[int, int, int] | None:
    if cfg.train.init != "spectral" or cfg.train.spectral_filter is None or cfg.update.refilter_above > 1:
        return None
    from trainers.spectral import filter_rank, sketch_width

    counts = newest[2].get("node_counts") if newest is not None else None
    if not counts:
        return None
    # The filter's block: items against every other node (trainers.spectral.interest_block).
    k = filter_rank(cfg.train.embedding_dim, counts["user"] + counts["category"] + counts["brand"], counts["item"])
    return (counts["item"], sketch_width(k), cfg.train.seed) if k >= 1 else None


def rehearsal(cfg: AppConfig, opts: Any, newest: tuple[Any, str, dict] | None) -> WorkerInputs | None:
    """A cycle like the first one, which the workers run once at start and the driver throws away: the newest
    version grown to the graph on disk, scored as the gate's baseline, one optimiser step, scored again, and its
    checkpoint put in the object store and taken back. A fresh worker's first cycle paid for its first touch of
    every block it asks for (the grown table, the optimiser's moments, the evaluations' score blocks, the object
    store's pages for a checkpoint): in bench.warm_start (Taobao, 2 workers) the first day's set-up, parent
    evaluation, 4 steps and checkpoint transfer took 0.7-0.9, 1.7-2.2, 2.4-2.9 and 0.8 s on fresh workers, and
    0.3-0.4, 0.8-1.2, 1.1-1.6 and 0.1-0.2 s after a rehearsal. The start pays for them instead, once (20-28 s
    there, against 11-13 s).

    None (no rehearsal) on an object store, where nothing readable is published yet, or where the graph cannot be
    read: the first cycle then runs cold, as before. Nothing it computes is published or kept as a parent."""
    if newest is None:
        return None
    import numpy as np

    import registry
    from registry.reader import load_model
    from trainers.data import GraphMissingError, load_graph, split
    from trainers.train import worker_inputs
    from trainers.worker_inputs import WarmStart

    storage, version, manifest = newest
    if not storage.is_local:
        return None
    folder, label = registry.version_folder(storage, version), registry.version_label(version)
    try:
        sha, counts = manifest["files"][registry.MODEL], dict(manifest["node_counts"])
        # Only model.pt is checked here (the workers map it unchecked); the first cycle verifies the whole version.
        hparams = load_model(storage, folder, sha, label, mapped=True)["hparams"]
        width, layers = int(hparams["embedding_dim"]), int(hparams["num_layers"])
        graph = load_graph(storage, evidence=False)  # only its training pairs are counted here
    except (registry.CheckpointError, GraphMissingError, OSError, KeyError, TypeError, ValueError) as err:
        log.warning("resident start: no rehearsal cycle (%s: %s)", type(err).__name__, err)
        return None
    sp = split(graph, cfg.train.holdout, cfg.train.holdout_days)
    n = len(sp.train_user)
    if not n:
        return None
    parent = GrowFrom(folder=folder, sha=sha, label=label, counts=counts)
    # The newest pairs, a step's worth on every rank: what a small cycle trains on.
    pairs = np.arange(max(0, n - cfg.train.batch_size * (opts.num_workers or cfg.train.num_workers)), n)
    train = cfg.train.model_copy(update={"embedding_dim": width, "num_layers": layers, "epochs": 1, "eval_every": 1,
                                         "lr": cfg.update.lr})
    return worker_inputs(cfg, opts, time.time(), warm=WarmStart(init_state=parent, pair_index=pairs, steps=1),
                         train=train)


def _barrier(world: int) -> None:
    if world == 1:
        return
    import torch.distributed as dist

    try:
        dist.barrier()
    except Exception as err:  # noqa: BLE001 - gloo and NCCL raise their own types for a closed peer
        raise PeerLost(f"a peer left the group before the cycle began: {err}") from err


class ResidentTrainer:
    """Driver side: starts the run in a thread (TorchTrainer.fit blocks until the workers return), posts cycles."""

    def __init__(self, cfg: AppConfig, opts: Any, stop: threading.Event | None = None) -> None:
        self.cfg, self.opts = cfg, opts
        self.stop = stop or threading.Event()  # the job's stop signal: a wait for workers gives up on it
        self._board: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._cycle = 0
        self.started_s: float | None = None  # seconds the last start took until the workers were ready
        # (version, cycle): the version published from that cycle's checkpoint as it was, whose table the workers
        # kept (`trainers.loop.keep_table`).
        self._published: tuple[str, int] | None = None

    def note_published(self, version: str, as_trained: bool) -> None:
        """The last cycle's checkpoint was published as `version`; `as_trained`: its model state as the workers
        left it (no deleted user blanked in it), so their kept tables are that version's table."""
        self._published = (version, self._cycle) if as_trained else None

    def kept_cycle(self, parent: str) -> int | None:
        """The cycle whose kept table is `parent`'s to the bit (`GrowFrom.kept`), or None: the workers read the
        file (another parent, a blanked version, or nothing published from these workers yet)."""
        return self._published[1] if self._published is not None and self._published[0] == parent else None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the run, wait until its workers take a first (empty) cycle, then, on this trainer's first start and
        with update.rehearse, run the rehearsal cycle (`rehearsal`). A start that replaces lost workers does not
        rehearse: it has a cycle waiting."""
        import ray

        from trainers.train import trainer_for

        began = time.time()
        first = self._thread is None
        self._kill_board()  # a dead run's board still holds its last cycle's inputs (object refs to the model)
        self._board = ray.remote(num_cpus=0)(CycleBoard).remote()
        name = time.strftime("resident-%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        newest = _newest(self.cfg)  # the draw's and the rehearsal's version: its manifest read once
        trainer = trainer_for(self.cfg, self.opts, resident_loop_per_worker,
                              {"board": self._board, "predraw": _draw_for(self.cfg, newest)}, name)
        self._published = None  # a new group's workers hold no table
        self._error = None

        def fit() -> None:
            try:
                result = trainer.fit()
                if result.error is not None:
                    self._error = result.error
            except BaseException as err:  # noqa: BLE001 - surfaced to the cycle that waits on it
                self._error = err

        self._thread = threading.Thread(target=fit, name="resident-train", daemon=True)
        self._thread.start()
        self._run(None, stoppable=True)
        inputs = rehearsal(self.cfg, self.opts, newest) if first and self.cfg.update.rehearse else None
        if inputs is not None:
            mark = time.time()
            try:
                self._run(inputs, stoppable=True)  # its checkpoint is dropped here; its kept table names no version
                log.info("resident update workers rehearsed a cycle in %.1f s", time.time() - mark)
            except Stopped:
                raise
            except RuntimeError as err:  # the first cycle then runs cold (on a new group, if this one was lost)
                log.warning("resident start: the rehearsal cycle failed: %s", err)
        self.started_s = round(time.time() - began, 3)
        log.info("resident update workers ready in %.1f s", self.started_s)

    def _run(self, inputs: WorkerInputs | None, stoppable: bool = False) -> dict:
        """Post a cycle and wait for it. A start gives up on the stop signal at once (workers may wait for resources
        for ever); a cycle under way gets STOP_GRACE_S more to finish, as `--every` stops between cycles."""
        import ray

        self._cycle += 1
        ray.get(self._board.submit.remote(self._cycle, inputs))
        stop_seen: float | None = None
        while True:
            result = ray.get(self._board.result.remote(self._cycle, 2.0))
            if result is not None:
                break
            if not self.alive():
                raise RuntimeError(f"the resident update workers stopped: {self._error!r}")
            if self.stop.is_set():
                stop_seen = stop_seen or time.time()
                if stoppable or time.time() - stop_seen > STOP_GRACE_S:
                    raise Stopped("stopped while waiting for the resident update workers")
        if "error" in result:
            raise RuntimeError(f"update cycle failed on a worker: {result['error']}")
        if result["final"]:
            result["final"] = ray.get(result["final"][0]).restored(writable=False)
        return result

    @contextmanager
    def fitted(self, inputs: WorkerInputs) -> Iterator[tuple[Checkpoint, dict]]:
        """Like `trainers.train.fitted`: the cycle's final checkpoint, and its metrics. The checkpoint's arrays and
        tensors are read-only views of the object store (to publish, not to edit)."""
        if not self.alive():
            if self._thread is not None:
                log.warning("resident update workers were gone (%r); starting new ones", self._error)
            self.start()
        result = self._run(inputs)
        if result["final"] is None:
            raise RuntimeError("the update cycle finished without a checkpoint")
        yield result["final"], result["metrics"]

    def _kill_board(self) -> None:
        import ray

        if self._board is not None:
            try:
                ray.kill(self._board)
            except Exception:  # noqa: BLE001 - already gone is as good as killed
                pass
            self._board = None

    def close(self, timeout_s: float = 60.0) -> None:
        """Let the workers return (the run ends), then drop the board. Never raises: it runs on the way out."""
        import ray

        if self._board is None:
            return
        try:
            if self.alive():
                ray.get(self._board.stop.remote(), timeout=10)
                self._thread.join(timeout_s)
        except Exception:  # noqa: BLE001 - the board or Ray may already be gone
            log.warning("resident update workers did not stop cleanly", exc_info=True)
        self._kill_board()
