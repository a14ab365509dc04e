"""The canonical event schema and the column names every stage shares (DESIGN 3.1)."""

from __future__ import annotations

from typing import get_args

import pyarrow as pa

from core.config import CanonicalColumn, EventName

USER_ID = "user_id"  # raw id, only between reading and validation
USER_KEY = "user_key"  # pseudonym that replaces it before anything is written
ITEM_ID = "item_id"
EVENT = "event"
TS = "ts"
CATEGORY_ID = "category_id"
BRAND_ID = "brand_id"
PRICE = "price"
SESSION_ID = "session_id"

CANONICAL_COLUMNS: tuple[str, ...] = get_args(CanonicalColumn)  # the config's vocabulary, in schema order
ID_COLUMNS = (USER_ID, ITEM_ID, CATEGORY_ID, BRAND_ID, SESSION_ID)

EVENT_TYPES: tuple[str, ...] = get_args(EventName)
EVENT_CODE = {name: code for code, name in enumerate(EVENT_TYPES)}
# Source vocabularies that map onto the canonical events (Taobao's pv/buy and common synonyms).
EVENT_SYNONYMS = {
    "pv": "view",
    "buy": "purchase",
    "order": "purchase",
    "add_to_cart": "cart",
    "favorite": "fav",
    "favourite": "fav",
}

# Provenance carried with every row so a reject can say where it came from.
SOURCE = "source"
LINE = "line"
SPLIT = "split"  # "train" or "holdout"
REASON = "reason"
DETAIL = "detail"


class Reason:
    """Reject reason codes, one per validation rule."""

    BAD_LINE = "bad_line"  # wrong column count or unparsable line
    MISSING_USER = "missing_user"
    MISSING_ITEM = "missing_item"
    MISSING_EVENT = "missing_event"
    UNKNOWN_EVENT = "unknown_event"
    BAD_TIMESTAMP = "bad_timestamp"  # unparsable
    TIMESTAMP_TOO_OLD = "timestamp_too_old"  # before 2000
    TIMESTAMP_IN_FUTURE = "timestamp_in_future"  # more than data.max_future_s ahead
    ID_TOO_LONG = "id_too_long"
    INVALID_UTF8 = "invalid_utf8"
    BAD_PRICE = "bad_price"  # negative or not a number
    DELETED_USER = "deleted_user"  # tombstoned by DELETE /users
    BAD_USER_KEY = "bad_user_key"  # a given (already pseudonymised) user_key that is not 32 lowercase hex characters
    UNREADABLE = "unreadable"  # a chunk or block that could not be processed at all; the detail says why


ALL_REASONS = tuple(v for k, v in vars(Reason).items() if not k.startswith("_"))

MIN_TS_MS = 946_684_800_000  # 2000-01-01T00:00:00Z

# Raw rows as adapters produce them: every field still a string (or null), before validation. `user_key` is set
# only for rows whose user was pseudonymised before they were written (files that POST /events flushes to raw/live/),
# so no raw user id from the live API is ever stored.
RAW_SCHEMA = pa.schema(
    [(c, pa.string()) for c in CANONICAL_COLUMNS]
    + [(USER_KEY, pa.string()), (SOURCE, pa.string()), (LINE, pa.int64()), (SPLIT, pa.string()),
       (REASON, pa.string())]
)

# Accepted rows under interactions/ (and holdout/).
INTERACTION_SCHEMA = pa.schema(
    [
        (USER_KEY, pa.string()),
        (ITEM_ID, pa.string()),
        (EVENT, pa.string()),
        (TS, pa.timestamp("ms", tz="UTC")),
        (CATEGORY_ID, pa.string()),
        (BRAND_ID, pa.string()),
        (PRICE, pa.float64()),
        (SESSION_ID, pa.string()),
    ]
)

# Rows under rejects/: the user id only as its pseudonym, never raw.
REJECT_SCHEMA = pa.schema(
    [
        (REASON, pa.string()),
        (DETAIL, pa.string()),
        (SOURCE, pa.string()),
        (LINE, pa.int64()),
        (USER_KEY, pa.string()),
        (ITEM_ID, pa.string()),
        (EVENT, pa.string()),
        (TS, pa.string()),
        (CATEGORY_ID, pa.string()),
        (BRAND_ID, pa.string()),
        (PRICE, pa.string()),
    ]
)

NODE_TYPES = ("user", "item", "category", "brand")
KEY = "key"
INDEX = "idx"
IDMAP_SCHEMA = pa.schema([(KEY, pa.string()), (INDEX, pa.int64())])

# graph/ files: what ingestion builds and the trainer reads (folder names of data.root are in core.storage).
GRAPH_META = "meta.json"  # watermark, formats, node counts, edge count, weights used
UI_EDGES = "user_item"  # folder of one Parquet file per shard
ITEM_CATEGORY_FILE = "item_category.parquet"
ITEM_BRAND_FILE = "item_brand.parquet"

# graph/ edge lists the trainer reads.
USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
CATEGORY_IDX = "category_idx"
BRAND_IDX = "brand_idx"
WEIGHT = "weight"
COUNT = "count"
FIRST_TS = "first_ts"
LAST_TS = "last_ts"
LAST_RUN = "last_run"  # arrival: the last ingestion run (1-based, in commit order) that brought the pair an event
WEIGHT_RECENT = "weight_recent"  # the same sum decayed with data.recent_half_life_days: where interest is heading
EVENT_COUNTS = tuple(f"n_{e}" for e in EVENT_TYPES)  # the pair's events by type (n_view, ..., n_purchase)
USER_ITEM_EDGE_SCHEMA = pa.schema(
    [
        (USER_IDX, pa.int64()),
        (ITEM_IDX, pa.int64()),
        (WEIGHT, pa.float32()),
        (COUNT, pa.int32()),
        (FIRST_TS, pa.timestamp("ms", tz="UTC")),
        (LAST_TS, pa.timestamp("ms", tz="UTC")),
        (LAST_RUN, pa.int32()),
        (WEIGHT_RECENT, pa.float32()),
        *[(name, pa.int32()) for name in EVENT_COUNTS],
    ]
)
ITEM_CATEGORY_SCHEMA = pa.schema([(ITEM_IDX, pa.int64()), (CATEGORY_IDX, pa.int64())])
ITEM_BRAND_SCHEMA = pa.schema([(ITEM_IDX, pa.int64()), (BRAND_IDX, pa.int64())])
