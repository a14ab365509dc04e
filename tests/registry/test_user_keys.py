"""A version's user keys as readers hold them (registry.UserKeys), and its seen lists memory-mapped from local disk:
what a replica at 10M shoppers relies on, checked against the plain list and dict they replace."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import registry
from core.storage import Storage
from registry.format import CheckpointError, mapped_npz, parse_seen
from registry.user_keys import UserKeys
from tests.registry.test_format_and_commit import N_USERS, _artifacts, _folder

keys_lists = st.lists(st.text(max_size=12), max_size=40, unique=True).flatmap(
    lambda keys: st.lists(st.booleans(), min_size=len(keys), max_size=len(keys)).map(
        lambda deleted: [None if d else k for k, d in zip(keys, deleted, strict=True)]))


@settings(max_examples=200, deadline=None)
@given(keys=keys_lists, probes=st.lists(st.text(max_size=12), max_size=10))
def test_user_keys_answer_as_the_list_and_dict_they_replace(keys: list[str | None], probes: list[str]) -> None:
    mapped = UserKeys(keys)
    rows = {k: i for i, k in enumerate(keys) if k is not None}
    assert len(mapped) == len(keys) and list(mapped) == keys and mapped == keys
    assert [mapped[i] for i in range(len(keys))] == keys and mapped[1:3] == keys[1:3]
    for key in [*keys, *probes, "", "\x00", "a\x00"]:
        if key is not None:
            assert mapped.row(key) == rows.get(key), key
            assert (key in mapped) == (key in rows)
    assert mapped.to_arrow().to_pylist() == keys
    assert UserKeys(mapped.to_arrow()) == mapped
    assert pickle.loads(pickle.dumps(mapped)) == mapped
    rows_arr = np.arange(len(keys), dtype=np.int64)
    assert mapped.present(rows_arr).tolist() == [k is not None for k in keys]


def test_user_keys_refuse_what_is_not_a_key() -> None:
    mapped = UserKeys(["u0", None, "u2"])
    assert mapped.row(None) is None and mapped.row(7) is None and mapped.row("u0" * 100) is None
    assert mapped.row("\ud800") is None  # a lone surrogate cannot be a stored key; it misses, it does not raise
    with pytest.raises(ValueError):
        mapped.index("nobody")
    assert mapped.index("u2") == 2 and UserKeys([]).row("u0") is None


def test_a_local_version_maps_its_seen_lists_and_reads_as_from_bytes(tmp_path) -> None:
    storage = Storage(str(tmp_path))
    art = _artifacts(seed=3, seen_evidence={
        "weight": np.arange(6, dtype=np.float32), "weight_recent": np.ones(6, np.float32),
        "counts": np.arange(30, dtype=np.int32).reshape(6, 5), "last_ts": np.arange(6, dtype=np.int64)})
    version = registry.publish(storage, art)
    loaded = registry.load_version(storage, version)
    assert isinstance(loaded.user_keys, UserKeys) and loaded.user_keys == art.user_keys
    for array in (loaded.seen_indptr, loaded.seen_indices, *loaded.seen_evidence.values()):
        assert isinstance(array, np.memmap) and not array.flags.writeable
    path = _folder(storage, version) / registry.SEEN
    from_bytes = parse_seen(path.read_bytes(), N_USERS, 7, "test")
    assert np.array_equal(from_bytes[0], loaded.seen_indptr) and np.array_equal(from_bytes[1], loaded.seen_indices)
    for name, values in art.seen_evidence.items():
        assert np.array_equal(loaded.seen_evidence[name], values) and np.array_equal(from_bytes[2][name], values)


def test_a_compressed_npz_is_read_into_memory_and_a_truncated_one_refused(tmp_path) -> None:
    arrays = {"indptr": np.array([0, 1, 3], np.int64), "indices": np.array([2, 0, 1], np.int32)}
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, **arrays)
    got = mapped_npz(str(compressed))
    assert not isinstance(got["indices"], np.memmap) and np.array_equal(got["indices"], arrays["indices"])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    whole = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(whole)) as z:
        info = z.getinfo("indices.npy")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(whole[: info.header_offset + 30 + len("indices.npy") + 64 + 4])  # inside its data
    with pytest.raises(CheckpointError, match="not a readable npz"):
        parse_seen(str(truncated), 2, 3, "test")


def test_user_keys_from_arrow_chunks_keep_deleted_rows() -> None:
    chunked = pa.chunked_array([pa.array(["a", None]), pa.array(["b"])])
    mapped = UserKeys(chunked)
    assert list(mapped) == ["a", None, "b"] and mapped.row("b") == 2 and mapped.present(np.array([1]))[0] == np.False_
