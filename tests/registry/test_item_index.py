"""The approximate index a version carries: published with its checksum, verified against the version's item
vectors on every read, refused with the version when damaged; versions without one load as before."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import registry
from core.storage import Storage
from registry.item_index import build
from tests.helpers import make_config, publish_toy_version
from tests.registry.test_format_and_commit import _artifacts

DIM = 4  # the width _artifacts uses


def _version_dir(storage: Storage, version: str) -> Path:
    return Path(storage.path("checkpoints", "versions", version))


def _rewrite_index(storage: Storage, version: str, data: bytes) -> None:
    """Replace the index file and fix its checksum in the manifest: damage a checksum alone cannot catch."""
    folder = _version_dir(storage, version)
    (folder / registry.INDEX).write_bytes(data)
    manifest = json.loads((folder / registry.MANIFEST).read_text())
    manifest["files"][registry.INDEX] = hashlib.sha256(data).hexdigest()
    (folder / registry.MANIFEST).write_text(json.dumps(manifest))


def test_a_version_carries_its_index_and_a_republish_keeps_it(tmp_path: Path) -> None:
    import faiss

    storage = Storage(str(tmp_path / "root"))
    art = _artifacts()
    version = registry.publish(storage, _artifacts(item_index=build(art.item_vectors)))
    loaded = registry.load_version(storage, version)
    assert registry.INDEX in loaded.manifest["files"]
    assert loaded.item_index.ntotal == len(loaded.item_ids)
    # Its lists are mapped from the version's file (shared by a node's replicas), not read into the process.
    assert isinstance(faiss.downcast_InvertedLists(loaded.item_index.invlists), faiss.OnDiskInvertedLists)
    _, found = loaded.item_index.search(loaded.item_vectors[:1], 1)
    assert found[0][0] == int(np.argmax(loaded.item_vectors @ loaded.item_vectors[0]))
    again = registry.publish(storage, loaded.artifacts())  # e.g. a version with deleted users blanked
    assert registry.load_version(storage, again).item_index.ntotal == len(loaded.item_ids)
    assert (_version_dir(storage, again) / registry.INDEX).read_bytes() == \
        (_version_dir(storage, version) / registry.INDEX).read_bytes()  # the published bytes, not the mapped lists


def test_a_version_without_an_index_loads_with_none(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    loaded = registry.load_version(storage, registry.publish(storage, _artifacts()))
    assert loaded.item_index is None and registry.INDEX not in loaded.manifest["files"]


@pytest.mark.parametrize("damage", ["flipped byte", "garbage with its checksum", "another version's index"])
def test_a_damaged_index_is_refused_with_its_version(tmp_path: Path, damage: str) -> None:
    storage = Storage(str(tmp_path / "root"))
    good = registry.publish(storage, _artifacts(item_index=build(_artifacts().item_vectors)))
    art = _artifacts(seed=1, parent=good)
    bad = registry.publish(storage, _artifacts(seed=1, parent=good, item_index=build(art.item_vectors)))
    path = _version_dir(storage, bad) / registry.INDEX
    if damage == "flipped byte":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        why = "checksum"
    elif damage == "garbage with its checksum":
        _rewrite_index(storage, bad, b"not an index at all" * 10)
        why = "not a readable faiss index"
    else:
        _rewrite_index(storage, bad, (_version_dir(storage, good) / registry.INDEX).read_bytes())
        why = "other item vectors"
    with pytest.raises(registry.CheckpointError, match=why):
        registry.load_version(storage, bad)
    served, refused = registry.load_newest_good(storage)
    assert served is not None and served.version == good and why in refused[bad]


def test_publishing_builds_the_index_from_the_configured_catalogue_size(tmp_path: Path) -> None:
    from trainers.publish import publish_and_prune

    storage = Storage(str(tmp_path / "root"))
    art = _artifacts()
    n_items = len(art.item_ids)
    small = publish_and_prune(make_config(tmp_path / "root", serve={"index_min_items": n_items + 1}), storage, art)
    assert registry.load_version(storage, small[0]).item_index is None
    large = publish_and_prune(make_config(tmp_path / "root", serve={"index_min_items": n_items}), storage,
                              _artifacts(parent=small[0]))
    assert registry.load_version(storage, large[0]).item_index.ntotal == n_items


def test_the_toy_publisher_builds_an_index_when_asked(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path / "root"))
    version = publish_toy_version(storage, seed=1, index=True)
    assert registry.load_version(storage, version).item_index is not None


def test_a_version_from_before_the_inverted_file_keeps_its_hnsw_graph_and_is_searched_with_it(tmp_path: Path) -> None:
    import faiss

    from registry.item_index import search_params, serialize

    art = _artifacts()
    graph = faiss.IndexHNSWFlat(DIM, 16, faiss.METRIC_INNER_PRODUCT)  # what versions carried before
    graph.add(np.ascontiguousarray(art.item_vectors, dtype=np.float32))
    storage = Storage(str(tmp_path / "root"))
    loaded = registry.load_version(storage, registry.publish(storage, _artifacts(item_index=serialize(graph))))
    assert isinstance(loaded.item_index, faiss.IndexHNSWFlat)
    _, found = loaded.item_index.search(loaded.item_vectors[:1], 1, params=search_params(loaded.item_index, 8, 1))
    assert found[0][0] == int(np.argmax(loaded.item_vectors @ loaded.item_vectors[0]))


def test_the_inverted_file_has_about_four_lists_per_root_item_and_never_fewer_than_faiss_trains(tmp_path: Path) -> None:
    from registry.item_index import lists_for

    assert lists_for(1_000_000) == 4000 and lists_for(100_000) == 1265
    assert lists_for(4000) == 4000 // 39 and lists_for(10) == 1 and lists_for(0) == 1
