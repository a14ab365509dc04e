"""The one typed configuration of the app, loaded from ray_config.yaml.

A leaf: it imports no first-party module, and every stage imports it. The vocabulary the configuration speaks
(event names, canonical event columns) is declared here once; `datasets.schema` takes it from here.

Every field carries a description: the README's config reference is generated from them, and a test checks that
ray_config.yaml comments every key.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

EventName = Literal["view", "click", "cart", "fav", "purchase"]
# The canonical event's columns (DESIGN 3.1), in schema order.
CanonicalColumn = Literal["user_id", "item_id", "event", "ts", "category_id", "brand_id", "price", "session_id"]
SourceFormat = Literal["taobao", "events", "lightgcn", "sequence"]


class ConfigError(ValueError):
    """A configuration problem, phrased as one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def is_object_store(path: str) -> bool:
    return path.startswith("s3://")


class SourceConfig(_Section):
    path: str | None = Field(None, description="path or glob of behaviour logs (local or s3://); null: only raw/")
    format: SourceFormat = Field("events", description="adapter: taobao | events | lightgcn | sequence")
    holdout: str | None = Field(None, description="lightgcn only: file whose rows become the evaluation holdout")
    attributes: str | None = Field(None, description="sequence only: item-attribute JSON {item: [attr, ...]}")
    columns: dict[CanonicalColumn, str] = Field(
        default_factory=dict, description="events only: canonical column -> source column (identity if absent)"
    )
    event: EventName = Field("purchase", description="event type for formats without one (lightgcn, sequence)")
    delimiter: str = Field(",", description="field separator of CSV inputs", min_length=1, max_length=1)


class DataConfig(_Section):
    root: str = Field("var/data", description="storage root: a local folder or s3://bucket/prefix")
    source: SourceConfig = Field(default_factory=SourceConfig, description="the behaviour logs to ingest")
    shards: int = Field(8, ge=1, le=4096, description="interaction shards, partitioned by user key")
    chunk_mb: int = Field(32, ge=1, le=1024, description="bytes of text per read task, in MiB")
    event_weights: dict[EventName, float] = Field(
        default_factory=lambda: {"view": 1.0, "click": 2.0, "cart": 4.0, "fav": 3.0, "purchase": 8.0},
        description="edge weight each event type adds to its user-item edge",
    )
    seen_events: list[EventName] = Field(
        default_factory=lambda: ["purchase"],
        description="event types after which an item is 'seen' by its shopper and never recommended to them again; "
        "an item with only other events (viewed, carted) stays a candidate")
    half_life_days: float = Field(14.0, gt=0, description="recency decay of edge weights, in days")
    recent_half_life_days: float = Field(
        3.0, gt=0, description="a shorter decay, kept beside the weight: interests rising or fading")
    max_id_length: int = Field(128, ge=1, description="longest accepted user/item/category/brand id")
    max_future_s: int = Field(
        300, ge=0, description="clock skew allowed: a timestamp further ahead of now is rejected (timestamp_in_future)")
    max_edge_weight: float = Field(
        24.0, gt=0, description="most weight one user's events give one item (edge weight and popularity): three "
        "purchases")
    writer_wait_s: float = Field(
        600.0, ge=0, description="how long an ingestion waits for another writer of data.root before it gives up")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL; null: AWS default")
    s3_region: str | None = Field(None, description="S3 region; null: from the environment")


class PrivacyConfig(_Section):
    allow_dev_key: bool = Field(
        True, description="start with a development pseudonym key (loud warning) when IG_PSEUDONYM_KEY is unset"
    )


class TrainConfig(_Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker and NCCL; CPU and gloo otherwise")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker")
    epochs: int = Field(1, ge=1, description="full passes over the training pairs")
    time_budget_s: float | None = Field(None, gt=0, description="stop cleanly and publish after this many seconds")
    embedding_dim: int = Field(1024, ge=1, description="embedding width, and the rank of the spectral-filter start")
    num_layers: int = Field(3, ge=0, description="propagation layers")
    lr: float = Field(0.001, gt=0, description="Adam learning rate")
    lr_decay: float = Field(0.85, gt=0, le=1, description="learning rate factor per epoch")
    init: Literal["normal", "spectral"] = Field(
        "spectral", description="embedding start: normal noise (LightGCN paper) or the graph's top singular vectors")
    spectral_filter: float | None = Field(
        3.5, ge=0, description="spectral start shaped so that, after propagation, scores are the low-pass filter "
        "exp(beta * sigma / sigma_1) of the top embedding_dim singular pairs of the interest graph (users, categories "
        "and brands against items; SVD-GCN; randomized SVD); null: sqrt(sigma) each side (exact SVD)")
    weighted_edges: bool = Field(
        True, description="user-item edges weigh log2(1 + weight) (event types, recency), scaled to mean 1 over the "
                          "pairs, in the adjacency; false: 1, who touched what")
    relations: Literal["one", "by_event"] = Field(
        "one", description="user-item edges: one relation (weighted as weighted_edges says), or by_event: each event "
                           "type a relation of its own, normalised by its own degrees and weighted by "
                           "data.event_weights")
    degree_exponent: float = Field(
        0.4, ge=0, le=1, description="the adjacency is D^-e A D^-e: 0.5 is LightGCN's symmetric normalisation, below "
                                     "it popular nodes weigh more (SGFCF's generalised normalisation); the spectral "
                                     "start uses the same")
    item_degree_power: float = Field(
        0.3, ge=0, le=1, description="items' final embeddings times (degree / mean)^power (GF-CF's D^1/2 "
        "on the item side); 0: off")
    batch_size: int = Field(16384, ge=1, description="BPR triples per step per worker")
    fanout: int = Field(
        32, ge=1, description="neighbours a step reads per node (more are sampled uniformly and reweighted): the "
                              "step's cost follows the batch, not the node's degree")
    refreshes_per_epoch: int = Field(
        4, ge=1, description="full forward propagations per pass over the training pairs that refresh the stored "
                             "embeddings a step's deeper layers and hard negatives read; an epoch over fewer pairs "
                             "(an update cycle) refreshes in proportion, at least once")
    negatives: int = Field(
        32, ge=1, description="negative candidates per positive; the best-scoring one is used (1: uniform sampling)")
    l2: float = Field(1e-4, ge=0, description="L2 on the batch's ego embeddings (LightGCN paper)")
    loss: Literal["bpr", "softmax"] = Field(
        "bpr", description="ranking loss: bpr (LightGCN paper) or softmax (sampled softmax over cosine, in-batch)")
    temperature: float = Field(0.1, gt=0, description="softmax loss: temperature of the cosine scores")
    k: int = Field(20, ge=1, description="cut-off of Recall@K / NDCG@K")
    holdout: Literal["auto", "official", "leave_one_out", "last_days"] = Field(
        "auto", description="evaluation holdout: auto picks official (lightgcn test file), leave_one_out (sequences) "
        "or last_days (event logs)"
    )
    holdout_days: float = Field(1.0, gt=0, description="event logs: the last N days form the holdout")
    eval_batch_users: int = Field(1024, ge=1, description="users scored per evaluation batch (bounds memory)")
    eval_max_users: int | None = Field(
        50_000, ge=1, description="users an evaluation scores (full ranking costs users x items): a seeded sample "
                                  "when more have held-out pairs, the same for popularity; null: all")
    seed: int = Field(0, description="random seed")
    eval_every: int = Field(1, ge=1, description="evaluate (and checkpoint) every N epochs")
    max_failures: int = Field(2, ge=0, description="worker losses a run survives, resuming from its last checkpoint")
    threads_per_worker: int | None = Field(None, ge=1, description="torch threads per worker; null: cpus_per_worker")
    allocator: Literal["jemalloc", "system"] = Field(
        "jemalloc", description="memory allocator of the training workers: jemalloc (preloaded where the machine has "
        "libjemalloc; a step's large blocks are reused, not faulted in again) or the system's malloc")
    refit: bool = Field(
        True, description="after the last evaluation, learn the held-out pairs too (sized like an update over them), "
        "so the published model has seen every ingested day; its metrics are the evaluation's; never an official "
        "test file")


class UpdateConfig(_Section):
    every_s: float = Field(300.0, gt=0, description="seconds between update cycles in --every mode")
    replay_ratio: float = Field(1.0, ge=0, description="old interactions replayed per new one")
    epochs: float = Field(4.0, gt=0, description="passes over an update's pairs (new + replay)")
    max_steps: int = Field(50, ge=1, description="most optimiser steps per warm-start update")
    lr: float = Field(0.001, gt=0, description="learning rate of a warm start (a fresh Adam over few steps)")
    tolerance: float = Field(0.02, ge=0, le=1, description="publish only if Recall@K >= (1 - tolerance) x parent's")
    touched_only_below: float = Field(
        0.05, ge=0, description="a cycle whose new pairs are under this share of the training pairs moves only the "
                                "rows they touch (new nodes, both ends of new pairs); 0: every cycle moves every row")
    refilter_above: float = Field(
        0.1, ge=0, description="a cycle whose new pairs are at least this share of the training pairs starts again "
                               "from the spectral filter of the grown graph, as a retrain does, on the update's "
                               "workers (still gated against its parent); above 1: never")
    refilter_passes: float = Field(
        0.0, ge=0, description="passes over every training pair at train.lr after a re-filter (a retrain takes one); "
                               "0: the filter alone (the pass added 0.4% Recall@20 on the Taobao sample and 0.1% on "
                               "Gowalla, and took 40% of a re-filtering cycle)")
    resident: bool = Field(True, description="--every: keep the Ray Train workers up between cycles (no start-up per "
                                             "cycle; their CPUs/GPUs stay reserved)")
    rehearse: bool = Field(True, description="resident workers run one cycle at start and throw it away (the newest "
                                             "version, one step, two evaluations), so the first real cycle does not "
                                             "pay a fresh process's first touch of its memory")


def _ordered(section: _Section, low: str, high: str) -> Any:
    if getattr(section, low) > getattr(section, high):
        raise ValueError(f"{low} must not exceed {high}")
    return section


class ServeConfig(_Section):
    min_replicas: int = Field(1, ge=0, description="autoscaling lower bound")
    max_replicas: int = Field(2, ge=1, description="autoscaling upper bound")
    target_ongoing_requests: float = Field(4.0, gt=0, description="autoscaling target per replica")
    upscale_delay_s: float = Field(5.0, ge=0, description="load must persist this long before scaling up")
    downscale_delay_s: float = Field(30.0, ge=0, description="idle time before scaling down")
    max_ongoing_requests: int = Field(32, ge=1, description="requests a replica takes at once")
    num_cpus: float = Field(0.5, ge=0, description="CPUs per recommender replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per recommender replica")
    poll_interval_s: float = Field(1.0, gt=0, description="how often replicas look at checkpoints/LATEST")
    max_k: int = Field(200, ge=1, description="largest k a request may ask for")
    precompute_depth: int = Field(
        50, ge=0, description="best items kept per known user after each swap, answered without scoring (0: off)")
    precompute_max_users: int = Field(
        1_000_000, ge=0, description="no precomputed answers past this many users (memory: users x depth x 8 B)")
    index_min_items: int = Field(
        100_000, ge=1, description="versions with at least this many items carry an approximate index (an inverted "
                                   "file), and replicas answer through it; smaller catalogues are scored exactly")
    index_nprobe: int = Field(
        256, ge=1, description="index lists a query scans (of about 4 x sqrt(items)): recall against exact and the "
                               "cost per query rise with it")
    max_audience: int = Field(
        1000, ge=1, description="GET /audiences: most shoppers one request may ask for (the batch job has no limit)")
    host: str = Field("127.0.0.1", description="HTTP bind address")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    high_throughput: bool = Field(
        True, description="RAY_SERVE_ENABLE_HA_PROXY and RAY_SERVE_THROUGHPUT_OPTIMIZED where supported"
    )
    max_events_per_batch: int = Field(1000, ge=1, description="POST /events: most events in one request")
    max_body_bytes: int = Field(1_000_000, ge=1, description="POST /events: largest request body")
    live_shards: int = Field(2, ge=1, le=256, description="actors holding live events, sharded by user key")
    live_max_events_per_user: int = Field(50, ge=1, description="newest live events kept per user")
    live_half_life_s: float = Field(1800.0, gt=0, description="recency decay of a live event's weight, in seconds")
    live_prior_weight: float = Field(
        4.0, gt=0, description="event weight the trained vector counts as when blended with live events"
    )
    live_wait_s: float = Field(1.0, gt=0, description="how long a write waits for every replica to apply it")
    live_max_users: int = Field(
        100_000, ge=1, description="users whose live events a shard holds; the least recently active go first")
    live_max_share: float = Field(
        0.8, gt=0, le=1, description="most of a known user's vector their live events may make up")
    live_log_entries: int = Field(
        10_000, ge=100, description="changes a shard keeps for replicas catching up (older: a snapshot instead)")
    live_seal_s: float = Field(
        30.0, gt=0, description="a live file is ingested once it is this old: later writes are refused (503)")

    @model_validator(mode="after")
    def _bounds(self) -> ServeConfig:
        return _ordered(self, "min_replicas", "max_replicas")


class NodeGroup(_Section):
    """One autoscaled worker type of a production cluster (cluster/launcher.yaml, cluster/kuberay-rayservice.yaml)."""

    min_workers: int = Field(0, ge=0, description="nodes kept even when idle")
    max_workers: int = Field(4, ge=0, description="most nodes the autoscaler starts")
    cpus: int = Field(8, ge=1, description="CPUs per node")
    gpus: int = Field(0, ge=0, description="GPUs per node")
    memory_gib: int = Field(32, ge=1, description="memory per node, GiB")

    @model_validator(mode="after")
    def _bounds(self) -> NodeGroup:
        return _ordered(self, "min_workers", "max_workers")


class ClusterConfig(_Section):
    address: str | None = Field(None, description="Ray address to join; null: RAY_ADDRESS or an embedded local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of an embedded local Ray; null: all")
    object_store_mb: int | None = Field(None, ge=64, description="object store of an embedded local Ray, MiB")
    head_cpus: int = Field(4, ge=0, description="production head node: CPUs it offers (Serve proxy, controller)")
    head_memory_gib: int = Field(16, ge=1, description="production head node: memory, GiB")
    cpu_workers: NodeGroup = Field(
        default_factory=lambda: NodeGroup(min_workers=1, max_workers=4, cpus=8, gpus=0, memory_gib=32),
        description="CPU worker nodes: ingestion, CPU training, serving replicas",
    )
    gpu_workers: NodeGroup = Field(
        default_factory=lambda: NodeGroup(min_workers=0, max_workers=2, cpus=8, gpus=1, memory_gib=32),
        description="GPU worker nodes: training with --use-gpu (scaled from zero)",
    )
    idle_timeout_minutes: float = Field(5.0, gt=0, description="an idle worker node is removed after this long")
    upscaling_speed: float = Field(1.0, gt=0, description="how fast the autoscaler adds nodes (Ray's meaning)")
    image: str = Field("rayproject/ray:2.60.0-py311", description="container image of the KubeRay pods")


class RegistryConfig(_Section):
    keep_versions: int = Field(
        10, ge=1, description="published versions kept; older ones are removed after each publish")


class AppConfig(_Section):
    data: DataConfig = Field(default_factory=DataConfig, description="storage and ingestion")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="pseudonyms and deletion")
    train: TrainConfig = Field(default_factory=TrainConfig, description="full training")
    update: UpdateConfig = Field(default_factory=UpdateConfig, description="warm-start updates")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="published model versions")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="the Serve app")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="where Ray runs")


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    if loc[-1:] == ["[key]"]:  # a mapping's key is wrong, not its value: name the mapping, then the key
        return f"{source}: {'.'.join(loc[:-2])}: key {loc[-2]!r}: {first['msg']}"
    key = ".".join(loc) or "<root>"
    if first["type"] == "extra_forbidden":
        return f"{source}: {key}: unknown key"
    return f"{source}: {key}: {first['msg']}"


def _local_paths_exist(cfg: AppConfig) -> None:
    src = cfg.data.source
    for key, value in (("path", src.path), ("holdout", src.holdout), ("attributes", src.attributes)):
        if value is None or is_object_store(value):
            continue
        if not glob.glob(value):
            raise ConfigError(f"data.source.{key}: no file matches {value!r}")


def parse_config(raw: dict[str, Any], source: str = "config") -> AppConfig:
    """Validate a config mapping; raises ConfigError with one line naming the key.

    Relative paths are relative to the working directory, as for every command (and `ray job submit
    --working-dir .`), not to the config file.
    """
    try:
        cfg = AppConfig.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None
    _local_paths_exist(cfg)
    return cfg


def load_config(path: str | os.PathLike[str]) -> AppConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return parse_config(raw or {}, source=str(path))
