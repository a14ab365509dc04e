"""Reading published versions: LATEST, the list of versions, manifests, and whole verified versions.

A reader verifies every checksum and shape before it hands a version out, and refuses a damaged one with a
`CheckpointError` naming the version and the file, so a caller keeps what it has.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.direct_io import direct_chunks
from core.storage import CHECKPOINTS, IDMAPS, Storage
from registry.concurrent_io import MAX_THREADS, run_all
from registry.format import (
    BRAND_ID,
    BRANDS,
    CATEGORIES,
    CATEGORY_ID,
    CURVE,
    INDEX,
    ITEM_ID,
    ITEM_VECTORS,
    ITEMS,
    LATEST,
    MANIFEST,
    MODEL,
    POPULARITY,
    SEEN,
    USER_KEY,
    USER_VECTORS,
    USERS,
    VERSION_RE,
    VERSIONS,
    CheckpointError,
    ModelArtifacts,
    check_manifest,
    mapped_vectors,
    one_line,
    parse_embeddings,
    parse_keys,
    parse_popularity,
    parse_seen,
    required_files,
    version_label,
    version_number,
)
from registry.user_keys import UserKeys
from registry.verified_files import VERIFIED, stamp

_HASH_CHUNK = 8 << 20

log = logging.getLogger("registry.reader")


@dataclass
class LoadedVersion:
    """One verified version, ready to serve: numpy matrices, key lists, seen CSR, popularity; model.pt on demand."""

    version: str
    manifest: dict[str, Any]
    user_keys: UserKeys  # row i = user index i; None: a deleted user
    # float32 [users, d] and [items, d]; format 3: memory-mapped copy-on-write (registry.format.mapped_vectors)
    user_vectors: np.ndarray
    item_ids: list[str]
    item_vectors: np.ndarray
    seen_indptr: np.ndarray  # int64 [users + 1]; read-only, memory-mapped when read from local disk
    seen_indices: np.ndarray  # int32
    popularity: pa.Table  # POPULARITY_SCHEMA
    category_ids: list[str]  # row i = category index i
    brand_ids: list[str]
    # Format 1 versions carry no category or brand vectors: None there.
    category_vectors: np.ndarray | None
    brand_vectors: np.ndarray | None
    seen_evidence: dict[str, np.ndarray] | None  # aligned with seen_indices (format.EVIDENCE); None: not carried
    storage: Storage = field(repr=False)
    folder: str = field(repr=False)
    item_index: Any = field(default=None, repr=False)  # faiss index over item_vectors (registry.item_index); None

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

    @property
    def format(self) -> int:
        return int(self.manifest.get("format", 1))

    @property
    def coverage(self) -> dict[str, int | None]:
        """Arrival the version covers (`runs`, `live_through_ms`); empty for versions from before it was recorded."""
        return self.manifest.get("coverage", {})

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

    def load_state(self, map_location: Any = "cpu", mapped: bool = False) -> dict[str, Any]:
        """model.pt as {"state_dict": ..., "hparams": ...}, checked against its sha256 again, as it is read later. On
        local disk, a file this process has hashed before and that is unchanged since is checked by its stat
        (`registry.verified_files`).

        `mapped` (local disk only): the tensors map the file copy-on-write once it is checked, so a table-sized file
        is neither read into bytes nor copied out of them (half a second of a Taobao update cycle at 1,024 dims).
        The mapping holds the file open until the tensors go, so a caller that may remove the version drops them
        first.
        """
        return load_model(self.storage, self.folder, self.manifest["files"][MODEL], version_label(self.version),
                          map_location, mapped)

    def artifacts(self, **changes: Any) -> ModelArtifacts:
        """This version as artifacts to publish again (a hot-swap drill, a version with users blanked), with
        `changes` applied; its parent is this version unless `changes` says otherwise."""
        state = self.load_state()
        fields = dict(
            user_keys=self.user_keys, user_vectors=self.user_vectors, item_ids=self.item_ids,
            item_vectors=self.item_vectors, seen_indptr=self.seen_indptr, seen_indices=self.seen_indices,
            popularity=self.popularity, state_dict=state["state_dict"], hparams=state["hparams"],
            config_hash=self.config_hash, metrics=self.metrics, k=self.k, node_counts=self.node_counts,
            category_ids=self.category_ids, brand_ids=self.brand_ids, category_vectors=self.category_vectors,
            brand_vectors=self.brand_vectors, parent=self.version, watermark_ms=self.watermark_ms,
            coverage=self.coverage, seen_evidence=self.seen_evidence,
            extra=self.extra, curve_png=self.load_curve_png())
        if INDEX in self.manifest["files"] and "item_vectors" not in changes:  # the same items: the same index
            # The published bytes: an index read with its lists mapped would serialise as an on-disk index that
            # names this version's file.
            fields["item_index"] = read_file(self.storage, self.folder, INDEX, self.manifest["files"][INDEX],
                                             version_label(self.version), verify=True)
        fields.update(changes)
        return ModelArtifacts(**fields)

    def load_curve_png(self) -> bytes | None:
        sha = self.manifest["files"].get(CURVE)
        if sha is None:
            return None
        return read_file(self.storage, self.folder, CURVE, sha, version_label(self.version), verify=True)


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
        raise CheckpointError(f"checkpoints/{LATEST}: cannot read: {one_line(e)}") from e
    try:
        version_number(text)
    except ValueError as e:
        raise CheckpointError(f"checkpoints/{LATEST}: {e}") from None
    return text


def version_folder(storage: Storage, version: str) -> str:
    """Where a published version's files lie (`checkpoints/versions/<version>`)."""
    return storage.path(CHECKPOINTS, VERSIONS, version)


def list_versions(storage: Storage) -> list[str]:
    """Complete versions (those with a manifest.json), oldest first."""
    prefix = storage.path(CHECKPOINTS, VERSIONS) + "/"
    found = set()
    for path in storage.list_files(CHECKPOINTS, VERSIONS, suffix="/" + MANIFEST):
        parts = path[len(prefix):].split("/")
        if len(parts) == 2 and parts[1] == MANIFEST and VERSION_RE.match(parts[0]):
            found.add(parts[0])
    return sorted(found, key=version_number)


def read_manifest(storage: Storage, version: str) -> dict[str, Any]:
    """A version's manifest, checked for shape; CheckpointError when missing or malformed."""
    label = version_label(version)
    try:
        version_number(version)
    except ValueError as e:
        raise CheckpointError(f"{label}: {e}") from None
    path = f"{version_folder(storage, version)}/{MANIFEST}"
    try:
        data = storage.read_bytes(path)
    except OSError as e:
        raise CheckpointError(f"{label}: {MANIFEST} is missing or unreadable (incomplete version): "
                              f"{one_line(e)}") from e
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise CheckpointError(f"{label}: {MANIFEST} is not valid JSON: {one_line(e)}") from e
    check_manifest(manifest, label)
    if manifest["version"] != version:
        raise CheckpointError(f"{label}: {MANIFEST} names version {manifest['version']!r}, not its folder's")
    return manifest


def read_curve(storage: Storage, version: str) -> bytes | None:
    """A version's training curve (PNG, checked against its manifest), or None when it has none."""
    manifest = read_manifest(storage, version)
    sha = manifest["files"].get(CURVE)
    if sha is None:
        return None
    return read_file(storage, version_folder(storage, version), CURVE, sha, version_label(version), verify=True)


def load_version(storage: Storage, version: str, verify: bool = True) -> LoadedVersion:
    """Load one version. With verify, every file must match its sha256 and no file may be missing or unlisted;
    shapes are always checked. Any failure raises CheckpointError naming the version and the file."""
    manifest = read_manifest(storage, version)
    return load_folder(storage, version_folder(storage, version), manifest, version_label(version), verify)


def load_newest_good(storage: Storage, newer_than: str | None = None, skip: set[str] | frozenset = frozenset()
                     ) -> tuple[LoadedVersion | None, dict[str, str]]:
    """The version LATEST names if it verifies; else (LATEST unreadable, or naming a damaged version) the newest
    version that verifies. Only versions newer than `newer_than` and not in `skip` are tried. Returns the version
    (None when none qualifies) and the versions refused on the way, with why: callers log and count them."""
    refused: dict[str, str] = {}
    floor = -1 if newer_than is None else version_number(newer_than)
    try:
        latest = latest_version(storage)
    except CheckpointError as err:
        latest, refused["LATEST"] = None, str(err)
    if latest is not None and version_number(latest) <= floor:
        return None, refused  # nothing newer: the normal case, no listing needed
    candidates = [latest] if latest is not None and latest not in skip else []
    for attempt in range(2):
        for version in candidates:
            try:
                return load_version(storage, version), refused
            except CheckpointError as err:
                refused[version] = str(err)
        if attempt == 0:  # LATEST failed (or is unusable): the newest of the others that verifies
            candidates = [v for v in reversed(list_versions(storage))
                          if version_number(v) > floor and v not in skip and v not in refused]
    return None, refused


def load_latest(storage: Storage, verify: bool = True) -> LoadedVersion | None:
    version = latest_version(storage)
    return None if version is None else load_version(storage, version, verify)


def load_folder(storage: Storage, folder: str, manifest: dict[str, Any], label: str, verify: bool,
                read_back: bool = False) -> LoadedVersion:
    """`read_back` (local disk, verify): this is a publisher's read-back of its own staging folder, whose files went
    around the page cache (`core.direct_io`) and are hashed as the disk holds them. Every file it checks is
    remembered as written here (`registry.verified_files`)."""
    files: dict[str, str] = manifest["files"]
    for rel in required_files(manifest):
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

    # On local disk every file is hashed up front, side by side, and parsed from the disk after (a version is
    # immutable once published: the mapped files were always read after their check), except one this process
    # hashed before and that is unchanged since (`registry.verified_files`); from an object store each file is
    # checked as it is copied or read.
    checked = _check_all(storage, folder, files, label, read_back) if verify and storage.is_local else set()

    def read(rel: str) -> bytes:
        return read_file(storage, folder, rel, files[rel], label, verify and rel not in checked)

    def parquet(rel: str, parse: Any) -> Any:
        # From an object store, checked by streaming, then parsed from the file: a 10M-user file is never held whole
        # as bytes as well.
        if verify and rel not in checked:
            _check_streamed(storage, folder, rel, files[rel], label)
        try:
            source = storage.fs.open_input_file(f"{folder}/{rel}")
        except OSError as e:
            raise CheckpointError(f"{label}: {rel} is missing or unreadable: {one_line(e)}") from e
        with source:
            return parse(source)

    def embeddings(rel: str, key_column: str) -> tuple[pa.Array, np.ndarray]:
        return parquet(rel, lambda source: parse_embeddings(source, key_column, label, rel))

    def mapped(rel: str, path: str, parse: Any) -> Any:
        # Where the file lies on local disk (versions are immutable once published, and removing one unlinks its
        # files, which leaves a mapping intact); from an object store, a private local copy, unlinked once mapped.
        if storage.is_local:  # checked up front when verifying
            return parse(path)
        spilled = _spill(storage, folder, rel, files[rel], label, verify)
        try:
            return parse(spilled)
        finally:
            os.unlink(spilled)

    def keys_and_vectors(rel: str, key_column: str, vectors_rel: str) -> tuple[pa.Array, np.ndarray]:
        if vectors_rel not in files:  # formats 1-2: the vectors are in the Parquet file
            return embeddings(rel, key_column)
        keys = parquet(rel, lambda source: parse_keys(source, key_column, label, rel))
        return keys, mapped(vectors_rel, f"{folder}/{vectors_rel}",
                            lambda path: mapped_vectors(path, len(keys), label, vectors_rel))

    counts = manifest["node_counts"]
    keys, user_vectors = keys_and_vectors(USERS, USER_KEY, USER_VECTORS)
    user_keys = UserKeys(keys)
    del keys
    ids, item_vectors = keys_and_vectors(ITEMS, ITEM_ID, ITEM_VECTORS)
    item_ids = ids.to_pylist()
    n_users, n_items = len(user_keys), len(item_ids)
    if n_users != counts["user"]:
        raise CheckpointError(f"{label}: {USERS} has {n_users} rows, node_counts.user is {counts['user']}")
    if n_items != counts["item"]:
        raise CheckpointError(f"{label}: {ITEMS} has {n_items} rows, node_counts.item is {counts['item']}")
    width = item_vectors.shape[1] if n_items else user_vectors.shape[1]
    if user_vectors.shape[1] != item_vectors.shape[1] and n_users and n_items:
        raise CheckpointError(f"{label}: {USERS} vectors have width {user_vectors.shape[1]}, "
                              f"{ITEMS} vectors {item_vectors.shape[1]}")
    attributes: dict[str, tuple[list[str], np.ndarray | None]] = {}
    for node, rel, key_column in (("category", CATEGORIES, CATEGORY_ID), ("brand", BRANDS, BRAND_ID)):
        if rel not in files:  # format 1
            attributes[node] = (_legacy_ids(storage, node, counts[node], label), None)
            continue
        arr, vectors = embeddings(rel, key_column)
        ids = arr.to_pylist()
        if len(ids) != counts[node]:
            raise CheckpointError(f"{label}: {rel} has {len(ids)} rows, node_counts.{node} is {counts[node]}")
        if len(ids) and vectors.shape[1] != width:
            raise CheckpointError(f"{label}: {rel} vectors have width {vectors.shape[1]}, {ITEMS} vectors {width}")
        attributes[node] = (ids, vectors)
    index = None
    if INDEX in files:
        from registry.item_index import parse

        index = mapped(INDEX, f"{folder}/{INDEX}", lambda path: parse(path, item_vectors, label))
    indptr, indices, evidence = mapped(SEEN, f"{folder}/{SEEN}",
                                       lambda path: parse_seen(path, n_users, n_items, label))
    popularity = parse_popularity(read(POPULARITY), n_items, counts["category"], counts["brand"], label)
    if verify:
        # model.pt and curve.png are read lazily, but a version that serves must be whole: hash them now, streaming.
        for rel in sorted(set(files) - {USERS, ITEMS, USER_VECTORS, ITEM_VECTORS, SEEN, POPULARITY, CATEGORIES,
                                        BRANDS, INDEX} - checked):
            _check_streamed(storage, folder, rel, files[rel], label)
    return LoadedVersion(
        version=manifest["version"] or "", manifest=manifest, user_keys=user_keys, user_vectors=user_vectors,
        item_ids=item_ids, item_vectors=item_vectors, seen_indptr=indptr, seen_indices=indices,
        popularity=popularity, category_ids=attributes["category"][0], brand_ids=attributes["brand"][0],
        category_vectors=attributes["category"][1], brand_vectors=attributes["brand"][1], seen_evidence=evidence,
        storage=storage, folder=folder, item_index=index,
    )


def load_model(storage: Storage, folder: str, sha: str, label: str, map_location: Any = "cpu",
               mapped: bool = False, verify: bool = True) -> dict[str, Any]:
    """A version folder's model.pt (`LoadedVersion.load_state`). `verify=False` only for a reader that maps a
    file its caller verified moments before (an update cycle's workers, which grow the table the driver checked)."""
    import torch

    mapped = mapped and storage.is_local
    if mapped:
        if verify:
            _check_streamed(storage, folder, MODEL, sha, label)
        source: Any = f"{folder}/{MODEL}"
    else:
        source = io.BytesIO(read_file(storage, folder, MODEL, sha, label, verify))
    try:
        obj = torch.load(source, map_location=map_location, weights_only=True, mmap=mapped)
    except Exception as e:
        raise CheckpointError(f"{label}: {MODEL}: cannot load: {one_line(e)}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict) \
            or not isinstance(obj.get("hparams"), dict):
        raise CheckpointError(f"{label}: {MODEL}: expected a dict with 'state_dict' and 'hparams'")
    return obj


def _legacy_ids(storage: Storage, node: str, count: int, label: str) -> list[str]:
    """Category or brand ids of a format-1 version, which named them only through ingestion's append-only id maps
    (`idmaps/<node>/*.parquet`, columns key and idx): the first `count` of them are the version's."""
    if not count:
        return []
    paths = storage.list_files(IDMAPS, node, suffix=".parquet")
    try:
        tables = [pq.read_table(p, columns=["key", "idx"], filesystem=storage.fs) for p in paths]
    except (OSError, ValueError, pa.ArrowInvalid) as e:
        raise CheckpointError(f"{label}: format 1: cannot read the {node} ids it relies on: {one_line(e)}") from e
    table = pa.concat_tables(tables).sort_by("idx") if tables else None
    if table is None or table.num_rows < count or table["idx"].to_numpy()[:count].tolist() != list(range(count)):
        raise CheckpointError(f"{label}: format 1: idmaps/{node} does not hold the version's {count} {node} ids")
    return table["key"].to_pylist()[:count]


def _files_under(storage: Storage, folder: str) -> list[str]:
    selector = pafs.FileSelector(folder, recursive=True, allow_not_found=True)
    return [i.path for i in storage.fs.get_file_info(selector) if i.type == pafs.FileType.File]


def read_file(storage: Storage, folder: str, rel: str, sha: str, label: str, verify: bool) -> bytes:
    try:
        data = storage.read_bytes(f"{folder}/{rel}")
    except OSError as e:
        raise CheckpointError(f"{label}: {rel} is missing or unreadable: {one_line(e)}") from e
    if verify:
        found = hashlib.sha256(data).hexdigest()
        if found != sha:
            raise CheckpointError(f"{label}: {rel} fails its checksum (sha256 {found[:12]}..., manifest {sha[:12]}...)")
    return data


def _spill(storage: Storage, folder: str, rel: str, sha: str, label: str, verify: bool) -> str:
    """A local temporary copy of one file of the version, checked against its sha256 as it is copied."""
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(prefix="ig-version-", suffix="-" + rel.replace("/", "-"), delete=False) as out:
        try:
            with storage.fs.open_input_stream(f"{folder}/{rel}") as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except OSError as e:
            os.unlink(out.name)
            raise CheckpointError(f"{label}: {rel} is missing or unreadable: {one_line(e)}") from e
    if verify and digest.hexdigest() != sha:
        os.unlink(out.name)
        raise CheckpointError(f"{label}: {rel} fails its checksum (sha256 {digest.hexdigest()[:12]}..., "
                              f"manifest {sha[:12]}...)")
    return out.name


def _check_all(storage: Storage, folder: str, files: dict[str, str], label: str, read_back: bool = False
               ) -> set[str]:
    """Check every listed file against the manifest (hashing those this process has not found unchanged since it
    last did, `_check_streamed`), several at a time, the largest first; the first failure in name order is raised
    (after all are read). Returns the names checked."""
    def size(rel: str) -> int:
        try:
            return os.path.getsize(f"{folder}/{rel}")
        except OSError:
            return 0  # gone since the listing: its check says so

    order = sorted(files, key=lambda rel: (-size(rel), rel))
    # From the disk, a read waits on the device as much as it hashes: more at once (3 big files: 0.30 s against 0.46
    # on two threads, Taobao).
    failures = run_all([lambda rel=rel: _failure(storage, folder, rel, files[rel], label, read_back) for rel in order],
                       workers=MAX_THREADS if read_back else None)
    failed = sorted((rel, err) for rel, err in zip(order, failures, strict=True) if err is not None)
    if failed:
        raise failed[0][1]
    return set(files)


def _failure(storage: Storage, folder: str, rel: str, sha: str, label: str, read_back: bool
             ) -> CheckpointError | None:
    try:
        _check_streamed(storage, folder, rel, sha, label, read_back)
    except CheckpointError as err:
        return err
    return None


def check_written(storage: Storage, folder: str, rel: str, sha: str, label: str) -> None:
    """A publisher's read-back of one file of its own staging folder as soon as it is written (`registry.writer`):
    hashed from the disk as `load_folder(..., read_back=...)` hashes it, and remembered, so that the publisher's
    `load_folder` finds it checked. Nothing where the memo would not remember it (not a local disk's filesystem): the
    file would be read twice. A failure is not raised: `load_folder` checks the file again and says so."""
    now = stamp(f"{folder}/{rel}") if storage.is_local else None
    if now is None or not VERIFIED.remembers_on(now.dev):
        return
    try:
        _check_streamed(storage, folder, rel, sha, label, read_back=True)
    except CheckpointError:
        pass
    except Exception:  # noqa: BLE001 - never remembered, so the publisher's load checks the file again
        log.warning("%s: the early read-back of %s failed; it is checked again", label, rel, exc_info=True)


def _check_streamed(storage: Storage, folder: str, rel: str, sha: str, label: str, read_back: bool = False
                    ) -> None:
    """Hash one file against its manifest entry; on local disk, not again while it is unchanged since this
    process last found it so (`registry.verified_files`). `read_back`: see `load_folder`."""
    path = f"{folder}/{rel}"
    before = stamp(path) if storage.is_local else None
    if VERIFIED.holds(before, sha):
        return
    started = time.time_ns()
    digest = hashlib.sha256()
    try:
        if read_back and before is not None:
            for chunk in direct_chunks(path):
                digest.update(chunk)
        else:
            with storage.fs.open_input_stream(path) as f:
                while chunk := f.read(_HASH_CHUNK):
                    digest.update(chunk)
    except OSError as e:
        raise CheckpointError(f"{label}: {rel} is missing or unreadable: {one_line(e)}") from e
    if digest.hexdigest() != sha:
        raise CheckpointError(f"{label}: {rel} fails its checksum (sha256 {digest.hexdigest()[:12]}..., "
                              f"manifest {sha[:12]}...)")
    if before is not None:
        VERIFIED.remember(before, stamp(path), sha, started, written_here=read_back)

