"""Deterministic train/val/test assignment from a hash of each row's id."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from still.errors import StillError

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
"""The int8 codes :func:`assign_splits` returns."""

_SOURCE_NAMES = {"train": 0, "val": 1, "validation": 1, "test": 2}


def assign_splits(ids: np.ndarray, source_split: np.ndarray | None, rule: Mapping[str, Any]) -> np.ndarray:
    """Assigns every row to train (0), val (1) or test (2).

    Each id is hashed with splitmix64 (keyed by ``rule["seed"]``) to a uniform number
    u in [0, 1), so a row's split depends on its id alone, never on batch or order.
    With a source split, its "test" rows are test, its "val"/"validation" rows are
    val, and its "train" rows are val when u < val_fraction. Without one, rows are
    test when u < test_fraction, and val_fraction of the rest are val.

    Args:
        ids: Integer or string ids, shape (n,).
        source_split: The data's own split names, shape (n,), or None.
        rule: A :attr:`DatasetSpec.split_rule` mapping.

    Returns:
        int8 codes, shape (n,).

    Raises:
        StillError: ``source_split`` holds a name other than train/val/validation/test.
    """
    u = _uniform(np.asarray(ids), int(rule["seed"]))
    val, test = float(rule["val_fraction"]), float(rule["test_fraction"])
    if source_split is None:
        codes = np.where(u < test, 2, np.where(u < test + val * (1.0 - test), 1, 0))
        return codes.astype(np.int8)
    names = np.char.lower(np.asarray(source_split).astype(str))
    known = np.isin(names, list(_SOURCE_NAMES))
    if not known.all():
        raise StillError(
            f"split column holds {str(names[~known][0])!r}; expected one of {', '.join(_SOURCE_NAMES)}"
        )
    codes = np.zeros(len(names), dtype=np.int8)
    for name, code in _SOURCE_NAMES.items():
        codes[names == name] = code
    codes[(codes == 0) & (u < val)] = 1
    return codes


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(ids: np.ndarray, seed: int) -> np.ndarray:
    key = splitmix64(np.array([seed], dtype=np.int64).view(np.uint64))
    hashed = splitmix64(id_keys(ids) ^ key)
    return (hashed >> np.uint64(11)).astype(np.float64) * 2.0**-53


def id_keys(ids: np.ndarray) -> np.ndarray:
    """uint64 keys of integer ids (their bits) or string ids (8 bytes of blake2b)."""
    if ids.dtype.kind in "iu":
        return ids.astype(np.int64).view(np.uint64)
    digests = (hashlib.blake2b(str(i).encode(), digest_size=8).digest() for i in ids)
    return np.frombuffer(b"".join(digests), dtype="<u8", count=len(ids)).astype(np.uint64)
