"""Safe reading of NVlabs/edm and NVlabs/edm2 `.pkl` checkpoints: no code from the file runs, and neither
EDM nor EDM2 is needed.

EDM pickles each of its classes as a call `torch_utils.persistence._reconstruct_persistent_obj(meta)` with
`meta = {type: 'class', version, module_src, class_name, state}`; EDM's own loader *executes* `module_src`
(a whole Python source file) to rebuild the class. Here a restricted `pickle.Unpickler` maps that call to
`PickledModule`, a plain record of the class name and the object's `__dict__`, maps torch's module
containers to record stand-ins, allows the globals that rebuild tensors, and refuses every other global.
`state_dict_of` then walks the records into the flat `state_dict` torch would give for the live network.

EDM2 writes the same persistence records, inside a `dnnlib.util.EasyDict` (read as `EasyDictRecord`, a plain
dict), and its latent encoder's constants as NumPy arrays (rebuilt by `_reconstruct_ndarray`, numeric dtypes
only).
"""

from __future__ import annotations

from pid_diffusion.user_error import UserError

import _compat_pickle
import codecs
import collections
import copyreg
import io
import pickle
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np
import torch

try:  # The module that holds NumPy's scalar constructor moved in NumPy 2; pickles name either one.
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:
    from numpy.core.multiarray import scalar as _numpy_scalar

__all__ = ["EDMPickleError", "EasyDictRecord", "PickledModule", "load_edm_pickle", "state_dict_of"]


class EDMPickleError(UserError, pickle.UnpicklingError):
    """The file is not an EDM checkpoint in the layout EDM writes, or it was modified."""


class PickledModule:
    """An object as its pickle stores it: the class name and attribute dict; none of the class's code runs."""

    class_name: str
    state: dict[str, Any]

    def __init__(self, class_name: str, state: Mapping[str, Any]):
        self.class_name = class_name
        self.state = dict(state)

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The constructor's keyword arguments as EDM's persistence recorded them (`_init_kwargs`)."""
        return dict(self.state.get("_init_kwargs", {}))

    def __repr__(self) -> str:
        return f"PickledModule({self.class_name!r}, {len(self.state)} attributes)"


class _ContainerRecord(PickledModule):
    """Stand-in for a torch container (ModuleDict, ...), which torch pickles as `cls.__new__` + `__setstate__`.

    Each stand-in subclass sets `class_name` as a class attribute, since unpickling never calls `__init__`.
    """

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise EDMPickleError(f"{self.class_name} state is a {type(state).__name__}, not an attribute dict")
        self.state = dict(state)


# Torch's parameter-free module containers; EDM uses ModuleDict for its encoder and decoder.
_CONTAINER_MODULE = "torch.nn.modules.container"
_STAND_INS: dict[tuple[str, str], type[_ContainerRecord]] = {
    (_CONTAINER_MODULE, name): type(name, (_ContainerRecord,), {"class_name": name, "__module__": __name__})
    for name in ("ModuleDict", "ModuleList", "Sequential")
}
_STAND_IN_CLASSES = frozenset(_STAND_INS.values())


def _reconstruct_persistent_record(meta: Any) -> PickledModule:
    """EDM's `_reconstruct_persistent_obj` without executing `meta['module_src']`: a record of the object."""
    if not (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)
            and isinstance(meta.get("state"), dict)):
        raise EDMPickleError("a persistent-object record lacks EDM's meta fields (type 'class', class_name, "
                             "state): the file is not an EDM checkpoint or was modified")
    return PickledModule(meta["class_name"], meta["state"])


def _reconstructor(cls: Any, base: Any, state: Any) -> _ContainerRecord:
    """`copyreg._reconstructor`, how protocols 0 and 1 build a container, restricted to the stand-ins.

    Protocols 2 and above build it with the NEWOBJ opcode, `cls.__new__(cls)` on a class `find_class` has
    already vetted, so `copyreg.__newobj__` itself never appears as a global.
    """
    if cls not in _STAND_IN_CLASSES or base is not object or state is not None:
        raise EDMPickleError(f"copyreg._reconstructor({cls!r}, {base!r}, ...) is allowed only for torch's module "
                             "containers: the file is not an EDM checkpoint or was modified")
    return copyreg._reconstructor(cls, object, None)


class EasyDictRecord(dict):
    """`dnnlib.util.EasyDict` (EDM2's snapshot dict and its dataset_kwargs) as a plain dict."""


def _numeric_dtype(*args: Any) -> np.dtype:
    """`numpy.dtype(...)`, refusing object dtypes: an object array would carry arbitrary pickled objects."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise EDMPickleError(f"refusing NumPy dtype {dtype}: EDM's files hold numeric arrays only")
    return dtype


def _reconstruct_ndarray(cls: Any, shape: Any, dtype: Any) -> np.ndarray:
    """`numpy.core.multiarray._reconstruct` (how NumPy pickles an array), for plain `numpy.ndarray` only."""
    if cls is not np.ndarray:
        raise EDMPickleError(f"numpy _reconstruct({cls!r}, ...) is allowed for numpy.ndarray only: the file is not "
                             "an EDM checkpoint or was modified")
    return np.ndarray.__new__(np.ndarray, shape, _numeric_dtype(dtype))


def _load_storage_from_bytes(data: bytes) -> torch.TypedStorage:
    """`torch.storage._load_from_bytes`, but the embedded `torch.save` payload is read with weights_only."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_record,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "dtype"): _numeric_dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,  # files written under NumPy 1 ...
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,  # ... and under NumPy 2
    ("dnnlib.util", "EasyDict"): EasyDictRecord,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    # Protocols 0 to 3 spell sets and bytes with these; EDM's files (protocol 4) have opcodes for both.
    ("builtins", "set"): set,
    ("_codecs", "encode"): codecs.encode,
    **_STAND_INS,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED_GLOBALS`; any other global in the stream stops the load before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (copy_reg, __builtin__) as pickle itself maps them for protocols 0 to 2.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise EDMPickleError(
                f"refusing to load global {module}.{name}: EDM and EDM2 checkpoints never reference it, so the "
                "file is not an EDM checkpoint or was modified") from None

    def persistent_load(self, pid: Any) -> Any:
        raise EDMPickleError("the pickle uses persistent ids, which EDM checkpoints never do: the file is not "
                             "an EDM checkpoint or was modified")


def load_edm_pickle(file: BinaryIO) -> Any:
    """Unpickle an EDM `.pkl` stream into plain data: `PickledModule` records, tensors, dicts and numbers.

    Loads the first pickle of the stream only (a legacy `torch.save` file therefore gives its magic number).
    """
    try:
        return _RestrictedUnpickler(file).load()
    except EDMPickleError:
        raise
    except Exception as error:  # A malformed stream fails inside pickle or torch; say which file layout it broke.
        raise EDMPickleError(f"not a readable EDM pickle ({type(error).__name__}: {error})") from error


def _module_state(module: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(module, PickledModule):
        raise EDMPickleError(f"submodule {prefix.rstrip('.') or '<root>'} is a {type(module).__name__}, not a "
                             "pickled module")
    for field in ("_parameters", "_buffers", "_modules"):
        if not isinstance(module.state.get(field), dict):
            raise EDMPickleError(f"{module.class_name} at {prefix.rstrip('.') or '<root>'} has no {field} dict: "
                                 "it is not a torch module")
    return module.state


def state_dict_of(module: PickledModule, prefix: str = "") -> dict[str, torch.Tensor]:
    """The flat `state_dict()` of the pickled module: parameters, persistent buffers, then each child's."""
    state = _module_state(module, prefix)
    non_persistent = state.get("_non_persistent_buffers_set", set())
    entries = [*state["_parameters"].items(),
               *((name, buffer) for name, buffer in state["_buffers"].items() if name not in non_persistent)]
    result: dict[str, torch.Tensor] = {}
    for name, tensor in entries:
        if tensor is None:  # torch keeps optional parameters (a bias=False layer's bias) as None entries.
            continue
        if not isinstance(tensor, torch.Tensor):
            raise EDMPickleError(f"{prefix}{name} is a {type(tensor).__name__}, not a tensor")
        result[prefix + name] = tensor.detach()
    for name, child in state["_modules"].items():
        if child is not None:
            result.update(state_dict_of(child, f"{prefix}{name}."))
    return result
