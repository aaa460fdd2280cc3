"""safetensors files: the header is parsed and validated by us before anything is mapped."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import torch

from .jsons import JsonError, loads
from .tensors import MAX_HEADER, TensorRef, _bad, _check_size, _itemsize, _key, _Mapped, _Storage

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}



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
        header = loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _bad(path, "not a valid safetensors file: the header is not JSON") from None
    except JsonError as e:
        raise _bad(path, f"not a valid safetensors file: the header is not JSON we accept ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "not a valid safetensors file: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(type(v) is str for v in metadata.values()):
        raise _bad(path, "not a valid safetensors file: __metadata__ is not an object of strings")
    start, data_len = 8 + n, size - 8 - n
    spans, entries = [], {}
    for key, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape, (b, e) = info["shape"], info["data_offsets"]
            ok = type(shape) is list and type(b) is int and type(e) is int
        except (KeyError, TypeError, ValueError):
            raise _bad(path, f"tensor {_key(key)} has an invalid header entry {_entry(info)}") from None
        if not ok:
            raise _bad(path, f"tensor {_key(key)} has an invalid shape or offsets {_entry(info)}")
        _check_size(path, key, shape)
        if not 0 <= b <= e <= data_len:
            raise _bad(path, f"tensor {_key(key)} lies outside the file (offsets {[b, e]}, {data_len} data bytes): "
                             "truncated or corrupt")
        if e - b != math.prod(shape) * _itemsize(dtype):
            raise _bad(path, f"tensor {_key(key)}: shape {tuple(shape)} {info['dtype']} does not match its {e - b} "
                             "bytes")
        spans.append((b, e, key))
        entries[key] = (dtype, tuple(shape), b, e)
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise _bad(path, f"tensors {_key(k0)} and {_key(k1)} overlap: corrupt file")
    mapped = _Mapped(path)
    refs = {k: TensorRef(_Storage(mapped, start + b, e - b), dtype, shape) for k, (dtype, shape, b, e) in entries.items()}
    return refs, metadata



def _entry(info) -> str:
    """A header entry for a message: its JSON text, cut short (it is nested at most MAX_JSON_DEPTH deep)."""
    text = str(info)
    return text if len(text) <= 200 else text[:197] + "..."
