"""The published version format (DESIGN 3.3, 3.7): file names, the manifest, and bytes <-> arrays.

Layout under `<data.root>/checkpoints/`:

    versions/vNNNNNN/      one complete version: manifest.json and every file it lists with its sha256
        manifest.json      format, version, parent, created_at, watermark_ms, config_hash, metrics, k, node_counts,
                           extra, files
        model.pt           torch.save({"state_dict": ..., "hparams": ...}), for warm starts
        embeddings/users.parquet       user_key string, vector list<float32> (large_list past 2**31 values);
                                       row i is user index i: the export anyone can score from (DESIGN 3.3)
        embeddings/users.npy           format 3: the same vectors as float32 [users, d], C order, .npy 1.0
        embeddings/items.parquet       item_id string, vector list<float32>; row i is item index i
        embeddings/items.npy           format 3: the item vectors, as users.npy
        embeddings/categories.parquet  category_id string, vector list<float32>; row i is category index i
        embeddings/brands.parquet      brand_id string, vector list<float32>; row i is brand index i
        seen.npz           CSR of each user's seen items: indptr int64 [users + 1], indices int32; with the evidence
                           behind each (format 2, optional): weight, weight_recent float32, counts int32 [., 5]
                           (events by type), last_ts int64. Written uncompressed (np.savez), so a reader on local
                           disk memory-maps its arrays where they lie (`mapped_npz`)
        popularity.parquet item_idx int32, score float32, category_idx, brand_idx int32 (-1 when none; format 1
                           has no brand_idx)
        curve.png          training curve (optional, opaque here)
        index/items.faiss  approximate nearest-neighbour index over the item vectors (optional: catalogues of at
                           least serve.index_min_items; see registry.item_index)
    LATEST                 the newest complete version's folder name, e.g. "v000042"
    .staging-<uuid>/       a version being written; readers never look here
    .lock                  local disk: flock serialising version claims and LATEST
    .claims/               object stores: version-number claims (see registry.writer)

A version carries everything serving needs. Format 1 (before categories and brands were carried) has no
`format` key and no categories/brands files; it still loads (registry.reader). Format 2 serves the user and item
vectors decoded from their Parquet files; format 3 also writes them as plain .npy files, which a reader on local
disk memory-maps where they lie (`mapped_vectors`), as it maps seen.npz: at the shipped 1,024 dimensions a million
shoppers' vectors are 4 GB, which every replica on a node then shares through the page cache instead of each
holding a decoded copy. The Parquet files keep their vectors: they are the export DESIGN 3.3 promises to readers
without this code, and a format-3 reader reads only their keys.

Pure: no Ray, no torch_geometric; torch is imported only where model.pt is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import mmap
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, BinaryIO, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from registry.concurrent_io import run_all
from registry.user_keys import UserKeys

FORMAT = 3  # what this code writes; a manifest without "format" is format 1

VERSIONS = "versions"
LATEST = "LATEST"
MANIFEST = "manifest.json"
MODEL = "model.pt"
USERS = "embeddings/users.parquet"
ITEMS = "embeddings/items.parquet"
CATEGORIES = "embeddings/categories.parquet"
BRANDS = "embeddings/brands.parquet"
USER_VECTORS = "embeddings/users.npy"  # format 3
ITEM_VECTORS = "embeddings/items.npy"  # format 3
SEEN = "seen.npz"
POPULARITY = "popularity.parquet"
CURVE = "curve.png"
INDEX = "index/items.faiss"
REQUIRED_FILES = (MODEL, USERS, ITEMS, SEEN, POPULARITY)  # format 1; format 2 adds CATEGORIES and BRANDS
NODE_TYPES = ("user", "item", "category", "brand")
STAGING_PREFIX = ".staging-"
CLAIMS = ".claims"
LOCK = ".lock"

USER_KEY = "user_key"
ITEM_ID = "item_id"
CATEGORY_ID = "category_id"
BRAND_ID = "brand_id"
VECTOR = "vector"
POPULARITY_SCHEMA = pa.schema([("item_idx", pa.int32()), ("score", pa.float32()), ("category_idx", pa.int32()),
                               ("brand_idx", pa.int32())])
_POPULARITY_V1 = pa.schema(list(POPULARITY_SCHEMA)[:3])
# The evidence behind each seen item (arrays aligned with seen.npz's indices): what interest profiles and
# explanations are made of. name -> (dtype, extra shape).
EVIDENCE = {"weight": (np.float32, ()), "weight_recent": (np.float32, ()), "counts": (np.int32, (5,)),
            "last_ts": (np.int64, ())}

_BATCH_ROWS = 65_536  # rows of vectors decoded at a time
_COPY_CHUNK = 16 << 20
_ROW_GROUP_BYTES = 16 << 20  # vectors per row group of an embedding export
LIST_VALUES_MAX = 2**31 - 1  # values a list<float32> column holds (int32 offsets); past it, large_list

VERSION_RE = re.compile(r"^v(\d{6,})$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MANIFEST_KEYS = ("version", "parent", "created_at", "watermark_ms", "config_hash", "metrics", "k", "node_counts",
                  "extra", "files")


class CheckpointError(Exception):
    """A version that is missing, incomplete or corrupt: readers refuse it and keep what they have."""


def version_name(number: int) -> str:
    return f"v{number:06d}"


def version_number(name: str) -> int:
    """The number in a version folder name; ValueError for anything else."""
    m = VERSION_RE.match(name)
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
    popularity: pa.Table | Mapping[str, Any]  # columns item_idx, score, category_idx, brand_idx (-1 when none)
    state_dict: Mapping[str, Any]  # model parameters for warm starts
    hparams: Mapping[str, Any]  # what it takes to rebuild the model around state_dict
    config_hash: str
    metrics: Mapping[str, float]  # e.g. {"recall@20": 0.18, "ndcg@20": 0.15}
    k: int
    node_counts: Mapping[str, int]  # user, item, category, brand
    category_ids: Sequence[str] | pa.Array = ()  # row i = category index i (node_counts.category of them)
    brand_ids: Sequence[str] | pa.Array = ()  # row i = brand index i
    category_vectors: np.ndarray | None = None  # float32 [categories, d]; None: zeros
    brand_vectors: np.ndarray | None = None  # float32 [brands, d]; None: zeros
    parent: str | None = None  # the version this one was warm-started from
    watermark_ms: int | None = None  # newest event time the training data covers
    # What the training data covers by arrival: ingestion runs (`runs`, a count) and live events received before
    # `live_through_ms`; serving folds only live events the version does not cover.
    coverage: Mapping[str, int | None] = field(default_factory=dict)
    # The evidence behind each seen item, aligned with seen_indices (see EVIDENCE); None: not carried.
    seen_evidence: Mapping[str, np.ndarray] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # free-form: epochs, seconds, ...
    curve_png: bytes | None = None
    item_index: bytes | None = None  # registry.item_index.build over item_vectors; None: scored exactly


def version_label(version: str | None) -> str:
    return f"checkpoint {version or '(staging)'}"


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_manifest(manifest: Any, label: str) -> None:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{label}: {MANIFEST}: {what}")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise bad(f"missing keys {missing}")
    for key, kinds in (("version", (str,)), ("parent", (str, type(None))), ("created_at", (str,)),
                       ("watermark_ms", (int, type(None))), ("config_hash", (str,)), ("metrics", (dict,)),
                       ("k", (int,)), ("node_counts", (dict,)), ("extra", (dict,)), ("files", (dict,))):
        if not isinstance(manifest[key], kinds) or isinstance(manifest[key], bool):
            raise bad(f"{key} has the wrong type ({type(manifest[key]).__name__})")
    for key in ("version", "parent"):
        if manifest[key] is not None and not VERSION_RE.match(manifest[key]):
            raise bad(f"{key} {manifest[key]!r} is not a version name")
    for name, value in manifest["metrics"].items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise bad(f"metrics[{name!r}] is not a number")
    counts = manifest["node_counts"]
    for node in NODE_TYPES:
        if not isinstance(counts.get(node), int) or isinstance(counts.get(node), bool) or counts[node] < 0:
            raise bad(f"node_counts.{node} is missing or not a count")
    coverage = manifest.get("coverage", {})
    if not isinstance(coverage, dict) or any(
            not isinstance(v, int | type(None)) or isinstance(v, bool) for v in coverage.values()):
        raise bad("coverage is not a mapping of counts")
    fmt = manifest.get("format", 1)
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise bad(f"format {fmt!r} is not a format number")
    if fmt > FORMAT:
        raise bad(f"format {fmt} is newer than this code reads (up to {FORMAT}); upgrade the reader")
    for rel, sha in manifest["files"].items():
        if not isinstance(sha, str) or not SHA256_RE.match(sha):
            raise bad(f"files[{rel!r}] is not a sha256 hex digest")
        if rel == MANIFEST or rel.startswith("/") or ".." in rel.split("/") or "" in rel.split("/"):
            raise bad(f"files lists an invalid path {rel!r}")


def required_files(manifest: Mapping[str, Any]) -> tuple[str, ...]:
    """The files a version of this manifest's format must list."""
    fmt = manifest.get("format", 1)
    return (*REQUIRED_FILES, *((CATEGORIES, BRANDS) if fmt >= 2 else ()),
            *((USER_VECTORS, ITEM_VECTORS) if fmt >= 3 else ()))


def parse_parquet(data: bytes, label: str, rel: str) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data))
    except Exception as e:
        raise CheckpointError(f"{label}: {rel} is not readable Parquet: {one_line(e)}") from e


def parse_embeddings(source: bytes | pa.NativeFile, key_column: str, label: str, rel: str
                     ) -> tuple[pa.Array, np.ndarray]:
    """Keys (an Arrow string array) and vectors (float32 [rows, width]) of an embeddings file. The vectors are
    decoded batch by batch into one matrix, so a reader's peak is the matrix and one batch, not two copies of it."""
    try:
        file = pq.ParquetFile(pa.BufferReader(source) if isinstance(source, bytes | memoryview) else source)
        schema = file.schema_arrow
    except Exception as e:
        raise CheckpointError(f"{label}: {rel} is not readable Parquet: {one_line(e)}") from e
    names = schema.names
    if key_column not in names or VECTOR not in names:
        raise CheckpointError(f"{label}: {rel} has columns {names}, expected [{key_column!r}, {VECTOR!r}]")
    key_type, vec_type = schema.field(key_column).type, schema.field(VECTOR).type
    if not pa.types.is_string(key_type):
        raise CheckpointError(f"{label}: {rel}: {key_column} is {key_type}, expected string")
    if not (pa.types.is_list(vec_type) or pa.types.is_large_list(vec_type)) or vec_type.value_type != pa.float32():
        raise CheckpointError(f"{label}: {rel}: {VECTOR} is {vec_type}, expected list<float32>")
    try:
        keys_col = file.read(columns=[key_column]).column(0).combine_chunks()
        n = file.metadata.num_rows
        matrix: np.ndarray | None = None
        at = 0
        for batch in file.iter_batches(columns=[VECTOR], batch_size=_BATCH_ROWS):
            vectors = batch.column(0)
            if vectors.null_count:
                raise CheckpointError(f"{label}: {rel} has null keys or vectors")
            lengths = pc.list_value_length(vectors).to_numpy()
            if matrix is None and len(lengths):
                matrix = np.empty((n, int(lengths[0])), np.float32)
            if len(lengths) and (lengths[0] < 1 or (lengths != matrix.shape[1]).any()):
                raise CheckpointError(f"{label}: {rel}: vectors do not all have the same positive width")
            flat = vectors.flatten()
            if flat.null_count:
                raise CheckpointError(f"{label}: {rel} has null vector components")
            if at + len(vectors) > n:
                raise CheckpointError(f"{label}: {rel} has more rows than its metadata says")
            if len(vectors):
                matrix[at:at + len(vectors)] = flat.to_numpy(zero_copy_only=False).reshape(len(vectors), -1)
            at += len(vectors)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{label}: {rel} is not readable Parquet: {one_line(e)}") from e
    if at != n or len(keys_col) != n:
        raise CheckpointError(f"{label}: {rel}: {len(keys_col)} keys and {at} vectors, its metadata says {n} rows")
    _check_keys(keys_col, key_column, label, rel)
    return keys_col, matrix if matrix is not None else np.zeros((0, 0), np.float32)


def _check_keys(keys: pa.Array, key_column: str, label: str, rel: str) -> None:
    # A null user_key is a deleted user's blanked row (see ModelArtifacts.user_keys); other ids are never null.
    if keys.null_count and key_column != USER_KEY:
        raise CheckpointError(f"{label}: {rel} has null keys")
    if pc.count_distinct(keys).as_py() != len(keys) - keys.null_count:
        raise CheckpointError(f"{label}: {rel}: {key_column} values are not unique")


def parse_keys(source: pa.NativeFile, key_column: str, label: str, rel: str) -> pa.Array:
    """The keys of an embeddings file, its vectors left unread (format 3 serves them from the .npy beside it)."""
    try:
        file = pq.ParquetFile(source)
        names = file.schema_arrow.names
        if key_column not in names or VECTOR not in names:
            raise CheckpointError(f"{label}: {rel} has columns {names}, expected [{key_column!r}, {VECTOR!r}]")
        if not pa.types.is_string(file.schema_arrow.field(key_column).type):
            raise CheckpointError(f"{label}: {rel}: {key_column} is {file.schema_arrow.field(key_column).type}, "
                                  "expected string")
        keys = file.read(columns=[key_column]).column(0).combine_chunks()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{label}: {rel} is not readable Parquet: {one_line(e)}") from e
    _check_keys(keys, key_column, label, rel)
    return keys


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npy_header(f: Any, what: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and the data's offset of the .npy array starting at f's position."""
    read_header = _NPY_HEADERS.get(np.lib.format.read_magic(f))
    if read_header is None:
        raise ValueError(f"{what} has an .npy format this reader does not map")
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject:
        raise ValueError(f"{what} holds Python objects")
    return shape, fortran, dtype, f.tell()


def mapped_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an uncompressed .npz on local disk, memory-mapped read-only where they lie in the file:
    replicas on one node share their pages through the page cache, and pages nobody reads stay on disk. A member
    that is compressed (or not a plain array) is read into memory instead."""
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                with archive.open(info) as member:
                    out[name] = np.lib.format.read_array(member, allow_pickle=False)
                continue
            f.seek(info.header_offset)
            local = f.read(30)  # the local file header: its name and extra field lengths sit at bytes 26-29
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"member {info.filename!r} has no local header")
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
                int.from_bytes(local[28:30], "little")
            f.seek(start)
            shape, fortran, dtype, offset = _npy_header(f, f"member {info.filename!r}")
            if offset - start + int(np.prod(shape)) * dtype.itemsize > info.file_size:
                raise ValueError(f"member {info.filename!r} is shorter than its header says")
            if int(np.prod(shape)) == 0:
                out[name] = np.zeros(shape, dtype)
            else:
                out[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                                      order="F" if fortran else "C")
    return out


def mapped_vectors(path: str, rows: int, label: str, rel: str) -> np.ndarray:
    """A format-3 vectors file (float32 [rows, d], C order, .npy) on local disk, memory-mapped copy-on-write:
    replicas on a node share its pages through the page cache, pages nobody reads stay on disk, and a write into
    the array (none is made) would land in a private copy, never in the version."""
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype, offset = _npy_header(f, "the file")
            size = f.seek(0, 2)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{label}: {rel} is not a readable .npy file: {one_line(e)}") from e
    if dtype != np.dtype("<f4") or len(shape) != 2 or fortran or shape[1] < 1:
        raise CheckpointError(f"{label}: {rel} holds {dtype}{list(shape)}{' (Fortran order)' if fortran else ''}, "
                              "expected a float32 [rows, width] matrix in C order")
    if shape[0] != rows:
        raise CheckpointError(f"{label}: {rel} has {shape[0]} rows, its keys {rows}")
    if size != offset + shape[0] * shape[1] * 4:
        raise CheckpointError(f"{label}: {rel} is {size} bytes, its header says {offset + shape[0] * shape[1] * 4}")
    if rows == 0:
        return np.zeros(shape, np.float32)
    return np.memmap(path, dtype=np.float32, mode="c", offset=offset, shape=shape)


def parse_seen(source: bytes | str, n_users: int, n_items: int, label: str
               ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None]:
    """indptr, indices and, when the version carries it, the evidence behind each seen item; from the file's bytes,
    or from a path on local disk, memory-mapped (`mapped_npz`)."""
    try:
        if isinstance(source, str):
            npz = mapped_npz(source)
        else:
            with np.load(io.BytesIO(source), allow_pickle=False) as loaded:
                npz = {name: loaded[name] for name in loaded.files}
        indptr, indices = npz["indptr"], npz["indices"]
        evidence = {name: npz[name] for name in EVIDENCE} if all(n in npz for n in EVIDENCE) else None
    except Exception as e:
        raise CheckpointError(f"{label}: {SEEN} is not a readable npz with indptr and indices: {one_line(e)}") from e
    if indptr.dtype != np.int64 or indices.dtype != np.int32 or indptr.ndim != 1 or indices.ndim != 1:
        raise CheckpointError(f"{label}: {SEEN}: expected 1-d int64 indptr and int32 indices, found "
                              f"{indptr.dtype}{list(indptr.shape)} and {indices.dtype}{list(indices.shape)}")
    if len(indptr) != n_users + 1:
        raise CheckpointError(f"{label}: {SEEN}: indptr has {len(indptr)} entries, expected users + 1 = {n_users + 1}")
    if indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any():
        raise CheckpointError(f"{label}: {SEEN}: indptr is not a valid CSR row pointer for {len(indices)} indices")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_items):
        raise CheckpointError(f"{label}: {SEEN}: item indices outside [0, {n_items})")
    if evidence is not None:
        for name, (dtype, shape) in EVIDENCE.items():
            if evidence[name].dtype != dtype or evidence[name].shape != (len(indices), *shape):
                raise CheckpointError(f"{label}: {SEEN}: {name} is {evidence[name].dtype}{list(evidence[name].shape)}"
                                      f", expected {np.dtype(dtype)}{[len(indices), *shape]}")
    return indptr, indices, evidence


def parse_popularity(data: bytes, n_items: int, n_categories: int, n_brands: int, label: str) -> pa.Table:
    table = parse_parquet(data, label, POPULARITY)
    if table.schema.equals(_POPULARITY_V1):  # format 1: no brands
        table = table.append_column("brand_idx", pa.array(np.full(table.num_rows, -1, np.int32)))
    if not table.schema.equals(POPULARITY_SCHEMA):
        raise CheckpointError(f"{label}: {POPULARITY}: schema is {table.schema.to_string(show_schema_metadata=False)!r}"
                              f", expected item_idx int32, score float32, category_idx int32, brand_idx int32"
                              .replace("\n", "; "))
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
    brands = table["brand_idx"].to_numpy()
    if len(brands) and (brands.min() < -1 or brands.max() >= n_brands):
        raise CheckpointError(f"{label}: {POPULARITY}: brand_idx outside [-1, {n_brands})")
    return table



def encode(a: ModelArtifacts, sink: Callable[[str], AbstractContextManager[BinaryIO]],
           written: Callable[[str, str], object] | None = None) -> dict[str, Any]:
    """Write the version's files, each to `sink(rel)`, and return its manifest without a version. `written(rel,
    sha256)` is called as each file is closed (from the thread that wrote it), while the others are still written.

    Everything is checked before the first file is written: bad artifacts raise ValueError and write nothing.
    """
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
    width = user_vectors.shape[1]
    attributes = {}
    for node, rel, key_column, ids, vectors in (
            ("category", CATEGORIES, CATEGORY_ID, a.category_ids, a.category_vectors),
            ("brand", BRANDS, BRAND_ID, a.brand_ids, a.brand_vectors)):
        keys = _as_keys(ids, counts[node], f"{node}_ids")
        if vectors is None or counts[node] == 0:
            matrix = np.zeros((counts[node], width), np.float32)
        else:
            matrix = _as_matrix(vectors, f"{node}_vectors")
        if matrix.shape != (counts[node], width):
            raise ValueError(f"{node}_vectors has shape {matrix.shape}, expected ({counts[node]}, {width})")
        attributes[rel] = _embedding_table(key_column, keys, matrix)
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

    evidence = _as_evidence(a.seen_evidence, len(indices))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": None,
        "parent": a.parent,
        "created_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "watermark_ms": None if a.watermark_ms is None else int(a.watermark_ms),
        "config_hash": str(a.config_hash),
        "metrics": metrics,
        "k": int(a.k),
        "node_counts": counts,
        "extra": json.loads(_json_bytes(dict(a.extra), "extra")),
        "coverage": {str(k): None if v is None else int(v) for k, v in dict(a.coverage).items()},
    }
    # Every file goes straight to the sink as it is encoded, hashed on the way: at a million shoppers and 1,024
    # dimensions each copy of the vectors is 4 GB, which a publisher then never holds as bytes, and which crosses
    # memory once (spilling it to a temporary file first and copying that in was nearly half of a Taobao publish).
    digests: dict[str, str] = {}

    def put(rel: str, write: Callable[[BinaryIO], object]) -> None:
        with sink(rel) as f:
            hashing = _Hashing(f)
            write(cast(BinaryIO, hashing))
        digests[rel] = hashing.hexdigest()
        if written is not None:
            written(rel, digests[rel])

    # Two lanes written side by side: the Parquet exports in one, the plain arrays and the model in the other, so
    # the two table-sized Parquet encoders (each holding a row group's pages) never run at once.
    exports: list[tuple[str, Callable[[BinaryIO], object]]] = [
        (USERS, lambda f: _write_vectors(_embedding_table(USER_KEY, user_keys, user_vectors), width, f)),
        (ITEMS, lambda f: _write_vectors(_embedding_table(ITEM_ID, item_ids, item_vectors), width, f)),
        (POPULARITY, lambda f: pq.write_table(popularity, f)),
        *((rel, lambda f, table=table: _write_vectors(table, width, f)) for rel, table in attributes.items()),
    ]
    arrays: list[tuple[str, Callable[[BinaryIO], object]]] = [
        (USER_VECTORS, lambda f: _write_npy(user_vectors, f)),
        (ITEM_VECTORS, lambda f: _write_npy(item_vectors, f)),
        # A zip archive is written by seeking back to its headers, so it is built aside and then copied in.
        (SEEN, lambda f: _copy(_spilled(lambda spill: np.savez(spill, indptr=indptr, indices=indices, **evidence)),
                               f)),
        (MODEL, lambda f: _save_model(a.state_dict, a.hparams, f)),
    ]
    png, index = a.curve_png, a.item_index
    if png is not None:
        exports.append((CURVE, lambda f: f.write(bytes(png))))
    if index is not None:
        arrays.append((INDEX, lambda f: f.write(index)))

    def write_lane(lane: list[tuple[str, Callable[[BinaryIO], object]]]) -> None:
        for rel, write in lane:
            put(rel, write)

    run_all([lambda lane=lane: write_lane(lane) for lane in (exports, arrays)], workers=2)
    manifest["files"] = dict(sorted(digests.items()))
    return manifest


class _Hashing:
    """A forward-only writable file that hashes what passes through it: the manifest then holds the checksum of the
    bytes the encoder produced, and the verification that reads the version back checks the disk against them."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._digest = hashlib.sha256()
        self.closed = False  # read by pyarrow's file wrapper

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._digest.update(view)
        self._out.write(view)
        return len(view)

    def flush(self) -> None:
        self._out.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _write_npy(array: np.ndarray, out: BinaryIO) -> None:
    """`np.lib.format.write_array(out, array, version=(1, 0))`, byte for byte, without its copy of every 16 MB of
    the array into a fresh bytes object on the way to a file-like `out` (a table-sized allocation per file)."""
    array = np.ascontiguousarray(array)
    np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(array))
    _copy(memoryview(array.reshape(-1)).cast("B"), out)


def _copy(source: memoryview, out: BinaryIO) -> None:
    for start in range(0, len(source), _COPY_CHUNK):
        out.write(source[start:start + _COPY_CHUNK])


def _spilled(write: Callable[[BinaryIO], object]) -> memoryview:
    """What `write(file)` writes, in an unlinked temporary file, mapped read-only."""
    with tempfile.TemporaryFile() as spill:
        write(spill)
        spill.flush()
        return memoryview(mmap.mmap(spill.fileno(), 0, access=mmap.ACCESS_READ))


def _all_finite(m: np.ndarray) -> bool:
    """`np.isfinite(m).all()` a few thousand rows at a time: at once, its mask of a Taobao item table was 50 MB of
    fresh memory a publish."""
    rows = max(1, _COPY_CHUNK // (m.itemsize * m.shape[1]))
    return all(bool(np.isfinite(m[s : s + rows]).all()) for s in range(0, len(m), rows))


def _as_matrix(x: Any, name: str) -> np.ndarray:
    m = np.ascontiguousarray(x, dtype=np.float32)
    if m.ndim != 2 or m.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-d matrix with at least one column, got shape {m.shape}")
    if not _all_finite(m):
        raise ValueError(f"{name} has NaN or infinite values")
    return m


def _as_keys(keys: Sequence[str | None] | pa.Array, n: int, name: str, nullable: bool = False) -> pa.Array:
    if isinstance(keys, UserKeys):
        keys = keys.to_arrow()
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    arr = keys.cast(pa.string()) if isinstance(keys, pa.Array) else pa.array(list(keys), pa.string())
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} entries for {n} vectors")
    if (arr.null_count and not nullable) or pc.count_distinct(arr).as_py() != n - arr.null_count:
        raise ValueError(f"{name} has nulls or repeats")
    return arr


def _as_evidence(evidence: Mapping[str, np.ndarray] | None, nnz: int) -> dict[str, np.ndarray]:
    if evidence is None:
        return {}
    out = {}
    for name, (dtype, shape) in EVIDENCE.items():
        value = np.ascontiguousarray(evidence[name], dtype=dtype)
        if value.shape != (nnz, *shape):
            raise ValueError(f"seen_evidence[{name!r}] has shape {value.shape}, expected {(nnz, *shape)}")
        out[name] = value
    return out


def _as_popularity(pop: pa.Table | Mapping[str, Any]) -> pa.Table:
    table = pop if isinstance(pop, pa.Table) else pa.table({k: np.asarray(v) for k, v in pop.items()})
    if "brand_idx" not in table.schema.names:
        table = table.append_column("brand_idx", pa.array(np.full(table.num_rows, -1, np.int32)))
    missing = [c for c in POPULARITY_SCHEMA.names if c not in table.schema.names]
    if missing:
        raise ValueError(f"popularity lacks columns {missing}")
    return table.select(POPULARITY_SCHEMA.names).cast(POPULARITY_SCHEMA)


def _write_vectors(table: pa.Table, width: int, out: BinaryIO) -> None:
    """An embedding table as Parquet, in row groups of about `_ROW_GROUP_BYTES`: the writer holds a whole row group
    before it writes it, and Taobao's items in one group were 313 MB of fresh memory a publish (0.4 s of kernel
    time in an update cycle); readers see the same table.

    The vectors are written plain: trained floats neither compress (Snappy made Taobao's items 0.3% larger) nor
    repeat (a dictionary is tried, per row group, then given up), and their min/max statistics prune nothing. That
    file took 0.61 s to write that way and 0.25 s plain (Taobao's items, 1,024 dims); the keys keep the writer's
    defaults."""
    keys = [name for name in table.column_names if name != VECTOR]
    pq.write_table(table, out, row_group_size=max(1, _ROW_GROUP_BYTES // (4 * width)),
                   compression={VECTOR: "none", **dict.fromkeys(keys, "snappy")}, use_dictionary=keys,
                   write_statistics=keys)


def _embedding_table(key_column: str, keys: pa.Array, vectors: np.ndarray) -> pa.Table:
    n, width = vectors.shape
    if n * width <= LIST_VALUES_MAX:
        offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
        return pa.table({key_column: keys, VECTOR: pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))})
    # Past int32 offsets (10M shoppers at 1,024 dimensions): the same column as large_list<float32>.
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int64))
    return pa.table({key_column: keys, VECTOR: pa.LargeListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))})


def _save_model(state_dict: Mapping[str, Any], hparams: Mapping[str, Any], file: Any) -> None:
    import torch

    state = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            # torch.save writes a view's whole storage; a slice of a big buffer would bloat the file.
            if value.untyped_storage().nbytes() != value.numel() * value.element_size():
                value = value.clone()
        state[key] = value
    torch.save({"state_dict": state, "hparams": dict(hparams)}, file)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_bytes(value: Any, what: str) -> bytes:
    try:
        return json.dumps(value, indent=1, sort_keys=True, allow_nan=False, default=_json_default).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON: {e}") from e



def final_manifest(manifest: dict[str, Any], number: int) -> bytes:
    final = {**manifest, "version": version_name(number)}
    check_manifest(final, version_label(final["version"]))
    return _json_bytes(final, MANIFEST)


