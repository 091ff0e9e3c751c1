"""File access through blobfile (local paths, gs://, az://) with atomic writes.

Every file this project writes that a later run reads (checkpoints, configurations, result tables, images)
goes through `atomic_write_bytes`: the payload is written under a temporary name in the same folder and then
renamed over the destination, so a crash never leaves a half-written file where a good one was.
"""

import io
import os
import uuid

import blobfile as bf
import torch

__all__ = [
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "exists",
    "is_local",
    "join",
    "listdir",
    "makedirs",
    "read_bytes",
    "remove",
    "torch_load",
]

_TEMP_SUFFIX = ".tmp"
_BLOB_SCHEMES = ("gs://", "az://", "https://")


def is_local(path: str | os.PathLike) -> bool:
    """True for a path on this machine's file system, False for a blob URL (gs://, az://)."""
    return not str(path).startswith(_BLOB_SCHEMES)


def join(*parts: str | os.PathLike) -> str:
    """Join path components; works for local paths and blob URLs alike."""
    return bf.join(*map(str, parts))


def exists(path: str | os.PathLike) -> bool:
    return bf.exists(str(path))


def listdir(path: str | os.PathLike) -> list[str]:
    """Names (not paths) of the entries of a folder, sorted."""
    return sorted(bf.listdir(str(path)))


def makedirs(path: str | os.PathLike) -> None:
    bf.makedirs(str(path))


def remove(path: str | os.PathLike) -> None:
    bf.remove(str(path))


def read_bytes(path: str | os.PathLike) -> bytes:
    path = str(path)
    if not bf.exists(path):
        raise FileNotFoundError(f"No such file: {path}")
    return bf.read_bytes(path)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write `data` to `path` through a temporary file and a rename.

    Local files are flushed and fsynced before the rename, so the destination holds either the old or the
    new payload, never a mix. Blob stores (gs://, az://) publish an object only once its upload completes,
    which gives the same guarantee; the rename there is a server-side copy.
    """
    path = str(path)
    parent = bf.dirname(path)
    if parent:
        bf.makedirs(parent)
    temp = f"{path}.{uuid.uuid4().hex[:8]}{_TEMP_SUFFIX}"
    if is_local(path):
        try:
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.remove(temp)
        return
    with bf.BlobFile(temp, "wb") as f:
        f.write(data)
    bf.copy(temp, path, overwrite=True)
    bf.remove(temp)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` to memory, then `atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def torch_load(path: str | os.PathLike, *, weights_only: bool = True, map_location="cpu"):
    """`torch.load` from a local path or blob URL; `weights_only` by default, so loading runs no code."""
    return torch.load(io.BytesIO(read_bytes(path)), weights_only=weights_only, map_location=map_location)

