"""The training state inside a Ray Train checkpoint: one typed record, written and read only here.

A checkpoint directory holds `state.pt` (this record, loaded with `weights_only=True`) and, for the final report
of a run, `embeddings.npz` (the final embeddings of every node type); `Checkpoint` is the two in memory. A lost
worker resumes from the record; the driver publishes from both.
"""

from __future__ import annotations

import os
import warnings
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
        model = {name: t.detach().cpu().numpy() for name, t in self.state.model.items()}
        return Checkpoint(replace(self.state, model=model), self.embeddings)  # type: ignore[arg-type]

    def restored(self, writable: bool = True) -> Checkpoint:
        """`portable`'s inverse. The arrays may be read-only views of the object store: the model gets its own
        copy (it is trained on and edited again), the embeddings are only read. `writable=False`: the model's
        tensors share the arrays too, for a caller that only reads them (the update cycle publishes them; the copy
        of a Taobao-sized table was half a second of every cycle)."""
        if writable:
            model = {name: torch.from_numpy(np.array(a)) for name, a in self.state.model.items()}
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                model = {name: torch.from_numpy(a) for name, a in self.state.model.items()}
        return Checkpoint(replace(self.state, model=model), self.embeddings)


def save_embeddings(directory: str, blocks: dict[str, np.ndarray]) -> None:
    """Final embeddings per node type (float32), keyed by NODE_BLOCKS."""
    np.savez(os.path.join(directory, EMBEDDINGS_FILE), **{k: np.asarray(blocks[k], np.float32) for k in NODE_BLOCKS})


def load_embeddings(directory: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(directory, EMBEDDINGS_FILE), allow_pickle=False) as npz:
        return {k: npz[k] for k in NODE_BLOCKS}
