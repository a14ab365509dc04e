"""A Ray Data datasource over planned chunks of behaviour-log files: one read task per chunk."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from core.storage import filesystem_for
from datasets.adapters import Chunk, read_chunk

# Arrow tables of raw strings take about this many times the bytes of the text they came from.
_EXPANSION = 3


class BehaviourLogDatasource(Datasource):
    def __init__(self, chunks: list[Chunk], endpoint: str | None = None, region: str | None = None) -> None:
        super().__init__()
        self._chunks = chunks
        self._endpoint = endpoint
        self._region = region

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(c.length for c in self._chunks) * _EXPANSION

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: object | None = None) -> list[ReadTask]:
        endpoint, region = self._endpoint, self._region

        def make(chunk: Chunk):
            def read() -> Iterable[pa.Table]:
                fs, _ = filesystem_for(chunk.path, endpoint, region)
                yield read_chunk(fs, chunk)

            return read

        return [
            ReadTask(make(c), BlockMetadata(num_rows=None, size_bytes=c.length * _EXPANSION, exec_stats=None,
                                            input_files=[c.path]))
            for c in self._chunks
        ]
