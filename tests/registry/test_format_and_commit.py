"""The published checkpoint format: round trips, refusals of damaged versions, and concurrent publishers.

"object_store" runs the S3 protocol (claims by listing, manifest written last, no rename, no lock) on local disk
through pyarrow's LocalFileSystem, so both commit paths are exercised without a bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import registry
import registry.writer
from bench.catalogue import as_format_2
from core.storage import Storage

N_USERS, N_ITEMS, DIM = 5, 7, 4
MODES = ["local", "object_store"]
ALL_FILES = [registry.USERS, registry.ITEMS, registry.USER_VECTORS, registry.ITEM_VECTORS, registry.CATEGORIES,
             registry.BRANDS, registry.SEEN, registry.POPULARITY, registry.MODEL, registry.CURVE]


def _artifacts(seed: int = 0, **overrides) -> registry.ModelArtifacts:
    rng = np.random.default_rng(seed)
    fields = dict(
        user_keys=[f"user-{seed}-{i}" for i in range(N_USERS)],
        user_vectors=rng.normal(size=(N_USERS, DIM)).astype(np.float32),
        item_ids=[f"item-{i}" for i in range(N_ITEMS)],
        item_vectors=rng.normal(size=(N_ITEMS, DIM)).astype(np.float32),
        seen_indptr=np.array([0, 2, 2, 3, 5, 6], dtype=np.int64),
        seen_indices=np.array([0, 1, 3, 6, 2, 4], dtype=np.int32),
        popularity=pa.table({
            "item_idx": pa.array(np.arange(N_ITEMS, dtype=np.int32)),
            "score": pa.array(rng.random(N_ITEMS).astype(np.float32)),
            "category_idx": pa.array(np.array([0, 1, -1, 0, 1, 2, -1], dtype=np.int32)),
        }),
        state_dict={"embedding.weight": torch.from_numpy(rng.normal(size=(N_USERS + N_ITEMS, DIM)).astype(np.float32))},
        hparams={"dim": DIM, "layers": 3},
        config_hash=registry.config_hash({"seed": seed}),
        metrics={"recall@20": 0.18, "ndcg@20": 0.15},
        k=20,
        node_counts={"user": N_USERS, "item": N_ITEMS, "category": 3, "brand": 2},
        category_ids=["cat-a", "cat-b", "cat-c"],
        brand_ids=["brand-a", "brand-b"],
        category_vectors=rng.normal(size=(3, DIM)).astype(np.float32),
        watermark_ms=1_700_000_000_000 + seed,
        extra={"epochs": 3, "seconds": 1.5},
        curve_png=b"\x89PNG fake curve " + bytes([seed % 256]),
    )
    fields.update(overrides)
    return registry.ModelArtifacts(**fields)


def _publish(storage: Storage, artifacts: registry.ModelArtifacts, mode: str = "local") -> str:
    return registry.writer._publish(storage, artifacts, object_store=mode == "object_store")


def _folder(storage: Storage, version: str) -> Path:
    return Path(storage.path("checkpoints", "versions", version))


def _rewrite(storage: Storage, version: str, rel: str, data: bytes, fix_hash: bool) -> None:
    """Replace one file; with fix_hash the manifest agrees, so only the content checks can catch it."""
    folder = _folder(storage, version)
    (folder / rel).write_bytes(data)
    if fix_hash:
        manifest = json.loads((folder / registry.MANIFEST).read_text())
        manifest["files"][rel] = hashlib.sha256(data).hexdigest()
        (folder / registry.MANIFEST).write_text(json.dumps(manifest))


def _edit_manifest(storage: Storage, version: str, edit) -> None:
    path = _folder(storage, version) / registry.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(str(tmp_path / "root"))


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("mode", MODES)
def test_publish_then_load_gives_back_what_was_published(storage: Storage, mode: str):
    art = _artifacts(seed=3)
    before = time.time()
    version = _publish(storage, art, mode)
    after = time.time()

    assert version == "v000001"
    assert Path(storage.path("checkpoints", "LATEST")).read_text().strip() == "v000001"
    assert registry.latest_version(storage) == "v000001"
    assert registry.list_versions(storage) == ["v000001"]

    loaded = registry.load_version(storage, version)
    assert loaded.version == "v000001"
    assert loaded.user_keys == art.user_keys and loaded.item_ids == art.item_ids
    assert loaded.user_vectors.dtype == np.float32 and loaded.user_vectors.shape == (N_USERS, DIM)
    np.testing.assert_array_equal(loaded.user_vectors, art.user_vectors)
    np.testing.assert_array_equal(loaded.item_vectors, art.item_vectors)
    np.testing.assert_array_equal(loaded.seen_indptr, art.seen_indptr)
    np.testing.assert_array_equal(loaded.seen_indices, art.seen_indices)
    assert loaded.seen_indptr.dtype == np.int64 and loaded.seen_indices.dtype == np.int32
    np.testing.assert_array_equal(loaded.seen_items(3), [6, 2])
    assert loaded.popularity.select(art.popularity.column_names).equals(art.popularity)
    assert loaded.popularity["brand_idx"].to_pylist() == [-1] * N_ITEMS  # none given: no brand
    assert loaded.seen_evidence is None  # none given: not carried
    scores = art.popularity["score"].to_numpy()
    assert list(loaded.popular_items()) == list(np.argsort(-scores, kind="stable"))
    cat1 = [i for i in np.argsort(-scores, kind="stable") if i in (1, 4)]
    assert list(loaded.popular_items(1)) == cat1

    state = loaded.load_state()
    assert state["hparams"] == {"dim": DIM, "layers": 3}
    assert torch.equal(state["state_dict"]["embedding.weight"], art.state_dict["embedding.weight"])
    assert loaded.load_curve_png() == art.curve_png

    m = loaded.manifest
    assert m["version"] == "v000001" and m["parent"] is None
    assert m["metrics"] == {"recall@20": 0.18, "ndcg@20": 0.15} and m["k"] == 20
    assert m["node_counts"] == {"user": N_USERS, "item": N_ITEMS, "category": 3, "brand": 2}
    assert m["watermark_ms"] == 1_700_000_000_003 and m["config_hash"] == art.config_hash
    assert m["extra"] == {"epochs": 3, "seconds": 1.5}
    created = m["created_at"]
    assert created.endswith("+00:00") and before - 1 <= _iso_ts(created) <= after + 1  # stamped while publishing
    assert set(m["files"]) == set(ALL_FILES)
    for rel, sha in m["files"].items():
        assert hashlib.sha256((_folder(storage, version) / rel).read_bytes()).hexdigest() == sha
    # Nothing is left behind beside the version: staging is gone.
    assert not [p for p in Path(storage.path("checkpoints")).iterdir() if p.name.startswith(registry.STAGING_PREFIX)]


def _iso_ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def test_embeddings_readable_without_this_module(storage: Storage):
    """DESIGN 3.3: anyone can score with a dot product from the Parquet files alone."""
    art = _artifacts()
    version = registry.publish(storage, art)
    users = pq.read_table(_folder(storage, version) / registry.USERS)
    items = pq.read_table(_folder(storage, version) / registry.ITEMS)
    assert users.schema.names == ["user_key", "vector"] and items.schema.names == ["item_id", "vector"]
    assert users.schema.field("vector").type.value_type == pa.float32()
    u = np.array(users["vector"].to_pylist(), dtype=np.float32)
    i = np.array(items["vector"].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(u @ i.T, art.user_vectors @ art.item_vectors.T, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_second_publish_gets_next_version_with_parent(storage: Storage, mode: str):
    first = _publish(storage, _artifacts(seed=1), mode)
    second = _publish(storage, _artifacts(seed=2, parent=first), mode)
    assert (first, second) == ("v000001", "v000002")
    assert registry.latest_version(storage) == "v000002"
    assert registry.list_versions(storage) == ["v000001", "v000002"]
    loaded = registry.load_version(storage, second)
    assert loaded.parent == "v000001"
    assert loaded.user_keys[0] == "user-2-0"
    assert registry.load_latest(storage).version == "v000002"


def test_parent_must_be_a_published_version(storage: Storage):
    with pytest.raises(ValueError, match="v000009"):
        registry.publish(storage, _artifacts(parent="v000009"))
    assert registry.list_versions(storage) == [] and registry.latest_version(storage) is None


def test_nothing_published_yet(storage: Storage):
    assert registry.latest_version(storage) is None
    assert registry.list_versions(storage) == []
    assert registry.load_latest(storage) is None


def test_damaged_latest_is_an_error_and_the_next_publish_repairs_it(storage: Storage):
    registry.publish(storage, _artifacts())
    Path(storage.path("checkpoints", "LATEST")).write_text("garbage\n")
    with pytest.raises(registry.CheckpointError, match="LATEST"):
        registry.latest_version(storage)
    assert registry.publish(storage, _artifacts()) == "v000002"
    assert registry.latest_version(storage) == "v000002"


def test_latest_read_strips_whitespace(storage: Storage):
    registry.publish(storage, _artifacts())
    Path(storage.path("checkpoints", "LATEST")).write_text(" v000001\n")
    assert registry.latest_version(storage) == "v000001"


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("rel", [registry.USERS, registry.ITEMS, registry.POPULARITY])
@pytest.mark.parametrize("verify", [True, False])
def test_truncated_parquet_is_refused(storage: Storage, rel: str, verify: bool):
    version = registry.publish(storage, _artifacts())
    path = _folder(storage, version) / rel
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # Without verify the checksum is not looked at: the Parquet reader must still refuse it cleanly.
    with pytest.raises(registry.CheckpointError) as info:
        registry.load_version(storage, version, verify=verify)
    message = str(info.value)
    assert "v000001" in message and rel in message and "\n" not in message
    if verify:
        assert "checksum" in message


@pytest.mark.parametrize("rel", ALL_FILES)
def test_altered_byte_is_refused(storage: Storage, rel: str):
    version = registry.publish(storage, _artifacts())
    registry.load_version(storage, version)  # intact, it loads
    path = _folder(storage, version) / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(registry.CheckpointError, match=rf"v000001: {rel} fails its checksum"):
        registry.load_version(storage, version)


@pytest.mark.parametrize("mapped", [False, True])
def test_load_state_checks_model_again(storage: Storage, mapped: bool):
    version = registry.publish(storage, _artifacts())
    loaded = registry.load_version(storage, version)
    path = _folder(storage, version) / registry.MODEL
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(registry.CheckpointError, match="model.pt fails its checksum"):
        loaded.load_state(mapped=mapped)


def test_a_loaded_state_is_the_callers_to_change(storage: Storage):
    # A mapped model.pt (local disk): writing to the loaded tensors must never reach the version.
    version = registry.publish(storage, _artifacts())
    loaded = registry.load_version(storage, version)
    table = loaded.load_state(mapped=True)["state_dict"]["embedding.weight"]
    before = table.clone()
    table += 1.0
    again = registry.load_version(storage, version, verify=True).load_state()["state_dict"]["embedding.weight"]
    assert torch.equal(again, before)


def test_manifest_listing_a_missing_file_is_refused(storage: Storage):
    version = registry.publish(storage, _artifacts())
    _edit_manifest(storage, version, lambda m: m["files"].__setitem__("extra/notes.txt", "0" * 64))
    with pytest.raises(registry.CheckpointError,
                       match="v000001: extra/notes.txt is listed in manifest.json but missing"):
        registry.load_version(storage, version)


def test_deleted_file_is_refused(storage: Storage):
    version = registry.publish(storage, _artifacts())
    (_folder(storage, version) / registry.CURVE).unlink()
    with pytest.raises(registry.CheckpointError, match="curve.png is listed in manifest.json but missing"):
        registry.load_version(storage, version)
    (_folder(storage, version) / registry.SEEN).unlink()
    with pytest.raises(registry.CheckpointError, match="seen.npz"):
        registry.load_version(storage, version, verify=False)


def test_unlisted_file_is_refused(storage: Storage):
    version = registry.publish(storage, _artifacts())
    (_folder(storage, version) / "embeddings" / "stray.parquet").write_bytes(b"x")
    with pytest.raises(registry.CheckpointError, match="embeddings/stray.parquet is in the folder but not listed"):
        registry.load_version(storage, version)


def test_manifest_must_list_every_required_file(storage: Storage):
    version = registry.publish(storage, _artifacts())
    _edit_manifest(storage, version, lambda m: m["files"].pop(registry.SEEN))
    (_folder(storage, version) / registry.SEEN).unlink()
    with pytest.raises(registry.CheckpointError, match="does not list seen.npz"):
        registry.load_version(storage, version)


def test_missing_or_broken_manifest_is_refused(storage: Storage):
    version = registry.publish(storage, _artifacts())
    manifest = _folder(storage, version) / registry.MANIFEST
    good = manifest.read_bytes()

    manifest.write_text("{not json")
    with pytest.raises(registry.CheckpointError, match="v000001: manifest.json is not valid JSON"):
        registry.load_version(storage, version)

    manifest.write_bytes(good.replace(b'"v000001"', b'"v000007"'))
    with pytest.raises(registry.CheckpointError, match="names version 'v000007'"):
        registry.load_version(storage, version)

    _edit_manifest(storage, version, lambda m: m.pop("metrics"))
    with pytest.raises(registry.CheckpointError, match="missing keys"):
        registry.load_version(storage, version)

    manifest.unlink()
    with pytest.raises(registry.CheckpointError, match="v000001: manifest.json is missing"):
        registry.load_version(storage, version)
    assert registry.list_versions(storage) == []

    with pytest.raises(registry.CheckpointError, match="not a version name"):
        registry.load_version(storage, "../secrets")


def _wider_items() -> bytes:
    flat = pa.array(np.ones(N_ITEMS * 3, dtype=np.float32))
    offsets = pa.array(np.arange(0, N_ITEMS * 3 + 1, 3, dtype=np.int32))
    return _parquet(pa.table({"item_id": [f"item-{i}" for i in range(N_ITEMS)],
                              "vector": pa.ListArray.from_arrays(offsets, flat)}))


def _ragged_users() -> bytes:
    vectors = [[1.0] * DIM for _ in range(N_USERS)]
    vectors[2] = [1.0] * (DIM - 1)
    return _parquet(pa.table({"user_key": [f"u{i}" for i in range(N_USERS)],
                              "vector": pa.array(vectors, pa.list_(pa.float32()))}))


def _seen(indptr, indices) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, indptr=np.asarray(indptr, np.int64), indices=np.asarray(indices, np.int32))
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array)
    return buf.getvalue()


def _popularity(items, cats) -> bytes:
    return _parquet(pa.table({"item_idx": pa.array(items, pa.int32()), "score": pa.array([1.0] * len(items),
                              pa.float32()), "category_idx": pa.array(cats, pa.int32())}))


@pytest.mark.parametrize(("rel", "data", "expect"), [
    (registry.ITEMS, _wider_items(), "width 4, embeddings/items.parquet vectors 3"),  # format 2's vectors
    (registry.USERS, _ragged_users(), "embeddings/users.parquet: vectors do not all have the same"),
    (registry.ITEM_VECTORS, _npy(np.ones((N_ITEMS, 3), np.float32)), "width 4, embeddings/items.parquet vectors 3"),
    (registry.USER_VECTORS, _npy(np.ones((N_USERS + 1, DIM), np.float32)), "users.npy has 6 rows, its keys 5"),
    (registry.USER_VECTORS, _npy(np.ones((N_USERS, DIM), np.float64)), "users.npy holds float64"),
    (registry.USER_VECTORS, _npy(np.ones((N_USERS, DIM), np.float32, order="F")), r"\(Fortran order\)"),
    (registry.USER_VECTORS, _npy(np.ones(N_USERS * DIM, np.float32)), r"expected a float32 \[rows, width\] matrix"),
    (registry.USER_VECTORS, _npy(np.ones((N_USERS, DIM), np.float32))[:-4], "users.npy is 204 bytes"),
    (registry.USER_VECTORS, b"not an npy file", "users.npy is not a readable .npy file"),
    (registry.SEEN, _seen([0, 1, 1, 1, 1, 1], [7]), r"seen.npz: item indices outside \[0, 7\)"),
    (registry.SEEN, _seen([0, 1, 1, 1], [0]), "seen.npz: indptr has 4 entries, expected users"),
    (registry.SEEN, _seen([0, 2, 1, 1, 1, 1], [0]), "seen.npz: indptr is not a valid CSR"),
    (registry.POPULARITY, _popularity([0, 9], [0, 0]), r"item_idx outside \[0, 7\)"),
    (registry.POPULARITY, _popularity([0, 0], [0, 0]), "item_idx repeats"),
    (registry.POPULARITY, _popularity([0, 1], [0, 3]), r"category_idx outside \[-1, 3\)"),
])
def test_well_formed_files_with_wrong_shapes_are_refused(storage: Storage, rel: str, data: bytes, expect: str):
    version = registry.publish(storage, _artifacts())
    if rel in (registry.USERS, registry.ITEMS):  # a format-3 reader reads only their keys
        as_format_2(storage, version)
    _rewrite(storage, version, rel, data, fix_hash=True)
    with pytest.raises(registry.CheckpointError, match=expect):
        registry.load_version(storage, version)


def test_row_counts_must_match_node_counts(storage: Storage):
    version = registry.publish(storage, _artifacts())
    _edit_manifest(storage, version, lambda m: m["node_counts"].__setitem__("user", N_USERS + 1))
    with pytest.raises(registry.CheckpointError, match="users.parquet has 5 rows, node_counts.user is 6"):
        registry.load_version(storage, version)
    _edit_manifest(storage, version, lambda m: m["node_counts"].update(user=N_USERS, item=N_ITEMS - 1))
    with pytest.raises(registry.CheckpointError, match="items.parquet has 7 rows, node_counts.item is 6"):
        registry.load_version(storage, version)


@pytest.mark.parametrize(("override", "expect"), [
    ({"user_vectors": np.full((N_USERS, DIM), np.nan, np.float32)}, "NaN"),
    ({"item_vectors": np.ones((N_ITEMS, DIM + 1), np.float32)}, "width"),
    ({"user_keys": ["same"] * N_USERS}, "repeats"),
    ({"item_ids": ["a", "b"]}, "2 entries for 7 vectors"),
    ({"node_counts": {"user": N_USERS, "item": N_ITEMS, "category": 3}}, "brand"),
    ({"node_counts": {"user": 1, "item": N_ITEMS, "category": 3, "brand": 0}}, "1 users"),
    ({"seen_indptr": np.array([0, 1, 2])}, "seen_indptr"),
    ({"seen_indices": np.array([0, 1, 3, 6, 2, 7])}, "seen_indices"),
    ({"metrics": {"recall@20": float("nan")}}, "finite"),
    ({"k": 0}, "k must be"),
    ({"extra": {"when": object()}}, "extra is not JSON"),
    ({"coverage": {"runs": "three"}}, "invalid literal"),
    ({"popularity": {"item_idx": np.arange(3)}}, "popularity lacks"),
])
def test_invalid_artifacts_are_refused_before_writing(storage: Storage, override: dict, expect: str, monkeypatch):
    def no_writes(self, path):
        raise AssertionError(f"{path} was written for artifacts that are refused")

    monkeypatch.setattr(Storage, "write_stream", no_writes)
    with pytest.raises(ValueError, match=expect):
        registry.publish(storage, _artifacts(**override))
    monkeypatch.undo()
    assert registry.list_versions(storage) == []
    assert not Path(storage.path("checkpoints", "versions")).exists() or \
        not any(Path(storage.path("checkpoints", "versions")).iterdir())


def test_a_version_streams_into_a_bucket_and_loads_back():
    # The object-store branch of the staging writes (a real S3 protocol on loopback: moto), which local tests never
    # take: every file a stream of copied chunks, the manifest's checksums those of what landed.
    from tests.helpers import s3_bucket

    with s3_bucket("versions-bucket") as endpoint:
        bucket = Storage("s3://versions-bucket/root", endpoint, "us-east-1")
        art = _artifacts(seed=3)
        version = registry.publish(bucket, art)
        loaded = registry.load_version(bucket, version, verify=True)
        np.testing.assert_array_equal(loaded.item_vectors, art.item_vectors)
        np.testing.assert_array_equal(loaded.user_vectors, art.user_vectors)
        assert torch.equal(loaded.load_state()["state_dict"]["embedding.weight"], art.state_dict["embedding.weight"])
        assert registry.latest_version(bucket) == version


@pytest.mark.parametrize("mode", MODES)
def test_publish_refuses_what_it_could_not_write_faithfully(storage: Storage, mode: str, monkeypatch):
    original = Storage.write_stream

    class Short:
        """A file that says it wrote what it was given and drops the tail of each write."""

        def __init__(self, out):
            self.out = out

        def write(self, data):
            view = memoryview(data).cast("B")
            self.out.write(view[:-20] if len(view) > 20 else view)
            return len(view)

        def flush(self):
            self.out.flush()

    @contextlib.contextmanager
    def flaky(self, path):
        with original(self, path) as f:
            yield Short(f) if path.endswith(registry.ITEMS) else f

    monkeypatch.setattr(Storage, "write_stream", flaky)
    with pytest.raises(registry.CheckpointError, match="items.parquet fails its checksum"):
        _publish(storage, _artifacts(), mode)
    monkeypatch.undo()
    assert registry.list_versions(storage) == [] and registry.latest_version(storage) is None
    leftovers = [p.name for p in Path(storage.path("checkpoints")).iterdir()]
    assert not [n for n in leftovers if n.startswith(registry.STAGING_PREFIX)]
    assert _publish(storage, _artifacts(), mode) == "v000001"


# ---------------------------------------------------------------------------------------------- numbering


@pytest.mark.parametrize("mode", MODES)
def test_latest_only_moves_forward(storage: Storage, mode: str):
    _publish(storage, _artifacts(), mode)
    _publish(storage, _artifacts(), mode)
    # As if a concurrent publisher had already moved LATEST past the number this publish will get.
    Path(storage.path("checkpoints", "LATEST")).write_text("v000005")
    assert _publish(storage, _artifacts(), mode) == "v000003"
    assert Path(storage.path("checkpoints", "LATEST")).read_text() == "v000005"


def test_empty_version_folder_is_never_renamed_onto(storage: Storage):
    empty = _folder(storage, "v000001")
    empty.mkdir(parents=True)
    assert registry.publish(storage, _artifacts()) == "v000002"
    assert empty.is_dir() and not any(empty.iterdir())
    assert registry.list_versions(storage) == ["v000002"] and registry.latest_version(storage) == "v000002"


def test_partial_object_store_version_is_invisible_and_skipped(storage: Storage):
    version = _publish(storage, _artifacts(), "object_store")
    # An upload that died before its manifest: files present, manifest absent.
    shutil.copytree(_folder(storage, version), _folder(storage, "v000002"))
    (_folder(storage, "v000002") / registry.MANIFEST).unlink()
    assert registry.list_versions(storage) == ["v000001"]
    with pytest.raises(registry.CheckpointError, match="v000002: manifest.json is missing"):
        registry.load_version(storage, "v000002")
    assert _publish(storage, _artifacts(), "object_store") == "v000003"
    assert registry.list_versions(storage) == ["v000001", "v000003"]


def test_object_store_claim_left_by_a_crash_is_skipped(storage: Storage):
    claims = Path(storage.path("checkpoints", registry.CLAIMS))
    claims.mkdir(parents=True)
    (claims / "v000001.deadbeef").write_bytes(b"")
    assert _publish(storage, _artifacts(), "object_store") == "v000002"
    assert [p.name for p in claims.iterdir()] == ["v000001.deadbeef"]  # ours was dropped once published


def test_local_claim_survives_a_stale_number(storage: Storage, monkeypatch):
    """Whatever number the listing suggests, an existing version folder is never reused."""
    assert registry.publish(storage, _artifacts(seed=1)) == "v000001"
    empty = _folder(storage, "v000002")
    empty.mkdir()  # Linux rename would silently replace an empty directory
    monkeypatch.setattr(registry.writer, "_next_local_number", lambda versions: 1)
    assert registry.publish(storage, _artifacts(seed=3)) == "v000003"
    assert registry.publish(storage, _artifacts(seed=4)) == "v000004"
    assert registry.load_version(storage, "v000001").user_keys[0] == "user-1-0"
    assert not any(empty.iterdir())
    assert registry.list_versions(storage) == ["v000001", "v000003", "v000004"]
    assert registry.latest_version(storage) == "v000004"


def test_object_store_claims_resolve_a_collision(storage: Storage, monkeypatch):
    """Two publishers that both list before either claims pick the same number; the claim protocol must
    still give them distinct versions, each holding its own files."""
    together = threading.Barrier(2)
    calls = {"n": 0}
    lock = threading.Lock()
    original = registry.writer._object_numbers

    def listed_together(st):
        numbers = original(st)
        with lock:
            calls["n"] += 1
            first_round = calls["n"] <= 2
        if first_round:
            together.wait(timeout=30)  # both have listed; neither has claimed yet
        return numbers

    monkeypatch.setattr(registry.writer, "_object_numbers", listed_together)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(writer: int):
        try:
            results[writer] = _publish(storage, _artifacts(seed=writer, extra={"writer": writer}), "object_store")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sorted(results.values()) == ["v000001", "v000002"]
    for writer, version in results.items():
        loaded = registry.load_version(storage, version)
        assert loaded.extra == {"writer": writer}
        np.testing.assert_array_equal(loaded.user_vectors, _artifacts(seed=writer).user_vectors)
    assert registry.latest_version(storage) == "v000002"
    assert not list(Path(storage.path("checkpoints", registry.CLAIMS)).iterdir())


def _publisher(root: str, writer: int, rounds: int, mode: str, barrier, out: str) -> None:
    storage = Storage(root)
    versions = []
    barrier.wait(timeout=300)
    for seq in range(rounds):
        art = _artifacts(seed=100 * writer + seq, extra={"writer": writer, "seq": seq})
        versions.append(_publish(storage, art, mode))
    Path(out).write_text(json.dumps(versions))


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_publishers_get_distinct_increasing_versions(storage: Storage, tmp_path: Path, mode: str):
    """One spawned process and one thread publish at once while a reader polls: every version a reader lists
    loads whole, versions are distinct and increase per publisher, and LATEST ends on the highest."""
    rounds = 3
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    outs = [str(tmp_path / f"out-{w}.json") for w in (0, 1)]
    proc = ctx.Process(target=_publisher, args=(storage.root, 1, rounds, mode, barrier, outs[1]))
    errors: list[BaseException] = []
    stop = threading.Event()
    observed: list[str | None] = []
    checked: set[str] = set()

    def guarded(fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    def reader():
        while not stop.is_set():
            latest = registry.latest_version(storage)
            complete = registry.list_versions(storage)
            observed.append(latest)
            if latest is not None:
                assert latest in complete, f"LATEST names {latest}, complete versions are {complete}"
            for v in complete:
                if v not in checked:
                    registry.load_version(storage, v)  # a listed version is whole, never partial
                    checked.add(v)
            time.sleep(0.002)

    proc.start()
    threads = [threading.Thread(target=guarded, args=(_publisher, storage.root, 0, rounds, mode, barrier, outs[0])),
               threading.Thread(target=guarded, args=(reader,))]
    for t in threads:
        t.start()
    proc.join(timeout=300)
    threads[0].join(timeout=300)
    stop.set()
    threads[1].join(timeout=60)
    if proc.is_alive():
        proc.kill()
    assert not errors, errors
    assert proc.exitcode == 0

    mine, theirs = (json.loads(Path(o).read_text()) for o in outs)
    for got in (mine, theirs):
        assert [registry.version_number(v) for v in got] == sorted(registry.version_number(v) for v in got)
        assert len(set(got)) == rounds
    everything = sorted(mine + theirs, key=registry.version_number)
    assert len(set(everything)) == 2 * rounds
    assert registry.list_versions(storage) == everything
    assert registry.latest_version(storage) == everything[-1]
    if mode == "local":
        assert everything == [registry.version_name(n) for n in range(1, 2 * rounds + 1)]
        numbers = [registry.version_number(v) for v in observed if v is not None]
        assert numbers == sorted(numbers), "LATEST moved backwards"
    # Each version holds exactly what its publisher wrote: no mixing of two publishers' files.
    for writer, got in ((0, mine), (1, theirs)):
        for seq, version in enumerate(got):
            loaded = registry.load_version(storage, version)
            assert loaded.extra == {"writer": writer, "seq": seq}
            np.testing.assert_array_equal(loaded.user_vectors, _artifacts(seed=100 * writer + seq).user_vectors)
    assert not [p for p in Path(storage.path("checkpoints")).iterdir() if p.name.startswith(registry.STAGING_PREFIX)]


# ---------------------------------------------------------------------------------------------- helpers


def test_config_hash_is_canonical():
    a = registry.config_hash({"train": {"lr": 0.001, "dim": 64}, "data": {"root": "/x"}})
    b = registry.config_hash({"data": {"root": "/x"}, "train": {"dim": 64, "lr": 0.001}})
    c = registry.config_hash({"data": {"root": "/x"}, "train": {"dim": 64, "lr": 0.002}})
    assert a == b != c
    assert len(a) == 16 and int(a, 16) >= 0
    assert registry.config_hash({"root": Path("/x")}) == registry.config_hash({"root": "/x"})


def test_version_names():
    assert registry.version_name(42) == "v000042"
    assert registry.version_number("v000042") == 42
    assert registry.version_number(registry.version_name(1_234_567)) == 1_234_567
    for bad in ("v42", "000042", "v00004x", "LATEST"):
        with pytest.raises(ValueError):
            registry.version_number(bad)


def test_remove_stale_staging(storage: Storage):
    registry.publish(storage, _artifacts())
    checkpoints = Path(storage.path("checkpoints"))
    old, fresh = checkpoints / ".staging-old", checkpoints / ".staging-fresh"
    for d in (old, fresh):
        (d / "embeddings").mkdir(parents=True)
        (d / "embeddings" / "users.parquet").write_bytes(b"partial")
    long_ago = time.time() - 3 * 86400
    for p in (old, old / "embeddings", old / "embeddings" / "users.parquet"):
        os.utime(p, (long_ago, long_ago))
    assert registry.remove_stale_staging(storage, older_than_s=86400) == 1
    assert not old.exists() and fresh.exists()
    assert registry.list_versions(storage) == ["v000001"]
