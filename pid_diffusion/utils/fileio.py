"""File access through blobfile (local paths, gs://, az://) with atomic writes.

Every file this project writes that a later run reads (checkpoints, configurations, result tables, images)
goes through `atomic_write`: the payload is written under a temporary name in the same folder and then
renamed over the destination, so a crash never leaves a half-written file where a good one was. Large
files (`atomic_torch_save`, `torch_load`) stream through the file instead of a copy in memory.
"""

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import BinaryIO

import blobfile as bf
import torch

from pid_diffusion.user_error import FileFormatError, MissingFileError

__all__ = [
    "TEMP_SUFFIX",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "exists",
    "is_local",
    "isdir",
    "join",
    "listdir",
    "open_read",
    "read_bytes",
    "remove",
    "rename",
    "size",
    "torch_load",
    "walk_files",
]

TEMP_SUFFIX = ".tmp"  # Of a file while `atomic_write` writes it: never a complete file.
_BLOB_SCHEMES = ("gs://", "az://", "https://")


def is_local(path: str | os.PathLike) -> bool:
    """True for a path on this machine's file system, False for a blob URL (gs://, az://)."""
    return not str(path).startswith(_BLOB_SCHEMES)


def join(*parts: str | os.PathLike) -> str:
    """Join path components; works for local paths and blob URLs alike."""
    return bf.join(*map(str, parts))


def exists(path: str | os.PathLike) -> bool:
    return bf.exists(str(path))


def isdir(path: str | os.PathLike) -> bool:
    """True for an existing folder (a blob prefix on a blob store)."""
    return bf.isdir(str(path))


def walk_files(path: str | os.PathLike) -> list[str]:
    """Paths of every file under the folder `path`, recursively, sorted."""
    return sorted(bf.join(folder, name) for folder, _, names in bf.walk(str(path)) for name in names)


def listdir(path: str | os.PathLike) -> list[str]:
    """Names (not paths) of the entries of a folder, sorted."""
    return sorted(bf.listdir(str(path)))


def remove(path: str | os.PathLike) -> None:
    bf.remove(str(path))


def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move `src` to `dst` (a rename on a local disk; a copy, then a removal, on a blob store)."""
    src, dst = str(src), str(dst)
    if is_local(src) and is_local(dst):
        os.replace(src, dst)
        return
    bf.copy(src, dst, overwrite=True)
    bf.remove(src)


def size(path: str | os.PathLike) -> int:
    """The size of a file in bytes."""
    return bf.stat(str(path)).size


def open_read(path: str | os.PathLike) -> BinaryIO:
    """A seekable binary file to read, local or blob (blobfile reads blobs in ranges)."""
    return bf.BlobFile(str(path), "rb")


def read_bytes(path: str | os.PathLike) -> bytes:
    path = str(path)
    _require(path)
    return bf.read_bytes(path)


def _require(path: str) -> None:
    if not bf.exists(path):
        raise MissingFileError(f"{path}: no such file; check the path (relative paths start at {os.getcwd()})")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: the payload goes to a temporary name and is renamed over
    `path` only when the block ends without an error.

    Local files are flushed and fsynced before the rename, so the destination holds either the old or the
    new payload, never a mix. Blob stores (gs://, az://) publish an object only once its upload completes,
    which gives the same guarantee; the rename there is a server-side copy. An error in the block (a full
    disk, a blob-store failure) removes the temporary file and leaves `path` as it was.
    """
    path = str(path)
    parent = bf.dirname(path)
    if parent:
        bf.makedirs(parent)
    temp = f"{path}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"
    try:
        if is_local(path):
            with open(temp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        else:
            with bf.BlobFile(temp, "wb", streaming=True, partial_writes_on_exc=False) as f:
                yield f
            bf.copy(temp, path, overwrite=True)
    finally:
        with contextlib.suppress(OSError):  # A failed upload may have left nothing to remove.
            if bf.exists(temp):
                bf.remove(temp)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write `data` to `path` atomically (`atomic_write`)."""
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` streamed into `atomic_write`: no copy of the file is held in memory."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def torch_load(path: str | os.PathLike, *, weights_only: bool = True, map_location="cpu"):
    """`torch.load` from a local path or blob URL, read through the file (blobfile streams blob URLs with
    range reads); `weights_only` by default, so loading runs no code."""
    path = str(path)
    _require(path)
    try:
        with open_read(path) as f:
            return torch.load(f, weights_only=weights_only, map_location=map_location)
    except Exception as error:
        if not _ends_like_a_zip(path):  # torch.load's own message for a cut file is often a bare "Invalid argument".
            raise FileFormatError(f"{path}: truncated, or not a zip-format torch.save file: no zip end record in "
                                  f"its {size(path)} bytes") from error
        raise


_ZIP_END = b"PK\x05\x06"  # The end-of-central-directory record that closes every zip file (torch.save's format).
_ZIP_END_SEARCH = 65_557  # The record (22 bytes) plus the longest zip comment (65 535 bytes).


def _ends_like_a_zip(path: str) -> bool:
    with open_read(path) as f:
        f.seek(max(0, size(path) - _ZIP_END_SEARCH))
        return _ZIP_END in f.read()

