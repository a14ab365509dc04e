"""A version's user keys as readers hold them: one fixed-width bytes array in row order and its sort order.

A Python list of 10M keys and a dict from key to row cost about 200 bytes a shopper (1.1 GB of str objects and as
much again for the dict) and a Python loop to build; this costs the key's width plus 9 bytes (33 + 9 for a
pseudonym) and a lookup is one binary search (about 2 us at 2M keys). It is a read-only `Sequence[str | None]`:
row i is user index i, None for a deleted user's blanked row.

Each key is stored as its UTF-8 bytes followed by a 0x01 terminator: numpy's fixed-width bytes drop trailing NULs,
and the terminator keeps every key distinct from every other and from a deleted row (no bytes at all).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_END = b"\x01"
_CHUNK = 1 << 20  # keys converted per step: bounds the temporary Python bytes objects to ~70 MB


class UserKeys(Sequence[str | None]):
    __slots__ = ("_keys", "_order")

    def __init__(self, keys: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> None:
        if isinstance(keys, UserKeys):
            self._keys, self._order = keys._keys, keys._order
            return
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        arr = keys.cast(pa.string()) if isinstance(keys, pa.Array) else pa.array(list(keys), pa.string())
        ended = pc.binary_join_element_wise(arr.cast(pa.binary()), pa.scalar(_END, pa.binary()),
                                            pa.scalar(b"", pa.binary())).fill_null(b"")
        width = max(1, pc.max(pc.binary_length(ended)).as_py() or 0) if len(ended) else 1
        out = np.zeros(len(ended), f"S{width}")
        for start in range(0, len(ended), _CHUNK):
            out[start:start + _CHUNK] = ended.slice(start, _CHUNK).to_numpy(zero_copy_only=False)
        self._keys = out
        self._order = np.argsort(out, kind="stable")

    @staticmethod
    def _encode(key: str) -> bytes:
        # surrogatepass: a lone surrogate cannot be in a stored key (Arrow holds valid UTF-8), so it simply misses.
        return key.encode("utf-8", "surrogatepass") + _END

    def row(self, key: Any) -> int | None:
        """The row of `key`, None when the version does not know it (or it is not a str)."""
        if not isinstance(key, str) or not len(self._keys):
            return None
        raw = self._encode(key)
        if len(raw) > self._keys.dtype.itemsize:
            return None
        at = int(np.searchsorted(self._keys, raw, sorter=self._order))
        if at < len(self._order) and self._keys[self._order[at]] == raw:
            return int(self._order[at])
        return None

    def rows_of(self, keys: Iterable[str]) -> np.ndarray:
        """The rows of those of `keys` the version knows (int64, in no particular order)."""
        found = (self.row(k) for k in keys)
        return np.fromiter((r for r in found if r is not None), np.int64)

    def present(self, rows: np.ndarray) -> np.ndarray:
        """Per row: whether it holds a key (False for deleted users)."""
        return self._keys[rows] != b""

    def sortable(self, rows: np.ndarray) -> np.ndarray:
        """The rows' keys as fixed-width bytes, ordered as the keys' UTF-8 bytes are (ties broken by key)."""
        return self._keys[rows]

    def __len__(self) -> int:
        return len(self._keys)

    @overload
    def __getitem__(self, i: int) -> str | None: ...
    @overload
    def __getitem__(self, i: slice) -> list[str | None]: ...
    def __getitem__(self, i: int | slice) -> str | None | list[str | None]:
        if isinstance(i, slice):
            return [self._decode(raw) for raw in self._keys[i]]
        return self._decode(self._keys[i])

    @staticmethod
    def _decode(raw: bytes) -> str | None:
        return raw[:-1].decode("utf-8") if raw else None

    def __iter__(self) -> Iterator[str | None]:
        for start in range(0, len(self._keys), _CHUNK):
            yield from (self._decode(raw) for raw in self._keys[start:start + _CHUNK].tolist())

    def __contains__(self, key: object) -> bool:
        return self.row(key) is not None

    def index(self, key: Any, start: int = 0, stop: int | None = None) -> int:
        row = self.row(key)
        if row is None or row < start or (stop is not None and row >= stop):
            raise ValueError(f"{key!r} is not a user key of this version")
        return row

    def __eq__(self, other: object) -> bool:
        if isinstance(other, UserKeys):
            return bool(np.array_equal(self._keys, other._keys))
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(other) == len(self) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def to_arrow(self) -> pa.Array:
        """The keys as an Arrow string array, null for deleted rows (what a version writes); built from the bytes
        directly, without a Python object per key."""
        width = self._keys.dtype.itemsize
        parts = []
        for start in range(0, len(self._keys), _CHUNK):
            block = np.ascontiguousarray(self._keys[start:start + _CHUNK])
            raw = block.view(np.uint8).reshape(len(block), width)
            nonzero = raw != 0
            # A stored key ends with the terminator, so its length is up to the last nonzero byte.
            stored = np.where(nonzero.any(axis=1), width - np.argmax(nonzero[:, ::-1], axis=1), 0)
            lengths = np.maximum(stored - 1, 0)
            data = raw[np.arange(width)[None, :] < lengths[:, None]]
            offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
            valid = np.packbits(stored > 0, bitorder="little")
            parts.append(pa.Array.from_buffers(pa.string(), len(block), [pa.py_buffer(valid), pa.py_buffer(offsets),
                                                                         pa.py_buffer(data)]))
        return pa.concat_arrays(parts) if parts else pa.array([], pa.string())

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._order.nbytes

    def __repr__(self) -> str:
        return f"UserKeys({len(self)} keys)"
