"""data.root on s3:// against a real S3-compatible server on loopback (moto's server mode): ingest, train, publish,
and a serving replica hot-swapping a version it reads from the bucket."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import requests

import registry
from core.storage import Storage
from datasets.ingest import Request, run_ingest
from datasets.synth import generate
from tests.helpers import make_config, s3_bucket, start_app, stop_app, write_config

pytestmark = pytest.mark.slow
BUCKET = "ig-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    with s3_bucket(BUCKET) as endpoint:
        yield endpoint


def test_ingest_train_publish_and_serve_from_a_bucket(ray_session, s3_endpoint: str, tmp_path: Path) -> None:
    from trainers.train import TrainOptions, run_train

    root = f"s3://{BUCKET}/root"
    s3 = {"s3_endpoint": s3_endpoint, "s3_region": "us-east-1"}
    local_logs = tmp_path / "logs"
    generate(local_logs, users=200, items=300, events=12_000, days=4, seed=9)
    logs = Storage(f"s3://{BUCKET}/logs", s3_endpoint, "us-east-1")
    for f in sorted(local_logs.glob("*.csv")):  # the source lives in the bucket too
        with logs.fs.open_output_stream(logs.path(f.name)) as out:
            out.write(f.read_bytes())
    cfg = make_config(tmp_path, data={"root": root, "shards": 2, **s3},  # data.root: the bucket, not tmp_path
                      train={"epochs": 2, "num_workers": 1, "embedding_dim": 16, "num_layers": 2,
                             "batch_size": 512, "holdout_days": 1.0})
    summary = run_ingest(cfg, Request(source=f"s3://{BUCKET}/logs/*.csv", fmt="events", holdout=None))
    assert summary["accepted"] > 9_000 and summary["rejected"]["total"] + summary["duplicates"] + \
        summary["accepted"] == summary["input_rows"]
    storage = Storage(root, s3_endpoint, "us-east-1")
    assert storage.list_files("interactions", suffix=".parquet")  # written to the bucket, not a local folder

    first = run_train(cfg, TrainOptions())["version"]
    assert registry.latest_version(storage) == first  # LATEST is one object, PUT after the version verified
    from_bucket = registry.load_version(storage, first)
    assert from_bucket.metrics[f"recall@{cfg.train.k}"] >= 0
    # The seen lists are mapped from a private local copy (unlinked at once), as from local disk.
    assert isinstance(from_bucket.seen_indices, np.memmap) and not from_bucket.seen_indices.flags.writeable

    config = write_config(tmp_path / "cfg.yaml", root=root, data={"root": root, "shards": 2, **s3},
                          serve={"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.1, "poll_interval_s": 0.3})
    url = start_app(config, "s3", first)
    try:
        loaded = registry.load_version(storage, first)
        second = registry.publish(storage, loaded.artifacts())
        deadline = time.time() + 10
        while requests.get(f"{url}/version", timeout=10).json()["version"] != second:
            assert time.time() < deadline, "the replica did not swap to the version published in the bucket"
            time.sleep(0.2)
        assert requests.get(f"{url}/recommend/nobody", timeout=10).json()["version"] == second
    finally:
        stop_app("s3", root)
