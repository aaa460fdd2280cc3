"""Model families: which networks a checkpoint holds, under which keys, with which sizes.

    ckpt = open_checkpoint("v1-5-pruned-emaonly.safetensors")   # headers only: family, sizes, scheduler, ...
    nets = ckpt.load(precision, device)                           # {component: network}, tensor by tensor

A family is a table of components (key prefix in an original single file, network, config, key mapping); the
layers below (sdgen.formats) read files without knowing any of this, and the networks are imported directly.
Opening reads headers and configs only, so a request can be checked against the model before any weight
is read (or downloaded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from .. import SdgenError
from ..formats import (Offline, TensorRef, component_patterns, is_repo_id, read_component, read_json, read_weights_file,
                       snapshot)
from ..precision import Precision
from ..sampling.schedule import SchedulerConfig


@dataclass(frozen=True)
class Component:
    """One network of a family and how its weights are named."""

    name: str                  # "unet"; also its folder in a diffusers repo
    prefix: str                # its key prefix in an original single file
    network: type              # built as network(config, compute_dtype); its attribute paths are the keys
    config: type               # .from_shapes({key: shape}) and .from_diffusers(config.json)
    renames: Callable          # config -> {diffusers key: our key}
    keys: Callable | None = None    # [our keys] -> {key: our key, or None to ignore} (old layouts, buffers)
    shapes: Callable | None = None  # {key: meta tensor} -> {key: meta tensor as the network stores it}


@dataclass(frozen=True)
class Family:
    name: str                  # "sd1"
    label: str                 # "Stable Diffusion 1.x"
    components: tuple[Component, ...]
    native_size: int           # pixels, when the file does not say (modelspec.resolution)
    scheduler: Mapping         # the scheduler_config.json a single file implies
    owns: Callable[[Mapping[str, tuple]], bool]   # single-file {key: shape} -> is it this family's?
    check: Callable[[str, Mapping], None]         # (name, {component: config}) -> refuses what it cannot run
    pipeline: str              # the diffusers pipeline class name of this family
    folder_size: Callable[[Mapping, Mapping], tuple[int, int]]   # (raw config.json, configs) -> native size

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)


@dataclass
class Checkpoint:
    """A model opened lazily: every fact about it, no weights read yet."""

    source: str                                  # what the user gave
    path: Path                                   # the file or folder read
    format: str                                  # "safetensors" | "ckpt" | "diffusers"
    family: Family
    tensors: dict[str, dict[str, TensorRef]]     # component -> {our key: lazy tensor}
    configs: dict[str, object]                   # component -> its Config (sizes)
    scheduler: SchedulerConfig
    native_size: tuple[int, int]                 # (width, height) the model was trained at
    tokenizer_dir: Path | None = None
    ignored: list[str] = field(default_factory=list)   # keys present but not used
    metadata: dict = field(default_factory=dict)       # safetensors __metadata__

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def inpainting(self) -> bool:
        """A 9-channel UNet: latents + mask + masked-image latents."""
        return self.configs["unet"].in_channels == 9

    @property
    def text_layers(self) -> int:
        return self.configs["text_encoder"].num_layers

    @property
    def dtype_on_disk(self) -> str:
        found = {str(r.dtype).removeprefix("torch.") for refs in self.tensors.values() for r in refs.values()
                 if r.dtype.is_floating_point}
        return found.pop() if len(found) == 1 else ("mixed" if found else "unknown")

    def parameters(self, component: str) -> int:
        return sum(math.prod(r.shape) for r in self.tensors[component].values())

    def shapes(self, component: str) -> dict[str, tuple]:
        return {k: ref.shape for k, ref in self.tensors.get(component, {}).items()}

    def load(self, precision: Precision, device) -> dict[str, nn.Module]:
        """{component: network} in eval mode, each tensor read straight to the storage dtype on `device`."""
        return {c.name: load_network(c, self.configs[c.name], self.tensors[c.name], precision, device,
                                     self.path.name).eval()
                for c in self.family.components}


def load_network(component: Component, config, refs: dict[str, TensorRef], precision: Precision, device,
                 where: str) -> nn.Module:
    """The network built on meta, then every tensor read straight to dtype/device, one at a time, in the layout
    the network chose for that parameter (see nets.layers.channels_last_)."""
    cls = component.network
    with torch.device("meta"):
        module = cls(config, compute_dtype=precision.compute)
    expected = module.state_dict()
    missing = [k for k in expected if k not in refs]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SdgenError(f"{where}: {cls.__name__} weight {missing[0]!r} is missing{more}")
    unexpected = [k for k in refs if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise SdgenError(f"{where}: unexpected {cls.__name__} weight {unexpected[0]!r}{more}")
    for k, t in expected.items():
        if tuple(refs[k].shape) != tuple(t.shape):
            raise SdgenError(f"{where}: {cls.__name__} weight {k!r} has shape {tuple(refs[k].shape)}, "
                             f"expected {tuple(t.shape)}")
    state = {}
    for k, t in expected.items():
        x = refs[k].load(precision.storage, device)
        state[k] = x.contiguous(memory_format=torch.channels_last) if \
            t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() else x
    module.load_state_dict(state, assign=True, strict=True)
    return module


# ------------------------------------------------------------------------------------------ opening


DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEMO = "demo"   # the built-in demo model (sdgen/data/demo.safetensors), trained by sdgen itself


def demo_path() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "demo.safetensors"


def open_checkpoint(source=None, *, variant: str | None = None, log=None) -> Checkpoint:
    """A single file (.safetensors/.ckpt/.pt/.bin), a diffusers folder, a Hugging Face repo id, or "demo"; read
    lazily. No source: SD1.5 from the local Hugging Face cache, else from the hub when it is reachable, else the
    built-in demo model, with one line through `log` saying so."""
    if source is None:
        try:
            return open_checkpoint(DEFAULT_REPO, variant=variant)
        except Offline:
            if not demo_path().is_file():
                raise
            (log or print)(f"note: {DEFAULT_REPO} is not in the local Hugging Face cache and the hub cannot be "
                           "reached: using the built-in demo model (coloured shapes, 128x128). For real images "
                           "give a checkpoint: --model path/to/model.safetensors")
            source = DEMO
    if source == DEMO:
        if not demo_path().is_file():
            raise SdgenError("the built-in demo model is not in this install (sdgen/data/demo.safetensors); "
                             "train it with: sdgen train-demo --out DIR")
        return _from_single_file(DEMO, demo_path())
    return _open(source, variant)


def _open(source, variant: str | None) -> Checkpoint:
    from . import sd1

    if not isinstance(source, (str, Path)):
        raise SdgenError(f"a model is a file, a folder or a repo id, not {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _from_diffusers(str(source), path, variant)
        raise SdgenError(f"{path}: is a folder but not a diffusers model (no model_index.json)")
    if path.is_file():
        return _from_single_file(str(source), path)
    if is_repo_id(str(source)):
        components = [c.name for c in sd1.FAMILY.components]
        return snapshot(str(source), lambda names: component_patterns(components, variant, names),
                        lambda folder: _from_diffusers(str(source), folder, variant))
    raise SdgenError(f"{source}: no such file or folder")


def _family_of_file(name: str, shapes: Mapping[str, tuple]) -> Family:
    from . import sd1

    for family in (sd1.FAMILY,):
        if family.owns(shapes):
            return family
    other = sd1.other_family(shapes)
    if other:
        raise SdgenError(f"{name}: this is {other}; {sd1.SUPPORTED}")
    prefixes = [c.prefix for c in sd1.FAMILY.components]
    present = [c for c in sd1.FAMILY.components if any(k.startswith(c.prefix) for k in shapes)]
    if not present:
        first = f" (first key: {next(iter(shapes))!r})" if shapes else " (it holds no tensors)"
        raise SdgenError(f"{name}: not a Stable Diffusion checkpoint: no key starts with {', '.join(prefixes)}{first}")
    missing = [c for c in sd1.FAMILY.components if c not in present]
    raise SdgenError(f"{name}: incomplete Stable Diffusion checkpoint: no {' or '.join(c.name for c in missing)} "
                     f"weights ({', '.join(c.prefix + '*' for c in missing)})")


def _native_size(metadata: Mapping, family: Family) -> tuple[int, int]:
    """modelspec.resolution ("768x512", the Stability model-spec key that A1111 and ComfyUI read) or the family's."""
    text = str(metadata.get("modelspec.resolution", ""))
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if 64 <= w <= 8192 and 64 <= h <= 8192 and w % 8 == 0 and h % 8 == 0:
            return w, h
    except ValueError:
        pass
    return family.native_size, family.native_size


def _adapt(component: Component, refs: dict[str, TensorRef], ignored: list[str], where: str) -> dict[str, TensorRef]:
    """Apply the component's key normalisation and stored-shape fixes, lazily."""
    if component.keys is not None:
        names, out = component.keys(list(refs)), {}
        for k, r in refs.items():
            ours = names.get(k, k)
            if ours is None:
                ignored.append(where + k)
            else:
                out[ours] = r
        refs = out
    if component.shapes is not None:  # run it on meta tensors, remember the reshapes it asks for
        fixed = component.shapes({k: torch.empty(r.shape, device="meta") for k, r in refs.items()})
        for k, r in refs.items():
            if tuple(fixed[k].shape) != tuple(r.shape):
                r.reshape = tuple(fixed[k].shape)
    return refs


def _check_floats(name: str, component: Component, refs: dict[str, TensorRef]) -> None:
    """Weights a network uses are floating point (integer buffers such as position_ids are ignored before this)."""
    bad = next((k for k, r in refs.items() if not r.is_float), None)
    if bad is not None:
        dtype = str(refs[bad].dtype).removeprefix("torch.")
        raise SdgenError(f"{name}: {component.network.__name__} weight {bad!r} is {dtype}, not floating point")


def _from_single_file(source: str, path: Path) -> Checkpoint:
    fmt = "safetensors" if path.suffix == ".safetensors" else "ckpt"
    refs, metadata = read_weights_file(path)
    family = _family_of_file(path.name, {k: r.shape for k, r in refs.items()})
    tensors, ignored = {c.name: {} for c in family.components}, []
    for key, ref in refs.items():
        for c in family.components:
            if key.startswith(c.prefix):
                tensors[c.name][key[len(c.prefix):]] = ref
                break
        else:
            ignored.append(key)
    for c in family.components:
        tensors[c.name] = _adapt(c, tensors[c.name], ignored, c.prefix)
        _check_floats(path.name, c, tensors[c.name])
    try:
        configs = {c.name: c.config.from_shapes({k: r.shape for k, r in tensors[c.name].items()})
                   for c in family.components}
    except SdgenError as e:
        raise SdgenError(f"{path.name}: {e}") from None
    family.check(path.name, configs)
    return Checkpoint(source=source, path=path, format=fmt, family=family, tensors=tensors, configs=configs,
                      scheduler=SchedulerConfig.from_diffusers(dict(family.scheduler)),
                      native_size=_native_size(metadata, family), ignored=sorted(ignored), metadata=metadata)


def _from_diffusers(source: str, folder: Path, variant: str | None) -> Checkpoint:
    from . import sd1

    index = read_json(folder / "model_index.json")
    sd1.check_diffusers_family(folder.name, index)
    family = sd1.FAMILY
    names = {p.relative_to(folder).as_posix() for c in family.components if (folder / c.name).is_dir()
             for p in (folder / c.name).iterdir()}
    tensors, configs, ignored = {}, {}, []
    raw_configs = {}
    for c in family.components:
        if not (folder / c.name / "config.json").is_file():
            raise SdgenError(f"{folder}: not a complete diffusers folder: {c.name}/config.json is missing")
        raw_configs[c.name] = read_json(folder / c.name / "config.json")
        configs[c.name] = c.config.from_diffusers(raw_configs[c.name], where=f"{c.name}/config.json")
    family.check(folder.name, configs)
    for c in family.components:
        renames = c.renames(configs[c.name])
        raw = read_component(folder, c.name, variant, names)
        tensors[c.name] = _adapt(c, {renames.get(k, k): r for k, r in raw.items()}, ignored, c.name + "/")
        _check_floats(folder.name, c, tensors[c.name])
    sched = folder / "scheduler" / "scheduler_config.json"
    tok = folder / "tokenizer"
    return Checkpoint(source=source, path=folder, format="diffusers", family=family, tensors=tensors, configs=configs,
                      scheduler=SchedulerConfig.from_diffusers(read_json(sched) if sched.is_file()
                                                               else dict(family.scheduler)),
                      native_size=family.folder_size(raw_configs, configs),
                      tokenizer_dir=tok if any((tok / f).is_file() for f in ("vocab.json", "tokenizer.json")) else None,
                      ignored=sorted(ignored))
