"""user_key = HMAC-SHA256(key, utf8(raw user id)), hex, first 32 characters (DESIGN 3.4)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

KEY_ENV = "IG_PSEUDONYM_KEY"
# Only for development: anyone who reads this file can reverse pseudonyms made with it.
DEV_KEY = "interest-graph-development-key-do-not-use-in-production"
KEY_LENGTH = 32

log = logging.getLogger(__name__)


class DevKeyError(RuntimeError):
    pass


def resolve_key(allow_dev_key: bool = True) -> tuple[bytes, bool]:
    """The pseudonym key from the environment, and whether it is the development default."""
    value = os.environ.get(KEY_ENV)
    if value:
        return value.encode(), False
    if not allow_dev_key:
        raise DevKeyError(f"{KEY_ENV} is not set and privacy.allow_dev_key is false")
    log.warning(
        "%s is not set: using the DEVELOPMENT pseudonym key; user pseudonyms are NOT private. "
        "Set %s before handling real users.",
        KEY_ENV,
        KEY_ENV,
    )
    return DEV_KEY.encode(), True


def pseudonymise(raw_user_id: str, key: bytes) -> str:
    # surrogatepass: a Python str may hold lone surrogates (JSON "\ud800"); valid text encodes exactly as UTF-8, and
    # such an id still gets a stable key instead of an exception (ingestion and the API refuse it as invalid_utf8).
    return hmac.new(key, raw_user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:KEY_LENGTH]


def _shard_of(user_key: str | None, shards: int) -> int:
    try:
        return int(user_key[:8], 16) % shards  # type: ignore[index]
    except (TypeError, ValueError):
        pass
    # Not a pseudonym (validation refuses such keys before anything is stored): any stable shard will do.
    text = "" if user_key is None else str(user_key)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:4], "big") % shards


def shard_of_keys(user_keys: list[str], shards: int) -> np.ndarray:
    """The shard of each user key: ingestion's interaction shards and serving's live-state shards both use it."""
    # The pseudonym is already a uniform hash, so its leading bits spread users evenly.
    try:
        return np.array([int(k[:8], 16) % shards for k in user_keys], dtype=np.int32)
    except (TypeError, ValueError):  # something that is no pseudonym: never an exception, key by key
        return np.array([_shard_of(k, shards) for k in user_keys], dtype=np.int32)


def pseudonymise_array(raw: pa.Array | pa.ChunkedArray, key: bytes) -> pa.Array:
    """Vectorised over an arrow string array: each distinct id is hashed once; nulls stay null."""
    encoded = pc.dictionary_encode(raw)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    keys = pa.array([pseudonymise(v, key) for v in encoded.dictionary.to_pylist()], pa.string())
    return pc.take(keys, encoded.indices)
