"""Storage URIs: one place that turns a user's URI into filesystems.

fsspec handles ``memory://`` and the optional cloud backends; pyarrow.fs is what
Parquet and Ray Data read fastest. ``resolve`` gives both views of one URI:
``memory://`` stays fsspec-only (pyarrow wraps it through ``PyFileSystem``), local
paths and ``file://`` become absolute local paths, ``s3://``/``gs://`` need the
``[s3]``/``[gcs]`` extras, with an error that names the extra when it is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow.fs as pafs

from still.errors import StillError

_EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


@dataclasses.dataclass(frozen=True)
class Location:
    """A URI resolved to a filesystem and a path on it.

    Attributes:
        uri: The canonical URI (``/abs/path`` for local files, else ``scheme://path``).
        fs: The fsspec filesystem.
        path: The path within ``fs`` (no scheme).
    """

    uri: str
    fs: Any
    path: str

    @property
    def is_local(self) -> bool:
        """True for files on this machine's filesystem."""
        return self.uri.startswith("/")

    def join(self, *parts: str) -> Location:
        """Returns the location of a child path."""
        path = posixpath.join(self.path, *parts)
        uri = path if self.is_local else f"{self.uri.split('://')[0]}://{path}"
        return Location(uri=uri, fs=self.fs, path=path)

    def arrow_fs(self) -> pafs.FileSystem:
        """Returns a pyarrow filesystem over the same storage (for Parquet and Ray Data)."""
        if self.is_local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def exists(self) -> bool:
        """True when the path exists."""
        return self.fs.exists(self.path)

    def read_json(self) -> Any:
        """Reads the path as JSON."""
        with self.fs.open(self.path, "r") as handle:
            return json.load(handle)

    def write_atomic(self, data: bytes) -> None:
        """Writes bytes under a temporary name, then renames them into place.

        A reader sees either the old content or the whole new content, never a
        partial file (local files: ``os.replace``; object stores: one PUT).
        """
        parent = posixpath.dirname(self.path)
        self.fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(self.path)}")
        with self.fs.open(tmp, "wb") as handle:
            handle.write(data)
            if self.is_local:
                handle.flush()
                os.fsync(handle.fileno())
        self.fs.mv(tmp, self.path)


def resolve(uri: str) -> Location:
    """Resolves a URI or local path to a :class:`Location`.

    Args:
        uri: ``/path``, ``relative/path``, ``file:///path``, ``memory://path``,
            ``s3://bucket/path`` or ``gs://bucket/path``.

    Raises:
        StillError: The URI is empty, or its backend's extra is not installed.
    """
    if not uri:
        raise StillError("empty storage URI")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return _local(uri)
    scheme = scheme.lower()
    if scheme == "file":
        return _local(rest)
    if scheme == "local":
        raise StillError(
            f"{uri!r}: local:// means 'on the Ray head node' to Ray Data but plain files to "
            "fsspec; use a plain path or file:// instead"
        )
    if scheme in _EXTRAS:
        module, extra = _EXTRAS[scheme]
        try:
            __import__(module)
        except ImportError:
            raise StillError(f"{uri!r} needs {module}: pip install 'still[{extra}]'") from None
    try:
        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as exc:
        raise StillError(f"{uri!r}: no filesystem for scheme {scheme!r} ({exc})") from None
    path = fs._strip_protocol(uri)
    return Location(uri=f"{scheme}://{path}", fs=fs, path=path)


def _local(path: str) -> Location:
    absolute = os.path.abspath(os.path.expanduser(path))
    return Location(uri=absolute, fs=fsspec.filesystem("file"), path=absolute)
