"""How a store shard's columns are encoded in Parquet: the writer options both kinds of store use.

Measured with pyarrow 25 on a top-5 fp16 store (65,536 rows, zstd level 1): Parquet's
default dictionary encoding made the ``topk_logit`` column the slowest thing a streamed
epoch reads (17 ms a row group; fp16 has so few distinct values that the dictionary
never falls back), and the file 2.46 MB. Floating-point leaves written plain with
byte-stream-split instead (the bytes of like significance stored together, so that
zstd finds the shared high bytes) decode in 4 to 5 ms and the file is 1.56 MB. Ids are
unique (a dictionary only costs). Every other column (split codes, labels, class ids,
uint8 inputs) keeps the dictionary, where it decodes as fast or faster.
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
        if pa.types.is_floating(value):
            split.append(f"{field.name}.list.element" if nested else field.name)
        elif field.name != "id":
            dictionary.append(field.name)
    return {"use_dictionary": dictionary, "use_byte_stream_split": split}
