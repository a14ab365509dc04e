"""`python -m datasets.ingest`: behaviour logs -> validated, pseudonymised, deduplicated, sharded interest graph.

Incremental: files recorded in state/ are skipped, so re-running adds nothing and a new file adds exactly its rows.
Prints one JSON summary as its last line.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from core.cli import Incomplete, run_command
from core.config import AppConfig
from core.storage import GRAPH, HOLDOUT, LAST_INGEST, RAW, REJECTS, STATE, TMP, Storage, filesystem_for, storage_for
from core.writer_lock import WriterBusy, exclusive_writer
from datasets import idmaps
from datasets import schema as s
from datasets.adapters import ADAPTERS, Chunk, SourceError, load_attributes, plan_chunks
from datasets.deletion import purge_users
from datasets.live_files import live_through_ms, sealed
from datasets.pseudonym import resolve_key
from datasets.stage import STAGED_REJECTS, StageBlock, now_ms
from datasets.state import IngestState, new_run_id, remove_uncommitted
from datasets.tombstones import load_tombstones, tombstone_files
from datasets.validate import Rules

log = logging.getLogger("datasets.ingest")


@dataclass(frozen=True)
class SourceFile:
    display: str  # absolute local path or s3:// URI: the file's identity in state/ and rejects/
    fs_path: str
    fmt: str
    split: str
    size: int
    mtime_ns: int


@dataclass
class Request:
    source: str | None
    fmt: str
    holdout: str | None
    extra: dict = field(default_factory=dict)


def _expand(pattern: str, fmt: str, split: str, endpoint: str | None, region: str | None) -> list[SourceFile]:
    fs, inner = filesystem_for(pattern, endpoint, region)
    if pattern.startswith("s3://"):
        base = inner.split("*", 1)[0].rsplit("/", 1)[0] if "*" in inner else inner
        if fs.get_file_info(base).type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        else:
            infos = [fs.get_file_info(base)]
        wanted = (lambda p: fnmatch.fnmatch(p, inner)) if "*" in inner else (lambda p: True)
        infos = [i for i in infos if i.type == pafs.FileType.File and wanted(i.path)]
        to_display = "s3://{}".format
    else:
        matches = sorted(glob.glob(pattern, recursive=True))
        paths = []
        for m in matches:
            if os.path.isdir(m):
                paths += sorted(os.path.join(d, f) for d, _, fs_ in os.walk(m) for f in fs_)
            else:
                paths.append(m)
        infos = [fs.get_file_info(os.path.abspath(p)) for p in paths]
        to_display = str
    return [SourceFile(to_display(i.path), i.path, fmt, split, i.size, i.mtime_ns or 0) for i in infos]


def discover(cfg: AppConfig, req: Request, storage: Storage, listed_ms: int) -> list[SourceFile]:
    d = cfg.data
    files: list[SourceFile] = []
    if req.source:
        found = _expand(req.source, req.fmt, "train", d.s3_endpoint, d.s3_region)
        if not found:
            raise SourceError(f"--source / data.source.path: no file matches {req.source!r}")
        files += found
    if req.holdout:
        found = _expand(req.holdout, req.fmt, "holdout", d.s3_endpoint, d.s3_region)
        if not found:
            raise SourceError(f"--holdout: no file matches {req.holdout!r}")
        files += found
    # Files under raw/ (dropped there, or flushed by POST /events) are canonical events; a live file is taken once
    # it is sealed (datasets.live_files), so what a run covers of the live events is known by arrival.
    raw_root = storage.path(RAW)
    if storage.exists(RAW):
        prefix = "s3://" if not storage.is_local else ""
        found = _expand(prefix + raw_root, "events", "train", d.s3_endpoint, d.s3_region)
        for f in found:
            if ".tmp-" in f.display.rsplit("/", 1)[-1]:
                continue  # a write still in progress
            if sealed(f.display, listed_ms, cfg.serve.live_seal_s):  # a live file of the last seconds: next run
                files.append(f)
    return files


def _chunk_options(cfg: AppConfig, req: Request, f: SourceFile, attributes: tuple) -> dict:
    src = cfg.data.source
    return {
        "split": f.split,
        "columns": tuple(sorted(src.columns.items())),
        "delimiter": src.delimiter,
        "default_event": src.event,
        "attributes": attributes if f.fmt == "sequence" else (),
    }


def options_tag(cfg: AppConfig, req: Request, f: SourceFile) -> str:
    """What an unreadable file was tried with: a change of adapter or options tries it again."""
    opts = {k: v for k, v in _chunk_options(cfg, req, f, ()).items() if k != "attributes"}
    return hashlib.sha256(json.dumps([f.fmt, opts], sort_keys=True, default=str).encode()).hexdigest()[:12]


def plan(cfg: AppConfig, req: Request, files: list[SourceFile]) -> tuple[list[Chunk], dict[SourceFile, str]]:
    """Chunks of every readable file, and the files no adapter can read at all (with the reason): those are
    quarantined by the caller, never the cause of a failed run."""
    d = cfg.data
    attributes: tuple = ()
    if req.fmt == "sequence" and cfg.data.source.attributes:
        fs, inner = filesystem_for(cfg.data.source.attributes, d.s3_endpoint, d.s3_region)
        attributes = load_attributes(fs, inner, cfg.data.source.attributes)
    chunks: list[Chunk] = []
    unreadable: dict[SourceFile, str] = {}
    for f in files:
        fs, _ = filesystem_for(f.display, d.s3_endpoint, d.s3_region)
        try:
            chunks += plan_chunks(fs, f.fs_path, f.display, f.fmt, d.chunk_mb << 20,
                                  **_chunk_options(cfg, req, f, attributes))
        except (SourceError, OSError) as err:
            unreadable[f] = str(err)
    return chunks, unreadable


def _stage(cfg: AppConfig, storage: Storage, run_id: str, chunks: list[Chunk], tombstones: pa.Array) -> dict:
    import ray

    from datasets.datasource import BehaviourLogDatasource

    key, _ = resolve_key(cfg.privacy.allow_dev_key)
    rules = Rules(max_id_length=cfg.data.max_id_length, max_future_s=cfg.data.max_future_s)
    stage = StageBlock(storage, run_id, key, rules, cfg.data.shards, now_ms(), tombstones)
    # One block per chunk: splitting them further only multiplies small staged files.
    ds = ray.data.read_datasource(BehaviourLogDatasource(chunks, cfg.data.s3_endpoint, cfg.data.s3_region),
                                  override_num_blocks=len(chunks))
    stats = ds.map_batches(stage, batch_size=None, batch_format="pyarrow", zero_copy_batch=True).to_arrow_refs()
    tables = [t for t in ray.get(stats) if t.num_rows]
    totals = {"rows": 0, "accepted": 0, "rejected": 0, "by_reason": Counter(), "max_ts": None}
    for t in tables:
        for row in t.to_pylist():
            totals["rows"] += row["rows"]
            totals["accepted"] += row["accepted"]
            totals["rejected"] += row["rejected"]
            totals["by_reason"].update(json.loads(row["by_reason"]))
            if row["max_ts"] is not None:
                totals["max_ts"] = max(row["max_ts"], totals["max_ts"] or row["max_ts"])
    return totals


def _finalise(cfg: AppConfig, storage: Storage, run_id: str, watermark_ms: int | None, formats: list[str],
              runs: list[str], live_through: int | None, timings: dict[str, float]) -> dict:
    import ray

    from datasets.shards import append_shard, shard_edges

    shards = range(cfg.data.shards)
    append = ray.remote(append_shard)
    mark = time.time()
    results = ray.get([append.remote(storage, run_id, sh) for sh in shards])
    timings["dedupe_append"] = time.time() - mark
    mark = time.time()
    before, after = {}, {}
    maps: dict[str, pa.Table] = {}
    for node, field_ in (("user", "users"), ("item", "items"), ("category", "categories"), ("brand", "brands")):
        current = idmaps.load(storage, node)
        before[node] = current.num_rows
        candidates = pa.concat_arrays([r[field_] for r in results]) if results else pa.array([], pa.string())
        maps[node] = idmaps.extend(storage, node, current, candidates, run_id)
        after[node] = maps[node].num_rows
    timings["idmaps"] = time.time() - mark
    mark = time.time()
    if watermark_ms is not None:
        refs = {k: ray.put(v) for k, v in maps.items()}
        arrival = {run: seq for seq, run in enumerate(runs, start=1)}  # a row's run: when it arrived
        edges_fn = ray.remote(shard_edges)
        edge_results = ray.get([
            edges_fn.remote(storage, sh, refs["user"], refs["item"], refs["category"], refs["brand"],
                            dict(cfg.data.event_weights), cfg.data.half_life_days, watermark_ms,
                            cfg.data.max_edge_weight, arrival, cfg.data.recent_half_life_days)
            for sh in shards
        ])
        for name, file in (("category", s.ITEM_CATEGORY_FILE), ("brand", s.ITEM_BRAND_FILE)):
            pairs = pa.concat_tables([r["pairs"][name] for r in edge_results])
            pairs = pairs.group_by(pairs.column_names).aggregate([]).sort_by(
                [(n, "ascending") for n in pairs.column_names])
            storage.write_parquet(storage.path(GRAPH, file), pairs)
        storage.write_json_atomic(storage.path(GRAPH, s.GRAPH_META), {
            "watermark_ms": watermark_ms,
            "formats": formats,
            "has_holdout": storage.exists(HOLDOUT),
            "num_nodes": after,
            "user_item_edges": sum(r["edges"] for r in edge_results),
            "event_weights": dict(cfg.data.event_weights),
            "half_life_days": cfg.data.half_life_days,
            "max_edge_weight": cfg.data.max_edge_weight,
            "runs": len(runs),  # arrival: edges record the last run (1-based) that brought them an event
            "live_through_ms": live_through,
        })
    timings["graph"] = time.time() - mark
    return {
        "accepted": sum(r["accepted"] for r in results),
        "duplicates": sum(r["duplicates"] for r in results),
        "holdout": sum(r["holdout"] for r in results),
        "by_event": dict(sum((Counter(r["by_event"]) for r in results), Counter())),
        "before": before,
        "after": after,
    }


def _commit_rejects(storage: Storage, run_id: str) -> None:
    staged = storage.list_files(TMP, run_id, STAGED_REJECTS, suffix=".parquet")
    if staged:
        table = storage.read_parquet(staged).sort_by([(s.SOURCE, "ascending"), (s.LINE, "ascending")])
        storage.write_parquet(storage.path(REJECTS, f"part-{run_id}.parquet"), table)


def run_ingest(cfg: AppConfig, req: Request) -> dict:
    """Ingest what is new; returns the summary (DESIGN 3.7). One writer at a time per storage root: a concurrent
    ingestion waits up to data.writer_wait_s, then fails with WriterBusy."""
    storage = storage_for(cfg)
    with exclusive_writer(storage, "ingestion", cfg.data.writer_wait_s):
        return _ingest_locked(cfg, req, storage)


def _ingest_locked(cfg: AppConfig, req: Request, storage: Storage) -> dict:
    started = time.time()
    d = cfg.data
    state = IngestState.load(storage)
    remove_uncommitted(storage, state)
    tombstones = load_tombstones(storage)
    pending_files = {name: key for name, key in tombstone_files(storage).items()
                     if name not in set(state.tombstones_applied)}
    pending = sorted(set(pending_files.values()))
    timings: dict[str, float] = {}
    run_id = new_run_id()
    summary: dict = {"run": run_id}
    if pending:  # before discovery: raw/ files it rewrites are then seen with their new size
        mark = time.time()
        key, _ = resolve_key(cfg.privacy.allow_dev_key)
        purged = purge_users(storage, pending, d.shards, key, d.source.columns.get(s.USER_ID, s.USER_ID),
                             d.source.delimiter)
        for path, (size, mtime_ns) in purged.rewritten.items():
            if path in state.files:
                state.files[path].update({"size": size, "mtime_ns": mtime_ns})
        summary["purged_rows"], summary["purged_users"] = purged.rows, len(pending)
        timings["purge"] = time.time() - mark
    listed_ms = now_ms()
    files = discover(cfg, req, storage, listed_ms)
    new_files, changed = [], []
    for f in files:
        seen = state.files.get(f.display)
        bad = state.unreadable.get(f.display)
        if seen is None and (bad is None or (bad["size"], bad["mtime_ns"], bad["options"]) !=
                             (f.size, f.mtime_ns, options_tag(cfg, req, f))):
            new_files.append(f)
        elif seen is not None and (seen["size"] != f.size or seen["mtime_ns"] != f.mtime_ns):
            changed.append(f.display)
    for path in changed:
        log.warning("%s changed since it was ingested; skipped (append new events as new files)", path)
    mark = time.time()
    chunks, unreadable = plan(cfg, req, new_files)
    timings["plan"] = time.time() - mark
    for f, reason in unreadable.items():
        log.error("%s cannot be read and is skipped until it or the adapter options change: %s", f.display, reason)
    readable = [f for f in new_files if f not in unreadable]
    summary.update({"files": len(readable), "skipped_files": len(files) - len(new_files), "changed_files": changed,
                    "unreadable_files": [{"file": f.display, "reason": r} for f, r in unreadable.items()]})
    if chunks or pending:
        from core.runtime import ensure_ray

        mark = time.time()
        ensure_ray(cfg)
        timings["ray_init"] = time.time() - mark
    if chunks:
        mark = time.time()
        staged = _stage(cfg, storage, run_id, chunks, tombstones)
        timings["stage"] = time.time() - mark
    else:
        staged = {"rows": 0, "accepted": 0, "rejected": 0, "by_reason": Counter(), "max_ts": None}
    watermark = state.watermark_ms
    if staged["max_ts"] is not None:
        watermark = max(watermark or staged["max_ts"], staged["max_ts"])
    live_through = max(state.live_through_ms or 0, live_through_ms(listed_ms, cfg.serve.live_seal_s))
    if chunks or pending:  # a purge rebuilds the graph too, so no edge of a deleted user survives it
        mark = time.time()
        formats = sorted(set(state.formats) | {f.fmt for f in readable})
        final = _finalise(cfg, storage, run_id, watermark, formats, [*state.runs, run_id], live_through, timings)
        _commit_rejects(storage, run_id)
        timings["commit"] = time.time() - mark
        for f in readable:
            state.files[f.display] = {"size": f.size, "mtime_ns": f.mtime_ns, "run": run_id}
            state.unreadable.pop(f.display, None)
        state.runs.append(run_id)
        state.watermark_ms = watermark
        state.live_through_ms = live_through
        state.formats = formats
        state.tombstones_applied = sorted(set(state.tombstones_applied) | set(pending_files))
    else:
        counts = {n: idmaps.load(storage, n).num_rows for n in s.NODE_TYPES}
        final = {"accepted": 0, "duplicates": 0, "holdout": 0, "by_event": {}, "before": counts, "after": counts}
    for f, reason in unreadable.items():
        state.unreadable[f.display] = {"size": f.size, "mtime_ns": f.mtime_ns, "options": options_tag(cfg, req, f),
                                       "reason": reason}
    if chunks or pending or unreadable:
        state.save(storage)
        storage.delete(storage.path(TMP, run_id))
    summary.update({
        "input_rows": staged["rows"],
        "accepted": final["accepted"],
        "rejected": {"total": staged["rejected"], "by_reason": dict(sorted(staged["by_reason"].items()))},
        "duplicates": final["duplicates"],
        "holdout": final["holdout"],
        "by_event": final["by_event"],
    })
    for node, plural in (("user", "users"), ("item", "items"), ("category", "categories"), ("brand", "brands")):
        summary[f"new_{plural}"] = final["after"][node] - final["before"][node]
        summary[f"total_{plural}"] = final["after"][node]
    summary.update({"shards": d.shards, "watermark_ms": watermark, "seconds": round(time.time() - started, 3),
                    "timings": {k: round(v, 3) for k, v in timings.items()}})
    if chunks or pending or unreadable:  # what the explorer page shows operators; a run that found nothing keeps it
        storage.write_json_atomic(storage.path(STATE, LAST_INGEST), {**summary, "finished_ms": now_ms()})
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m datasets.ingest", description=__doc__)
    p.add_argument("--config", default="ray_config.yaml", help="the app's configuration")
    p.add_argument("--source", help="path or glob of logs (overrides data.source.path)")
    p.add_argument("--format", help=f"adapter, one of {', '.join(ADAPTERS)} (overrides data.source.format)")
    p.add_argument("--holdout", help="lightgcn: file whose rows become the evaluation holdout")
    p.add_argument("--root", help="storage root (overrides data.root)")
    return p


def resolve_request(cfg: AppConfig, args: argparse.Namespace) -> Request:
    fmt = args.format or cfg.data.source.format
    if fmt not in ADAPTERS:
        raise SourceError(f"--format: unknown adapter {fmt!r}; expected one of {', '.join(ADAPTERS)}")
    holdout = args.holdout or cfg.data.source.holdout
    if holdout and fmt != "lightgcn":
        raise SourceError(f"--holdout: only the lightgcn adapter takes a holdout file, not {fmt!r}")
    return Request(source=args.source or cfg.data.source.path, fmt=fmt, holdout=holdout)


def _ingest_command(args: argparse.Namespace, cfg: AppConfig) -> dict:
    req = resolve_request(cfg, args)
    if req.source is None and not storage_for(cfg).exists(RAW):
        raise SourceError("no source: give --source or data.source.path (or put files under raw/)")
    summary = run_ingest(cfg, req)
    if summary["unreadable_files"]:
        first = summary["unreadable_files"][0]
        raise Incomplete(f"{len(summary['unreadable_files'])} file(s) could not be read and are skipped until they "
                         f"change: {first['reason']}", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv, _ingest_command, errors=(SourceError, WriterBusy))


if __name__ == "__main__":
    raise SystemExit(main())
