"""The training state inside a Ray Train checkpoint: one typed record, written and read only here.

A checkpoint directory holds `state.pt` (this record, loaded with `weights_only=True`) and, for the final report
of a run, `embeddings.npz` (the final embeddings of every node type); `Checkpoint` is the two in memory. A lost
worker resumes from the record; the driver publishes from both.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
EMBEDDINGS_FILE = "embeddings.npz"
NODE_BLOCKS = ("users", "items", "categories", "brands")


@dataclass
class TrainState:
    model: dict[str, torch.Tensor]  # the model's state_dict
    optimiser: dict[str, Any]
    scheduler: dict[str, Any]
    epoch: int  # the last epoch this state finished
    history: list[dict[str, Any]]  # one entry per epoch: epoch, seconds, loss, steps, metrics when evaluated
    seconds: float  # training seconds so far (a resumed run keeps counting from here)
    hparams: dict[str, int]  # num_nodes, embedding_dim, num_layers: what rebuilds the model
    split: dict[str, Any]  # mode, train_pairs, test_pairs
    steps: int  # optimiser steps taken
    parent_metrics: dict[str, float] | None = None  # a warm start's parent scored on the same holdout
    phases: dict[str, float] = field(default_factory=dict)  # where the worker's time went

    def save(self, directory: str) -> None:
        # Not dataclasses.asdict: it deep-copies every tensor of the model.
        torch.save({f.name: getattr(self, f.name) for f in fields(self)}, os.path.join(directory, STATE_FILE))

    @classmethod
    def load(cls, directory: str) -> TrainState:
        raw = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
        return cls(**raw)


@dataclass
class Checkpoint:
    """What rank 0 reports: the training state and, with a run's last report, the final embeddings per node type.
    A session persists it as it needs: Ray Train as a directory (`save`, read back by `load`), the resident
    workers in memory (`portable`: through Ray's object store, which hands numpy arrays to a reader on the same
    node without a copy, where a directory of files cost rank 0 a write and the driver a read of each, twice)."""

    state: TrainState
    embeddings: dict[str, np.ndarray] | None = None

    def save(self, directory: str) -> None:
        self.state.save(directory)
        if self.embeddings is not None:
            save_embeddings(directory, self.embeddings)

    @classmethod
    def load(cls, directory: str) -> Checkpoint:
        has_embeddings = os.path.exists(os.path.join(directory, EMBEDDINGS_FILE))
        return cls(TrainState.load(directory), load_embeddings(directory) if has_embeddings else None)

    def portable(self) -> Checkpoint:
        """The same checkpoint with the model's tensors as numpy arrays (for `ray.put`)."""
        return Checkpoint(replace(self.state, model=as_arrays(self.state.model)), self.embeddings)

    def restored(self, writable: bool = True) -> Checkpoint:
        """`portable`'s inverse; the embeddings stay the (read-only) arrays they came as. `writable` gives the model
        its own copy, for a caller that edits or trains it; `writable=False` shares the arrays, for one that only
        reads them (the update cycle publishes them: the copy of a Taobao-sized table was half a second of a
        cycle)."""
        return Checkpoint(replace(self.state, model=as_tensors(self.state.model, writable)), self.embeddings)


def as_arrays(state: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict's tensors as numpy arrays, for Ray's object store: a reader on the same node gets numpy arrays
    without a copy, where a tensor is pickled whole (1.3 s of the driver's time for a Taobao-sized table)."""
    return {name: t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t for name, t in state.items()}


def as_tensors(state: Mapping[str, Any], writable: bool = True) -> dict[str, Any]:
    """`as_arrays`' inverse (tensors pass through). `writable=False` shares the arrays, which may be read-only
    views of the object store: for a reader only (`load_state_dict` copies, publishing reads)."""
    if writable:
        return {name: torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a for name, a in state.items()}
    # Said once, here: torch warns on every read-only array, and a filter set and reset around the call
    # (`warnings.catch_warnings`) is not thread-safe while the resident run's thread is working.
    warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning, __name__)
    return {name: torch.from_numpy(a) if isinstance(a, np.ndarray) else a for name, a in state.items()}


def save_embeddings(directory: str, blocks: dict[str, np.ndarray]) -> None:
    """Final embeddings per node type (float32), keyed by NODE_BLOCKS."""
    np.savez(os.path.join(directory, EMBEDDINGS_FILE), **{k: np.asarray(blocks[k], np.float32) for k in NODE_BLOCKS})


def load_embeddings(directory: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(directory, EMBEDDINGS_FILE), allow_pickle=False) as npz:
        return {k: npz[k] for k in NODE_BLOCKS}
