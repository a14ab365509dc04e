"""The baseline of bench.ingest: a plain single-process pyarrow script, no Ray.

Same work as the pipeline: read the CSV log, validate every row with the same rules, pseudonymise users, drop
exact duplicates, map ids to dense indices, write Parquet. Everything is held in memory at once, as a simple
script would.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from datasets import schema as s
from datasets.pseudonym import pseudonymise_array, resolve_key
from datasets.shards import DEDUPE_KEY, first_occurrence
from datasets.validate import Rules, validate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ingest_baseline", description=__doc__)
    p.add_argument("--source", required=True, help="folder of events-*.csv")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    started = time.time()
    key, _ = resolve_key()
    rules = Rules()
    accepted_parts, rows, rejected = [], 0, 0
    string_types = {c: pa.string() for c in s.CANONICAL_COLUMNS}
    for path in sorted(Path(args.source).glob("events-*.csv")):
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=string_types))
        n = table.num_rows
        raw = pa.table({
            **{c: table.column(c) for c in s.CANONICAL_COLUMNS},
            s.USER_KEY: pa.nulls(n, pa.string()),
            s.SOURCE: pa.array([str(path)] * n, pa.string()),
            s.LINE: pa.array(np.arange(2, n + 2), pa.int64()),
            s.SPLIT: pa.array(["train"] * n, pa.string()),
            s.REASON: pa.nulls(n, pa.string()),
        }, schema=s.RAW_SCHEMA)
        ok, bad = validate(raw, rules)
        user_key = pseudonymise_array(ok.column(s.USER_ID), key)
        ok = ok.drop_columns([s.USER_ID, s.USER_KEY]).add_column(0, s.USER_KEY, user_key)
        accepted_parts.append(ok)
        rows += n
        rejected += bad.num_rows
    accepted = pa.concat_tables(accepted_parts)
    keep = first_occurrence(accepted.select(list(DEDUPE_KEY)))
    accepted = accepted.filter(pa.array(keep))
    for col, idx in ((s.USER_KEY, s.USER_IDX), (s.ITEM_ID, s.ITEM_IDX), (s.CATEGORY_ID, s.CATEGORY_IDX),
                     (s.BRAND_ID, s.BRAND_IDX)):
        keys = pc.unique(pc.drop_null(accepted.column(col)))
        keys = pc.take(keys, pc.array_sort_indices(keys))
        accepted = accepted.append_column(idx, pc.index_in(accepted.column(col), value_set=keys))
        pq.write_table(pa.table({s.KEY: keys, s.INDEX: pa.array(np.arange(len(keys)))}),
                       Path(args.out) / f"idmap-{col}.parquet")
    pq.write_table(accepted.drop_columns([s.SOURCE, s.LINE, s.SPLIT]), Path(args.out) / "interactions.parquet")
    print(json.dumps({"input_rows": rows, "accepted": accepted.num_rows, "rejected": rejected,
                      "duplicates": int((~keep).sum()), "seconds": round(time.time() - started, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
