"""The files a server may use: the model it started with, the checkpoints in --models-dir, LoRA and embedding files.

A request names a model (A1111's `sd_model_checkpoint`) by a title from this listing, never by a path: the name
is looked up among the entries found under the folder, so no request can reach a file outside it (links that
point out of the folder are not listed).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import SdgenError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
NETWORK_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
MAX_DEPTH = 4          # sub-folders searched below each folder
MAX_ENTRIES = 2000     # files listed per folder: a mistyped --models-dir / is not walked to the end


@dataclass(frozen=True)
class Model:
    title: str          # what clients show and send back: the path inside --models-dir ("sd15/v1-5.safetensors")
    model_name: str     # the title without its extension, as A1111 names it
    source: str         # what sdgen.load() is given: an absolute path, or the --model text as typed


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError):
        return False


def _walk(root: Path, want_file, want_folder=lambda p: False) -> list[Path]:
    """Files (and model folders) under `root`, sorted, never leaving it."""
    if root is None or not root.is_dir():
        return []
    root = root.resolve()
    found = []
    for here, dirs, files in os.walk(root, followlinks=False):
        depth = len(Path(here).relative_to(root).parts)
        for d in list(dirs):
            p = Path(here, d)
            if want_folder(p) and _inside(root, p):
                found.append(p)
                dirs.remove(d)     # a diffusers folder is one model, not a place to look for more
        dirs[:] = [d for d in sorted(dirs) if not d.startswith(".")] if depth < MAX_DEPTH else []
        found += [Path(here, f) for f in files if want_file(f) and _inside(root, Path(here, f))]
        if len(found) >= MAX_ENTRIES:
            break
    return sorted(found)[:MAX_ENTRIES]


_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]$")   # A1111 titles end in " [hash]"; clients may send it back


class Library:
    def __init__(self, model: str | None, models_dir=None, lora_dir=None, embeddings_dir=None):
        self.start = model
        self.start_name = None   # with no --model: the name of what load() picked (SD1.5 or the demo), once loaded
        self.models_dir = Path(models_dir).resolve() if models_dir else None
        self.lora_dir = Path(lora_dir).resolve() if lora_dir else None
        self.embeddings_dir = Path(embeddings_dir).resolve() if embeddings_dir else None
        for what, folder in (("--models-dir", self.models_dir), ("--lora-dir", self.lora_dir),
                             ("--embeddings-dir", self.embeddings_dir)):
            if folder is not None and not folder.is_dir():
                raise SdgenError(f"{what} {folder}: not a folder")

    def _start_model(self) -> Model:
        text = self.start or self.start_name or "default"
        if self.start and Path(self.start).exists():
            path = Path(self.start).resolve()
            if self.models_dir and _inside(self.models_dir, path):
                title = path.relative_to(self.models_dir).as_posix()
            else:
                title = path.name
            return Model(title, Path(title).stem if path.is_file() else title, str(path))
        return Model(text, text, self.start)

    def models(self) -> list[Model]:
        """The starting model first, then every checkpoint under --models-dir."""
        out = [self._start_model()]
        for p in _walk(self.models_dir, lambda f: f.lower().endswith(CHECKPOINT_SUFFIXES),
                       lambda p: (p / "model_index.json").is_file()):
            title = p.relative_to(self.models_dir).as_posix()
            if title != out[0].title:
                out.append(Model(title, title.rsplit(".", 1)[0] if p.is_file() else title, str(p)))
        return out

    def find(self, name: str) -> Model:
        """The model a client names: by title or model name (an A1111 " [hash]" suffix is ignored)."""
        if not isinstance(name, str) or not name.strip():
            raise SdgenError("give a model title from /sdapi/v1/sd-models")
        wanted = _HASH.sub("", name.strip())
        models = self.models()
        for m in models:
            if wanted in (m.title, m.model_name):
                return m
        for m in models:   # a bare file name ("v1-5.safetensors") for a model in a sub-folder
            if wanted in (Path(m.title).name, Path(m.model_name).name):
                return m
        known = ", ".join(m.title for m in models[:20])
        raise SdgenError(f"unknown model {name[:200]!r}: the server has {known}")

    def loras(self) -> list[dict]:
        """A1111's /sdapi/v1/loras: [{name, alias, path, metadata}] of the files in --lora-dir."""
        return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}}
                for p in _walk(self.lora_dir, lambda f: f.lower().endswith(NETWORK_SUFFIXES))]

    def embeddings(self) -> dict:
        """A1111's /sdapi/v1/embeddings: {loaded: {name: {...}}, skipped: {}} for the files in --embeddings-dir."""
        files = _walk(self.embeddings_dir, lambda f: f.lower().endswith(NETWORK_SUFFIXES))
        return {"loaded": {p.stem: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                    "shape": None, "vectors": None} for p in files},
                "skipped": {}}
