"""Pickled PyTorch files (.ckpt/.pt/.bin, zip and legacy) read by an unpickler that can only rebuild tensors:
it never imports or calls anything else."""

from __future__ import annotations

import builtins
import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import SdgenError
from .tensors import MAX_HEADER, TensorRef, _bad, _check_view, _itemsize, _Mapped, _Storage



class _Refused(Exception):
    pass


class _Inert:
    """Stands in for a non-tensor object in a checkpoint (training callbacks, numpy scalars); runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<inert {type(self).__name__}>"


_INERT: dict[str, type] = {}
# non-tensor objects that real SD checkpoints carry next to the weights
_INERT_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
_INERT_NUMPY = {"scalar", "dtype", "_reconstruct", "ndarray"}

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor without storage")
    dtype = rest[-1] if rest and isinstance(rest[-1], torch.dtype) else storage.dtype  # v3 passes the dtype
    return TensorRef(storage, dtype, tuple(size), tuple(stride), int(storage_offset))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    return data


def _rebuild_from_type(func, new_type, args, state):
    return func(*args)  # func is one of ours: find_class gave it


_ALLOWED = {
    "collections.OrderedDict": OrderedDict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Size": tuple,
    "_codecs.encode": lambda s, enc="latin1": str(s).encode(enc),  # protocol-2 bytes
}
for _m in ("builtins", "__builtin__"):  # harmless constructors only: no getattr, eval, exec, open, __import__
    _ALLOWED.update({f"{_m}.{n}": getattr(builtins, n)
                     for n in ("set", "frozenset", "slice", "complex", "tuple", "list", "dict")})
for _n in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"):
    _ALLOWED[f"torch.{_n}"] = getattr(torch, _n)


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only the names above; everything else is refused before it could run."""

    def __init__(self, file, storage_for=None):
        super().__init__(file, encoding="utf-8")
        self._storage_for = storage_for

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full in _ALLOWED:
            return _ALLOWED[full]
        if module == "torch" and name in _STORAGE_DTYPES or full == "torch.storage.UntypedStorage":
            return _StorageType(_STORAGE_DTYPES.get(name, torch.uint8))
        if module.startswith(_INERT_MODULES) or module.split(".")[0] == "numpy" and name in _INERT_NUMPY:
            return _INERT.setdefault(full, type(name, (_Inert,), {"__module__": module}))
        raise _Refused(full)

    def persistent_load(self, pid):
        if self._storage_for is None or not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise _Refused("an unknown persistent object")
        return self._storage_for(pid[1:])


def _unpickle(path, file, storage_for=None):
    try:
        return _SafeUnpickler(file, storage_for).load()
    except _Refused as e:
        raise _bad(path, f"refusing to load: the pickle wants to call {e.args[0]} (a .ckpt must only contain tensors)"
                   ) from None
    except SdgenError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed pickle is the user's file being wrong
        raise _bad(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]})") from None


def read_torch_file(path: Path) -> dict[str, TensorRef]:
    """State dict of a torch.save file (zip or legacy), `{"state_dict": ...}` unwrapped, as TensorRefs."""
    size = path.stat().st_size
    if size == 0:
        raise _bad(path, "the file is empty")
    obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path, size)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise _bad(path, f"holds a {type(obj).__name__}, not a state dict of tensors")
    refs = {k: v for k, v in obj.items() if isinstance(v, TensorRef) and isinstance(k, str)}
    for k, ref in refs.items():
        _check_view(path, k, ref)
    return refs


def _read_zip(path: Path):
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise _bad(path, f"corrupt zip archive ({e})") from None
    with z, open(path, "rb") as f:
        pkls = sorted((n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
        if not pkls:
            raise _bad(path, "is a zip archive but not a PyTorch checkpoint (no data.pkl)")
        prefix = pkls[0][: -len("data.pkl")]
        infos = {i.filename: i for i in z.infolist()}
        if prefix + "byteorder" in infos and z.read(prefix + "byteorder").strip() not in (b"little", b""):
            raise _bad(path, "was saved on a big-endian machine; re-save it as safetensors")
        if infos[pkls[0]].file_size > MAX_HEADER:
            raise _bad(path, f"data.pkl is {infos[pkls[0]].file_size} bytes: not a plain state dict")
        try:
            program = z.read(pkls[0])
        except Exception as e:  # noqa: BLE001 - truncated/corrupt member
            raise _bad(path, f"corrupt zip archive ({type(e).__name__}: {e})") from None
        mapped = _Mapped(path)

        def zip_storage(key, nbytes, dtype):
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise _bad(path, f"storage {key} is missing from the archive (truncated?)")
            if info.compress_type != zipfile.ZIP_STORED:
                raise _bad(path, f"storage {key} is compressed; torch.save never does that")
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise _bad(path, f"corrupt zip entry for storage {key}")
            n_name, n_extra = struct.unpack("<HH", head[26:30])
            offset = info.header_offset + 30 + n_name + n_extra
            if nbytes > info.file_size or offset + nbytes > mapped.size:
                raise _bad(path, f"storage {key} claims {nbytes} bytes but holds {info.file_size}: truncated")
            return _Storage(mapped, offset, nbytes, dtype)

        return _unpickle(path, io.BytesIO(program), _storage_table(zip_storage, {}))


def _storage_table(make, storages: dict):
    """The pickle's persistent-id hook: one storage per key in `storages`, made by make(key, nbytes, dtype) on
    first sight."""
    def storage_for(args):
        stype, key, _location, numel = args[:4]
        if not isinstance(stype, _StorageType):
            raise _Refused("a storage of an unknown type")
        if key not in storages:
            storages[key] = make(key, int(numel) * _itemsize(stype.dtype), stype.dtype)
        return storages[key]

    return storage_for


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_legacy(path: Path, size: int):
    """torch.save(..., _use_new_zipfile_serialization=False): pickles, then each storage as int64 count + data."""
    with open(path, "rb") as f:
        head = f.read(4)
        if head == b"PK\x03\x04":
            raise _bad(path, "truncated or corrupt: a zip archive (torch.save format) whose end is missing")
        if len(head) < 2 or head[0] != 0x80:  # every pickle of protocol >= 2 starts with PROTO
            raise _bad(path, "not a PyTorch checkpoint (neither a zip archive nor a pickle)")
        f.seek(0)
        magic = _unpickle(path, f)
        if magic != _LEGACY_MAGIC:
            raise _bad(path, "is a pickle but not a PyTorch checkpoint (bad magic number)")
        _unpickle(path, f)  # protocol version
        sys_info = _unpickle(path, f)
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise _bad(path, "was saved on a big-endian machine; re-save it as safetensors")
        mapped, storages = _Mapped(path), {}
        obj = _unpickle(path, f, _storage_table(lambda key, nbytes, dtype: _Storage(mapped, None, nbytes, dtype),
                                                storages))
        keys = _unpickle(path, f)
        if not isinstance(keys, list):
            raise _bad(path, "corrupt legacy checkpoint (no storage list)")
        offset = f.tell()
        for key in keys:
            if offset + 8 > size:
                raise _bad(path, "truncated: storage data is missing")
            f.seek(offset)
            (count,) = struct.unpack("<q", f.read(8))
            st = storages.get(key)
            if st is None:
                raise _bad(path, f"corrupt legacy checkpoint (unknown storage {key!r})")
            nbytes = count * _itemsize(st.dtype)
            if count < 0 or nbytes != st.nbytes or offset + 8 + nbytes > size:
                raise _bad(path, f"truncated or corrupt: storage {key!r} does not fit in the file")
            st.offset = offset + 8
            offset += 8 + nbytes
        for key, st in storages.items():
            if st.offset is None:
                raise _bad(path, f"corrupt legacy checkpoint (storage {key!r} has no data)")
    return obj

