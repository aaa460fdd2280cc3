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
from dataclasses import dataclass, field, replace
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
    fixed: Mapping | None = None    # config fields a single file cannot tell, the family's constants ({"head_channels": 64})
    single_keys: Callable | None = None   # as `keys`, for original single files only (SD2's unused last text block)


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
    # the text side: encode_chunk(nets, ids (B, 77), clip_skip, extras) -> (context (B, 77, D), pooled (B, P) or None)
    encode_chunk: Callable | None = None
    pad_token: str = "<|endoftext|>"   # what the tokenizer pads with when the model brings no tokenizer files
    # SDXL's added conditioning: added(pooled (B, P), width, height, negative, unet config) -> y (B, adm) or None
    added: Callable | None = None
    claims: Callable[[Mapping[str, tuple]], bool] | None = None   # its text encoder's keys are there (complete or not)
    single_file: Callable | None = None   # (metadata, {key: TensorRef}, path) -> (scheduler dict, native size)
    zero_negative: bool = False        # an empty negative prompt is zeros, not encoded (SDXL base in diffusers)

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    @property
    def text_components(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components if c.name.startswith("text_encoder"))


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
    zero_negative: bool = False   # diffusers' force_zeros_for_empty_prompt: "" as a negative prompt is zeros

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def inpainting(self) -> bool:
        """A 9-channel UNet: latents + mask + masked-image latents."""
        return self.configs["unet"].in_channels == 9

    @property
    def text_layers(self) -> int:
        return min(self.configs[name].num_layers for name in self.family.text_components)

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


def families() -> tuple[Family, ...]:
    """Every family sdgen runs, in the order single files are tried."""
    from . import sd1, sd2, sdxl

    return sd1.FAMILY, sd2.FAMILY, sdxl.FAMILY, sdxl.REFINER


def _open(source, variant: str | None) -> Checkpoint:
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
        components = sorted({c.name for f in families() for c in f.components})  # a repo lacking one is fine
        return snapshot(str(source), lambda names: component_patterns(components, variant, names),
                        lambda folder: _from_diffusers(str(source), folder, variant))
    raise SdgenError(f"{source}: no such file or folder")


def _family_of_file(name: str, shapes: Mapping[str, tuple]) -> Family:
    """The family from the key names (and, within a family, shapes): each family claims a file by its text
    encoder's prefix and owns it when every component is there."""
    from . import sd1

    found = families()
    for family in found:
        if family.owns(shapes):
            return family
    claimed = next((f for f in found[1:] if f.claims(shapes)), None)
    other = sd1.other_family(shapes)
    if other and claimed is None:
        raise SdgenError(f"{name}: this is {other}; {SUPPORTED}")
    family = claimed or found[0]
    prefixes = [c.prefix for c in family.components]
    present = [c for c in family.components if any(k.startswith(c.prefix) for k in shapes)]
    if not present:
        first = f" (first key: {next(iter(shapes))!r})" if shapes else " (it holds no tensors)"
        raise SdgenError(f"{name}: not a Stable Diffusion checkpoint: no key starts with {', '.join(prefixes)}{first}")
    missing = [c for c in family.components if c not in present]
    what = "Stable Diffusion" if claimed is None else family.label
    raise SdgenError(f"{name}: incomplete {what} checkpoint: no {' or '.join(c.name for c in missing)} "
                     f"weights ({', '.join(c.prefix + '*' for c in missing)})")


SUPPORTED = "sdgen supports Stable Diffusion 1.x, 2.x and XL (base and refiner)"


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
        if c.single_keys is not None:
            names = c.single_keys(list(tensors[c.name]))
            ignored += [c.prefix + k for k, ours in names.items() if ours is None]
            tensors[c.name] = {names[k]: r for k, r in tensors[c.name].items() if names[k] is not None}
        tensors[c.name] = _adapt(c, tensors[c.name], ignored, c.prefix)
        _check_floats(path.name, c, tensors[c.name])
    try:
        configs = {c.name: _sized(c, c.config.from_shapes({k: r.shape for k, r in tensors[c.name].items()}))
                   for c in family.components}
    except SdgenError as e:
        raise SdgenError(f"{path.name}: {e}") from None
    family.check(path.name, configs)
    scheduler, size = dict(family.scheduler), family.native_size
    if family.single_file is not None:
        scheduler, size = family.single_file(metadata, refs, path)
    native = _native_size(metadata, family)
    return Checkpoint(source=source, path=path, format=fmt, family=family, tensors=tensors, configs=configs,
                      scheduler=SchedulerConfig.from_diffusers(scheduler),
                      native_size=native if "modelspec.resolution" in metadata else (size, size),
                      ignored=sorted(ignored), metadata=metadata, zero_negative=family.zero_negative)


def _sized(component: Component, config):
    """A config read off shapes, with the family's constants for what shapes cannot tell."""
    if not component.fixed:
        return config
    config = replace(config, **component.fixed)
    problem = config.problem()
    if problem:
        raise SdgenError(f"the {component.name} weights describe {problem}")
    return config


class _Joined:
    """A tensor a diffusers folder stores in parts (OpenCLIP's fused q/k/v) or transposed (its text projection),
    read lazily like a TensorRef: `load` reads the parts and joins them."""

    def __init__(self, parts: list, transpose: bool = False):
        self.parts, self.transpose = parts, transpose
        self.dtype = parts[0].dtype
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        self.shape = tuple(reversed(shape)) if transpose else shape
        self.reshape = None

    @property
    def is_float(self) -> bool:
        return all(p.is_float for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def load(self, dtype=None, device="cpu") -> torch.Tensor:
        if len(self.parts) == 1:
            x = self.parts[0].load(dtype, device)
        else:
            x = torch.cat([p.load(dtype, device) for p in self.parts])
        return x.t().contiguous() if self.transpose else x


def _join_parts(refs: dict) -> dict:
    """Keys a rename table marked `key#0`, `key#1`, ... (parts along dim 0) or `key#T` (transposed) -> `key`."""
    out, parts = {}, {}
    for k, r in refs.items():
        if "#" not in k:
            out[k] = r
        else:
            base, tag = k.rsplit("#", 1)
            parts.setdefault(base, {})[tag] = r
    for base, tags in parts.items():
        if tags.keys() == {"T"}:
            out[base] = _Joined([tags["T"]], transpose=True)
        elif sorted(tags) == [str(i) for i in range(len(tags))] and \
                len({tuple(r.shape[1:]) for r in tags.values()}) == 1:
            out[base] = _Joined([tags[str(i)] for i in range(len(tags))])
        else:
            raise SdgenError(f"weights for {base!r} come in parts {sorted(tags)} that do not fit together")
    return out


def _from_diffusers(source: str, folder: Path, variant: str | None) -> Checkpoint:
    from . import sd1

    index = read_json(folder / "model_index.json")
    sd1.check_diffusers_family(folder.name, index)
    family = _family_of_folder(folder, index)
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
        renamed = _join_parts({renames.get(k, k): r for k, r in raw.items()})
        tensors[c.name] = _adapt(c, renamed, ignored, c.name + "/")
        _check_floats(folder.name, c, tensors[c.name])
    sched = folder / "scheduler" / "scheduler_config.json"
    # the first encoder's tokenizer (the SDXL refiner has only the second's)
    tok = next((folder / t for t in ("tokenizer", "tokenizer_2")
                if any((folder / t / f).is_file() for f in ("vocab.json", "tokenizer.json"))), None)
    zero = index.get("force_zeros_for_empty_prompt", family.zero_negative)
    return Checkpoint(source=source, path=folder, format="diffusers", family=family, tensors=tensors, configs=configs,
                      scheduler=SchedulerConfig.from_diffusers(read_json(sched) if sched.is_file()
                                                               else dict(family.scheduler)),
                      native_size=family.folder_size(raw_configs, configs), tokenizer_dir=tok,
                      ignored=sorted(ignored), zero_negative=zero is True)


def _family_of_folder(folder: Path, index: Mapping) -> Family:
    """SDXL folders list a second text encoder (the refiner no first one); SD1 and SD2 share a pipeline class and
    differ in the text encoder: OpenAI CLIP (quick GELU) or OpenCLIP (exact GELU)."""
    from . import sd1, sd2, sdxl

    def listed(name):
        entry = index.get(name)
        return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None

    if listed("text_encoder_2") or "XL" in str(index.get("_class_name", "")):
        return sdxl.FAMILY if listed("text_encoder") else sdxl.REFINER
    config = folder / "text_encoder" / "config.json"
    act = read_json(config).get("hidden_act") if config.is_file() else None
    return sd2.FAMILY if act == "gelu" else sd1.FAMILY
