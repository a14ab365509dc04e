"""The approximate nearest-neighbour index a version may carry over its item vectors (`index/items.faiss`).

An HNSW graph (faiss `IndexHNSWFlat`, inner product) over exactly the version's item vectors, row i = item index i,
written when the version is published and listed in its manifest with its sha256 like every other file. HNSW keeps
the full vectors, so the scores it returns are the same dot products exact scoring computes; only which items get
looked at is approximate. A reader refuses the whole version when the file fails its checksum, does not
deserialise, or does not match the version's items (count, width, metric): a damaged index is a damaged version.
Versions without the file (small catalogues, versions from before the index) are scored exactly.

faiss is imported only inside these functions: the registry stays importable where it is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from registry.format import INDEX, CheckpointError, one_line

SAMPLE_ROWS = 256  # rows compared between the index and the item vectors when a version is read


@dataclass(frozen=True)
class IndexParams:
    # Chosen on bench.catalogue's clustered vectors (100k items, ef_search 256): m 32 / ef_construction 80 reached
    # recall@20 0.966 against exact, m 48 / 120 reached 0.982 for 1.8x the build time.
    m: int = 48  # graph degree: recall at a given search effort rises with it, as does memory (m x 8 B per item)
    ef_construction: int = 120  # build effort: the build time follows it about linearly


def build(item_vectors: np.ndarray, params: IndexParams = IndexParams()) -> bytes:
    """The serialised index over `item_vectors` (float32 [items, d])."""
    import faiss

    x = np.ascontiguousarray(item_vectors, dtype=np.float32)
    index = faiss.IndexHNSWFlat(x.shape[1], params.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params.ef_construction
    index.add(x)
    return serialize(index)


def serialize(index: Any) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def parse(data: bytes, item_vectors: np.ndarray, label: str) -> Any:
    """The index the bytes hold, checked against the version's item vectors (count, width, and the vectors
    themselves on a spread of rows); CheckpointError when it is not theirs."""
    import faiss

    try:
        # The concrete class, owned by the returned object (a downcast proxy would dangle once this one is freed).
        hnsw = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except Exception as e:  # faiss raises RuntimeError from C++ for any malformed input
        raise CheckpointError(f"{label}: {INDEX} is not a readable faiss index: {one_line(e)}") from e
    if not isinstance(hnsw, faiss.IndexHNSWFlat) or hnsw.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise CheckpointError(f"{label}: {INDEX} is a {type(hnsw).__name__}, expected an inner-product HNSW index")
    n, width = item_vectors.shape
    if hnsw.ntotal != n or hnsw.d != width:
        raise CheckpointError(f"{label}: {INDEX} holds {hnsw.ntotal} vectors of width {hnsw.d}, the version "
                              f"{n} of width {width}")
    rows = np.unique(np.linspace(0, n - 1, min(SAMPLE_ROWS, n)).astype(np.int64))
    if n and not np.array_equal(np.stack([hnsw.reconstruct(int(r)) for r in rows]), item_vectors[rows]):
        raise CheckpointError(f"{label}: {INDEX} was built over other item vectors than the version's")
    return hnsw
