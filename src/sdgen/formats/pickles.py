"""Pickled PyTorch files (.ckpt/.pt/.bin, zip and legacy), read by a small pickle interpreter of our own.

It runs only the opcodes torch.save writes and calls only the functions in `_CALLS`, each of which checks the types
and sizes of its arguments; it never imports or calls anything else. Work and memory are bounded per byte of input:
the opcodes run, the bytes of the objects built, how deep containers nest, how big a dict key may be (hashing) and
how many names a pickle may use all have caps that real checkpoints stay far below. A container may not change
once it is inside another (torch.save never does that), so the nesting depth recorded when it is built stays true.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import SdgenError
from .tensors import (MAX_NDIM, MAX_NUMEL, TensorRef, _bad, _check_claims, _check_view, _itemsize, _key, _Mapped,
                      _Storage)

# Real SD checkpoints, measured: ~170 program bytes, ~32 opcodes and nesting 4 per tensor (SD1.5 with EMA: ~2.9k
# tensors, 0.5 MB, 100k opcodes; a Lightning training checkpoint with optimizer state: ~8k tensors, < 2 MB).
MAX_PICKLE = 64 * 2**20     # program bytes
MAX_OPS = 4_000_000         # steps: opcodes run + items put in containers + parts hashed (real: < 1M); ~2 s
MAX_MEMORY = 96 * 2**20     # bytes of the objects built, estimated (real: < 20 MB)
MAX_DEPTH = 32              # containers inside containers, and MARKs open at once (real: < 10)
MAX_KEY = 256               # parts of a dict key or set element: hashing and comparing them is bounded
MAX_NAMES = 256             # distinct globals one pickle may name (real: ~10)
MAX_TEXT = 16 * 2**20       # characters of one protocol-2 bytes object (_codecs.encode); numpy scalars: 8
MAX_MEMBER = 4096           # bytes of a small zip member (byteorder, version)


class _Refused(Exception):
    """The pickle names something outside the table: it would run code."""


class _Malformed(Exception):
    """The pickle is not one torch.save writes (corrupt or hostile): the message says what, in a few words."""


class _Inert:
    """Stands in for a non-tensor object in a checkpoint (training callbacks, numpy scalars): it takes no arguments
    and keeps no state; items and state given to it are dropped."""

    def __repr__(self):
        return f"<inert {type(self).__name__}>"


# non-tensor objects that real SD checkpoints carry next to the weights
_INERT_MODULES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
_INERT_NUMPY = {"scalar", "dtype", "_reconstruct", "ndarray"}

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_DTYPES = {n: getattr(torch, n) for n in ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn",
                                          "float8_e5m2", "int64", "int32", "int16", "int8", "uint8", "bool")}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


# ------------------------------------------------------------------------------------------ the callable table


@dataclass(frozen=True, eq=False)
class _Call:
    """An allowed global: `fn` checks its arguments and builds the value. `hashes`: what of its first argument it
    hashes ("elements", or "keys" of pairs), checked and paid for by the interpreter first."""

    name: str
    fn: object
    hashes: str | None = None


def _ints(value, what: str, hi: int, max_len: int = MAX_NDIM) -> tuple:
    if type(value) not in (tuple, list) or len(value) > max_len or any(type(v) is not int or not 0 <= v <= hi
                                                                       for v in value):
        raise _Malformed(f"{what} is not a short tuple of sizes")
    return tuple(value)


def _tensor(storage, storage_offset, size, stride, dtype=None) -> TensorRef:
    if not isinstance(storage, _Storage):
        raise _Malformed("a tensor without storage")
    if type(storage_offset) is not int or not 0 <= storage_offset <= 2**62:
        raise _Malformed("a tensor with an invalid storage offset")
    # sizes are checked against MAX_NUMEL with the tensor's name, once it is known (_check_view)
    size, stride = _ints(size, "a tensor's size", 2**62), _ints(stride, "a tensor's stride", 2**62)
    if len(size) != len(stride):
        raise _Malformed("a tensor whose size and stride differ in length")
    if dtype is not None and dtype not in _DTYPES.values():
        raise _Malformed("a tensor with an unknown dtype")
    return TensorRef(storage, storage.dtype if dtype is None else dtype, size, stride, storage_offset)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return _tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, TensorRef):
        raise _Malformed("a parameter without a tensor")
    return data


_REBUILD = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type(func, new_type, args, state):
    if not isinstance(func, _Call) or func.fn not in _REBUILD or type(args) is not tuple:
        raise _Malformed("a tensor subclass rebuilt by something other than a tensor function")
    return func.fn(*args)


def _ordered_dict():
    return OrderedDict()


def _size(dims):
    return _ints(dims, "a torch.Size", MAX_NUMEL)


def _encode(text, encoding="latin1"):
    """Protocol-2 bytes: _codecs.encode(str, 'latin1'), and nothing else (other codecs can be slow, other
    arguments are stringified)."""
    if type(text) is not str or encoding not in ("latin1", "latin-1") or len(text) > MAX_TEXT:
        raise _Malformed("_codecs.encode with arguments torch.save never writes")
    return text.encode("latin1")


def _sequence(value=()):
    if type(value) not in (list, tuple, set, frozenset):
        raise _Malformed("a collection built from something that is not one")
    return value


def _pairs(pairs=()):
    if type(pairs) not in (list, tuple) or any(type(p) not in (list, tuple) or len(p) != 2 for p in pairs):
        raise _Malformed("dict() of something other than pairs")
    return pairs


def _slice(*args):
    if not 1 <= len(args) <= 3 or any(a is not None and type(a) is not int for a in args):
        raise _Malformed("slice() of something other than integers")
    return slice(*args)


def _complex(real=0.0, imag=0.0):
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise _Malformed("complex() of something other than numbers")
    return complex(real, imag)


_CALLS = {
    "collections.OrderedDict": _ordered_dict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Size": _size,
    "_codecs.encode": _encode,
}
_HASHES = {}
for _m in ("builtins", "__builtin__"):  # harmless constructors only: no getattr, eval, exec, open, __import__
    _CALLS.update({f"{_m}.set": lambda v=(): set(_sequence(v)), f"{_m}.frozenset": lambda v=(): frozenset(_sequence(v)),
                   f"{_m}.tuple": lambda v=(): tuple(_sequence(v)), f"{_m}.list": lambda v=(): list(_sequence(v)),
                   f"{_m}.dict": lambda v=(): dict(_pairs(v)), f"{_m}.slice": _slice, f"{_m}.complex": _complex})
    _HASHES.update({f"{_m}.set": "elements", f"{_m}.frozenset": "elements", f"{_m}.dict": "keys"})
_CALLS = {name: _Call(name, fn, _HASHES.get(name)) for name, fn in _CALLS.items()}

# What may be hashed (a dict key, a set element): these, inert classes, and tuples/frozensets of them
_HASHABLE = (str, bytes, int, float, bool, type(None), complex, torch.dtype)
_TOO_BIG = MAX_KEY + 1


# ------------------------------------------------------------------------------------------ the interpreter


_MUTABLE = (list, dict, OrderedDict, set)
_U8, _U16, _I32, _U32, _U64, _F64 = map(struct.Struct, ("<B", "<H", "<i", "<I", "<Q", ">d"))


class _Unpickler:
    """Runs one pickle program from data[pos:]; `load()` returns its value and leaves `pos` after its STOP."""

    def __init__(self, data, pos: int = 0, storage_for=None):
        self.data, self.pos, self.storage_for = data, pos, storage_for
        self.stack, self.metastack, self.memo = [], [], {}
        self.depth = {}     # id -> nesting depth, for every container built (all kept alive by self.built)
        self.parts = {}     # id -> parts of a tuple or frozenset counted as hashing walks them (capped)
        self.built = []
        self.sealed = set()  # ids of mutable containers already inside another: they may not change any more
        self.names = {}
        self.ops = self.memory = 0

    def load(self):
        data, end, dispatch = self.data, len(self.data), self.dispatch
        try:
            while True:
                if self.pos >= end:
                    raise _Malformed("the pickle ends early (truncated)")
                op = data[self.pos]
                self.pos += 1
                self.ops += 1
                if self.ops > MAX_OPS:
                    self._step(0)
                handler, arg = dispatch.get(op, (None, None))
                if handler is None:
                    raise _Malformed(f"opcode {op:#04x} at byte {self.pos - 1} is not one torch.save writes")
                if handler(self, arg):
                    if self.metastack or len(self.stack) != 1:
                        raise _Malformed("the pickle stops with a malformed stack")
                    return self.stack.pop()
        except (IndexError, KeyError) as e:  # an empty stack or a memo miss: a malformed program
            kind = "reads a memo entry it never wrote" if isinstance(e, KeyError) else "pops more than it pushed"
            raise _Malformed(f"the pickle {kind} (at byte {self.pos - 1})") from None

    # ---------------------------------------------------------------- reading the program

    def _take(self, n: int):
        start, self.pos = self.pos, self.pos + n
        if n < 0 or self.pos > len(self.data):
            raise _Malformed("the pickle ends early (truncated)")
        return self.data[start:self.pos]

    def _unpack(self, fmt: struct.Struct):
        return fmt.unpack(self._take(fmt.size))[0]

    def _line(self) -> str:
        end = self.data.find(b"\n", self.pos, self.pos + 256) if isinstance(self.data, bytes) else \
            bytes(self.data[self.pos:self.pos + 256]).find(b"\n") + self.pos
        if end < self.pos:
            raise _Malformed("a global name longer than 256 bytes")
        return str(self._take(end + 1 - self.pos)[:-1], "utf-8")

    # ---------------------------------------------------------------- bookkeeping

    def _spend(self, nbytes: int):
        self.memory += nbytes
        if self.memory > MAX_MEMORY:
            raise _Malformed(f"the pickle builds more than {MAX_MEMORY >> 20} MB of objects: not a plain state dict")

    def _push(self, value, nbytes: int = 32):
        self._spend(nbytes)
        self.stack.append(value)

    def _inside(self, items) -> int:
        """Seal `items` (now inside a container) and return the depth of a container holding them. Each item
        visited is a step: copying a memoised list again and again costs its length each time."""
        self._step(len(items))
        depth, sealed, d = self.depth, self.sealed, 0
        for x in items:
            i = id(x)
            d = max(d, depth.get(i, 0))
            if type(x) in _MUTABLE:
                sealed.add(i)
        if d >= MAX_DEPTH:
            raise _Malformed(f"containers nest more than {MAX_DEPTH} deep: not a plain state dict")
        return d + 1

    def _new(self, container, items=(), slot: int = 8):
        """A container built from `items` (which it now holds)."""
        i = id(container)
        if i not in self.depth:
            self.built.append(container)
        self.depth[i] = self._inside(items)
        if type(container) in (tuple, frozenset):
            self.parts[i] = min(_TOO_BIG, 1 + sum(map(self._parts, items)))
        self._spend(64 + slot * len(container))
        return container

    def _parts(self, value) -> int:
        """How many parts hashing `value` walks (CPython does not cache tuple hashes and recurses in C), or
        _TOO_BIG for what may not be hashed here."""
        if type(value) in _HASHABLE:
            return 1
        if type(value) in (tuple, frozenset):
            return self.parts.get(id(value), _TOO_BIG)
        return 1 if isinstance(value, type) and issubclass(value, _Inert) else _TOO_BIG

    def _hashed(self, values):
        """`values` are about to be hashed: each must be small enough, and the walk is paid for in steps."""
        for v in values:
            n = self._parts(v)
            if n > MAX_KEY:
                what = "a " + type(v).__name__ if type(v) not in (tuple, frozenset) else f"over {MAX_KEY} parts"
                raise _Malformed(f"a dict key or set element with {what}")
            self._step(n)

    def _step(self, n: int):
        self.ops += n
        if self.ops > MAX_OPS:
            raise _Malformed(f"the pickle runs more than {MAX_OPS} steps: not a plain state dict")

    def _grow(self, target, items, slot: int):
        """`items` go into the mutable container `target` (on the stack)."""
        d = self._inside(items)  # first: a container put into itself is now sealed, and refused below
        if id(target) in self.sealed:
            raise _Malformed("a container changes after it was put into another (torch.save never does that)")
        self.depth[id(target)] = max(self.depth[id(target)], d)
        self._spend(slot * len(items))

    def _pop_mark(self) -> list:
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    # ---------------------------------------------------------------- opcodes: handler(self, arg) from `dispatch`

    def _proto(self, _):
        if not 2 <= self._take(1)[0] <= 5:
            raise _Malformed("an unknown pickle protocol")

    def _skip(self, n):  # FRAME: a read-ahead hint, and the program is in memory already
        self._take(n)

    def _stop(self, _):
        return True

    def _mark(self, _):
        if len(self.metastack) >= MAX_DEPTH:
            raise _Malformed(f"MARKs nest more than {MAX_DEPTH} deep: not a plain state dict")
        self.metastack.append(self.stack)
        self.stack = []

    def _pop(self, _):
        if self.stack:
            self.stack.pop()
        else:
            self._pop_mark()

    def _pop_mark_op(self, _):
        self._pop_mark()

    def _dup(self, _):
        self._push(self.stack[-1], 8)

    def _const(self, value):
        self._push(value, 8)

    def _number(self, fmt):
        self._push(self._unpack(fmt))

    def _long(self, fmt):  # LONG1, LONG4: a little-endian two's complement integer of n bytes
        n = self._unpack(fmt)
        if not 0 <= n <= 1024:
            raise _Malformed("an integer of more than 1024 bytes")
        self._push(int.from_bytes(self._take(n), "little", signed=True), 64 + n)

    def _text(self, fmt):
        n = self._unpack(fmt)
        self._spend(64 + max(n, 0))  # before decoding: a str takes at most about as many bytes as its UTF-8
        self._push(str(self._take(n), "utf-8", "surrogatepass"), 8)

    def _bytes(self, fmt):
        n = self._unpack(fmt)
        self._spend(64 + max(n, 0))
        self._push(bytes(self._take(n)), 8)

    def _empty(self, kind):
        self._push(self._new(kind()), 8 if kind is tuple else 32)

    def _tuple(self, _):
        items = self._pop_mark()
        self._push(self._new(tuple(items), items))

    def _tuple_n(self, n):
        items = self.stack[-n:]
        if len(items) != n:
            raise IndexError
        del self.stack[-n:]
        self._push(self._new(tuple(items), items))

    def _list(self, _):
        items = self._pop_mark()
        self._push(self._new(items, items))

    def _frozenset(self, _):
        items = self._pop_mark()
        self._hashed(items)
        self._push(self._new(frozenset(items), items, 32))

    def _dict(self, _):
        items = self._pop_mark()
        self._push(self._new({}))
        self._set_items(items)

    def _append(self, _):
        self._extend([self.stack.pop()])

    def _appends(self, _):
        self._extend(self._pop_mark())

    def _extend(self, items):
        target = self.stack[-1]
        if type(target) is list:
            self._grow(target, items, 8)
            target.extend(items)
        elif not isinstance(target, _Inert):
            raise _Malformed(f"the pickle appends to a {type(target).__name__}")

    def _setitem(self, _):
        value, key = self.stack.pop(), self.stack.pop()
        self._set_items([key, value])

    def _setitems(self, _):
        self._set_items(self._pop_mark())

    def _set_items(self, items):
        target = self.stack[-1]
        if isinstance(target, _Inert):
            return
        if type(target) not in (dict, OrderedDict) or len(items) % 2:
            raise _Malformed(f"the pickle sets items of a {type(target).__name__}")
        self._grow(target, items, 48)
        self._hashed(items[::2])
        for i in range(0, len(items), 2):
            key = items[i]
            if key in target:
                raise _Malformed(f"the key {_key(key)} is set twice")
            target[key] = items[i + 1]

    def _additems(self, _):
        items, target = self._pop_mark(), self.stack[-1]
        if isinstance(target, _Inert):
            return
        if type(target) is not set:
            raise _Malformed(f"the pickle adds set items to a {type(target).__name__}")
        self._hashed(items)
        self._grow(target, items, 32)
        target.update(items)

    def _memo_put(self, fmt):  # BINPUT, LONG_BINPUT; MEMOIZE (fmt None): the next free index
        index = len(self.memo) if fmt is None else self._unpack(fmt)
        if index not in self.memo:
            self._spend(64)
        self.memo[index] = self.stack[-1]

    def _memo_get(self, fmt):
        self._push(self.memo[self._unpack(fmt)], 8)

    def _global(self, _):
        module = self._line()
        self._push_global(module, self._line())

    def _stack_global(self, _):
        name, module = self.stack.pop(), self.stack.pop()
        if type(name) is not str or type(module) is not str:
            raise _Malformed("a global whose name is not a string")
        self._push_global(module, name)

    def _push_global(self, module: str, name: str):
        full = f"{module}.{name}"
        value = self.names.get(full)
        if value is None:
            if len(self.names) >= MAX_NAMES:
                raise _Malformed(f"the pickle names more than {MAX_NAMES} globals: not a plain state dict")
            value = self.names[full] = _resolve(module, name)
            self._spend(1024)
        self._push(value, 8)

    def _reduce(self, _):
        args, func = self.stack.pop(), self.stack[-1]
        if type(args) is not tuple:
            raise _Malformed("a call whose arguments are not a tuple")
        if isinstance(func, type) and issubclass(func, _Inert):
            self.stack[-1] = func()
            return
        if not isinstance(func, _Call):
            raise _Malformed(f"the pickle calls a {type(func).__name__}, which is not a function")
        if func.hashes and args and type(args[0]) in (list, tuple, set, frozenset):
            self._spend(8 * len(args[0]))
            self._hashed(args[0] if func.hashes == "elements" else
                         [p[0] for p in args[0] if type(p) in (list, tuple) and p])
        try:
            value = func.fn(*args)
        except TypeError:  # the number of arguments
            raise _Malformed(f"{func.name} called with {len(args)} arguments") from None
        self._inside(args)  # what the value keeps of its arguments may no longer change
        if type(value) in (tuple, list, set, frozenset):
            self._new(value, value)
        elif type(value) in (dict, OrderedDict):
            self._new(value, [*value.keys(), *value.values()], 48)
        else:
            self._spend(64 + (len(value) if type(value) is bytes else 0))
        self.stack[-1] = value

    def _newobj(self, n_args):  # NEWOBJ: cls, args; NEWOBJ_EX: cls, args, kwargs. Only inert classes.
        if len(self.stack) <= n_args:
            raise IndexError
        del self.stack[-n_args:]
        cls = self.stack.pop()
        if not (isinstance(cls, type) and issubclass(cls, _Inert)):
            raise _Malformed(f"the pickle creates a {type(cls).__name__} object directly")
        self._push(cls(), 64)

    def _build(self, _):
        state, inst = self.stack.pop(), self.stack[-1]
        if isinstance(inst, TensorRef):
            raise _Malformed("a tensor record is changed after it was built (BUILD)")
        if not isinstance(inst, (_Inert, dict)):  # inert: no state; a state dict's _metadata is not needed
            raise _Malformed(f"the pickle sets the state of a {type(inst).__name__}")

    def _binpersid(self, _):
        pid = self.stack.pop()
        if self.storage_for is None or type(pid) is not tuple or not pid or pid[0] not in ("storage", b"storage"):
            raise _Refused("an unknown persistent object")
        if len(pid) < 5 or not isinstance(pid[1], _StorageType):
            raise _Refused("a storage of an unknown type")
        key, numel = pid[2], pid[4]
        if type(key) is not str or len(key) > 64 or type(numel) is not int or not 0 <= numel <= MAX_NUMEL:
            raise _Malformed("a storage record with an invalid key or size")
        self._push(self.storage_for(key, numel * _itemsize(pid[1].dtype), pid[1].dtype), 128)

    # the opcodes torch.save's pickles use (protocol 2, and 3 to 5 for other writers); anything else is refused
    dispatch = {
        0x80: (_proto, None), 0x95: (_skip, 8), ord("."): (_stop, None), ord("("): (_mark, None),
        ord("0"): (_pop, None), ord("1"): (_pop_mark_op, None), ord("2"): (_dup, None),
        ord("N"): (_const, None), 0x88: (_const, True), 0x89: (_const, False),
        ord("J"): (_number, _I32), ord("K"): (_number, _U8), ord("M"): (_number, _U16), ord("G"): (_number, _F64),
        0x8A: (_long, _U8), 0x8B: (_long, _I32),
        ord("X"): (_text, _U32), 0x8C: (_text, _U8), 0x8D: (_text, _U64), ord("T"): (_text, _I32),
        ord("U"): (_text, _U8), ord("B"): (_bytes, _U32), ord("C"): (_bytes, _U8), 0x8E: (_bytes, _U64),
        ord(")"): (_empty, tuple), ord("]"): (_empty, list), ord("}"): (_empty, dict), 0x8F: (_empty, set),
        ord("t"): (_tuple, None), 0x85: (_tuple_n, 1), 0x86: (_tuple_n, 2), 0x87: (_tuple_n, 3),
        ord("l"): (_list, None), 0x91: (_frozenset, None), ord("d"): (_dict, None),
        ord("a"): (_append, None), ord("e"): (_appends, None), ord("s"): (_setitem, None),
        ord("u"): (_setitems, None), 0x90: (_additems, None),
        ord("q"): (_memo_put, _U8), ord("r"): (_memo_put, _U32), 0x94: (_memo_put, None),
        ord("h"): (_memo_get, _U8), ord("j"): (_memo_get, _U32),
        ord("c"): (_global, None), 0x93: (_stack_global, None), ord("R"): (_reduce, None),
        0x81: (_newobj, 1), 0x92: (_newobj, 2), ord("b"): (_build, None), ord("Q"): (_binpersid, None),
    }


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,199}")


def _resolve(module: str, name: str):
    """The value a global names: one of ours, or refused before anything could run."""
    if not _NAME.fullmatch(module) or not _NAME.fullmatch(name):
        raise _Malformed("a global whose name is not a Python name")
    full = f"{module}.{name}"
    if full in _CALLS:
        return _CALLS[full]
    if module == "torch" and name in _DTYPES:
        return _DTYPES[name]
    if module == "torch" and name in _STORAGE_DTYPES or full == "torch.storage.UntypedStorage":
        return _StorageType(_STORAGE_DTYPES.get(name, torch.uint8))
    if module.startswith(_INERT_MODULES) or module.split(".")[0] == "numpy" and name in _INERT_NUMPY:
        return type(name, (_Inert,), {"__module__": module})
    raise _Refused(full[:200])


def _unpickle(path, data, pos: int = 0, storage_for=None):
    """(value, position after it) of the pickle at data[pos:]; anything wrong is one line naming the file."""
    try:
        unpickler = _Unpickler(data, pos, storage_for)
        return unpickler.load(), unpickler.pos
    except _Refused as e:
        raise _bad(path, f"refusing to load: the pickle wants to call {e.args[0]} (a .ckpt must only contain tensors)"
                   ) from None
    except _Malformed as e:
        raise _bad(path, f"not a readable PyTorch checkpoint ({e.args[0]})") from None
    except SdgenError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed pickle is the user's file being wrong
        raise _bad(path, f"not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]})") from None


# ------------------------------------------------------------------------------------------ files


def read_torch_file(path: Path) -> dict[str, TensorRef]:
    """State dict of a torch.save file (zip or legacy), `{"state_dict": ...}` unwrapped, as TensorRefs."""
    size = path.stat().st_size
    if size == 0:
        raise _bad(path, "the file is empty")
    obj = _read_zip(path) if _is_zip(path) else _read_legacy(path, size)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise _bad(path, f"holds a {type(obj).__name__}, not a state dict of tensors")
    # one record per key, even where the pickle shares one object between keys (a later reshape is per key)
    refs = {k: dataclasses.replace(v) for k, v in obj.items() if isinstance(v, TensorRef) and isinstance(k, str)}
    for k, ref in refs.items():
        _check_view(path, k, ref)
    _check_claims(path, refs, size)
    return refs


def read_torch_object(path: Path):
    """What a torch.save file holds (dicts, lists, numbers, strings; tensors as TensorRefs), every tensor checked as
    read_torch_file checks them: for files whose tensors are not a flat state dict (textual-inversion embeddings)."""
    size = path.stat().st_size
    if size == 0:
        raise _bad(path, "the file is empty")
    obj = _read_zip(path) if _is_zip(path) else _read_legacy(path, size)
    refs, stack = {}, [("", obj)]
    while stack:  # the unpickler bounds the nesting depth and the object count
        key, value = stack.pop()
        if isinstance(value, TensorRef):
            refs[key or "tensor"] = value
        elif isinstance(value, dict):
            stack += [(f"{key}.{k}" if key else str(k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            stack += [(f"{key}.{i}", v) for i, v in enumerate(value)]
    for k, ref in refs.items():
        _check_view(path, k, ref)
    _check_claims(path, refs, size)
    return obj


def _is_zip(path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except Exception:  # noqa: BLE001 - is_zipfile raises on some corrupt directories: _read_zip says what is wrong
        return True


def _member(path, z: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    """One zip member, read whole only if it is at most `cap` bytes (checked as it inflates, not as claimed)."""
    if info.file_size > cap:
        raise _bad(path, f"{info.filename[-80:]!r} is {info.file_size} bytes: not a plain state dict")
    try:
        with z.open(info) as f:
            data = f.read(cap + 1)
    except Exception as e:  # noqa: BLE001 - zipfile raises many kinds (BadZipFile, zlib.error, EOFError, ...)
        raise _bad(path, f"corrupt zip archive ({type(e).__name__}: {str(e)[:120]})") from None
    if len(data) > cap:
        raise _bad(path, f"{info.filename[-80:]!r} is over {cap} bytes: not a plain state dict")
    return data


def _read_zip(path: Path):
    try:
        z = zipfile.ZipFile(path)
    except Exception as e:  # noqa: BLE001 - BadZipFile, OSError, struct/unicode errors of a corrupt directory
        raise _bad(path, f"corrupt zip archive ({type(e).__name__}: {str(e)[:120]})") from None
    with z, open(path, "rb") as f:
        infos = {i.filename: i for i in z.infolist()}
        pkls = sorted((n for n in infos if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
        if not pkls:
            raise _bad(path, "is a zip archive but not a PyTorch checkpoint (no data.pkl)")
        prefix = pkls[0][: -len("data.pkl")]
        if prefix + "byteorder" in infos and \
                _member(path, z, infos[prefix + "byteorder"], MAX_MEMBER).strip() not in (b"little", b""):
            raise _bad(path, "was saved on a big-endian machine; re-save it as safetensors")
        program = _member(path, z, infos[pkls[0]], MAX_PICKLE)
        mapped, spans = _Mapped(path), []

        def zip_storage(key, nbytes, dtype):
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise _bad(path, f"storage {_key(key)} is missing from the archive (truncated?)")
            if info.compress_type != zipfile.ZIP_STORED:
                raise _bad(path, f"storage {_key(key)} is compressed; torch.save never does that")
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise _bad(path, f"corrupt zip entry for storage {_key(key)}")
            n_name, n_extra = struct.unpack("<HH", head[26:30])
            offset = info.header_offset + 30 + n_name + n_extra
            if nbytes > info.file_size or offset + nbytes > mapped.size:
                raise _bad(path, f"storage {_key(key)} claims {nbytes} bytes but holds {info.file_size}: truncated")
            spans.append((offset, offset + nbytes, key))
            return _Storage(mapped, offset, nbytes, dtype)

        obj, _ = _unpickle(path, program, 0, _storage_table(zip_storage, {}))
        spans.sort()
        for (_, e0, k0), (b1, _, k1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise _bad(path, f"storages {_key(k0)} and {_key(k1)} overlap: corrupt archive")
        return obj


def _storage_table(make, storages: dict):
    """The pickle's persistent-id hook: one storage per key in `storages`, made by make(key, nbytes, dtype) on
    first sight."""
    def storage_for(key, nbytes, dtype):
        if key not in storages:
            storages[key] = make(key, nbytes, dtype)
        elif storages[key].nbytes != nbytes:
            raise _Malformed(f"storage {_key(key)} is given two sizes")
        return storages[key]

    return storage_for


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_legacy(path: Path, size: int):
    """torch.save(..., _use_new_zipfile_serialization=False): five pickles (magic, protocol, system info, the
    object, its storage keys), then each storage as int64 count + data."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        raise _bad(path, "truncated or corrupt: a zip archive (torch.save format) whose end is missing")
    if len(head) < 2 or head[0] != 0x80:  # every pickle of protocol >= 2 starts with PROTO
        raise _bad(path, "not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    mapped, storages = _Mapped(path), {}
    with memoryview(mapped.mm) as whole:
        program = whole[: min(size, MAX_PICKLE)]
        try:
            magic, pos = _unpickle(path, program)
            if magic != _LEGACY_MAGIC:
                raise _bad(path, "is a pickle but not a PyTorch checkpoint (bad magic number)")
            _, pos = _unpickle(path, program, pos)  # protocol version
            sys_info, pos = _unpickle(path, program, pos)
            if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
                raise _bad(path, "was saved on a big-endian machine; re-save it as safetensors")
            obj, pos = _unpickle(path, program, pos, _storage_table(
                lambda key, nbytes, dtype: _Storage(mapped, None, nbytes, dtype), storages))
            keys, offset = _unpickle(path, program, pos)
        finally:
            program.release()
        if type(keys) is not list or any(type(k) is not str for k in keys) or len(set(keys)) != len(keys):
            raise _bad(path, "corrupt legacy checkpoint (no storage list)")
        for key in keys:
            if offset + 8 > size:
                raise _bad(path, "truncated: storage data is missing")
            (count,) = struct.unpack("<q", whole[offset:offset + 8])
            st = storages.get(key)
            if st is None:
                raise _bad(path, f"corrupt legacy checkpoint (unknown storage {_key(key)})")
            nbytes = count * _itemsize(st.dtype)
            if count < 0 or nbytes != st.nbytes or offset + 8 + nbytes > size:
                raise _bad(path, f"truncated or corrupt: storage {_key(key)} does not fit in the file")
            st.offset = offset + 8
            offset += 8 + nbytes
    for key, st in storages.items():
        if st.offset is None:
            raise _bad(path, f"corrupt legacy checkpoint (storage {_key(key)} has no data)")
    return obj
