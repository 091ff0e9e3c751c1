"""Reference statistics in both published formats: EDM's `.npz` (Inception mu and sigma: FID only) and EDM2's
`.pkl` (`dict(num_images, fid=dict(mu, sigma), fd_dinov2=dict(mu, sigma))`, as `calculate_metrics.py ref`
writes it, e.g. `https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl`).

The two are told apart by content (a zip archive or a pickle), not by name. An EDM2 pickle is read by an
unpickler that resolves only numpy's array reconstruction, so loading one runs no code.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import zipfile
from typing import Any

import numpy as np

from pid_diffusion.fid import load_reference, save_reference
from pid_diffusion.utils import fileio

__all__ = ["FD_DINOV2", "FID", "PICKLE_PROTOCOL", "ReferenceStats", "load_stats", "save_stats"]

FID, FD_DINOV2 = "fid", "fd_dinov2"  # EDM2's metric names, the keys of its reference pickles.
PICKLE_PROTOCOL = 4  # What EDM2's `pickle.dump` wrote under the Pythons it supports; numpy arrays as _reconstruct.

Stats = tuple[np.ndarray, np.ndarray]  # float64 mu [D], sigma [D, D]


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """A data set's feature statistics: Inception (FID) and, in EDM2's format, DINOv2 (FD_DINOv2)."""

    fid: Stats
    fd_dinov2: Stats | None = None
    num_images: int | None = None


try:
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray, numeric as _numeric

_NUMPY_GLOBALS: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
for _module in ("numpy.core", "numpy._core"):  # Pickles of numpy 1.x and 2.x name the same functions so.
    _NUMPY_GLOBALS[f"{_module}.multiarray", "_reconstruct"] = _multiarray._reconstruct
    _NUMPY_GLOBALS[f"{_module}.multiarray", "scalar"] = _multiarray.scalar
    _NUMPY_GLOBALS[f"{_module}.numeric", "_frombuffer"] = _numeric._frombuffer  # Protocol 5's arrays.


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _NUMPY_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: EDM2's reference statistics hold "
                                         "only dicts, numbers and numpy arrays") from None


def _stats(data: Any, key: str, path: str) -> Stats:
    entry = data.get(key)
    if not (isinstance(entry, dict) and {"mu", "sigma"} <= entry.keys()):
        raise ValueError(f"{path}: its {key!r} entry is not dict(mu, sigma)")
    mu, sigma = np.asarray(entry["mu"], dtype=np.float64), np.asarray(entry["sigma"], dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise ValueError(f"{path}: {key} mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    return mu, sigma


def load_stats(path: str) -> ReferenceStats:
    """An EDM `.npz` (FID only) or an EDM2 reference pickle (FID and, where it has them, FD_DINOv2)."""
    raw = fileio.read_bytes(path)
    if zipfile.is_zipfile(io.BytesIO(raw)):
        return ReferenceStats(fid=load_reference(path))
    try:
        data = _NumpyUnpickler(io.BytesIO(raw)).load()
    except Exception as error:  # A file of another kind fails anywhere inside pickle.
        raise ValueError(f"{path} is neither EDM's reference .npz nor EDM2's reference .pkl ({type(error).__name__}: "
                         f"{error}); make one with pid-fid-ref") from None
    if not isinstance(data, dict) or FID not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not EDM2's reference statistics (a dict with 'fid' and 'fd_dinov2'), found {found}")
    return ReferenceStats(fid=_stats(data, FID, path), fd_dinov2=_stats(data, FD_DINOV2, path) if FD_DINOV2 in data
                          else None, num_images=None if data.get("num_images") is None else int(data["num_images"]))


def save_stats(path: str, stats: ReferenceStats) -> None:
    """Write `stats` atomically: EDM2's pickle for a `.pkl` path, EDM's `.npz` (FID only) otherwise."""
    if not path.endswith(".pkl"):
        if stats.fd_dinov2 is not None:
            raise ValueError(f"{path}: EDM's .npz holds the Inception statistics only; name a .pkl to write EDM2's "
                             "format with FD_DINOv2's")
        save_reference(path, *stats.fid)
        return
    data: dict[str, Any] = {"num_images": stats.num_images}
    for key, value in ((FID, stats.fid), (FD_DINOV2, stats.fd_dinov2)):
        if value is not None:
            data[key] = {"mu": value[0], "sigma": value[1]}
    fileio.atomic_write_bytes(pickle.dumps(data, protocol=PICKLE_PROTOCOL), path)
