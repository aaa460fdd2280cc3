"""Files and folders: one weights file of any format, JSON configs, and which files of a diffusers-style
component folder hold its weights (variants, shards). Component names are the caller's."""

from __future__ import annotations

import re
from pathlib import Path

from .. import SdgenError
from .jsons import MAX_JSON, JsonError, loads
from .pickles import read_torch_file
from .safetensors import read_safetensors
from .tensors import TensorRef, _bad, _key, one_line

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
        files = [f"{component}/{s}" for s in _shards(folder / index)]
    if not files:
        want = f" (variant {variant!r})" if variant else ""
        raise SdgenError(f"{folder}: no weights for {component}{want} in {component}/")
    refs = {}
    for name in files:
        p = folder / name
        if not p.is_file():
            raise SdgenError(f"{p}: shard listed in {index} is missing")
        part = read_weights_file(p)[0]
        twice = next((k for k in part if k in refs), None)
        if twice is not None:
            raise _bad(p, f"tensor {_key(twice)} is also in another shard")
        refs.update(part)
    return refs


_SHARD_NAME = re.compile(r"\w[\w.+-]{0,199}")


def _shards(index: Path) -> list[str]:
    """The shard files a weight index names: plain file names next to it, never a path out of the folder."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise _where(index, "is not a valid weight index (no weight_map)")
    shards = set()
    for key, shard in weight_map.items():
        if type(shard) is not str:
            raise _where(index, f"field 'weight_map': tensor {_key(key)} maps to a {type(shard).__name__}, "
                                "not a file name")
        if shard not in shards:
            if not _SHARD_NAME.fullmatch(shard) or ".." in shard or not shard.endswith(WEIGHT_SUFFIXES):
                raise _where(index, "field 'weight_map': names a shard outside its folder or not a weights file: "
                                    f"{_key(shard)}")
            shards.add(shard)
    return sorted(shards)


def read_json(path: Path) -> dict:
    """A JSON object from a config, index or tokenizer file: size and nesting bounded, repeated keys refused; any
    problem is one line naming the file (with its folder: `unet/config.json`)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON:
            raise _where(path, f"is {size} bytes: too big for a config file")
        out = loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise SdgenError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, JsonError) as e:
        raise _where(path, f"is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(out, dict):
        raise _where(path, "is not a JSON object")
    return out


def _where(path: Path, what: str) -> SdgenError:
    """An error naming a file in a model folder by its folder and name (`unet/config.json`)."""
    name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    return SdgenError(one_line(f"{name}: {what}"))


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
