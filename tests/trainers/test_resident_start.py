"""What a resident update worker prepares at start: the re-filter's Gaussian draw, guessed from the newest version."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.storage import Storage
from tests.helpers import N_CATS, N_ITEMS, N_USERS, make_config, publish_toy_version
from trainers import loop
from trainers.resident import first_draw
from trainers.spectral import filter_rank, sketch_width
from trainers.worker_inputs import GrowFrom

FILTER = {"init": "spectral", "spectral_filter": 3.5, "embedding_dim": 8, "seed": 7}


def test_the_first_draw_is_the_newest_versions_item_block(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, train=FILTER)
    assert first_draw(cfg) is None  # nothing published: the first cycle is a full training
    publish_toy_version(Storage(str(tmp_path)), seed=1)
    k = filter_rank(8, N_USERS + N_CATS, N_ITEMS)
    assert first_draw(cfg) == (N_ITEMS, sketch_width(k), 7) == (N_ITEMS, 16, 7)


@pytest.mark.parametrize("sections", [
    {"train": {**FILTER, "init": "normal"}},
    {"train": {**FILTER, "spectral_filter": None}},  # the exact SVD draws nothing
    {"train": FILTER, "update": {"refilter_above": 1.5}},  # no cycle re-filters
])
def test_no_draw_is_guessed_where_no_cycle_would_make_one(tmp_path: Path, sections: dict) -> None:
    publish_toy_version(Storage(str(tmp_path)), seed=1)
    assert first_draw(make_config(tmp_path, **sections)) is None


def test_an_unreadable_newest_version_guesses_nothing(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    version = publish_toy_version(storage, seed=1)
    (tmp_path / "checkpoints" / "versions" / version / "manifest.json").write_text("{not json")
    assert first_draw(make_config(tmp_path, train=FILTER)) is None


def test_a_worker_warmed_up_with_a_draw_keeps_it_for_its_first_refilter(monkeypatch) -> None:
    monkeypatch.setattr(loop, "_KEPT", loop._Kept())
    loop.warm_up((100, 32, 7))
    kept = loop._KEPT.draws
    assert kept is not None and kept._drawn == 100
    rows = kept.draw(100, 32, 7)
    expected = torch.randn(110, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    assert torch.equal(rows, expected[:100])
    assert torch.equal(kept.draw(110, 32, 7), expected)  # ten new items: only their rows are drawn


@pytest.mark.parametrize("predraw", [None, (100, 20, 7), (10**9, 32, 7)])
def test_a_draw_that_would_not_be_kept_is_not_made_at_start(monkeypatch, predraw) -> None:
    """No guess, a width torch draws otherwise (20), or one past the bound: nothing drawn, nothing held."""
    monkeypatch.setattr(loop, "_KEPT", loop._Kept())
    loop.warm_up(predraw)
    assert loop._KEPT.draws is not None and loop._KEPT.draws._drawn == 0


def _parent_and_graph(tmp_path: Path) -> tuple[Storage, GrowFrom, torch.Tensor, SimpleNamespace, SimpleNamespace]:
    """A published parent (3 users, 4 items, 2 categories, 1 brand) and a grown graph (one more of each)."""
    import numpy as np

    import registry
    from tests.registry.test_format_and_commit import _artifacts

    counts = {"user": 3, "item": 4, "category": 2, "brand": 1}
    table = torch.randn(sum(counts.values()), 4, generator=torch.Generator().manual_seed(3))
    storage = Storage(str(tmp_path))
    art = _artifacts(user_keys=[f"u{i}" for i in range(3)], user_vectors=np.ones((3, 4), np.float32),
                     item_ids=[f"i{i}" for i in range(4)], item_vectors=np.ones((4, 4), np.float32),
                     seen_indptr=np.array([0, 1, 1, 2], np.int64), seen_indices=np.array([0, 3], np.int32),
                     popularity={"item_idx": np.arange(4, dtype=np.int32), "score": np.ones(4, np.float32),
                                 "category_idx": np.zeros(4, np.int32)},
                     node_counts=counts, category_ids=["c0", "c1"], brand_ids=["b0"],
                     category_vectors=np.ones((2, 4), np.float32), brand_vectors=np.ones((1, 4), np.float32),
                     state_dict={"embedding.weight": table})
    version = registry.publish(storage, art)
    loaded = registry.load_version(storage, version)
    parent = GrowFrom(folder=loaded.folder, sha=loaded.manifest["files"][registry.MODEL], label=version,
                      counts=counts)
    graph = SimpleNamespace(num_users=4, num_items=5, num_categories=3, num_brands=2,
                            ic_item=np.array([0, 4, 4]), ic_cat=np.array([0, 2, 1]), ib_item=np.array([4]),
                            ib_brand=np.array([1]))
    sp = SimpleNamespace(train_user=np.array([0, 3, 3]), train_item=np.array([1, 2, 4]))
    return storage, parent, table, graph, sp


def test_a_kept_table_grows_to_the_same_bits_as_the_parents_file(tmp_path: Path, monkeypatch) -> None:
    """A resident worker grows the parent from the table it kept when the driver says the parent is that table
    (`GrowFrom.kept` naming the cycle it kept it from); the result is the file's growth, and the file is not read.
    Any other cycle, or no word from the driver, reads the file; either way the kept table is let go."""
    from dataclasses import replace

    from trainers.model import InterestGCN

    storage, parent, table, graph, sp = _parent_and_graph(tmp_path)
    monkeypatch.setattr(loop, "_KEPT", loop._Kept())
    nodes = 4 + 5 + 3 + 2

    def grown(grow_from: GrowFrom) -> torch.Tensor:
        model = InterestGCN(nodes, 4, 2, initialise=False)
        loop._grow_parent(model, grow_from, storage, graph, sp)
        return model.embedding.weight.detach().clone()

    from_file = grown(parent)
    loop.warm_up()
    loop.keep_table(table.clone(), cycle=7)
    import registry.reader

    def no_read(*args, **kwargs):
        raise AssertionError("the parent's file was read")

    with monkeypatch.context() as m:
        m.setattr(registry.reader, "load_model", no_read)
        assert torch.equal(grown(replace(parent, kept=7)), from_file)
    assert loop._KEPT.table is None
    for kept_word in (None, 6):
        loop.keep_table(table.clone(), cycle=7)
        assert torch.equal(grown(replace(parent, kept=kept_word)), from_file) and loop._KEPT.table is None


def test_only_a_resident_worker_keeps_its_table_and_only_within_the_bound(monkeypatch) -> None:
    monkeypatch.setattr(loop, "_KEPT", loop._Kept())
    loop.keep_table(torch.zeros(3, 2), cycle=1)
    assert loop._KEPT.table is None  # a one-shot training keeps nothing
    loop.warm_up()
    loop.keep_table(torch.zeros(3, 2), cycle=1)
    assert loop._KEPT.table_cycle == 1
    monkeypatch.setattr(loop, "KEEP_TABLE_MAX_BYTES", 20)
    loop.keep_table(torch.zeros(3, 2), cycle=2)
    assert loop._KEPT.table is None and loop._KEPT.table_cycle is None


def test_the_driver_names_a_kept_table_only_for_the_version_published_from_it_as_it_was() -> None:
    """`GrowFrom.kept` names the cycle whose checkpoint became the parent unchanged: not another version, not one
    with a deleted user blanked in it, and not once a later cycle published something else."""
    from trainers.resident import ResidentTrainer

    resident = ResidentTrainer(make_config(Path("/nonexistent"), train=FILTER), None)
    assert resident.kept_cycle("v000001") is None  # nothing published from these workers yet
    resident._cycle = 5
    resident.note_published("v000002", as_trained=True)
    assert resident.kept_cycle("v000002") == 5 and resident.kept_cycle("v000001") is None
    resident._cycle = 6
    resident.note_published("v000003", as_trained=False)  # blanked: model.pt is not the workers' table
    assert resident.kept_cycle("v000003") is None and resident.kept_cycle("v000002") is None


def test_a_table_preloaded_at_start_is_the_newest_versions_and_grows_the_first_parent_without_its_file(
        tmp_path: Path, monkeypatch) -> None:
    """The driver names the newest version (`first_parent`); each worker reads its table at start, checked, and
    keeps it under PRELOADED; the first cycle, told so (`GrowFrom.kept`), grows that table to the file's bits."""
    from dataclasses import replace

    import registry
    import registry.reader
    from trainers.model import InterestGCN
    from trainers.resident import first_parent

    storage, parent, table, graph, sp = _parent_and_graph(tmp_path)
    assert first_parent(make_config(tmp_path / "empty")) is None  # nothing published: nothing to preload
    version, named = first_parent(make_config(tmp_path))
    assert version == parent.label and named == replace(parent, label=registry.version_label(version))
    monkeypatch.setattr(loop, "_KEPT", loop._Kept())
    loop.preload_table(storage, named)
    assert loop._KEPT.table is None  # not a resident worker: nothing read, nothing held
    loop.warm_up()
    loop.preload_table(storage, named)
    assert loop._KEPT.table_cycle == loop.PRELOADED and torch.equal(loop._KEPT.table, table)

    def grown(grow_from: GrowFrom) -> torch.Tensor:
        model = InterestGCN(4 + 5 + 3 + 2, 4, 2, initialise=False)
        loop._grow_parent(model, grow_from, storage, graph, sp)
        return model.embedding.weight.detach().clone()

    with monkeypatch.context() as m:
        m.setattr(registry.reader, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("file read")))
        from_memory = grown(replace(parent, kept=loop.PRELOADED))
    assert torch.equal(from_memory, grown(parent)) and loop._KEPT.table is None


def test_a_damaged_or_vanished_newest_version_preloads_nothing_and_the_worker_starts(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    from dataclasses import replace

    storage, parent, _table, _graph, _sp = _parent_and_graph(tmp_path)
    monkeypatch.setattr(loop, "_KEPT", loop._Kept())
    loop.warm_up()
    loop.preload_table(storage, replace(parent, sha="0" * 64))  # the file does not match its manifest
    assert loop._KEPT.table is None
    loop.preload_table(storage, replace(parent, folder=str(tmp_path / "pruned")))
    assert loop._KEPT.table is None
    loop.preload_table(storage, replace(parent, counts={**parent.counts, "item": 5}))  # not the table named
    assert loop._KEPT.table is None
    monkeypatch.setattr(loop, "KEEP_TABLE_MAX_BYTES", 16)
    loop.preload_table(storage, parent)
    assert loop._KEPT.table is None
