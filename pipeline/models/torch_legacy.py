"""Read a PyTorch state dict into numpy arrays without importing torch.

Two container formats are understood:

* the legacy (pre-1.6) stream: five pickles back to back (magic number, protocol
  version, system info, the object itself, the list of storage keys), then for
  each listed key an 8-byte little-endian element count followed by the raw
  storage bytes;
* the zip archive written by newer versions: ``<prefix>/data.pkl`` plus one raw
  file ``<prefix>/data/<key>`` per storage.

In both, tensors point at storages through pickle persistent ids and are rebuilt
by ``torch._utils._rebuild_tensor_v2``. The unpickler below resolves only the
handful of globals a plain state dict needs and refuses everything else, so a
hostile file cannot run code through ``find_class``.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype code (byte order added at read time)
_STORAGE_DTYPES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "bf16",  # no numpy dtype: read as u2, widened to float32
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "b1",
    "UntypedStorage": "u1",
}


class _StorageType:
    """Stands in for a torch.*Storage class referenced by the pickle."""

    def __init__(self, name: str):
        self.name = name
        self.code = _STORAGE_DTYPES[name]

    def dtype(self, byteorder: str) -> np.dtype:
        if self.code == "bf16":
            return np.dtype(byteorder + "u2")
        if self.code in ("i1", "u1", "b1"):
            return np.dtype(self.code if self.code != "b1" else "?")
        return np.dtype(byteorder + self.code)


class _Storage:
    """One storage: its element type now, its values once the data is read."""

    def __init__(self, key: str, stype: _StorageType, numel: int):
        self.key = key
        self.stype = stype
        self.numel = numel
        self.values: np.ndarray | None = None  # 1-D, native byte order

    def fill(self, raw: bytes | memoryview, byteorder: str) -> None:
        dtype = self.stype.dtype(byteorder)
        count = len(raw) // dtype.itemsize
        if count < self.numel:
            raise ValueError(f"storage {self.key} holds {count} elements, expected {self.numel}")
        arr = np.frombuffer(raw, dtype=dtype, count=count)
        if self.stype.code == "bf16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = arr.astype(dtype.newbyteorder("="), copy=False)
        self.values = arr


class _StorageRef:
    """A window onto a storage (legacy files may store views of a root storage)."""

    def __init__(self, storage: _Storage, offset: int, numel: int):
        self.storage = storage
        self.offset = offset
        self.numel = numel


class _PendingTensor:
    """Tensor metadata recorded while unpickling; data attached afterwards."""

    def __init__(self, ref: _StorageRef, offset: int, size, stride):
        if not isinstance(ref, _StorageRef):
            raise ValueError("tensor does not reference a storage")
        self.ref = ref
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)
        if len(self.size) != len(self.stride):
            raise ValueError("tensor size and stride differ in length")

    def materialize(self) -> np.ndarray:
        values = self.ref.storage.values
        if values is None:
            raise ValueError(f"no data for storage {self.ref.storage.key}")
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, dtype=values.dtype)
        if self.offset < 0 or any(s < 0 for s in self.stride):
            raise ValueError("negative tensor offset or stride")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= self.ref.numel:
            raise ValueError(f"tensor of size {self.size} overruns its storage of {self.ref.numel} elements")
        start = self.ref.offset + self.offset
        if start + (last - self.offset) >= values.shape[0]:
            raise ValueError("tensor view overruns the storage data")
        item = values.itemsize
        view = np.lib.stride_tricks.as_strided(
            values[start:], shape=self.size, strides=tuple(s * item for s in self.stride),
            writeable=False)
        return np.array(view, copy=True, order="C")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _PendingTensor(storage, storage_offset, size, stride)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves storages by persistent id and few globals only."""

    def __init__(self, file, storages: dict[str, _Storage], legacy: bool):
        super().__init__(file)
        self._storages = storages
        self._views: dict[str, _StorageRef] = {}
        self._legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id type {kind!r}")
        if len(pid) < 5:
            raise pickle.UnpicklingError("truncated storage persistent id")
        stype, key, numel = pid[1], str(pid[2]), int(pid[4])  # pid[3]: device, unused
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError("storage of unknown type")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, stype, numel)
        view_meta = pid[5] if self._legacy and len(pid) > 5 else None
        if view_meta is None:
            return _StorageRef(storage, 0, storage.numel)
        view_key, offset, view_numel = str(view_meta[0]), int(view_meta[1]), int(view_meta[2])
        ref = self._views.get(view_key)
        if ref is None:
            if offset < 0 or offset + view_numel > storage.numel:
                raise pickle.UnpicklingError("storage view outside its root storage")
            ref = self._views[view_key] = _StorageRef(storage, offset, view_numel)
        return ref


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _PendingTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _load_legacy(f: io.BufferedIOBase, file_size: int) -> Any:
    plain = _HeaderUnpickler(f)
    magic = plain.load()
    if magic != _LEGACY_MAGIC:
        raise ValueError("not a torch checkpoint (bad magic number)")
    protocol = plain.load()
    if protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"unsupported legacy protocol version {protocol!r}")
    sys_info = plain.load()
    little = True
    if isinstance(sys_info, dict):
        little = bool(sys_info.get("little_endian", True))
    byteorder = "<" if little else ">"

    storages: dict[str, _Storage] = {}
    obj = _SafeUnpickler(f, storages, legacy=True).load()
    keys = _SafeUnpickler(f, storages, legacy=True).load()
    if not isinstance(keys, list):
        raise ValueError("storage key list missing")
    for key in keys:
        key = str(key)
        storage = storages.get(key)
        if storage is None:
            raise ValueError(f"data for unknown storage {key}")
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("file truncated in storage data")
        (count,) = struct.unpack("<q", head)
        nbytes = count * storage.stype.dtype(byteorder).itemsize
        if count < 0 or nbytes > file_size - f.tell():
            raise ValueError(f"storage {key} claims more data than the file holds")
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError("file truncated in storage data")
        storage.fill(raw, byteorder)
    return obj


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), None)
        if pkl is None:
            raise ValueError("zip archive has no data.pkl")
        prefix = pkl[: -len("data.pkl")]
        byteorder = "<"
        if prefix + "byteorder" in names:
            order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
            byteorder = ">" if order == "big" else "<"
        storages: dict[str, _Storage] = {}
        with zf.open(pkl) as fh:
            obj = _SafeUnpickler(io.BytesIO(fh.read()), storages, legacy=False).load()
        for key, storage in storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise ValueError(f"zip archive lacks {member}")
            storage.fill(zf.read(member), byteorder)
    return obj


class _HeaderUnpickler(pickle.Unpickler):
    """For the legacy header pickles, which hold plain values only."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a torch ``state_dict`` file (legacy or zip format) as numpy arrays.

    Keys keep torch's dotted names; arrays keep torch's layouts and dtypes.
    Raises PipelineError (one line) for files it cannot read.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            obj = _load_zip(path)
        else:
            with open(path, "rb") as f:
                obj = _load_legacy(f, os.fstat(f.fileno()).st_size)
        obj = _materialize(obj)
    except OSError as err:
        raise PipelineError(f"cannot read torch weights {path}: {err}") from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            struct.error, zipfile.BadZipFile) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise PipelineError(f"cannot parse torch weights {path}: {reason}") from err
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise PipelineError(f"{path} does not hold a plain state dict (name -> tensor)")
    return dict(obj)
