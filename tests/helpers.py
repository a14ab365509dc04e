"""Small helpers shared by tests (no Ray work shipped from here)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from core.config import AppConfig, parse_config


def make_config(root: Path, **sections: dict) -> AppConfig:
    raw: dict = {"data": {"root": str(root), "shards": 4, **sections.pop("data", {})}}
    raw.update(sections)
    return parse_config(raw, source="test")


def read_dir(path: Path):
    files = sorted(p for p in path.rglob("*.parquet"))
    if not files:
        return None
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def write_config(path: Path, root: str, **sections: dict) -> Path:
    """A ray_config.yaml for a test: data.root plus the given sections."""
    import yaml

    raw: dict = {"data": {"root": root, "shards": 4}}
    raw.update(sections)
    path.write_text(yaml.safe_dump(raw))
    return path


@contextlib.contextmanager
def s3_bucket(bucket: str) -> Iterator[str]:
    """A real S3 protocol on loopback (moto's server mode) holding an empty `bucket`; yields its endpoint."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True).create_dir(bucket)
        yield endpoint
    finally:
        server.stop()


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int, avoid: frozenset[int] = frozenset()) -> list[int]:
    """`n` distinct free ports, none in `avoid`: all held open at once while they are picked, so the system cannot
    hand the same one out twice (one at a time, two of a head node's ports once came back equal in CI)."""
    import socket

    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            sock = socket.socket()
            held.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in avoid:
                ports.append(port)
        return ports
    finally:
        for sock in held:
            sock.close()


# What a producer sends with POST /events (the token tests/conftest.py puts in every Ray worker's environment).
PRODUCER = {"Authorization": f"Bearer {os.environ.get('IG_EVENTS_TOKEN', '')}"}

# A toy model with known geometry for serving tests: item i is in category i % 3, user u likes category u % 3 and
# has seen items (u % 3) + 3j for j < 3.
TEST_KEY = b"test-pseudonym-key"
N_USERS, N_ITEMS, N_CATS, DIM = 20, 60, 3, 8


def toy_seen(u: int) -> list[int]:
    return [(u % N_CATS) + N_CATS * j for j in range(3)]


def publish_toy_version(storage, seed: int, parent: str | None = None, watermark_ms: int | None = None,
                        index: bool = False) -> str:
    """A real, verified version with known vectors (see above); `index`: it carries an approximate item index."""
    import numpy as np
    import pyarrow as pa

    import registry
    from datasets.pseudonym import pseudonymise
    from registry.item_index import build as build_index

    rng = np.random.default_rng(seed)
    cat_dirs = np.eye(DIM, dtype=np.float32)[:N_CATS] * 3
    item_cat = np.arange(N_ITEMS) % N_CATS
    items = cat_dirs[item_cat] + rng.normal(0, 0.3, (N_ITEMS, DIM)).astype(np.float32)
    users = cat_dirs[np.arange(N_USERS) % N_CATS] + rng.normal(0, 0.3, (N_USERS, DIM)).astype(np.float32)
    seen_lists = [toy_seen(u) for u in range(N_USERS)]
    indptr = np.cumsum([0] + [len(s) for s in seen_lists]).astype(np.int64)
    pop = pa.table({"item_idx": pa.array(np.arange(N_ITEMS, dtype=np.int32)),
                    "score": pa.array(np.linspace(1, 0, N_ITEMS).astype(np.float32)),
                    "category_idx": pa.array(item_cat.astype(np.int32))})
    return registry.publish(storage, registry.ModelArtifacts(
        user_keys=[pseudonymise(f"user-{u}", TEST_KEY) for u in range(N_USERS)], user_vectors=users,
        item_ids=[f"item-{i}" for i in range(N_ITEMS)], item_vectors=items,
        seen_indptr=indptr, seen_indices=np.concatenate(seen_lists).astype(np.int32), popularity=pop,
        state_dict={}, hparams={}, config_hash="test", metrics={"recall@20": 0.5}, k=20,
        node_counts={"user": N_USERS, "item": N_ITEMS, "category": N_CATS, "brand": 0},
        category_ids=[f"cat-{c}" for c in range(N_CATS)], category_vectors=cat_dirs, parent=parent,
        watermark_ms=watermark_ms, item_index=build_index(items) if index else None))


def start_app(config: Path, name: str, version: str, port: int | None = None) -> str:
    """serve.run the app on loopback and wait until it serves `version`; returns its base URL."""
    import time

    import requests
    from ray import serve

    from serve_app.app import AppArgs, build_app

    port = port or free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(config_path=str(config))), name=name, route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=2).json().get("version") == version:
                return url
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"the app did not serve {version} within 60 s")


def stop_app(name: str, root: str, shards: int = 2) -> None:
    from ray import serve

    from serve_app.live_state import kill_shards

    serve.delete(name)
    serve.shutdown()
    kill_shards(root, shards)


class LoadThreads:
    """Client threads that call `request(i)` in a loop until stopped. An exception in any of them is not lost: it
    fails the test when the threads are joined (`stop()`, or leaving the `with` block)."""

    def __init__(self, clients: int, request) -> None:
        import threading

        self._request, self._stop = request, threading.Event()
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        try:
            while not self._stop.is_set():
                self._request(i)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread by stop()
            self.errors.append(err)

    def __enter__(self) -> LoadThreads:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        if any(t.is_alive() for t in self._threads):
            raise AssertionError("a load thread did not stop within 60 s")
        if self.errors:
            raise AssertionError(f"a load thread failed: {self.errors[0]!r}") from self.errors[0]

    def __exit__(self, *exc: object) -> None:
        self.stop()
