"""Files and folders: one weights file of any format, JSON configs, and which files of a diffusers-style
component folder hold its weights (variants, shards). Component names are the caller's."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .. import SdgenError
from .pickles import read_torch_file
from .safetensors import read_safetensors
from .tensors import TensorRef, _bad

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")


def read_weights_file(path: Path) -> tuple[dict[str, TensorRef], dict]:
    """{key: TensorRef} and the file's metadata (safetensors __metadata__; {} for pickles)."""
    if not path.is_file():
        raise SdgenError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_file(path), {}



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


def read_component(folder: Path, component: str, variant: str | None, names: set[str]) -> dict[str, TensorRef]:
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
        refs.update(read_weights_file(p)[0])
    return refs

def read_json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdgenError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise _bad(path, f"is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise _bad(path, "is not a JSON object")
    return out



def component_patterns(components, variant: str | None, names: set[str] | None) -> list[str]:
    """The files a diffusers-style repo needs for `components` (glob patterns), given its file names (None:
    whatever weights a local cache holds)."""
    patterns = ["model_index.json", "scheduler/*", "tokenizer/*"] + [f"{c}/config.json" for c in components]
    if names is None:
        return patterns + [f"{c}/*" for c in components]
    for comp in components:
        files, index = pick_weight_files(names, comp, variant)
        if index is not None:
            patterns.append(index)
            stem = index.split("/")[1].split(".")[0]
            ext = "safetensors" if ".safetensors." in index else "bin"
            patterns.append(f"{comp}/{stem}-*.{ext}" if not variant else f"{comp}/{stem}*{variant}*.{ext}")
        patterns += files
    return patterns
