"""Checkpoints in every format users have -> lazy tensors under the original CompVis key names.

    ckpt = open_checkpoint("v1-5-pruned-emaonly.safetensors")   # or a .ckpt, a diffusers folder, a repo id
    unet = load_module(UNet, config, ckpt.tensors["unet"], dtype=torch.bfloat16, device="cpu", where=...)

Nothing is read until a tensor is asked for: a `TensorRef` is (file mapping, byte range, dtype, shape) and
`load(dtype, device)` converts one tensor straight to the target dtype, then drops its pages from our address
space, so loading fp32 files as bf16 peaks near the bf16 size. Pickled files (.ckpt/.pt/.bin) are read with
an unpickler that can only rebuild tensors: it never imports or calls anything else.
"""

from __future__ import annotations

import builtins
import importlib
import io
import json
import math
import mmap
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import SdgenError

DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MAX_HEADER = 100 * 2**20  # safetensors header / pickle program size cap: real ones are < 1 MB

# component -> (prefix in an original single file, module, config class)
COMPONENTS = {
    "unet": ("model.diffusion_model.", "sdgen.unet", "UNetConfig"),
    "vae": ("first_stage_model.", "sdgen.vae", "VAEConfig"),
    "text_encoder": ("cond_stage_model.transformer.", "sdgen.clip", "CLIPConfig"),
}

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


def _bad(path, what) -> SdgenError:
    return SdgenError(f"{Path(path).name}: {what}")


# ------------------------------------------------------------------------------------------ lazy tensors


class _Mapped:
    """One file mapped copy-on-write (never written): tensors are views of it until converted."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            # ACCESS_COPY makes the buffer writable for torch.frombuffer (no warning) and private, so
            # MADV_DONTNEED just drops pages: they would be re-read from the file, never lost.
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if self.size else None

    def view(self, offset: int, nbytes: int) -> torch.Tensor:  # (nbytes,) uint8, shares the mapping
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.mm, dtype=torch.uint8, count=nbytes, offset=offset)

    def release(self, offset: int, nbytes: int):
        """Drop these pages from our RSS once a tensor has been converted (Linux/macOS; a no-op elsewhere)."""
        if self.mm is None or nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset - offset % mmap.PAGESIZE
        end = min(self.size, offset + nbytes)
        try:
            self.mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass


@dataclass(eq=False)
class _Storage:
    """A run of bytes in a file; `offset` is filled late for legacy pickles (data follows the pickle)."""

    mapped: _Mapped | None
    offset: int | None
    nbytes: int
    dtype: torch.dtype = torch.uint8  # as pickled (tensors may reinterpret it, _rebuild_tensor_v3)


@dataclass(eq=False)
class TensorRef:
    """A tensor in a file, read on demand. `shape` is what `load` returns (after any reshape fix)."""

    storage: _Storage
    dtype: torch.dtype  # on disk
    size: tuple  # on disk
    stride: tuple | None = None  # None: contiguous
    storage_offset: int = 0  # elements
    reshape: tuple | None = None  # e.g. VAE attention (C, C) -> (C, C, 1, 1)

    @property
    def shape(self) -> tuple:
        return tuple(self.reshape if self.reshape is not None else self.size)

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * _itemsize(self.dtype)

    def load(self, dtype: torch.dtype | None = None, device="cpu") -> torch.Tensor:
        """A fresh tensor in `dtype` (floating tensors only; integers/bools keep theirs) on `device`."""
        st = self.storage
        target = dtype if dtype is not None and self.dtype.is_floating_point else self.dtype
        size = _itemsize(self.dtype)
        raw = st.mapped.view(st.offset, st.nbytes - st.nbytes % size)
        if st.offset % size:  # unaligned data (legal in safetensors): realign first
            raw = raw.clone()
        src = raw.view(self.dtype)
        if self.stride is None:
            src = src[self.storage_offset : self.storage_offset + math.prod(self.size)].view(self.size)
        else:
            src = src.as_strided(self.size, self.stride, self.storage_offset)
        out = torch.empty(self.size, dtype=target, device=device)
        out.copy_(src)  # one conversion, straight into the target dtype and device
        st.mapped.release(st.offset, st.nbytes)
        return out.reshape(self.reshape) if self.reshape is not None else out

    def __repr__(self):
        return f"TensorRef({self.storage.mapped.path.name}, {str(self.dtype).removeprefix('torch.')}, {self.shape})"


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _check_view(path, key, ref: TensorRef):
    """Sizes, strides and offset of a pickled tensor must stay inside its storage."""
    size, n = ref.size, ref.storage.nbytes // _itemsize(ref.dtype)
    if any(not isinstance(s, int) or s < 0 for s in size) or ref.storage_offset < 0:
        raise _bad(path, f"tensor {key!r} has an invalid shape {size}")
    if math.prod(size) == 0:
        return
    stride = ref.stride if ref.stride is not None else ()
    if ref.stride is not None and (len(stride) != len(size) or any(not isinstance(s, int) or s < 0 for s in stride)):
        raise _bad(path, f"tensor {key!r} has invalid strides {stride}")
    last = ref.storage_offset + (sum((a - 1) * b for a, b in zip(size, stride)) if ref.stride is not None
                                 else math.prod(size) - 1)
    if last >= n:
        raise _bad(path, f"tensor {key!r} {tuple(size)} reaches past the end of its data ({n} elements)")


# ------------------------------------------------------------------------------------------ safetensors


def read_safetensors(path: Path) -> tuple[dict[str, TensorRef], dict]:
    """{key: TensorRef}, metadata. The header is validated before anything is mapped."""
    size = path.stat().st_size
    if size < 8:
        raise _bad(path, f"not a safetensors file (only {size} bytes)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > MAX_HEADER:
            raise _bad(path, f"not a valid safetensors file: the header claims {n} bytes but the file has {size} "
                             "(truncated or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _bad(path, "not a valid safetensors file: the header is not JSON") from None
    if not isinstance(header, dict):
        raise _bad(path, "not a valid safetensors file: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _bad(path, "not a valid safetensors file: __metadata__ is not an object")
    start, data_len = 8 + n, size - 8 - n
    spans, entries = [], {}
    for key, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape, (b, e) = info["shape"], info["data_offsets"]
            ok = all(type(s) is int and s >= 0 for s in shape) and type(b) is int and type(e) is int
        except (KeyError, TypeError, ValueError):
            raise _bad(path, f"tensor {key!r} has an invalid header entry {str(info)[:200]}") from None
        if not ok:
            raise _bad(path, f"tensor {key!r} has an invalid shape or offsets {str(info)[:200]}")
        if not 0 <= b <= e <= data_len:
            raise _bad(path, f"tensor {key!r} lies outside the file (offsets {info['data_offsets']}, "
                             f"{data_len} data bytes): truncated or corrupt")
        if e - b != math.prod(shape) * _itemsize(dtype):
            raise _bad(path, f"tensor {key!r}: shape {tuple(shape)} {info['dtype']} does not match its {e - b} bytes")
        spans.append((b, e, key))
        entries[key] = (dtype, tuple(shape), b, e)
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _bad(path, f"tensors {k0!r} and {k1!r} overlap: corrupt file")
    mapped = _Mapped(path)
    refs = {k: TensorRef(_Storage(mapped, start + b, e - b), dtype, shape) for k, (dtype, shape, b, e) in entries.items()}
    return refs, metadata


# ------------------------------------------------------------------------------------------ pickles


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


def read_weights_file(path: Path) -> dict[str, TensorRef]:
    if not path.is_file():
        raise SdgenError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    return read_torch_file(path)


# ------------------------------------------------------------------------------------------ checkpoint


@dataclass
class Checkpoint:
    source: str  # what the user gave
    path: Path  # the file or folder read
    format: str  # "safetensors" | "ckpt" | "diffusers"
    tensors: dict[str, dict[str, TensorRef]]  # component -> {our key: lazy tensor}
    configs: dict[str, dict] = field(default_factory=dict)  # diffusers config.json per component
    tokenizer_dir: Path | None = None
    scheduler_config: dict | None = None
    ignored: list[str] = field(default_factory=list)  # keys present but not used
    dtype_on_disk: str = "float32"  # "float16", "float32", ... or "mixed"

    def shapes(self, component: str) -> dict[str, tuple]:
        return {k: ref.shape for k, ref in self.tensors.get(component, {}).items()}


def _module(component):
    """(network module, its Config class), imported on first use."""
    _, mod, cfg = COMPONENTS[component]
    m = importlib.import_module(mod)
    return m, getattr(m, cfg, None)


def _dtype_summary(tensors: dict[str, dict[str, TensorRef]]) -> str:
    found = {str(r.dtype).removeprefix("torch.") for refs in tensors.values() for r in refs.values()
             if r.dtype.is_floating_point}
    return found.pop() if len(found) == 1 else ("mixed" if found else "unknown")


def _fix_vae_shapes(refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """Apply vae.fix_shapes lazily: run it on meta tensors and remember the reshapes it asks for."""
    vae, _ = _module("vae")
    metas = {k: torch.empty(r.shape, device="meta") for k, r in refs.items()}
    fixed = vae.fix_shapes(metas)
    for k, r in refs.items():
        if tuple(fixed[k].shape) != tuple(r.shape):
            r.reshape = tuple(fixed[k].shape)
    return refs


def _normalize_text_encoder(refs: dict[str, TensorRef], ignored: list[str], prefix: str) -> dict[str, TensorRef]:
    clip, _ = _module("text_encoder")
    names = clip.normalize_keys(list(refs))
    out = {}
    for k, r in refs.items():
        ours = names.get(k, k)
        if ours is None:
            ignored.append(prefix + k)
        else:
            out[ours] = r
    return out


def _from_single_file(source, path: Path) -> Checkpoint:
    fmt = "safetensors" if path.suffix == ".safetensors" else "ckpt"
    refs = read_weights_file(path)
    from .spec import check_family  # refuses SDXL, SD2, random state dicts with a clear line

    check_family(path.name, refs)
    tensors, ignored = {c: {} for c in COMPONENTS}, []
    for key, ref in refs.items():
        for comp, (prefix, _, _) in COMPONENTS.items():
            if key.startswith(prefix):
                tensors[comp][key[len(prefix):]] = ref
                break
        else:
            ignored.append(key)
    tensors["text_encoder"] = _normalize_text_encoder(tensors["text_encoder"], ignored, COMPONENTS["text_encoder"][0])
    tensors["vae"] = _fix_vae_shapes(tensors["vae"])
    return Checkpoint(source=str(source), path=path, format=fmt, tensors=tensors, ignored=sorted(ignored),
                      dtype_on_disk=_dtype_summary(tensors))


# ------------------------------------------------------------------------------------------ diffusers


_WEIGHT_BASES = ("diffusion_pytorch_model", "model", "pytorch_model")


def pick_weight_files(names: set[str], component: str, variant: str | None) -> tuple[list[str], str | None]:
    """Which files under `component/` hold its weights (relative names), and the index file if sharded.

    safetensors before .bin; with `variant` only that variant; without, the plain files, or the variant
    files when those are the only ones (e.g. a folder saved fp16-only), fp16 first."""
    d = component + "/"
    variants = sorted({m.group(1) for n in names if n.startswith(d)
                       for m in [re.match(rf"{re.escape(d)}(?:{'|'.join(_WEIGHT_BASES)})\.(?:safetensors|bin)"
                                          r"(?:\.index)?\.(\w+)\.(?:safetensors|bin|json)$", n)
                                 or re.match(rf"{re.escape(d)}(?:{'|'.join(_WEIGHT_BASES)})\.(\w+)\.(?:safetensors|bin)$", n)]
                       if m}, key=lambda v: (v != "fp16", v))
    for v in ([variant] if variant else [None, *variants]):
        for ext in ("safetensors", "bin"):
            for base in _WEIGHT_BASES:
                single = f"{d}{base}.{v}.{ext}" if v else f"{d}{base}.{ext}"
                index = f"{d}{base}.{ext}.index.{v}.json" if v else f"{d}{base}.{ext}.index.json"
                if single in names:
                    return [single], None
                if index in names:
                    return [], index
    return [], None


def _read_component(folder: Path, component: str, variant: str | None, names: set[str]) -> dict[str, TensorRef]:
    files, index = pick_weight_files(names, component, variant)
    if index is not None:
        try:
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise _bad(folder / index, "is not a valid weight index (no weight_map)") from None
        files = [f"{component}/{s}" for s in shards]
        for s in shards:
            if "/" in s or "\\" in s or s.startswith("."):
                raise _bad(folder / index, f"names a shard outside its folder: {s!r}")
    if not files:
        want = f" (variant {variant!r})" if variant else ""
        raise SdgenError(f"{folder}: no weights for {component}{want} in {component}/")
    refs = {}
    for name in files:
        p = folder / name
        if not p.is_file():
            raise SdgenError(f"{p}: shard listed in {index} is missing")
        refs.update(read_weights_file(p))
    return refs


def _from_diffusers(source, folder: Path, variant: str | None) -> Checkpoint:
    index = _read_json(folder / "model_index.json")
    names = {p.relative_to(folder).as_posix() for c in COMPONENTS if (folder / c).is_dir() for p in (folder / c).iterdir()}
    from .spec import check_diffusers_family

    check_diffusers_family(folder.name, index)
    tensors, configs, ignored = {}, {}, []
    for comp in COMPONENTS:
        if not (folder / comp / "config.json").is_file():
            raise SdgenError(f"{folder}: not a complete diffusers folder: {comp}/config.json is missing")
        configs[comp] = _read_json(folder / comp / "config.json")
        raw = _read_component(folder, comp, variant, names)
        module, config_cls = _module(comp)
        renames = module.diffusers_renames(config_cls.from_diffusers(configs[comp]))
        refs = {renames.get(k, k): r for k, r in raw.items()}
        if comp == "text_encoder":
            refs = _normalize_text_encoder(refs, ignored, "text_encoder/")
        elif comp == "vae":
            refs = _fix_vae_shapes(refs)
        tensors[comp] = refs
    sched = folder / "scheduler" / "scheduler_config.json"
    tok = folder / "tokenizer"
    return Checkpoint(source=str(source), path=folder, format="diffusers", tensors=tensors, configs=configs,
                      tokenizer_dir=tok if any((tok / f).is_file() for f in ("vocab.json", "tokenizer.json")) else None,
                      scheduler_config=_read_json(sched) if sched.is_file() else None,
                      ignored=sorted(ignored), dtype_on_disk=_dtype_summary(tensors))


def _read_json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdgenError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise _bad(path, f"is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise _bad(path, "is not a JSON object")
    return out


# ------------------------------------------------------------------------------------------ hub


def _hub_patterns(variant: str | None, names: set[str] | None) -> list[str]:
    patterns = ["model_index.json", "scheduler/*", "tokenizer/*"] + [f"{c}/config.json" for c in COMPONENTS]
    if names is None:  # offline: whatever weights the cache holds
        return patterns + [f"{c}/*" for c in COMPONENTS]
    for comp in COMPONENTS:
        files, index = pick_weight_files(names, comp, variant)
        if index is not None:
            patterns.append(index)
            stem = index.split("/")[1].split(".")[0]
            ext = "safetensors" if ".safetensors." in index else "bin"
            patterns.append(f"{comp}/{stem}-*.{ext}" if not variant else f"{comp}/{stem}*{variant}*.{ext}")
        patterns += files
    return patterns


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Can the hub's host be resolved and reached? Offline, this answers in moments instead of the hub client's
    half a minute of retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _from_hub(repo: str, variant: str | None) -> Checkpoint:
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise SdgenError(f"{repo}: not a file or folder, and huggingface_hub is not installed to download it") from None
    offline_hint = (f"model {repo!r} is not in the local Hugging Face cache and we are offline; "
                    "point at a local file instead: --model path/to/model.safetensors")
    # A complete cached copy loads without touching the network.
    try:
        cached = Path(snapshot_download(repo, local_files_only=True, allow_patterns=_hub_patterns(variant, None)))
    except (LocalEntryNotFoundError, OSError, ValueError):
        cached = None
    if cached is not None:
        try:
            return _from_diffusers(repo, cached, variant)
        except SdgenError:
            if constants.HF_HUB_OFFLINE:  # what the cache holds is all there is
                raise
    if constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT):
        raise SdgenError(offline_hint)
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry warnings would bury our one line
    try:
        names = set(HfApi().list_repo_files(repo))
        folder = Path(snapshot_download(repo, allow_patterns=_hub_patterns(variant, names)))
    except LocalEntryNotFoundError:
        raise SdgenError(offline_hint) from None
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one line for the user
        kind = type(e).__name__
        if "Connect" in kind or "Timeout" in kind or "Offline" in kind:
            raise SdgenError(offline_hint) from None
        raise SdgenError(f"{repo}: could not download from Hugging Face ({kind}: {str(e).splitlines()[0][:200]})"
                         ) from None
    return _from_diffusers(repo, folder, variant)


# ------------------------------------------------------------------------------------------ entry points


def open_checkpoint(source: str | Path | None = None, *, variant: str | None = None) -> Checkpoint:
    """A single file (.safetensors/.ckpt/.pt/.bin), a diffusers folder, or a Hugging Face repo id."""
    source = DEFAULT_REPO if source is None else source
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _from_diffusers(source, path, variant)
        raise SdgenError(f"{path}: is a folder but not a diffusers model (no model_index.json)")
    if path.is_file():
        return _from_single_file(source, path)
    s = str(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", s) and not s.startswith((".", "/")) and Path(s).suffix not in (
            ".safetensors", ".ckpt", ".pt", ".bin", ".pth"):
        return _from_hub(s, variant)
    raise SdgenError(f"{source}: no such file or folder")


def load_module(cls, config, refs: dict[str, TensorRef], *, dtype, device, where: str) -> nn.Module:
    """cls(config) built on meta, then every tensor read straight to dtype/device, one at a time."""
    with torch.device("meta"):
        module = cls(config)
    expected = module.state_dict()
    name = Path(str(where)).name or str(where)
    missing = [k for k in expected if k not in refs]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SdgenError(f"{name}: {cls.__name__} weight {missing[0]!r} is missing{more}")
    unexpected = [k for k in refs if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise SdgenError(f"{name}: unexpected {cls.__name__} weight {unexpected[0]!r}{more}")
    for k, t in expected.items():
        if tuple(refs[k].shape) != tuple(t.shape):
            raise SdgenError(f"{name}: {cls.__name__} weight {k!r} has shape {tuple(refs[k].shape)}, "
                             f"expected {tuple(t.shape)}")
    state = {}
    for k in expected:
        state[k] = refs[k].load(dtype, device)
    module.load_state_dict(state, assign=True, strict=True)
    return module
