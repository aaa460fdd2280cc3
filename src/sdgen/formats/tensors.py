"""Lazy tensors in files: a `TensorRef` is (file mapping, byte range, dtype, shape), read on demand.

`load(dtype, device)` converts one tensor straight to the target dtype, then drops its pages from our address
space, so loading fp32 files as bf16 peaks near the bf16 size. Nothing here knows about Stable Diffusion.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import SdgenError

MAX_HEADER = 100 * 2**20  # safetensors header / pickle program size cap: real ones are < 1 MB


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

