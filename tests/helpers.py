"""Small helpers shared by tests (no Ray work shipped from here)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from cluster.config import AppConfig, parse_config


def make_config(root: Path, **sections: dict) -> AppConfig:
    raw: dict = {"data": {"root": str(root), "shards": 4, **sections.pop("data", {})}}
    raw.update(sections)
    return parse_config(raw, source="test")


def read_dir(path: Path):
    files = sorted(p for p in path.rglob("*.parquet"))
    if not files:
        return None
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def write_config(path: Path, root: str, **sections: dict) -> Path:
    """A ray_config.yaml for a test: data.root plus the given sections."""
    import yaml

    raw: dict = {"data": {"root": root, "shards": 4}}
    raw.update(sections)
    path.write_text(yaml.safe_dump(raw))
    return path
