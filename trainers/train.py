"""`python -m trainers.train`: train the GNN on Ray Train across N workers and publish a checkpoint version.

Data-parallel across workers (gloo on CPU, NCCL with --use-gpu; ranks exchange the rows their batches touched); each
worker trains on its own shard of the training pairs, checkpoints every evaluation through Ray Train, and a lost
worker is replaced and resumes from the last checkpoint (train.max_failures). The last line printed is one JSON
object: version, parent, epochs, seconds, metrics.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.cli import positive, run_command
from core.config import AppConfig, TrainConfig
from core.storage import TRAIN_RUNS, storage_for
from trainers.allocator import worker_env
from trainers.data import GraphMissingError
from trainers.worker_inputs import Refit, WarmStart, WorkerInputs

if TYPE_CHECKING:
    from trainers.train_state import Checkpoint

log = logging.getLogger("trainers.train")


@dataclass
class TrainOptions:
    num_workers: int | None = None
    use_gpu: bool | None = None
    epochs: int | None = None
    time_budget_s: float | None = None


def worker_inputs(cfg: AppConfig, opts: TrainOptions, started: float, warm: WarmStart | None = None,
                  train: TrainConfig | None = None, **extra: Any) -> WorkerInputs:
    """What every worker gets; scaling options (workers, GPUs) stay with the driver. `train` overrides the
    configured hyper-parameters (an update's epochs, rate and width); `extra` sets max_steps or session_wrapper."""
    t = train or cfg.train
    if opts.epochs:
        t = t.model_copy(update={"epochs": opts.epochs})
    budget = opts.time_budget_s if opts.time_budget_s is not None else t.time_budget_s
    threads = t.threads_per_worker or max(1, int(t.cpus_per_worker))
    # A full training also learns its holdout once evaluated; an update's holdout is the gate's (the next cycle,
    # whose holdout has moved on, learns it).
    refit = (Refit(lr=cfg.update.lr, epochs=cfg.update.epochs, max_steps=cfg.update.max_steps,
                   replay_ratio=cfg.update.replay_ratio) if cfg.train.refit and warm is None else None)
    return WorkerInputs(storage=storage_for(cfg), train=t, threads=threads,
                        deadline=started + budget if budget else None, warm=warm, refit=refit, **extra)


def _use_gpu(cfg: AppConfig, opts: TrainOptions) -> bool:
    return cfg.train.use_gpu if opts.use_gpu is None else opts.use_gpu


def scaling_config(cfg: AppConfig, opts: TrainOptions):  # -> ray.train.ScalingConfig
    from ray.train import ScalingConfig

    use_gpu = _use_gpu(cfg, opts)
    resources: dict[str, float] = {"CPU": cfg.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=opts.num_workers or cfg.train.num_workers, use_gpu=use_gpu,
                         resources_per_worker=resources)


def torch_config(cfg: AppConfig, opts: TrainOptions):  # -> ray.train.torch.TorchConfig
    """NCCL between GPUs, gloo on CPU."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if _use_gpu(cfg, opts) else "gloo")


def trainer_for(cfg: AppConfig, opts: TrainOptions, loop: Any, config: dict, name: str):  # -> TorchTrainer
    """A TorchTrainer with the app's scaling, backend, failure and storage settings (full, update, resident)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    storage = storage_for(cfg)
    env = worker_env(cfg.train.allocator)
    # On an object store Ray Train gets our filesystem, so it uses data.s3_endpoint / s3_region like everything else.
    where = {"storage_path": storage.path(TRAIN_RUNS)}
    if not storage.is_local:
        where["storage_filesystem"] = storage.fs
    return TorchTrainer(
        loop,
        train_loop_config=config,
        torch_config=torch_config(cfg, opts),
        scaling_config=scaling_config(cfg, opts),
        run_config=RunConfig(
            name=name,
            **where,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )


@contextmanager
def fitted(cfg: AppConfig, opts: TrainOptions, inputs: WorkerInputs, name: str) -> Iterator[tuple[Checkpoint, dict]]:
    """Run the TorchTrainer; returns the final checkpoint and the last metrics."""
    from trainers.loop import train_loop_per_worker
    from trainers.shared_graph import with_shared_graph
    from trainers.train_state import Checkpoint

    inputs = with_shared_graph(inputs, opts.num_workers or cfg.train.num_workers, cfg.train.cpus_per_worker)
    trainer = trainer_for(cfg, opts, train_loop_per_worker, {"inputs": inputs}, name)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    local = tempfile.mkdtemp(prefix="ig-final-")
    try:
        yield Checkpoint.load(result.checkpoint.to_directory(local)), dict(result.metrics or {})
    finally:  # the local copy, and Ray Train's run folder: its checkpoints hold user vectors a deletion must reach
        shutil.rmtree(local, ignore_errors=True)
        storage_for(cfg).delete(storage_for(cfg).path(TRAIN_RUNS, name))


def run_train(cfg: AppConfig, opts: TrainOptions | None = None, parent: str | None = None, **extra: Any) -> dict:
    """Train and publish; returns the JSON summary. `extra` goes to the workers' inputs (max_steps,
    session_wrapper)."""
    from core.runtime import ensure_ray
    from trainers.data import graph_meta
    from trainers.publish import publish_from_checkpoint

    opts = opts or TrainOptions()
    started = time.time()
    storage = storage_for(cfg)
    graph_meta(storage)  # fail here, with a clear message, rather than inside every worker
    ensure_ray(cfg)
    inputs = worker_inputs(cfg, opts, started, **extra)
    name = time.strftime("train-%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    with fitted(cfg, opts, inputs, name) as (checkpoint, _):
        version, manifest, _ = publish_from_checkpoint(cfg, storage, checkpoint, parent=parent,
                                                       num_workers=opts.num_workers or cfg.train.num_workers)
    return {
        "version": version,
        "parent": parent,
        "epochs": manifest["extra"]["epochs"],
        "seconds": round(time.time() - started, 3),
        "train_seconds": manifest["extra"]["train_seconds"],
        "metrics": manifest["metrics"],
        "k": manifest["k"],
        "split": manifest["extra"]["split"],
        "popularity_metrics": manifest["extra"]["popularity_metrics"],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainers.train", description=__doc__)
    p.add_argument("--config", default="ray_config.yaml", help="the app's configuration")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (overrides train.num_workers)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker, NCCL")
    p.add_argument("--epochs", type=int, help="passes over the training pairs (overrides train.epochs)")
    p.add_argument("--time-budget-s", type=float, help="stop cleanly and publish after this many seconds")
    p.add_argument("--root", help="storage root (overrides data.root)")
    return p


def _train_command(args: argparse.Namespace, cfg: AppConfig) -> dict:
    for name, value in (("--num-workers", args.num_workers), ("--epochs", args.epochs),
                        ("--time-budget-s", args.time_budget_s)):
        positive(name, value)
    return run_train(cfg, TrainOptions(args.num_workers, args.use_gpu, args.epochs, args.time_budget_s))


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, _train_command, errors=(GraphMissingError,))


if __name__ == "__main__":
    raise SystemExit(main())
