"""Test-only fault injection: a session wrapper that kills or fails a worker at a chosen rank and epoch.

It lives in the package (not under tests/) because Ray ships it to the workers. Production never builds one:
`WorkerInputs.session_wrapper` is None there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainers.train_state import Checkpoint


@dataclass(frozen=True)
class Fault:
    rank: int
    epoch: int
    marker: str  # a file written when the fault fires: each fault fires once, even across restarted workers
    raise_error: bool = False  # raise an exception instead of ending the process


@dataclass(frozen=True)
class InjectFaults:
    """A `WorkerInputs.session_wrapper`: faults fire, in order, when a worker reports that epoch (after its
    training and evaluation, before its checkpoint is saved), so a resumed run repeats the epoch."""

    faults: tuple[Fault, ...]

    def __call__(self, session: Any) -> Any:
        return _FaultySession(session, self.faults)


class _FaultySession:
    def __init__(self, inner: Any, faults: tuple[Fault, ...]) -> None:
        self._inner, self._faults = inner, faults
        self.rank, self.world, self.local_world = inner.rank, inner.world, inner.local_world

    def report(self, metrics: dict[str, Any], checkpoint: Checkpoint | None) -> None:
        for fault in self._faults:
            marker = Path(fault.marker)
            if fault.rank != self.rank or fault.epoch != metrics.get("epoch") or marker.exists():
                continue
            marker.write_text(f"rank {self.rank} failed at epoch {fault.epoch}\n")
            if fault.raise_error:
                raise RuntimeError(f"injected fault at rank {self.rank}, epoch {fault.epoch}")
            os._exit(1)
        self._inner.report(metrics, checkpoint)

    def restored_dir(self) -> str | None:
        return self._inner.restored_dir()

    def device(self) -> Any:
        return self._inner.device()
