"""Checked reads of what model files claim, for the config classes: typed config fields (one line naming the file
and the field) and tensor shapes (one line naming the tensor). Nothing here knows about Stable Diffusion."""

from __future__ import annotations

import math
from typing import Mapping

from .. import SdgenError
from .jsons import _show


def shape_of(shapes: Mapping[str, tuple], key: str, ndims: tuple[int, ...], network: str) -> tuple:
    """shapes[key], which must have one of `ndims` dimensions, each at least 1."""
    shape = shapes.get(key)
    if shape is None:
        raise SdgenError(f"{network} weights lack {key!r}")
    if len(shape) not in ndims or any(d < 1 for d in shape):
        want = " or ".join(map(str, ndims))
        raise SdgenError(f"{network} weight {key!r} has shape {tuple(shape)}, expected {want} dimensions of at least 1")
    return tuple(shape)


def index_of(part: str) -> int | None:
    """A block number in a key ("input_blocks.3.0..." -> 3), or None when the part is not a plain small number."""
    return int(part) if part.isascii() and part.isdigit() and len(part) <= 6 else None


class Fields:
    """Typed reads of one JSON config object. An absent or null field takes its default; a value of the wrong type
    or out of range is one SdgenError naming the file (`where`) and the field. Booleans are not integers here."""

    def __init__(self, config: Mapping, where: str):
        if not isinstance(config, Mapping):
            raise SdgenError(f"{where}: is not a JSON object")
        self.config, self.where = config, where

    def error(self, key: str, problem: str) -> SdgenError:
        return SdgenError(f"{self.where}: field {key!r}: {problem}")

    def _get(self, key, default):
        value = self.config.get(key)
        return default if value is None else value

    def int(self, key: str, default, lo: int, hi: int):
        value = self._get(key, default)
        if value is None:
            return None
        if type(value) is not int:
            raise self.error(key, f"{_show(value)} is not an integer")
        if not lo <= value <= hi:
            raise self.error(key, f"{value} is out of range ({lo} to {hi})")
        return value

    def float(self, key: str, default, lo: float, hi: float, *, above: bool = False):
        """A finite number in [lo, hi] (in (lo, hi] with above=True)."""
        value = self._get(key, default)
        if type(value) not in (int, float):
            raise self.error(key, f"{_show(value)} is not a number")
        if not math.isfinite(value) or not (lo < value if above else lo <= value) or value > hi:
            bounds = f"above {lo} and at most {hi}" if above else f"{lo} to {hi}"
            raise self.error(key, f"{value} is out of range ({bounds})")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if type(value) is not bool:
            raise self.error(key, f"{_show(value)} is not true or false")
        return value

    def str(self, key: str, default: str, choices=None) -> str:
        value = self._get(key, default)
        if type(value) is not str:
            raise self.error(key, f"{_show(value)} is not a string")
        if choices is not None and value not in choices:
            raise self.error(key, f"{_show(value)} is not one of {', '.join(map(repr, choices))}")
        return value

    def ints(self, key: str, default, lo: int, hi: int, *, max_len: int, scalar: bool = False) -> tuple:
        """A non-empty list of integers in [lo, hi]; with scalar=True a single integer is read as a list of one."""
        value = self._get(key, default)
        if scalar and type(value) is int:
            value = (value,)
        if not isinstance(value, (list, tuple)) or any(type(v) is not int for v in value):
            kind = "an integer or a list of them" if scalar else "a list of integers"
            raise self.error(key, f"{_show(value)} is not {kind}")
        if not 1 <= len(value) <= max_len:
            raise self.error(key, f"has {len(value)} entries (1 to {max_len} expected)")
        bad = next((v for v in value if not lo <= v <= hi), None)
        if bad is not None:
            raise self.error(key, f"{bad} is out of range ({lo} to {hi})")
        return tuple(value)

    def strs(self, key: str, default, *, max_len: int) -> tuple:
        value = self._get(key, default)
        if not isinstance(value, (list, tuple)) or any(type(v) is not str for v in value):
            raise self.error(key, f"{_show(value)} is not a list of strings")
        if not 1 <= len(value) <= max_len:
            raise self.error(key, f"has {len(value)} entries (1 to {max_len} expected)")
        return tuple(value)
