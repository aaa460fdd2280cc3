"""Textual-inversion embeddings: the files of the ecosystem, their names in a prompt, their vectors.

    db = EmbeddingFolders([Path("embeddings")], tokenizer.encode)
    table = ExtraTokens(vocab_size=49408)
    match = db.matcher(table)             # for prompts.chunk_prompt: a name's tokens -> placeholder ids
    ...; table.rows("*")                  # (N, D) vectors the placeholder ids (vocab_size + i) stand for

Formats (those A1111 reads): A1111 `.pt` ({"string_to_param": {"*": (n, D)}, "name": ..., "step": ...}),
`.safetensors` with `emb_params` (n, D), diffusers `learned_embeds.bin`/`.safetensors` ({token: (D,) or (n, D)}),
SDXL files with `clip_l` (n, 768) and `clip_g` (n, 1280). A prompt calls an embedding by its file name without the
extension; the name is matched on token ids, as A1111 does, so `my-style` matches however the prompt spaces it.
Files are read when a prompt first uses them: a broken file that no prompt names costs nothing.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from . import SdgenError
from .formats import read_safetensors
from .formats.pickles import read_torch_object
from .formats.tensors import TensorRef, one_line

SINGLE = "*"           # the file key of a one-encoder embedding
# family -> {text-encoder component: the key of its vectors in an embedding file}. SDXL adds
# {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}.
ENCODER_KEYS: dict[str, dict[str, str]] = {
    "sd1": {"text_encoder": SINGLE},
    "sd2": {"text_encoder": SINGLE},
    "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    "sdxl-refiner": {"text_encoder_2": "clip_g"},
}
SUFFIXES = (".pt", ".bin", ".safetensors")
MAX_VECTORS = 75       # one chunk: an embedding is never split across chunks
MAX_FILE = 64 << 20    # real embeddings are kilobytes; a 64 MB "embedding" is something else


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str
    path: Path
    vectors: dict[str, Tensor]       # file key (SINGLE, "clip_l", "clip_g") -> (n, D) float32

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def shorthash(self) -> str:
        """A1111's `TI hashes` entry: the first 12 hex digits of the file's sha256."""
        return file_sha256(self.path)[:12]


def file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


_HASHES: dict[tuple, str] = {}


def read_embedding(path: Path, name: str | None = None) -> Embedding:
    """An embedding file of any of the formats above; anything else is one line naming the file."""
    path = Path(path)
    where = one_line(str(path))
    if not path.is_file():
        raise SdgenError(f"{where}: no such embedding file")
    if path.stat().st_size > MAX_FILE:
        raise SdgenError(f"{where}: {path.stat().st_size} bytes is too big for a textual-inversion embedding")
    if path.suffix == ".safetensors":
        raw, _ = read_safetensors(path)
    else:
        raw = read_torch_object(path)
    if not isinstance(raw, dict):
        raise SdgenError(f"{where}: not a textual-inversion embedding (the file holds a {type(raw).__name__})")
    if "string_to_param" in raw:                                     # A1111
        params = raw["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise SdgenError(f"{where}: not a textual-inversion embedding ('string_to_param' must hold one tensor)")
        vectors = {SINGLE: next(iter(params.values()))}
    elif "clip_l" in raw or "clip_g" in raw:                         # SDXL
        vectors = {k: raw.get(k) for k in ("clip_l", "clip_g")}
    else:                                                            # emb_params, diffusers {token: vector}
        tensors = {k: v for k, v in raw.items() if isinstance(v, TensorRef)}
        if len(tensors) != 1:
            raise SdgenError(f"{where}: not a textual-inversion embedding (expected one tensor, found "
                             f"{len(tensors)}{': ' + ', '.join(one_line(str(k))[:40] for k in list(tensors)[:4]) if tensors else ''})")
        vectors = {SINGLE: next(iter(tensors.values()))}
    out = {}
    for key, ref in vectors.items():
        if not isinstance(ref, TensorRef):
            raise SdgenError(f"{where}: not a textual-inversion embedding ({key!r} is not a tensor)")
        if not ref.is_float:
            raise SdgenError(f"{where}: the embedding's vectors are {str(ref.dtype).removeprefix('torch.')}, "
                             "not floating point")
        shape = ref.shape if len(ref.shape) != 1 else (1, *ref.shape)
        if len(shape) != 2 or not 1 <= shape[0] <= MAX_VECTORS or shape[1] < 1:
            raise SdgenError(f"{where}: embedding vectors of shape {tuple(ref.shape)}; expected (vectors, width) with "
                             f"1 to {MAX_VECTORS} vectors")
        t = ref.load(torch.float32).reshape(shape)
        if not torch.isfinite(t).all():
            raise SdgenError(f"{where}: the embedding holds NaN or infinite values")
        out[key] = t
    if len({t.shape[0] for t in out.values()}) != 1:
        raise SdgenError(f"{where}: the embedding's clip_l and clip_g hold different numbers of vectors")
    return Embedding(name or path.stem, path, out)


def check(emb: Embedding, family: str, widths: dict[str, int]) -> None:
    """Refuse, in one line naming the file, an embedding that does not fit the model's text encoders.
    widths: {text-encoder component: its hidden size}."""
    keys = ENCODER_KEYS.get(family, {c: SINGLE for c in widths})
    where = one_line(str(emb.path))
    for component, width in widths.items():
        key = keys.get(component, SINGLE)
        t = emb.vectors.get(key)
        if t is None:
            have = " and ".join(sorted(emb.vectors))
            kind = "an SDXL embedding (clip_l/clip_g)" if SINGLE not in emb.vectors else f"an embedding with {have}"
            raise SdgenError(f"{where}: {kind}; this model's {component} needs {'one set of vectors' if key == SINGLE else key}")
        if t.shape[1] != width:
            guess = {768: " (an SD1 embedding?)", 1024: " (an SD2 embedding?)"}.get(t.shape[1], "")
            raise SdgenError(f"{where}: an embedding of {t.shape[1]}-wide vectors{guess}; this model's {component} "
                             f"takes {width}")


class ExtraTokens:
    """Token-embedding rows added for one encoding: placeholder id vocab_size + i stands for row i."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.used: dict[str, Embedding] = {}
        self._start: dict[str, int] = {}
        self._rows = 0

    def add(self, emb: Embedding) -> list[int]:
        if emb.name not in self._start:
            self._start[emb.name] = self._rows
            self.used[emb.name] = emb
            self._rows += emb.count
        start = self.vocab_size + self._start[emb.name]
        return list(range(start, start + emb.count))

    def rows(self, key: str = SINGLE) -> Tensor | None:
        """(N, D) float32 vectors of file key `key` for the placeholder ids, or None when no embedding was used."""
        if not self.used:
            return None
        return torch.cat([e.vectors[key] for e in self.used.values()])


@dataclass
class EmbeddingFolders:
    """The embedding folders of a pipeline (A1111's --embeddings-dir): names from file names, read on first use."""

    dirs: list[Path]
    encode: Callable[[str], list[int]]          # the tokenizer's bare ids of a text
    check: Callable[[Embedding], None] = lambda emb: None   # refuses an embedding that does not fit the model
    _scan_key: tuple | None = field(default=None, repr=False)
    _files: dict[str, Path] = field(default_factory=dict, repr=False)
    _lookup: dict[int, list[tuple[list[int], str]]] = field(default_factory=dict, repr=False)
    _loaded: dict[tuple, Embedding] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.dirs = [Path(d).expanduser() for d in self.dirs]
        for d in self.dirs:
            if not d.is_dir():
                raise SdgenError(f"{one_line(str(d))}: embeddings folder not found")

    def _scan(self):
        """Files by name (first folder first; subfolders too, as A1111), rescanned when a folder changes."""
        key = tuple(_tree_mtime(d) for d in self.dirs)
        if key == self._scan_key:
            return
        files: dict[str, Path] = {}
        for d in self.dirs:
            for path in sorted(d.rglob("*")):
                if path.suffix.lower() in SUFFIXES and path.is_file() and path.stat().st_size > 0:
                    files.setdefault(path.stem, path)
        lookup: dict[int, list] = {}
        for name in files:
            ids = self.encode(name)
            if ids:
                lookup.setdefault(ids[0], []).append((ids, name))
        for entries in lookup.values():
            entries.sort(key=lambda e: len(e[0]), reverse=True)   # the longest name wins, as A1111
        self._files, self._lookup, self._scan_key = files, lookup, key

    @property
    def names(self) -> list[str]:
        self._scan()
        return sorted(self._files)

    def get(self, name: str) -> Embedding:
        self._scan()
        path = self._files[name]
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in self._loaded:
            emb = read_embedding(path, name)
            self.check(emb)
            self._loaded[key] = emb
        return self._loaded[key]

    def find(self, tokens: list[int], pos: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's ids start at tokens[pos], and how many tokens the name takes."""
        for ids, name in self._lookup.get(tokens[pos], ()):
            if tokens[pos : pos + len(ids)] == ids:
                return self.get(name), len(ids)
        return None

    def matcher(self, table: ExtraTokens):
        """prompts.chunk_prompt's `match`: the placeholder ids of the embedding named at tokens[pos]."""
        self._scan()

        def match(tokens, pos):
            found = self.find(tokens, pos)
            return None if found is None else (table.add(found[0]), found[1])

        return match


def _tree_mtime(d: Path) -> float:
    try:
        return max([os.stat(d).st_mtime_ns] + [os.stat(p).st_mtime_ns for p in d.rglob("*") if p.is_dir()])
    except OSError:
        return math.nan
