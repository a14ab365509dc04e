"""The published checkpoint format (DESIGN 3.2, 3.3, 3.7): the one module that writes and reads `checkpoints/`.

Layout under `<data.root>/checkpoints/`:

    versions/vNNNNNN/      one complete version: manifest.json and every file it lists with its sha256
        manifest.json      version, parent, created_at, watermark_ms, config_hash, metrics, k, node_counts, extra, files
        model.pt           torch.save({"state_dict": ..., "hparams": ...}), for warm starts
        embeddings/users.parquet   user_key string, vector list<float32>; row i is user index i
        embeddings/items.parquet   item_id string, vector list<float32>; row i is item index i
        seen.npz           CSR of each user's seen items: indptr int64 [users + 1], indices int32
        popularity.parquet item_idx int32, score float32, category_idx int32 (-1 when none)
        curve.png          training curve (optional, opaque here)
    LATEST                 the newest complete version's folder name, e.g. "v000042"
    .staging-<uuid>/       a version being written; readers never look here
    .lock                  local disk: flock serialising version claims and LATEST
    .claims/               object stores: version-number claims (see _claim_object_store)

A version is complete when its manifest.json exists: publishing writes the manifest last (or renames the finished
folder into place in one step on local disk), so readers list and load only complete versions.

Serving and warm-start updates import this module, so it stays free of Ray and torch_geometric; torch is imported
only where model.pt is written or read, so a reader that needs only embeddings never pays for it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import math
import os
import random
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from datasets.storage import CHECKPOINTS, Storage

VERSIONS = "versions"
LATEST = "LATEST"
MANIFEST = "manifest.json"
MODEL = "model.pt"
USERS = "embeddings/users.parquet"
ITEMS = "embeddings/items.parquet"
SEEN = "seen.npz"
POPULARITY = "popularity.parquet"
CURVE = "curve.png"
REQUIRED_FILES = (MODEL, USERS, ITEMS, SEEN, POPULARITY)
NODE_TYPES = ("user", "item", "category", "brand")
STAGING_PREFIX = ".staging-"
CLAIMS = ".claims"
LOCK = ".lock"

USER_KEY = "user_key"
ITEM_ID = "item_id"
VECTOR = "vector"
POPULARITY_SCHEMA = pa.schema([("item_idx", pa.int32()), ("score", pa.float32()), ("category_idx", pa.int32())])

_VERSION_RE = re.compile(r"^v(\d{6,})$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_KEYS = ("version", "parent", "created_at", "watermark_ms", "config_hash", "metrics", "k", "node_counts",
                  "extra", "files")
# LATEST on an object store converges by re-checking; bounded so a pathological store cannot spin forever.
_LATEST_ROUNDS = 20
_HASH_CHUNK = 8 << 20


class CheckpointError(Exception):
    """A version that is missing, incomplete or corrupt: readers refuse it and keep what they have."""


def version_name(number: int) -> str:
    return f"v{number:06d}"


def version_number(name: str) -> int:
    """The number in a version folder name; ValueError for anything else."""
    m = _VERSION_RE.match(name)
    if m is None:
        raise ValueError(f"not a version name: {name!r} (expected v followed by 6 digits, e.g. v000042)")
    return int(m.group(1))


def config_hash(model_dump: Mapping[str, Any]) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces), first 16 hex characters.

    Values JSON cannot hold (paths, enums) hash by str(), so `model_dump()` and `model_dump(mode="json")` agree.
    """
    text = json.dumps(model_dump, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class ModelArtifacts:
    """Everything one published version holds, as the trainer has it in memory."""

    # Pseudonymised, row i = user index i; None for a deleted user, whose row also has a zero vector and no seen
    # items (rows stay in place so indices never shift).
    user_keys: Sequence[str | None] | pa.Array
    user_vectors: np.ndarray  # float32 [users, d]
    item_ids: Sequence[str] | pa.Array  # row i = item index i
    item_vectors: np.ndarray  # float32 [items, d]
    seen_indptr: np.ndarray  # int64 [users + 1]
    seen_indices: np.ndarray  # int32 item indices
    popularity: pa.Table | Mapping[str, Any]  # columns item_idx, score, category_idx (-1 when none)
    state_dict: Mapping[str, Any]  # model parameters for warm starts
    hparams: Mapping[str, Any]  # what it takes to rebuild the model around state_dict
    config_hash: str
    metrics: Mapping[str, float]  # e.g. {"recall@20": 0.18, "ndcg@20": 0.15}
    k: int
    node_counts: Mapping[str, int]  # user, item, category, brand
    parent: str | None = None  # the version this one was warm-started from
    watermark_ms: int | None = None  # newest event time the training data covers
    extra: Mapping[str, Any] = field(default_factory=dict)  # free-form: epochs, seconds, ...
    curve_png: bytes | None = None


@dataclass
class LoadedVersion:
    """One verified version, ready to serve: numpy matrices, key lists, seen CSR, popularity; model.pt on demand."""

    version: str
    manifest: dict[str, Any]
    user_keys: list[str | None]  # None: a deleted user
    user_vectors: np.ndarray  # float32 [users, d]
    item_ids: list[str]
    item_vectors: np.ndarray  # float32 [items, d]
    seen_indptr: np.ndarray  # int64 [users + 1]
    seen_indices: np.ndarray  # int32
    popularity: pa.Table  # POPULARITY_SCHEMA
    storage: Storage = field(repr=False)
    folder: str = field(repr=False)

    @property
    def parent(self) -> str | None:
        return self.manifest["parent"]

    @property
    def metrics(self) -> dict[str, float]:
        return self.manifest["metrics"]

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def node_counts(self) -> dict[str, int]:
        return self.manifest["node_counts"]

    @property
    def watermark_ms(self) -> int | None:
        return self.manifest["watermark_ms"]

    @property
    def config_hash(self) -> str:
        return self.manifest["config_hash"]

    @property
    def created_at(self) -> str:
        return self.manifest["created_at"]

    @property
    def extra(self) -> dict[str, Any]:
        return self.manifest["extra"]

    def seen_items(self, user_idx: int) -> np.ndarray:
        return self.seen_indices[self.seen_indptr[user_idx]:self.seen_indptr[user_idx + 1]]

    def popular_items(self, category_idx: int | None = None) -> np.ndarray:
        """Item indices by descending score (ties by index), overall or within one category."""
        table = self.popularity
        if category_idx is not None:
            table = table.filter(pc.equal(table["category_idx"], pa.scalar(category_idx, pa.int32())))
        items = table["item_idx"].to_numpy()
        scores = table["score"].to_numpy()
        return items[np.lexsort((items, -scores))]

    def load_state(self, map_location: Any = "cpu") -> dict[str, Any]:
        """model.pt as {"state_dict": ..., "hparams": ...}, checked against its sha256 again (it is read later)."""
        import torch

        label = _label(self.version)
        data = _read_file(self.storage, self.folder, MODEL, self.manifest["files"][MODEL], label, verify=True)
        try:
            obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{label}: {MODEL}: cannot load: {_one_line(e)}") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict) \
                or not isinstance(obj.get("hparams"), dict):
            raise CheckpointError(f"{label}: {MODEL}: expected a dict with 'state_dict' and 'hparams'")
        return obj

    def load_curve_png(self) -> bytes | None:
        sha = self.manifest["files"].get(CURVE)
        if sha is None:
            return None
        return _read_file(self.storage, self.folder, CURVE, sha, _label(self.version), verify=True)


# ---------------------------------------------------------------------------------------------------- reading


def latest_version(storage: Storage) -> str | None:
    """The version LATEST names, or None before the first publish."""
    path = storage.path(CHECKPOINTS, LATEST)
    try:
        text = storage.read_bytes(path).decode("utf-8", "replace").strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        if not storage.exists(CHECKPOINTS, LATEST):
            return None
        raise CheckpointError(f"checkpoints/{LATEST}: cannot read: {_one_line(e)}") from e
    try:
        version_number(text)
    except ValueError as e:
        raise CheckpointError(f"checkpoints/{LATEST}: {e}") from None
    return text


def list_versions(storage: Storage) -> list[str]:
    """Complete versions (those with a manifest.json), oldest first."""
    prefix = storage.path(CHECKPOINTS, VERSIONS) + "/"
    found = set()
    for path in storage.list_files(CHECKPOINTS, VERSIONS, suffix="/" + MANIFEST):
        parts = path[len(prefix):].split("/")
        if len(parts) == 2 and parts[1] == MANIFEST and _VERSION_RE.match(parts[0]):
            found.add(parts[0])
    return sorted(found, key=version_number)


def read_manifest(storage: Storage, version: str) -> dict[str, Any]:
    """A version's manifest, checked for shape; CheckpointError when missing or malformed."""
    label = _label(version)
    try:
        version_number(version)
    except ValueError as e:
        raise CheckpointError(f"{label}: {e}") from None
    path = storage.path(CHECKPOINTS, VERSIONS, version, MANIFEST)
    try:
        data = storage.read_bytes(path)
    except OSError as e:
        raise CheckpointError(f"{label}: {MANIFEST} is missing or unreadable (incomplete version): "
                              f"{_one_line(e)}") from e
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise CheckpointError(f"{label}: {MANIFEST} is not valid JSON: {_one_line(e)}") from e
    _check_manifest(manifest, label)
    if manifest["version"] != version:
        raise CheckpointError(f"{label}: {MANIFEST} names version {manifest['version']!r}, not its folder's")
    return manifest


def load_version(storage: Storage, version: str, verify: bool = True) -> LoadedVersion:
    """Load one version. With verify, every file must match its sha256 and no file may be missing or unlisted;
    shapes are always checked. Any failure raises CheckpointError naming the version and the file."""
    manifest = read_manifest(storage, version)
    return _load_folder(storage, storage.path(CHECKPOINTS, VERSIONS, version), manifest, _label(version), verify)


def load_latest(storage: Storage, verify: bool = True) -> LoadedVersion | None:
    version = latest_version(storage)
    return None if version is None else load_version(storage, version, verify)


def _load_folder(storage: Storage, folder: str, manifest: dict[str, Any], label: str, verify: bool
                 ) -> LoadedVersion:
    files: dict[str, str] = manifest["files"]
    for rel in REQUIRED_FILES:
        if rel not in files:
            raise CheckpointError(f"{label}: {MANIFEST} does not list {rel}")
    if verify:
        present = {p[len(folder) + 1:] for p in _files_under(storage, folder)} - {MANIFEST}
        missing = sorted(set(files) - present)
        if missing:
            raise CheckpointError(f"{label}: {missing[0]} is listed in {MANIFEST} but missing")
        unlisted = sorted(present - set(files))
        if unlisted:
            raise CheckpointError(f"{label}: {unlisted[0]} is in the folder but not listed in {MANIFEST}")

    counts = manifest["node_counts"]
    user_keys, user_vectors = _parse_embeddings(
        _read_file(storage, folder, USERS, files[USERS], label, verify), USER_KEY, label, USERS)
    item_ids, item_vectors = _parse_embeddings(
        _read_file(storage, folder, ITEMS, files[ITEMS], label, verify), ITEM_ID, label, ITEMS)
    n_users, n_items = len(user_keys), len(item_ids)
    if n_users != counts["user"]:
        raise CheckpointError(f"{label}: {USERS} has {n_users} rows, node_counts.user is {counts['user']}")
    if n_items != counts["item"]:
        raise CheckpointError(f"{label}: {ITEMS} has {n_items} rows, node_counts.item is {counts['item']}")
    if user_vectors.shape[1] != item_vectors.shape[1] and n_users and n_items:
        raise CheckpointError(f"{label}: {USERS} vectors have width {user_vectors.shape[1]}, "
                              f"{ITEMS} vectors {item_vectors.shape[1]}")
    indptr, indices = _parse_seen(_read_file(storage, folder, SEEN, files[SEEN], label, verify), n_users, n_items,
                                  label)
    popularity = _parse_popularity(_read_file(storage, folder, POPULARITY, files[POPULARITY], label, verify),
                                   n_items, counts["category"], label)
    if verify:
        # model.pt and curve.png are read lazily, but a version that serves must be whole: hash them now, streaming.
        for rel in sorted(set(files) - {USERS, ITEMS, SEEN, POPULARITY}):
            _check_streamed(storage, folder, rel, files[rel], label)
    return LoadedVersion(
        version=manifest["version"] or "", manifest=manifest, user_keys=user_keys, user_vectors=user_vectors,
        item_ids=item_ids, item_vectors=item_vectors, seen_indptr=indptr, seen_indices=indices,
        popularity=popularity, storage=storage, folder=folder,
    )


def _files_under(storage: Storage, folder: str) -> list[str]:
    selector = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
    return [i.path for i in storage.fs.get_file_info(selector) if i.type == pafs.FileType.File]


def _label(version: str | None) -> str:
    return f"checkpoint {version or '(staging)'}"


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read_file(storage: Storage, folder: str, rel: str, sha: str, label: str, verify: bool) -> bytes:
    try:
        data = storage.read_bytes(f"{folder}/{rel}")
    except OSError as e:
        raise CheckpointError(f"{label}: {rel} is missing or unreadable: {_one_line(e)}") from e
    if verify:
        found = hashlib.sha256(data).hexdigest()
        if found != sha:
            raise CheckpointError(f"{label}: {rel} fails its checksum (sha256 {found[:12]}..., manifest {sha[:12]}...)")
    return data


def _check_streamed(storage: Storage, folder: str, rel: str, sha: str, label: str) -> None:
    digest = hashlib.sha256()
    try:
        with storage.fs.open_input_stream(f"{folder}/{rel}") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise CheckpointError(f"{label}: {rel} is missing or unreadable: {_one_line(e)}") from e
    if digest.hexdigest() != sha:
        raise CheckpointError(f"{label}: {rel} fails its checksum (sha256 {digest.hexdigest()[:12]}..., "
                              f"manifest {sha[:12]}...)")


def _check_manifest(manifest: Any, label: str) -> None:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{label}: {MANIFEST}: {what}")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise bad(f"missing keys {missing}")
    for key, kinds in (("version", (str,)), ("parent", (str, type(None))), ("created_at", (str,)),
                       ("watermark_ms", (int, type(None))), ("config_hash", (str,)), ("metrics", (dict,)),
                       ("k", (int,)), ("node_counts", (dict,)), ("extra", (dict,)), ("files", (dict,))):
        if not isinstance(manifest[key], kinds) or isinstance(manifest[key], bool):
            raise bad(f"{key} has the wrong type ({type(manifest[key]).__name__})")
    for key in ("version", "parent"):
        if manifest[key] is not None and not _VERSION_RE.match(manifest[key]):
            raise bad(f"{key} {manifest[key]!r} is not a version name")
    for name, value in manifest["metrics"].items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise bad(f"metrics[{name!r}] is not a number")
    counts = manifest["node_counts"]
    for node in NODE_TYPES:
        if not isinstance(counts.get(node), int) or isinstance(counts.get(node), bool) or counts[node] < 0:
            raise bad(f"node_counts.{node} is missing or not a count")
    for rel, sha in manifest["files"].items():
        if not isinstance(sha, str) or not _SHA256_RE.match(sha):
            raise bad(f"files[{rel!r}] is not a sha256 hex digest")
        if rel == MANIFEST or rel.startswith("/") or ".." in rel.split("/") or "" in rel.split("/"):
            raise bad(f"files lists an invalid path {rel!r}")


def _parse_parquet(data: bytes, label: str, rel: str) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data))
    except Exception as e:
        raise CheckpointError(f"{label}: {rel} is not readable Parquet: {_one_line(e)}") from e


def _parse_embeddings(data: bytes, key_column: str, label: str, rel: str) -> tuple[list[str], np.ndarray]:
    table = _parse_parquet(data, label, rel)
    names = table.schema.names
    if key_column not in names or VECTOR not in names:
        raise CheckpointError(f"{label}: {rel} has columns {names}, expected [{key_column!r}, {VECTOR!r}]")
    keys_col, vec_col = table[key_column], table[VECTOR]
    if not pa.types.is_string(keys_col.type):
        raise CheckpointError(f"{label}: {rel}: {key_column} is {keys_col.type}, expected string")
    if not pa.types.is_list(vec_col.type) or vec_col.type.value_type != pa.float32():
        raise CheckpointError(f"{label}: {rel}: {VECTOR} is {vec_col.type}, expected list<float32>")
    # A null user_key is a deleted user's blanked row (see ModelArtifacts.user_keys); item ids are never null.
    if (keys_col.null_count and key_column != USER_KEY) or vec_col.null_count:
        raise CheckpointError(f"{label}: {rel} has null keys or vectors")
    n = table.num_rows
    vectors = vec_col.combine_chunks() if vec_col.num_chunks else pa.array([], vec_col.type)
    lengths = pc.list_value_length(vectors).to_numpy() if n else np.zeros(0, np.int32)
    width = int(lengths[0]) if n else 0
    if n and (width < 1 or (lengths != width).any()):
        raise CheckpointError(f"{label}: {rel}: vectors do not all have the same positive width")
    flat = vectors.flatten()
    if flat.null_count:
        raise CheckpointError(f"{label}: {rel} has null vector components")
    # A writable copy: callers hand these to torch.from_numpy, which warns on Arrow's read-only buffers.
    matrix = flat.to_numpy(zero_copy_only=False, writable=True).reshape(n, width)
    if pc.count_distinct(keys_col).as_py() != n - keys_col.null_count:
        raise CheckpointError(f"{label}: {rel}: {key_column} values are not unique")
    return keys_col.to_pylist(), matrix


def _parse_seen(data: bytes, n_users: int, n_items: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            indptr, indices = npz["indptr"], npz["indices"]
    except Exception as e:
        raise CheckpointError(f"{label}: {SEEN} is not a readable npz with indptr and indices: {_one_line(e)}") from e
    if indptr.dtype != np.int64 or indices.dtype != np.int32 or indptr.ndim != 1 or indices.ndim != 1:
        raise CheckpointError(f"{label}: {SEEN}: expected 1-d int64 indptr and int32 indices, found "
                              f"{indptr.dtype}{list(indptr.shape)} and {indices.dtype}{list(indices.shape)}")
    if len(indptr) != n_users + 1:
        raise CheckpointError(f"{label}: {SEEN}: indptr has {len(indptr)} entries, expected users + 1 = {n_users + 1}")
    if indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any():
        raise CheckpointError(f"{label}: {SEEN}: indptr is not a valid CSR row pointer for {len(indices)} indices")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_items):
        raise CheckpointError(f"{label}: {SEEN}: item indices outside [0, {n_items})")
    return indptr, indices


def _parse_popularity(data: bytes, n_items: int, n_categories: int, label: str) -> pa.Table:
    table = _parse_parquet(data, label, POPULARITY)
    if not table.schema.equals(POPULARITY_SCHEMA):
        raise CheckpointError(f"{label}: {POPULARITY}: schema is {table.schema.to_string(show_schema_metadata=False)!r}"
                              f", expected item_idx int32, score float32, category_idx int32".replace("\n", "; "))
    table = table.combine_chunks()
    if any(table[c].null_count for c in POPULARITY_SCHEMA.names):
        raise CheckpointError(f"{label}: {POPULARITY} has nulls")
    items, cats = table["item_idx"].to_numpy(), table["category_idx"].to_numpy()
    if len(items) and (items.min() < 0 or items.max() >= n_items):
        raise CheckpointError(f"{label}: {POPULARITY}: item_idx outside [0, {n_items})")
    if len(np.unique(items)) != len(items):
        raise CheckpointError(f"{label}: {POPULARITY}: item_idx repeats")
    if len(cats) and (cats.min() < -1 or cats.max() >= n_categories):
        raise CheckpointError(f"{label}: {POPULARITY}: category_idx outside [-1, {n_categories})")
    return table


# ---------------------------------------------------------------------------------------------------- writing


def publish(storage: Storage, artifacts: ModelArtifacts) -> str:
    """Write, verify and publish one version; returns its name (e.g. "v000042") once LATEST names it or a newer one.

    The version is written and verified in a staging folder first, then claimed under the next free number, so
    versions only increase and stay distinct under concurrent publishers, and LATEST only moves forward.
    Bad artifacts raise ValueError before anything is written; a failed verification raises CheckpointError.
    """
    return _publish(storage, artifacts, object_store=not storage.is_local)


def _publish(storage: Storage, artifacts: ModelArtifacts, object_store: bool) -> str:
    # object_store=True on a local Storage runs the object-store protocol on disk: that is how tests exercise it.
    if artifacts.parent is not None and not storage.exists(CHECKPOINTS, VERSIONS, artifacts.parent, MANIFEST):
        raise ValueError(f"parent {artifacts.parent!r} is not a published version")
    files, manifest = _encode(artifacts)
    staging = storage.path(CHECKPOINTS, f"{STAGING_PREFIX}{uuid.uuid4().hex}")
    try:
        for rel, data in files.items():
            storage.write_bytes_atomic(f"{staging}/{rel}", data)
        # Verify through the reader's own code path: a version that publishes is one that loads.
        _load_folder(storage, staging, manifest, _label(None), verify=True)
        del files
        if object_store:
            return _commit_object_store(storage, staging, manifest)
        return _commit_local(storage, staging, manifest)
    finally:
        storage.delete(staging)  # a no-op once the local rename has moved it


def _encode(a: ModelArtifacts) -> tuple[dict[str, Any], dict[str, Any]]:
    """The version's files as bytes (Arrow buffers or memoryviews, not copied) and its manifest without a version."""
    user_vectors = _as_matrix(a.user_vectors, "user_vectors")
    item_vectors = _as_matrix(a.item_vectors, "item_vectors")
    n_users, n_items = user_vectors.shape[0], item_vectors.shape[0]
    if user_vectors.shape[1] != item_vectors.shape[1]:
        raise ValueError(f"user vectors have width {user_vectors.shape[1]}, item vectors {item_vectors.shape[1]}")
    user_keys = _as_keys(a.user_keys, n_users, "user_keys", nullable=True)
    item_ids = _as_keys(a.item_ids, n_items, "item_ids")
    counts = {}
    for node in NODE_TYPES:
        value = a.node_counts.get(node)
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 0:
            raise ValueError(f"node_counts.{node} must be a count, got {value!r}")
        counts[node] = int(value)
    if counts["user"] != n_users or counts["item"] != n_items:
        raise ValueError(f"node_counts says {counts['user']} users and {counts['item']} items, "
                         f"the vectors have {n_users} and {n_items}")
    indptr = np.ascontiguousarray(a.seen_indptr, dtype=np.int64)
    indices_raw = np.asarray(a.seen_indices)
    if len(indices_raw) and (indices_raw.min() < 0 or indices_raw.max() >= n_items):
        raise ValueError(f"seen_indices outside [0, {n_items})")
    indices = np.ascontiguousarray(indices_raw, dtype=np.int32)
    if indptr.ndim != 1 or len(indptr) != n_users + 1 or indptr[0] != 0 or indptr[-1] != len(indices) \
            or (np.diff(indptr) < 0).any():
        raise ValueError(f"seen_indptr is not a CSR row pointer for {n_users} users and {len(indices)} indices")
    popularity = _as_popularity(a.popularity)
    if not isinstance(a.k, int | np.integer) or isinstance(a.k, bool) or a.k < 1:
        raise ValueError(f"k must be a positive int, got {a.k!r}")
    if a.watermark_ms is not None and (not isinstance(a.watermark_ms, int | np.integer)
                                       or isinstance(a.watermark_ms, bool)):
        raise ValueError(f"watermark_ms must be an int or None, got {a.watermark_ms!r}")
    metrics = {}
    for name, value in a.metrics.items():
        if not isinstance(value, int | float | np.number) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"metric {name!r} must be a finite number, got {value!r}")
        metrics[str(name)] = float(value)
    if a.parent is not None:
        version_number(a.parent)

    out: dict[str, Any] = {
        USERS: _parquet_bytes(_embedding_table(USER_KEY, user_keys, user_vectors)),
        ITEMS: _parquet_bytes(_embedding_table(ITEM_ID, item_ids, item_vectors)),
        POPULARITY: _parquet_bytes(popularity),
        MODEL: _model_bytes(a.state_dict, a.hparams),
    }
    seen = io.BytesIO()
    np.savez(seen, indptr=indptr, indices=indices)
    out[SEEN] = seen.getbuffer()
    if a.curve_png is not None:
        out[CURVE] = bytes(a.curve_png)
    manifest = {
        "version": None,
        "parent": a.parent,
        "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "watermark_ms": None if a.watermark_ms is None else int(a.watermark_ms),
        "config_hash": str(a.config_hash),
        "metrics": metrics,
        "k": int(a.k),
        "node_counts": counts,
        "extra": json.loads(_json_bytes(dict(a.extra), "extra")),
        "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(out.items())},
    }
    return out, manifest


def _as_matrix(x: Any, name: str) -> np.ndarray:
    m = np.ascontiguousarray(x, dtype=np.float32)
    if m.ndim != 2 or m.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-d matrix with at least one column, got shape {m.shape}")
    if m.size >= 2**31:
        raise ValueError(f"{name} has {m.size} values; list<float32> offsets are int32, so at most 2**31 - 1")
    if not np.isfinite(m).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return m


def _as_keys(keys: Sequence[str | None] | pa.Array, n: int, name: str, nullable: bool = False) -> pa.Array:
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    arr = keys.cast(pa.string()) if isinstance(keys, pa.Array) else pa.array(list(keys), pa.string())
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} entries for {n} vectors")
    if (arr.null_count and not nullable) or pc.count_distinct(arr).as_py() != n - arr.null_count:
        raise ValueError(f"{name} has nulls or repeats")
    return arr


def _as_popularity(pop: pa.Table | Mapping[str, Any]) -> pa.Table:
    table = pop if isinstance(pop, pa.Table) else pa.table({k: np.asarray(v) for k, v in pop.items()})
    missing = [c for c in POPULARITY_SCHEMA.names if c not in table.schema.names]
    if missing:
        raise ValueError(f"popularity lacks columns {missing}")
    return table.select(POPULARITY_SCHEMA.names).cast(POPULARITY_SCHEMA)


def _embedding_table(key_column: str, keys: pa.Array, vectors: np.ndarray) -> pa.Table:
    n, width = vectors.shape
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.table({key_column: keys, VECTOR: pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))})


def _parquet_bytes(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue()


def _model_bytes(state_dict: Mapping[str, Any], hparams: Mapping[str, Any]) -> memoryview:
    import torch

    state = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            # torch.save writes a view's whole storage; a slice of a big buffer would bloat the file.
            if value.untyped_storage().nbytes() != value.numel() * value.element_size():
                value = value.clone()
        state[key] = value
    buf = io.BytesIO()
    torch.save({"state_dict": state, "hparams": dict(hparams)}, buf)
    return buf.getbuffer()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_bytes(value: Any, what: str) -> bytes:
    try:
        return json.dumps(value, indent=1, sort_keys=True, allow_nan=False, default=_json_default).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON: {e}") from e


def _final_manifest(manifest: dict[str, Any], number: int) -> bytes:
    final = {**manifest, "version": version_name(number)}
    _check_manifest(final, _label(final["version"]))
    return _json_bytes(final, MANIFEST)


def _write_manifest_checked(storage: Storage, path: str, data: bytes, label: str) -> None:
    storage.write_bytes_atomic(path, data)
    if storage.read_bytes(path) != data:
        raise CheckpointError(f"{label}: {MANIFEST} reads back differently from what was written")


# Local disk: one flock serialises number claims and LATEST; the claim itself is an atomic directory rename.


@contextmanager
def _locked(storage: Storage) -> Iterator[None]:
    path = storage.makedirs(CHECKPOINTS) + "/" + LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _next_local_number(versions: str) -> int:
    return 1 + max((version_number(n) for n in os.listdir(versions) if _VERSION_RE.match(n)), default=0)


def _commit_local(storage: Storage, staging: str, manifest: dict[str, Any]) -> str:
    versions = storage.makedirs(CHECKPOINTS, VERSIONS)
    for root, _dirs, _files in os.walk(staging):
        _fsync_dir(root)
    with _locked(storage):
        number = _next_local_number(versions)
        while True:
            target = f"{versions}/{version_name(number)}"
            # Linux rename replaces an EMPTY directory: never rename onto anything that exists, even empty.
            if os.path.lexists(target):
                number += 1
                continue
            _write_manifest_checked(storage, f"{staging}/{MANIFEST}", _final_manifest(manifest, number),
                                    _label(version_name(number)))
            try:
                os.rename(staging, target)
            except OSError as e:
                # Another writer that ignores the lock (or a shared disk where flock is advisory) got there first.
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    number += 1
                    continue
                raise
            break
        _fsync_dir(versions)
        current = _latest_number_or_none(storage)
        if current is None or number > current:
            storage.write_bytes_atomic(storage.path(CHECKPOINTS, LATEST), version_name(number).encode())
            _fsync_dir(storage.path(CHECKPOINTS))
    return version_name(number)


def _latest_number_or_none(storage: Storage) -> int | None:
    # A damaged LATEST must not block publishing: treat it as absent so this publish repairs it.
    try:
        version = latest_version(storage)
    except CheckpointError:
        return None
    return None if version is None else version_number(version)


# Object stores have no rename and no lock. Numbers are claimed by writing `.claims/vNNNNNN.<uuid>` and listing:
# a claim wins only if it is the only one for its number. With S3's strong read-after-write consistency two
# claimants can never both win (each would have listed before the other wrote), though both may lose and retry.
# The version's files are then copied in and manifest.json is written LAST, one PUT, so readers ignore the folder
# until it is complete. The remaining race is on LATEST: read-compare-write is not atomic, so two publishers can
# briefly move it backwards; each re-lists after writing and repairs it, so it settles on the highest complete
# version, but a reader polling at that moment may see the older one for a round.


def _object_numbers(storage: Storage) -> set[int]:
    numbers = set()
    vprefix = storage.path(CHECKPOINTS, VERSIONS) + "/"
    for path in storage.list_files(CHECKPOINTS, VERSIONS):
        name = path[len(vprefix):].split("/", 1)[0]
        if _VERSION_RE.match(name):
            numbers.add(version_number(name))
    for path in storage.list_files(CHECKPOINTS, CLAIMS):
        name = path.rsplit("/", 1)[-1].split(".", 1)[0]
        if _VERSION_RE.match(name):
            numbers.add(version_number(name))
    return numbers


def _claim_object_store(storage: Storage) -> tuple[int, str]:
    token = uuid.uuid4().hex
    for attempt in range(1000):
        number = 1 + max(_object_numbers(storage), default=0)
        name = version_name(number)
        claim = storage.path(CHECKPOINTS, CLAIMS, f"{name}.{token}")
        storage.write_bytes_atomic(claim, b"")
        rivals = [p for p in storage.list_files(CHECKPOINTS, CLAIMS) if p.rsplit("/", 1)[-1].startswith(name + ".")]
        # The folder check covers a winner that finished and dropped its claim between our two listings.
        if rivals == [claim] and not storage.list_files(CHECKPOINTS, VERSIONS, name):
            return number, claim
        storage.delete(claim)
        time.sleep(random.uniform(0.005, 0.05) * min(attempt + 1, 10))
    raise CheckpointError("could not claim a version number after 1000 attempts")


def _commit_object_store(storage: Storage, staging: str, manifest: dict[str, Any]) -> str:
    number, claim = _claim_object_store(storage)
    name = version_name(number)
    target = storage.path(CHECKPOINTS, VERSIONS, name)
    try:
        for rel in manifest["files"]:
            if storage.is_local:
                os.makedirs(os.path.dirname(f"{target}/{rel}"), exist_ok=True)
            storage.fs.copy_file(f"{staging}/{rel}", f"{target}/{rel}")
        # Staging passed the full verification; a server-side copy is checksummed by the store, so sizes suffice.
        for rel in manifest["files"]:
            src, dst = storage.fs.get_file_info([f"{staging}/{rel}", f"{target}/{rel}"])
            if dst.type != pafs.FileType.File or dst.size != src.size:
                raise CheckpointError(f"{_label(name)}: {rel} was not copied whole")
        _write_manifest_checked(storage, f"{target}/{MANIFEST}", _final_manifest(manifest, number), _label(name))
    except BaseException:
        # The number is ours (we hold the claim): take the manifest away first so nobody sees a broken version.
        storage.delete(f"{target}/{MANIFEST}")
        storage.delete(target)
        raise
    finally:
        storage.delete(claim)
    for _ in range(_LATEST_ROUNDS):
        highest = max((version_number(v) for v in list_versions(storage)), default=number)
        current = _latest_number_or_none(storage)
        if current is not None and current >= highest:
            break
        storage.write_bytes_atomic(storage.path(CHECKPOINTS, LATEST), version_name(highest).encode())
    return name


def remove_stale_staging(storage: Storage, older_than_s: float = 24 * 3600) -> int:
    """Delete staging folders left by crashed publishers, untouched for older_than_s; returns how many."""
    now = time.time()
    removed = 0
    entries = storage.fs.get_file_info(pafs.FileSelector(storage.path(CHECKPOINTS), allow_not_found=True))
    for entry in entries:
        if not entry.base_name.startswith(STAGING_PREFIX):
            continue
        infos = storage.fs.get_file_info(pafs.FileSelector(entry.path, recursive=True, allow_not_found=True))
        times = [i.mtime.timestamp() for i in [entry, *infos] if i.mtime is not None]
        if times and now - max(times) > older_than_s:
            storage.delete(entry.path)
            removed += 1
    return removed
