"""The approximate nearest-neighbour index a version may carry over its item vectors (`index/items.faiss`).

An inverted file (faiss `IndexIVFFlat`, inner product): the item vectors clustered into about 4 x sqrt(items)
lists, a query scanning the `serve.index_nprobe` lists whose centroids score highest. Row i = item index i, written
when the version is published and listed in its manifest with its sha256 like every other file. The lists keep the
full vectors, so the scores it returns are the same dot products exact scoring computes; only which items get
looked at is approximate. A reader refuses the whole version when the file fails its checksum, does not
deserialise, or does not match the version's items (count, width, metric): a damaged index is a damaged version.
Versions without the file (small catalogues, versions from before the index) are scored exactly; versions from
before the inverted file carry an HNSW graph (`IndexHNSWFlat`), still read and searched (`search_params`).

Why an inverted file (bench.catalogue, 1M clustered items, 64 dims, shoppers drawn from three interest clusters
each): HNSW over inner product levelled off at recall@20 0.955-0.970 against exact whatever its search effort
(its walk stays in one of a shopper's clusters) and took 5 to 13 minutes to build on 2 cores; the inverted file
reached 0.979 at 128 lists and 0.992 at 256 (1.7 ms a query), built in 25 s, and is half HNSW's size.

faiss is imported only inside these functions: the registry stays importable where it is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from registry.format import INDEX, CheckpointError, one_line

SAMPLE_ROWS = 256  # rows compared between the index and the item vectors when a version is read
HNSW_EF_SEARCH = 256  # search effort for versions that carry an HNSW graph (before the inverted file)


@dataclass(frozen=True)
class IndexParams:
    lists_per_sqrt_item: float = 4.0  # lists = this x sqrt(items): about 4,000 at 1M items, 250 items each
    min_train_per_list: int = 39  # faiss's own floor for k-means; fewer items, fewer lists (one list: a scan)
    train_per_list: int = 64  # rows sampled per list to train the centroids (all rows when fewer)
    seed: int = 0  # the training sample's, so a version's index is reproducible


def lists_for(n_items: int, params: IndexParams = IndexParams()) -> int:
    return max(1, min(int(round(params.lists_per_sqrt_item * np.sqrt(n_items))), n_items // params.min_train_per_list))


def build(item_vectors: np.ndarray, params: IndexParams = IndexParams()) -> bytes:
    """The serialised index over `item_vectors` (float32 [items, d])."""
    import faiss

    x = np.ascontiguousarray(item_vectors, dtype=np.float32)
    n, d = x.shape
    nlist = lists_for(n, params)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = min(n, nlist * params.train_per_list)
    rows = np.sort(np.random.default_rng(params.seed).choice(n, sample, replace=False)) if sample < n else slice(None)
    index.train(x[rows])
    index.add(x)
    index.make_direct_map()  # row -> vector, for the reader's check against the version's vectors
    return serialize(index)


def search_params(index: Any, effort: int, fetch: int) -> Any:
    """faiss search parameters for `index` fetching `fetch` results: `effort` lists scanned (an inverted file), or
    an HNSW graph's (older versions) search effort of at least `fetch`."""
    import faiss

    if isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = max(1, min(effort, index.nlist))
        return params
    params = faiss.SearchParametersHNSW()
    params.efSearch = max(HNSW_EF_SEARCH, fetch)
    return params


def serialize(index: Any) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def parse(source: bytes | str, item_vectors: np.ndarray, label: str) -> Any:
    """The index the bytes hold, or the file at a local path (an inverted file's lists memory-mapped where they
    lie, shared by the replicas on a node like the version's vectors), checked against the version's item vectors
    (count, width, and the vectors themselves on a spread of rows); CheckpointError when it is not theirs."""
    import faiss

    try:
        # The concrete class, owned by the returned object (a downcast proxy would dangle once this one is freed).
        if isinstance(source, str):
            index = faiss.read_index(source, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        else:
            index = faiss.deserialize_index(np.frombuffer(source, dtype=np.uint8))
    except Exception as e:  # faiss raises RuntimeError from C++ for any malformed input
        raise CheckpointError(f"{label}: {INDEX} is not a readable faiss index: {one_line(e)}") from e
    if not isinstance(index, faiss.IndexIVFFlat | faiss.IndexHNSWFlat) or \
            index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise CheckpointError(f"{label}: {INDEX} is a {type(index).__name__}, expected an inner-product inverted "
                              "file (or HNSW graph)")
    n, width = item_vectors.shape
    if index.ntotal != n or index.d != width:
        raise CheckpointError(f"{label}: {INDEX} holds {index.ntotal} vectors of width {index.d}, the version "
                              f"{n} of width {width}")
    if isinstance(index, faiss.IndexIVF) and index.direct_map.type == faiss.DirectMap.NoMap:
        index.make_direct_map()
    rows = np.unique(np.linspace(0, n - 1, min(SAMPLE_ROWS, n)).astype(np.int64))
    if n and not np.array_equal(np.stack([index.reconstruct(int(r)) for r in rows]), item_vectors[rows]):
        raise CheckpointError(f"{label}: {INDEX} was built over other item vectors than the version's")
    return index
