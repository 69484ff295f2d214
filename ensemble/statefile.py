"""A state_dict file written by ``torch.save`` read into numpy arrays, without importing torch.

The ONNX Runtime path (:mod:`ensemble.onnx_runtime`) answers a photo without torch, whose import
alone holds about 480 MB with the CUDA build; it reads the run's own ``weights.pt`` files here.
The format is torch's zip archive: ``<prefix>/data.pkl`` (a pickle whose tensors point at
storages by key) and ``<prefix>/data/<key>`` (each storage's raw little-endian bytes). Like
``torch.load(weights_only=True)``, the unpickler admits only tensors, storages and ordered
dicts: a file that asks for anything else is refused, never executed.
"""

from __future__ import annotations

import functools
import math
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import UserError

#: torch's storage classes -> numpy dtypes (bfloat16 has no numpy dtype: refused by name)
STORAGES = {
    "HalfStorage": np.float16,
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Storage:
    def __init__(self, name: str):
        if name not in STORAGES:
            raise pickle.UnpicklingError(f"tensors of torch.{name} have no numpy type here")
        self.dtype = np.dtype(STORAGES[name])


#: no tensor of a weights file holds more elements than this (a crafted size must not exhaust memory)
MAX_ELEMENTS = 1 << 31


def _ints(v, what: str) -> tuple:
    seq = v if isinstance(v, tuple) else (v,) if what == "offset" else None
    if seq is None or not all(type(n) is int and n >= 0 for n in seq):
        raise pickle.UnpicklingError(f"a tensor's {what} is not made of non-negative integers")
    return seq


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, np.ndarray):
        raise pickle.UnpicklingError("a tensor without a storage")
    (offset,), size, stride = _ints(offset, "offset"), _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError("a tensor's size and stride disagree")
    if math.prod(size) > MAX_ELEMENTS:
        raise pickle.UnpicklingError(f"a tensor of {math.prod(size)} elements")
    if math.prod(size) == 0:
        return np.empty(size, storage.dtype)
    if offset + sum((n - 1) * st for n, st in zip(size, stride)) >= len(storage):
        raise pickle.UnpicklingError("a tensor reaches past its storage")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(st * item for st in stride))
    return np.array(view)  # its own contiguous copy: the archive's bytes are not kept


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.storages = {}  # key -> array: a storage several tensors view is read once

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return functools.partial(_rebuild_tensor)  # a fresh object: a BUILD opcode cannot touch ours
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return _Storage(name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor, a storage or a dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.60}")
        _, storage, key, _location, numel = pid
        if not (isinstance(key, str) and type(numel) is int and numel >= 0):
            raise pickle.UnpicklingError("a storage without a key or a size")
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            if len(raw) < numel * storage.dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {key} is shorter than its {numel} elements")
            self.storages[key] = np.frombuffer(raw, dtype=storage.dtype, count=numel)
        if self.storages[key].dtype != storage.dtype:
            raise pickle.UnpicklingError(f"storage {key} is read as two types")
        return self.storages[key]


def read_state(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a ``torch.save``'d dict of tensors, as numpy arrays (their stored dtypes)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise pickle.UnpicklingError("not a torch.save archive (no single data.pkl)")
            prefix = pkl[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder") != b"little":
                raise pickle.UnpicklingError("stored big-endian")
            with archive.open(pkl[0]) as f:
                state = _Unpickler(f, archive, prefix).load()
    except Exception as exc:  # a damaged or crafted file, whatever it breaks (zlib, zip, pickle): one line
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not (
        isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items())
    ):
        raise UserError(f"cannot read {path}: not a dict of tensors")
    return dict(state)
