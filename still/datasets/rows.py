"""Reading row ranges of Parquet files: what a shard of a store is made of.

A shard's rows are named by pieces ``[file_index, start, stop]`` (rows ``start`` to
``stop`` of file ``file_index`` of the dataset, files in sorted order). Only the
row groups that overlap a piece are read, batch by batch, and reading stops at the
piece's end, so a small piece of a file with million-row groups decodes at most the
pages up to its last row instead of whole row groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_BATCH_ROWS = 8192


def read_rows(fs: pafs.FileSystem, paths: Sequence[str], pieces: Sequence[Sequence[int]],
              columns: Sequence[str]) -> pa.Table:
    """Reads the rows that ``pieces`` name, in order, as one table.

    Args:
        fs: The files' pyarrow filesystem.
        paths: The dataset's files, in the order ``file_index`` counts them.
        pieces: ``[file_index, start, stop]`` row ranges.
        columns: Columns to read.
    """
    tables = []
    for file_index, start, stop in pieces:
        with fs.open_input_file(paths[file_index]) as handle:
            tables.append(_read_range(pq.ParquetFile(handle), int(start), int(stop), list(columns)))
    if not tables:
        raise ValueError("read_rows needs at least one piece")
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _read_range(pfile: pq.ParquetFile, start: int, stop: int, columns: list[str]) -> pa.Table:
    meta = pfile.metadata
    groups, first, offset = [], None, 0
    for group in range(meta.num_row_groups):
        rows = meta.row_group(group).num_rows
        if offset < stop and offset + rows > start:
            groups.append(group)
            first = offset if first is None else first
        offset += rows
    if not groups:
        return pfile.schema_arrow.empty_table().select(columns)
    batches, position = [], first
    for batch in pfile.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups, columns=columns, use_threads=False):
        lo, hi = max(start - position, 0), min(stop - position, batch.num_rows)
        if hi > lo:
            batches.append(batch.slice(lo, hi - lo))
        position += batch.num_rows
        if position >= stop:
            break
    return pa.Table.from_batches(batches, schema=batches[0].schema) if batches else \
        pfile.schema_arrow.empty_table().select(columns)
