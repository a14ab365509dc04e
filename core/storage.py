"""The storage layout under data.root (DESIGN 3.2), on a local folder or an object store, through pyarrow.fs.

`storage_for(cfg)` is the one way to build a `Storage` from the config, so the endpoint and region never get lost.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.config import AppConfig
from core.direct_io import direct_write

RAW = "raw"
STATE = "state"
REJECTS = "rejects"
INTERACTIONS = "interactions"
HOLDOUT = "holdout"
IDMAPS = "idmaps"
GRAPH = "graph"
CHECKPOINTS = "checkpoints"
TMP = "tmp"
TRAIN_RUNS = "train_runs"  # Ray Train's own run folders (checkpoints of runs in progress)
AUDIENCES = "audiences"  # audience exports, per version (pseudonymous keys only)
LAST_INGEST = "last_ingest.json"  # under STATE: the newest ingestion's summary, as operators see it
# Walks of a folder that changed under them, before the error is raised (`Storage.list_files`).
LIST_ATTEMPTS = 5


def filesystem_for(uri: str, endpoint: str | None = None, region: str | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it for a local path or an s3:// URI."""
    if uri.startswith("s3://"):
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint or os.environ.get("AWS_ENDPOINT_URL"),
            region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            allow_bucket_creation=True,
        )
        return fs, uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


@dataclass(frozen=True)
class Storage:
    """Paths and small atomic reads and writes under one root. Picklable, so Ray tasks can carry it."""

    root: str
    endpoint: str | None = None
    region: str | None = None

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem_for(self.root, self.endpoint, self.region)[0]

    @property
    def base(self) -> str:
        return filesystem_for(self.root, self.endpoint, self.region)[1]

    @property
    def is_local(self) -> bool:
        return not self.root.startswith("s3://")

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def makedirs(self, *parts: str) -> str:
        p = self.path(*parts)
        if self.is_local:
            os.makedirs(p, exist_ok=True)
        return p

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def list_files(self, *parts: str, suffix: str = "") -> list[str]:
        """Files (full paths) under a folder, recursively, sorted; none if it does not exist.

        A local walk that fails with FileNotFoundError while other processes change the folder (CI met it once, on
        checkpoints/versions, as two publishers and a reader ran at once) is taken again, from the top."""
        selector = pafs.FileSelector(self.path(*parts), recursive=True, allow_not_found=True)
        for attempt in range(LIST_ATTEMPTS):
            try:
                infos = self.fs.get_file_info(selector)
                break
            except FileNotFoundError:
                if attempt == LIST_ATTEMPTS - 1:
                    raise
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Readers see the old content or the new, never a part: rename locally, one PUT on an object store."""
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                _remove_if_left(tmp)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    @contextmanager
    def write_stream(self, path: str) -> Iterator[BinaryIO]:
        """A file written in place as it is produced, synced to disk locally when the block ends: only for folders
        no reader looks in until they are renamed or committed (a version's staging folder), since a reader could
        see it half-written. Locally it goes around the page cache (`core.direct_io`): its readers come later or
        elsewhere, and its bytes need no place in this process's memory."""
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with direct_write(path) as out:
                yield out  # type: ignore[misc]
        else:
            with self.fs.open_output_stream(path) as out:
                yield _CopiedWrites(out)  # type: ignore[misc]

    def read_json(self, path: str, default: Any = None) -> Any:
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return default
        return json.loads(self.read_bytes(path))

    def write_json_atomic(self, path: str, value: Any) -> None:
        self.write_bytes_atomic(path, json.dumps(value, indent=1, sort_keys=True).encode())

    def write_parquet(self, path: str, table: pa.Table, durable: bool = False, deadline: float | None = None) -> None:
        """Written under a temporary name and renamed, so a reader never sees half a file; `durable` also syncs it
        to disk before the rename (what is acknowledged to a caller must survive a crash). A failed write (a full
        disk) leaves nothing behind; past `deadline` (time.time()) the write is abandoned before it becomes
        visible, with TimeoutError."""
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                pq.write_table(table, tmp)
                if durable:
                    fd = os.open(tmp, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                _check_deadline(deadline, path)
                os.replace(tmp, path)
            finally:
                _remove_if_left(tmp)
        else:
            buf = pa.BufferOutputStream()  # one PUT: an object appears whole or not at all
            pq.write_table(table, buf)
            _check_deadline(deadline, path)
            with self.fs.open_output_stream(path) as f:
                f.write(buf.getvalue())

    def parquet_columns(self, path: str) -> list[str]:
        """The column names of a Parquet file, from its footer alone."""
        return pq.read_schema(path, filesystem=self.fs).names

    def read_parquet(self, paths: list[str], columns: list[str] | None = None, schema: pa.Schema | None = None
                     ) -> pa.Table:
        if not paths:
            if schema is None:
                raise ValueError("no files to read and no schema given")
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        tables = [pq.read_table(p, columns=columns, filesystem=self.fs) for p in paths]
        return pa.concat_tables(tables, promote_options="default")

    def delete(self, path: str) -> None:
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(path)


class _CopiedWrites:
    """Hands an object store's stream a copy of each chunk: it may upload a buffer it was given after `write` returns
    (background writes), and a producer may reuse the memory behind its chunk (torch's serialiser passes views of
    its own)."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self.closed = False  # read by pyarrow's file wrapper

    def write(self, data: Any) -> int:
        return self._out.write(bytes(data))

    def flush(self) -> None:
        self._out.flush()


def _remove_if_left(tmp: str) -> None:
    try:
        os.remove(tmp)
    except FileNotFoundError:
        pass


def _check_deadline(deadline: float | None, path: str) -> None:
    if deadline is not None and time.time() > deadline:
        raise TimeoutError(f"writing {path} took too long; abandoned before it became visible")


def storage_for(cfg: AppConfig) -> Storage:
    """The storage of `data.root` with its endpoint and region; a local root is made absolute, so the same value
    means the same folder in a Ray worker whose working directory differs."""
    d = cfg.data
    root = d.root if d.root.startswith("s3://") else os.path.abspath(d.root)
    return Storage(root, d.s3_endpoint, d.s3_region)
