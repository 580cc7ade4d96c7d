"""How a store shard's columns are encoded in Parquet: the writer options both kinds of store use.

Measured with pyarrow 25 on a top-5 fp16 store (65,536 rows, zstd level 1): Parquet's
default dictionary encoding made the ``topk_logit`` column the slowest thing a streamed
epoch reads (17 ms a row group; fp16 has so few distinct values that the dictionary
never falls back), and the file 2.46 MB. Floating-point leaves written plain with
byte-stream-split instead (the bytes of like significance stored together, so that
zstd finds the shared high bytes) decode in 4 to 5 ms and the file is 1.56 MB. Ids are
unique (a dictionary only costs). Every other column (split codes, labels, class ids,
uint8 inputs) keeps the dictionary, where it is smaller and decodes faster: top-5 class
ids of 10 classes 2.1 against 3.7 bytes a row and 3.9 against 6.2 ms a row group;
random uint8 inputs 787 against 1,068 bytes a row (plain, a uint8 leaf is stored as a
32-bit integer).

Both options name Parquet leaf paths (``name.list.element`` for a list column): pyarrow
matches them against leaves and silently ignores a list column's top-level name.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa


def column_encodings(schema: pa.Schema) -> dict[str, Any]:
    """``pyarrow.parquet`` writer options for a shard of ``schema``: ``use_dictionary`` and
    ``use_byte_stream_split``, each naming the columns (Parquet leaf paths for lists) it applies to."""
    dictionary, split = [], []
    for field in schema:
        kind = field.type
        nested = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
        value = kind.value_type if nested else kind
        leaf = f"{field.name}.list.element" if nested else field.name
        if pa.types.is_floating(value):
            split.append(leaf)
        elif field.name != "id":
            dictionary.append(leaf)
    return {"use_dictionary": dictionary, "use_byte_stream_split": split}
