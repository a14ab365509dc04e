"""What one training worker is given: typed, frozen, and shipped across the Ray boundary whole."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.config import TrainConfig
from core.storage import Storage


@dataclass(frozen=True)
class GrowFrom:
    """A published parent on local disk whose table each worker maps and grows to the run's graph itself
    (`trainers.warm_start.extend_embeddings`), instead of the driver growing it and shipping the copy through the
    object store (at 1,024 dims, 0.4 s of a Taobao cycle's preparation and a 242 MB copy). The driver verified the
    file before posting the cycle."""

    folder: str  # the version's folder (Storage path)
    sha: str  # model.pt's sha256 from the manifest
    label: str  # the version, as errors name it
    counts: dict[str, int]  # the parent's node counts by type
    # The resident cycle whose final table model.pt holds to the bit (it published that cycle's checkpoint as it
    # was): a resident worker that kept that table grows it from memory instead of reading the file
    # (`trainers.loop.keep_table`).
    kept: int | None = None


@dataclass(frozen=True)
class WarmStart:
    """A warm-start cycle: where it starts, what it trains on, for how long."""

    # the grown parent's state_dict (tensors or numpy arrays), or an ObjectRef to it (large: it goes through the
    # object store, as numpy arrays), or a `GrowFrom` the workers grow themselves
    init_state: Any
    # int64 indices into the split's training pairs (new + replayed), or an ObjectRef to them; None: every pair
    pair_index: Any
    steps: int  # optimiser steps of the cycle: one "epoch" that wraps over its pairs, one checkpoint, no decay; 0: none
    passes: float = 1.0  # passes over its pairs those steps make (update.epochs): what sizes a step's batch
    eval_parent: bool = True  # score the starting point on the same holdout first: the gate's baseline
    # bool per node (the homogeneous table), or an ObjectRef to it: the rows a small cycle may move
    # (update.touched_only_below); None: every row
    trainable: Any = None
    # Train from the spectral filter of the grown graph rather than from the parent (update.refilter_above): the
    # parent is still loaded first, as the gate's baseline
    refilter: bool = False


@dataclass(frozen=True)
class Refit:
    """After the last evaluation, learn the held-out pairs too (train.refit), sized like a warm-start update over
    them: `epochs` passes over the held-out pairs plus `replay_ratio` training pairs per held-out one, at most
    `max_steps` steps, a fresh Adam at `lr`. The metrics stay those of the evaluation before it."""

    lr: float
    epochs: float
    max_steps: int
    replay_ratio: float


@dataclass(frozen=True)
class WorkerInputs:
    storage: Storage
    train: TrainConfig  # hyper-parameters as this run uses them (an update overrides epochs, lr and the width)
    threads: int  # torch threads of this worker
    deadline: float | None = None  # time.time() at which every rank stops at the same step, evaluates and saves
    max_steps: int | None = None  # stop after this many optimiser steps
    warm: WarmStart | None = None
    refit: Refit | None = None  # full training only; never an official test file (it is the benchmark's)
    # An ObjectRef to the run's `trainers.shared_graph.SharedGraph` (built once, mapped by every worker of a node);
    # None: the worker builds its own
    shared: Any = None
    # Tests only: wraps the worker's session (fault injection, trainers.faults); None in production.
    session_wrapper: Callable[[Any], Any] | None = None
