"""What a version carries for serving (category and brand names and vectors), and versions of older formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import registry
from bench.catalogue import as_format_2
from core.storage import Storage
from tests.registry.test_format_and_commit import DIM, MODES, _artifacts, _edit_manifest, _publish

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_root"


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(str(tmp_path / "root"))


@pytest.fixture
def legacy(tmp_path: Path) -> Storage:
    shutil.copytree(LEGACY, tmp_path / "legacy")
    return Storage(str(tmp_path / "legacy"))


def test_a_version_carries_category_and_brand_names_and_vectors(storage: Storage) -> None:
    art = _artifacts(seed=5)
    version = registry.publish(storage, art)
    loaded = registry.load_version(storage, version)
    assert loaded.format == registry.FORMAT == 3
    assert loaded.category_ids == ["cat-a", "cat-b", "cat-c"] and loaded.brand_ids == ["brand-a", "brand-b"]
    np.testing.assert_array_equal(loaded.category_vectors, art.category_vectors)
    assert loaded.brand_vectors.shape == (2, DIM) and not loaded.brand_vectors.any()  # none given: zeros
    table = pq.read_table(Path(storage.path("checkpoints", "versions", version, registry.CATEGORIES)))
    assert table.column_names == ["category_id", "vector"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"category_ids": ["only-one"]}, "category_ids has 1 entries for 3"),
    ({"brand_ids": ["b", "b"]}, "brand_ids has nulls or repeats"),
    ({"category_vectors": np.zeros((3, DIM + 1), np.float32)}, "category_vectors has shape"),
])
def test_names_and_vectors_that_do_not_fit_the_counts_are_refused_before_writing(
        storage: Storage, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        registry.publish(storage, _artifacts(**overrides))
    assert not Path(storage.path("checkpoints", "versions")).exists()


def test_a_version_missing_its_category_names_is_refused(storage: Storage) -> None:
    version = registry.publish(storage, _artifacts())
    _edit_manifest(storage, version, lambda m: m["files"].pop(registry.CATEGORIES))
    (Path(storage.path("checkpoints", "versions", version)) / registry.CATEGORIES).unlink()
    with pytest.raises(registry.CheckpointError, match="does not list embeddings/categories.parquet"):
        registry.load_version(storage, version)


def test_a_manifest_of_a_newer_format_is_refused_with_its_reason(storage: Storage) -> None:
    version = registry.publish(storage, _artifacts())
    _edit_manifest(storage, version, lambda m: m.__setitem__("format", registry.FORMAT + 1))
    with pytest.raises(registry.CheckpointError, match="newer than this code reads"):
        registry.load_version(storage, version)


def test_a_version_published_by_the_old_code_still_loads_whole(legacy: Storage) -> None:
    assert registry.latest_version(legacy) == "v000001"
    loaded = registry.load_latest(legacy)
    assert loaded.format == 1 and "format" not in loaded.manifest
    assert loaded.category_vectors is None and loaded.brand_vectors is None
    # Its category names come from the id maps it was published against, in index order.
    keys = sorted(pq.read_table(next(Path(legacy.root, "idmaps", "category").glob("*.parquet"))).to_pylist(),
                  key=lambda r: r["idx"])
    assert loaded.category_ids == [r["key"] for r in keys][: loaded.node_counts["category"]]
    assert len(loaded.brand_ids) == loaded.node_counts["brand"]
    state = loaded.load_state()
    assert state["state_dict"]["embedding.weight"].shape[0] == sum(loaded.node_counts.values())
    manifest = json.loads(Path(legacy.root, "checkpoints", "versions", "v000001", "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "embeddings/users.parquet", "embeddings/items.parquet", "seen.npz",
                                      "popularity.parquet", "curve.png"}


def test_an_old_version_whose_id_maps_are_gone_is_refused_not_half_loaded(legacy: Storage) -> None:
    shutil.rmtree(Path(legacy.root, "idmaps", "category"))
    with pytest.raises(registry.CheckpointError, match="format 1: idmaps/category does not hold"):
        registry.load_latest(legacy)


def test_a_loaded_version_publishes_again_whole_in_the_current_format(legacy: Storage) -> None:
    old = registry.load_latest(legacy)
    again = registry.load_version(legacy, registry.publish(legacy, old.artifacts()))
    assert again.version == "v000002" and again.parent == "v000001" and again.format == registry.FORMAT
    assert again.category_ids == old.category_ids and again.user_keys == old.user_keys
    np.testing.assert_array_equal(again.item_vectors, old.item_vectors)
    assert again.load_curve_png() == old.load_curve_png()


@pytest.mark.parametrize("mode", MODES)
def test_the_vectors_are_mapped_from_the_version_and_a_write_never_reaches_it(storage: Storage, mode: str) -> None:
    art = _artifacts(seed=2)
    version = _publish(storage, art, mode)
    loaded = registry.load_version(storage, version)
    folder = Path(storage.path("checkpoints", "versions", version))
    for rel, vectors, expected in ((registry.USER_VECTORS, loaded.user_vectors, art.user_vectors),
                                   (registry.ITEM_VECTORS, loaded.item_vectors, art.item_vectors)):
        assert isinstance(vectors, np.memmap) and vectors.dtype == np.float32
        np.testing.assert_array_equal(vectors, expected)
        np.testing.assert_array_equal(np.load(folder / rel), expected)  # plain .npy: readable without this code
        vectors[0] = 99.0  # copy-on-write: this process's page only
        np.testing.assert_array_equal(np.load(folder / rel)[0], expected[0])
    assert registry.load_version(storage, version).user_vectors[0].tolist() == art.user_vectors[0].tolist()


def test_a_format_2_version_loads_its_vectors_from_the_parquet_files(storage: Storage) -> None:
    art = _artifacts(seed=4)
    version = registry.publish(storage, art)
    as_format_2(storage, version)
    loaded = registry.load_version(storage, version)
    assert loaded.format == 2 and not isinstance(loaded.user_vectors, np.memmap)
    np.testing.assert_array_equal(loaded.user_vectors, art.user_vectors)
    np.testing.assert_array_equal(loaded.item_vectors, art.item_vectors)
    again = registry.load_version(storage, registry.publish(storage, loaded.artifacts()))
    assert again.format == registry.FORMAT and isinstance(again.user_vectors, np.memmap)
    np.testing.assert_array_equal(again.item_vectors, art.item_vectors)


def test_vectors_past_int32_list_offsets_are_exported_as_large_lists(storage: Storage, monkeypatch) -> None:
    import registry.format

    monkeypatch.setattr(registry.format, "LIST_VALUES_MAX", 8)  # 10M shoppers x 1,024 dims, in miniature
    art = _artifacts(seed=6)
    version = registry.publish(storage, art)
    users = pq.read_table(Path(storage.path("checkpoints", "versions", version, registry.USERS)))
    assert str(users.schema.field("vector").type) == "large_list<element: float>"
    np.testing.assert_array_equal(np.array(users["vector"].to_pylist(), np.float32), art.user_vectors)
    np.testing.assert_array_equal(registry.load_version(storage, version).user_vectors, art.user_vectors)


def test_embedding_exports_in_several_row_groups_read_back_whole(storage: Storage, monkeypatch) -> None:
    """The exports are written a few megabytes of vectors per row group; a reader sees the same table."""
    import registry.format as fmt

    monkeypatch.setattr(fmt, "_ROW_GROUP_BYTES", 4 * DIM * 2)  # two rows per group
    art = _artifacts(seed=7)
    version = registry.publish(storage, art)
    folder = Path(storage.path("checkpoints", "versions", version))
    items = pq.ParquetFile(folder / registry.ITEMS)
    assert items.metadata.num_row_groups == -(-len(art.item_ids) // 2) > 1
    loaded = registry.load_version(storage, version)
    np.testing.assert_array_equal(loaded.item_vectors, art.item_vectors)
    for rel, key, keys, vectors in ((registry.USERS, "user_key", art.user_keys, art.user_vectors),
                                    (registry.ITEMS, "item_id", art.item_ids, art.item_vectors)):
        table = pq.read_table(folder / rel)
        np.testing.assert_array_equal(np.stack(table["vector"].to_numpy(zero_copy_only=False)), vectors)
        assert table[key].to_pylist() == list(keys)
        # The vectors are stored plain (floats neither compress nor repeat); the keys keep the defaults.
        meta = pq.ParquetFile(folder / rel).metadata.row_group(0)
        vector, key_column = meta.column(1), meta.column(0)
        assert vector.compression == "UNCOMPRESSED" and "PLAIN_DICTIONARY" not in vector.encodings
        assert vector.statistics is None and key_column.compression == "SNAPPY"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_in_any_chunk_of_the_vectors_is_refused(storage: Storage, monkeypatch, value) -> None:
    import registry.format as fmt

    monkeypatch.setattr(fmt, "_COPY_CHUNK", 4 * DIM * 2)  # finiteness checked two rows at a time
    art = _artifacts(seed=8)
    art.item_vectors[-1, -1] = value  # in the last chunk
    with pytest.raises(ValueError, match="item_vectors has NaN or infinite values"):
        registry.publish(storage, art)
    assert registry.list_versions(storage) == []
