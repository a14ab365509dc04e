"""What a resident update worker prepares at start: the re-filter's Gaussian draw, guessed from the newest version, and
the rehearsal cycle it runs and throws away."""

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


def _publish_small(storage: Storage, table: torch.Tensor, **changes) -> GrowFrom:
    """Publish a version of 3 users, 4 items, 2 categories and 1 brand whose model is `table`; where it lies."""
    import numpy as np

    import registry
    from tests.registry.test_format_and_commit import _artifacts

    counts = {"user": 3, "item": 4, "category": 2, "brand": 1}
    art = _artifacts(user_keys=[f"u{i}" for i in range(3)], user_vectors=np.ones((3, 4), np.float32),
                     item_ids=[f"i{i}" for i in range(4)], item_vectors=np.ones((4, 4), np.float32),
                     seen_indptr=np.array([0, 1, 1, 2], np.int64), seen_indices=np.array([0, 3], np.int32),
                     popularity={"item_idx": np.arange(4, dtype=np.int32), "score": np.ones(4, np.float32),
                                 "category_idx": np.zeros(4, np.int32)},
                     node_counts=counts, category_ids=["c0", "c1"], brand_ids=["b0"],
                     category_vectors=np.ones((2, 4), np.float32), brand_vectors=np.ones((1, 4), np.float32),
                     state_dict={"embedding.weight": table}, **changes)
    version = registry.publish(storage, art)
    loaded = registry.load_version(storage, version)
    return GrowFrom(folder=loaded.folder, sha=loaded.manifest["files"][registry.MODEL],
                    label=registry.version_label(version), counts=counts)


def _parent_and_graph(tmp_path: Path) -> tuple[Storage, GrowFrom, torch.Tensor, SimpleNamespace, SimpleNamespace]:
    """A published parent (3 users, 4 items, 2 categories, 1 brand) and a grown graph (one more of each)."""
    import numpy as np

    table = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    storage = Storage(str(tmp_path))
    parent = _publish_small(storage, table)
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


def _published_with_graph(tmp_path: Path, monkeypatch, pairs: int) -> tuple[Storage, GrowFrom]:
    """A published version (as `_parent_and_graph`, with a trainer's hparams) and a graph of `pairs` training pairs
    that `trainers.data` hands out as the one on disk."""
    import numpy as np

    import trainers.data

    storage = Storage(str(tmp_path))
    parent = _publish_small(storage, torch.zeros(10, 4), hparams={"num_nodes": 10, "embedding_dim": 4, "num_layers": 2})
    monkeypatch.setattr(trainers.data, "load_graph", lambda _storage, **_kw: SimpleNamespace())
    monkeypatch.setattr(trainers.data, "split", lambda *_a: SimpleNamespace(train_user=np.zeros(pairs, np.int32)))
    return storage, parent


def test_the_rehearsal_is_the_newest_version_grown_and_stepped_once_on_the_newest_pairs(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """What resident workers run at start: a warm start from the newest version (read from its file, as no table
    is kept yet), scored before and after one step over a step's worth of the newest training pairs, at the
    parent's width; no fault wrapper, no deadline beyond the configured budget."""
    import numpy as np

    from trainers.resident import _newest, rehearsal
    from trainers.train import TrainOptions

    _storage, parent = _published_with_graph(tmp_path, monkeypatch, pairs=5000)
    cfg = make_config(tmp_path, train={"batch_size": 1024, "num_workers": 2, "embedding_dim": 16, "num_layers": 3})
    inputs = rehearsal(cfg, TrainOptions(), _newest(cfg))
    warm = inputs.warm
    assert warm.init_state == parent and warm.init_state.kept is None
    assert warm.steps == 1 and warm.eval_parent and not warm.refilter and warm.trainable is None
    assert np.array_equal(warm.pair_index, np.arange(5000 - 2048, 5000))
    assert (inputs.train.embedding_dim, inputs.train.num_layers, inputs.train.epochs) == (4, 2, 1)
    assert inputs.train.lr == cfg.update.lr and inputs.refit is None and inputs.session_wrapper is None
    _published_with_graph(tmp_path / "small", monkeypatch, pairs=300)
    small = make_config(tmp_path / "small")
    assert np.array_equal(rehearsal(small, TrainOptions(), _newest(small)).warm.pair_index, np.arange(300))


def test_no_rehearsal_without_a_readable_version_and_graph_and_the_start_goes_on(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """Nothing published, an object store, no training pairs, a model.pt that fails its check, or no graph: no
    rehearsal (the first cycle runs cold), and nothing raised."""
    import registry
    import trainers.data
    from trainers.data import GraphMissingError
    from trainers.resident import _newest, rehearsal
    from trainers.train import TrainOptions

    opts = TrainOptions()
    assert rehearsal(make_config(tmp_path / "empty"), opts, _newest(make_config(tmp_path / "empty"))) is None
    storage, parent = _published_with_graph(tmp_path, monkeypatch, pairs=0)
    cfg = make_config(tmp_path)
    newest = _newest(cfg)
    assert rehearsal(cfg, opts, newest) is None  # no training pairs
    assert rehearsal(cfg, opts, (SimpleNamespace(is_local=False), *newest[1:])) is None
    _published_with_graph(tmp_path / "nograph", monkeypatch, pairs=10)

    def missing(_storage, **_kw):
        raise GraphMissingError("no graph under graph/")

    monkeypatch.setattr(trainers.data, "load_graph", missing)
    nograph = make_config(tmp_path / "nograph")
    assert rehearsal(nograph, opts, _newest(nograph)) is None
    _published_with_graph(tmp_path / "damaged", monkeypatch, pairs=10)
    damaged = make_config(tmp_path / "damaged")
    newest = _newest(damaged)
    model = Path(damaged.data.root) / "checkpoints" / "versions" / newest[1] / registry.MODEL
    model.write_bytes(model.read_bytes()[:-1] + b"x")
    assert rehearsal(damaged, opts, newest) is None
