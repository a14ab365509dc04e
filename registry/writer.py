"""Publishing a version: write it under a staging name, verify it through the reader, claim the next number, and
move LATEST forward. Local disk: one flock and an atomic directory rename. Object stores: number claims by
listing, the manifest written last.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pyarrow.fs as pafs

from core.storage import CHECKPOINTS, Storage
from registry.format import (
    CLAIMS,
    LATEST,
    LOCK,
    MANIFEST,
    STAGING_PREFIX,
    VERSION_RE,
    VERSIONS,
    CheckpointError,
    ModelArtifacts,
    encode,
    final_manifest,
    version_label,
    version_name,
    version_number,
)
from registry.reader import check_written, latest_version, list_versions, load_folder, version_folder

# LATEST on an object store converges by re-checking; bounded so a pathological store cannot spin forever.
_LATEST_ROUNDS = 20


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
    staging = storage.path(CHECKPOINTS, f"{STAGING_PREFIX}{uuid.uuid4().hex}")
    try:
        # On local disk each file is read back as soon as it is closed, beside the ones still being written (a Taobao
        # publish's encoders left most of a core idle); the reader below then finds them checked
        # (`registry.verified_files`) instead of reading them after the last one. A failure is not raised here: an
        # unchecked file is checked, and its failure raised, below. Every check ends before the folder is read or
        # deleted; those not started when the encoding fails are dropped.
        early = ThreadPoolExecutor(max_workers=2, thread_name_prefix="registry-read-back")

        def written(rel: str, sha: str) -> None:
            if not object_store:
                early.submit(check_written, storage, staging, rel, sha, version_label(None))

        try:
            # Every file goes around the page cache (core.direct_io), model.pt too: filling the cache with it was
            # 0.3-0.4 s of the publisher's kernel time (Taobao); a resident update worker grows the next parent
            # from the table it kept, and other readers map it from the disk.
            manifest = encode(artifacts, lambda rel: storage.write_stream(f"{staging}/{rel}"), written)
        except BaseException:
            early.shutdown(wait=True, cancel_futures=True)
            raise
        early.shutdown(wait=True)
        # Verify through the reader's own code path: a version that publishes is one that loads; the files are read
        # back from the disk.
        load_folder(storage, staging, manifest, version_label(None), verify=True, read_back=True)
        if object_store:
            return _commit_object_store(storage, staging, manifest)
        return _commit_local(storage, staging, manifest)
    finally:
        storage.delete(staging)  # a no-op once the local rename has moved it


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
    return 1 + max((version_number(n) for n in os.listdir(versions) if VERSION_RE.match(n)), default=0)


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
            _write_manifest_checked(storage, f"{staging}/{MANIFEST}", final_manifest(manifest, number),
                                    version_label(version_name(number)))
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
        if VERSION_RE.match(name):
            numbers.add(version_number(name))
    for path in storage.list_files(CHECKPOINTS, CLAIMS):
        name = path.rsplit("/", 1)[-1].split(".", 1)[0]
        if VERSION_RE.match(name):
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
    target = version_folder(storage, name)
    try:
        for rel in manifest["files"]:
            if storage.is_local:
                os.makedirs(os.path.dirname(f"{target}/{rel}"), exist_ok=True)
            storage.fs.copy_file(f"{staging}/{rel}", f"{target}/{rel}")
        # Staging passed the full verification; a server-side copy is checksummed by the store, so sizes suffice.
        for rel in manifest["files"]:
            src, dst = storage.fs.get_file_info([f"{staging}/{rel}", f"{target}/{rel}"])
            if dst.type != pafs.FileType.File or dst.size != src.size:
                raise CheckpointError(f"{version_label(name)}: {rel} was not copied whole")
        _write_manifest_checked(storage, f"{target}/{MANIFEST}", final_manifest(manifest, number), version_label(name))
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
