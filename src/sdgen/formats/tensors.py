"""Lazy tensors in files: a `TensorRef` is (file mapping, byte range, dtype, shape), read on demand.

`load(dtype, device)` converts one tensor straight to the target dtype, then drops its pages from our address
space, so loading fp32 files as bf16 peaks near the bf16 size. Nothing here knows about Stable Diffusion.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import SdgenError

MAX_HEADER = 100 * 2**20  # safetensors header cap (as the reference reader's): real ones are < 1 MB
# What a tensor record may claim. The largest tensor of any Stable Diffusion model has ~10^8 elements (2**27); a
# record claiming more than 2**34 (64 GB of fp32), or more elements than its storage holds, is lying.
MAX_NUMEL = 2**34
MAX_NDIM = 16  # real ones: <= 5


def _bad(path, what) -> SdgenError:
    return SdgenError(one_line(f"{Path(path).name}: {what}"))


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """A message as one printable line, whatever names and values from a file it quotes."""
    return _CONTROL.sub("?", text)


def _key(key) -> str:
    """A tensor name for a one-line message: quoted (newlines escaped) and cut short."""
    text = repr(key) if isinstance(key, str) else f"<{type(key).__name__}>"
    return text if len(text) <= 120 else text[:116] + "...'"


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

    @property
    def is_float(self) -> bool:
        """Floating point on disk: what a network weight must be (integer tensors are buffers, e.g. position_ids)."""
        return self.dtype.is_floating_point

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


def _check_size(path, key, size):
    """A shape as a record may claim it: a few dimensions, none negative, at most MAX_NUMEL elements."""
    if len(size) > MAX_NDIM or any(type(s) is not int or s < 0 for s in size):
        raise _bad(path, f"tensor {_key(key)} has an invalid shape {_short(size)}")
    if max(size, default=0) > MAX_NUMEL or math.prod(size) > MAX_NUMEL:
        raise _bad(path, f"tensor {_key(key)} claims shape {tuple(size)}: larger than any real tensor (corrupt or "
                         "hostile file)")


def _check_view(path, key, ref: TensorRef):
    """Sizes, strides and offset of a pickled tensor must stay inside its storage, and it may not claim more
    elements than the storage holds (a stride-0 record could otherwise claim terabytes of a one-element storage)."""
    size, n = ref.size, ref.storage.nbytes // _itemsize(ref.dtype)
    _check_size(path, key, size)
    if type(ref.storage_offset) is not int or ref.storage_offset < 0:
        raise _bad(path, f"tensor {_key(key)} has an invalid storage offset")
    numel = math.prod(size)
    if numel == 0:
        return
    if numel > n:
        raise _bad(path, f"tensor {_key(key)} {tuple(size)} claims {numel} elements but its storage holds {n}")
    stride = ref.stride if ref.stride is not None else ()
    if ref.stride is not None and (len(stride) != len(size) or any(type(s) is not int or s < 0 for s in stride)):
        raise _bad(path, f"tensor {_key(key)} has invalid strides {_short(stride)}")
    last = ref.storage_offset + (sum((a - 1) * b for a, b in zip(size, stride)) if ref.stride is not None
                                 else numel - 1)
    if last >= n:
        raise _bad(path, f"tensor {_key(key)} {tuple(size)} reaches past the end of its data ({n} elements)")


def _check_claims(path, refs: dict, file_size: int):
    """All records together may not claim much more than the file holds: tensors sharing a storage (tied weights)
    are legitimate, a file whose records claim many times its size is lying (and would blow up memory on load)."""
    total = sum(r.nbytes for r in refs.values())
    if total > 4 * file_size + 2**20:
        key = max(refs, key=lambda k: refs[k].nbytes)
        raise _bad(path, f"its tensors claim {total} bytes (the largest, {_key(key)}, {refs[key].nbytes}) but the file "
                         f"holds {file_size}: corrupt or hostile records")


def _short(value, limit=80) -> str:
    """A shape for a message, without ever printing what is not a number (a hostile record could hold anything)."""
    if not isinstance(value, (tuple, list)):
        return type(value).__name__
    text = "(" + ", ".join(str(v) if type(v) is int else type(v).__name__ for v in value[:MAX_NDIM + 1]) + ")"
    return text if len(text) <= limit else text[: limit - 3] + "..."
