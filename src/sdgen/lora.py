"""LoRA files of every common layout, merged into the networks' weights for a request and taken out exactly.

    lib = LoraLibrary([Path("loras")], ckpt)           # ckpt: the opened checkpoint (key names and shapes)
    lora = lib.open("add_detail")                       # a name in the folders, or a path; checked against the model
    patcher.set(nets, [(lora, te_weight, unet_weight)]) # merged; patcher.set(nets, []) restores the originals

Per module, the update of a weight W (out, in[, kh, kw]) is, times the user's weight (te or UNet multiplier):
  LoRA/LoCon (kohya `lora_down`/`lora_up`/`alpha`, diffusers/PEFT `lora_A`/`lora_B`):
      up (out, r) @ down (r, in*kh*kw) * alpha / r;  with kohya's `lora_mid` (r, r, kh, kw) the Tucker form
  LoHa (LyCORIS `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `alpha`):
      (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r    (r = w1_b's rows; `hada_t1/t2`: the Tucker form of each)
  LoKr (LyCORIS `lokr_w1` or `lokr_w1_a @ lokr_w1_b`, `lokr_w2` or `lokr_w2_a @ lokr_w2_b` / Tucker `lokr_t2`):
      kron(w1, w2) * alpha / r  (r = the factored side's rank; 1 when neither side is factored)
A missing alpha means alpha = r (scale 1). PEFT files from diffusers carry alpha in their `lora_adapter_metadata`.

Module names: kohya flattens a module path with "_" under a prefix per network (`lora_unet_`, `lora_te_`), with
diffusers' names (`lora_unet_down_blocks_0_attentions_0_..._to_q`) or the original ones
(`lora_unet_input_blocks_1_1_...`); PEFT files use the dotted diffusers path under `unet.` / `text_encoder.`. All of
them are mapped through each component's diffusers renaming table (families/), built in one loop: the table below
only says which prefix belongs to which network, per family.

Applying keeps the original tensor of every touched weight and points the parameter at a merged copy; removing
points it back: exact, and only the touched layers are copied (measured in benchmarks/bench_lora.py against a
forward-time low-rank delta).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import SdgenError
from .formats import read_weights_file
from .formats.tensors import TensorRef, one_line

# ------------------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class Target:
    """Which network a LoRA key prefix belongs to."""

    component: str              # the pipeline's network ("unet", "text_encoder", ...)
    kohya: str                  # kohya prefix, e.g. "lora_unet_"
    peft: tuple[str, ...]       # diffusers/PEFT prefixes, e.g. ("unet.",)
    text: bool                  # a text encoder: the text-encoder multiplier applies


_SD = (Target("unet", "lora_unet_", ("unet.",), False),
       Target("text_encoder", "lora_te_", ("text_encoder.",), True))
# family -> targets. SDXL: unet; text_encoder ("lora_te1_", "text_encoder."); text_encoder_2 ("lora_te2_",
# "text_encoder_2.").
TARGETS: dict[str, tuple[Target, ...]] = {"sd1": _SD, "sd2": _SD}

# a key's tail -> (module kind, part). Longest tails first when matching.
PARTS: dict[str, tuple[str, str]] = {
    ".lora_down.weight": ("lora", "down"), ".lora_up.weight": ("lora", "up"), ".lora_mid.weight": ("lora", "mid"),
    ".lora_A.weight": ("lora", "down"), ".lora_B.weight": ("lora", "up"),
    ".lora_A.default.weight": ("lora", "down"), ".lora_B.default.weight": ("lora", "up"),
    ".lora.down.weight": ("lora", "down"), ".lora.up.weight": ("lora", "up"),
    ".lora_linear_layer.down.weight": ("lora", "down"), ".lora_linear_layer.up.weight": ("lora", "up"),
    ".hada_w1_a": ("loha", "w1_a"), ".hada_w1_b": ("loha", "w1_b"), ".hada_w2_a": ("loha", "w2_a"),
    ".hada_w2_b": ("loha", "w2_b"), ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"), ".lokr_w1_a": ("lokr", "w1_a"), ".lokr_w1_b": ("lokr", "w1_b"),
    ".lokr_w2": ("lokr", "w2"), ".lokr_w2_a": ("lokr", "w2_a"), ".lokr_w2_b": ("lokr", "w2_b"),
    ".lokr_t2": ("lokr", "t2"),
    ".alpha": ("", "alpha"),
}
_TAILS = sorted(PARTS, key=len, reverse=True)
# diffusers' old attention-processor layout: ...attn1.processor.to_q_lora.down.weight
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
FORMATS = {"lora": "LoRA", "loha": "LoHa (LyCORIS)", "lokr": "LoKr (LyCORIS)"}
# the cross-attention context width a LoRA's to_k/to_v reads -> the family it was made for
CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
FAMILY_LABELS = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL"}
SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


# ------------------------------------------------------------------------------------------ files


@dataclass(eq=False)
class Module:
    """One layer's update as stored in the file."""

    name: str                         # as in the file, e.g. "lora_unet_down_blocks_0_..._to_q"
    kind: str                         # "lora" | "loha" | "lokr"
    parts: dict[str, TensorRef]       # "down", "up", "mid", "w1_a", ... (alpha apart)
    alpha: float | None

    @property
    def rank(self) -> int | None:
        p = self.parts
        for key in ("down", "w1_b", "w2_b"):
            if key in p:
                return p[key].shape[0]
        return None


@dataclass(eq=False)
class LoraFile:
    path: Path
    modules: dict[str, Module]
    metadata: dict
    _hash: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def identity(self) -> tuple:
        stat = self.path.stat()
        return str(self.path.resolve()), stat.st_mtime_ns, stat.st_size

    @property
    def format(self) -> str:
        kinds = Counter(m.kind for m in self.modules.values())
        style = "kohya" if any(_kohya(n) for n in self.modules) else "diffusers/PEFT"
        conv = any(len(p.shape) == 4 and p.shape[2:] != (1, 1) for m in self.modules.values() for p in m.parts.values())
        names = ", ".join(FORMATS[k] + (" with 3x3 convs (LoCon)" if k == "lora" and conv else "")
                          for k in sorted(kinds))
        return f"{names}, {style} key names"

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values() if m.rank is not None})

    @property
    def family(self) -> str | None:
        """The family it was made for, from the kohya/modelspec metadata, else its keys and widths; None: unknown."""
        meta = self.metadata
        version = str(meta.get("ss_base_model_version", "")) + " " + str(meta.get("modelspec.architecture", ""))
        if "sdxl" in version or "stable-diffusion-xl" in version:
            return "sdxl"
        if "sd_v2" in version or "stable-diffusion-v2" in version or str(meta.get("ss_v2", "")) == "True":
            return "sd2"
        if "sd_v1" in version or "stable-diffusion-v1" in version:
            return "sd1"
        if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for n in self.modules):
            return "sdxl"
        for m in self.modules.values():
            if re.search(r"attn2[._]to_[kv]$", m.name):
                width = _in_width(m)
                if width in CONTEXT_WIDTHS:
                    return CONTEXT_WIDTHS[width]
        return None

    @property
    def shorthash(self) -> str:
        """A1111's `Lora hashes` entry: kohya's `sshs_model_hash` when the file has it, else the first 12 hex digits
        of the sha256 of the file (of its tensor data, after the header, for safetensors: the "addnet" hash)."""
        if self._hash is None:
            h = str(self.metadata.get("sshs_model_hash") or "")
            self._hash = h if re.fullmatch(r"[0-9a-f]{12,64}", h) else _file_hash(self.path)
        return self._hash[:12]

    def component_counts(self) -> dict[str, int]:
        counts: Counter = Counter()
        for name in self.modules:
            target = next((t for t in _SD + _SDXL_EXTRA if name.startswith((t.kohya, *t.peft))), None)
            counts[target.component if target else "?"] += 1
        return dict(counts)


_SDXL_EXTRA = (Target("text_encoder", "lora_te1_", (), True), Target("text_encoder_2", "lora_te2_", ("text_encoder_2.",), True))
# SDXL: CLIP-L as `lora_te1_` / PEFT `text_encoder.`, OpenCLIP bigG as `lora_te2_` / `text_encoder_2.` (the refiner
# has only the latter); their module names are transformers' (q_proj, fc1, ...), renamed by the OpenCLIP table.
TARGETS.update({"sdxl": (_SD[0], Target("text_encoder", "lora_te1_", ("text_encoder.",), True), _SDXL_EXTRA[1]),
                "sdxl-refiner": (_SD[0], _SDXL_EXTRA[1])})


def _kohya(name: str) -> bool:
    return name.startswith("lora_")


def _in_width(m: Module) -> int | None:
    p = m.parts
    for key in ("down", "w1_b", "w2_b"):
        if key in p and len(p[key].shape) >= 2:
            return p[key].shape[1]
    return None


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_lora(path: Path) -> LoraFile:
    """A LoRA file's modules (headers only: tensors stay on disk until applied). One line naming the file for
    anything that is not a LoRA."""
    path = Path(path)
    where = one_line(str(path))
    if not path.is_file():
        raise SdgenError(f"{where}: no such LoRA file")
    refs, metadata = read_weights_file(path)
    alphas = _peft_alphas(metadata, where)
    modules: dict[str, Module] = {}
    for key, ref in refs.items():
        m = _PROCESSOR.search(key)
        if m:
            out = "to_out.0" if m.group(1) == "to_out" else m.group(1)
            name, kind, part = key[: m.start()] + "." + out, "lora", m.group(2)
        else:
            tail = next((t for t in _TAILS if key.endswith(t)), None)
            if tail is None:
                if key.endswith((".dora_scale", ".diff", ".diff_b", ".on_input", ".weight_norm")):
                    raise SdgenError(f"{where}: {one_line(key)[:100]!r}: this LoRA variant (DoRA, full diff, IA3, norms) "
                                     "is not supported; sdgen reads LoRA, LoCon, LoHa and LoKr")
                if "lora" in path.stem.lower() or modules:
                    raise SdgenError(f"{where}: {one_line(key)[:100]!r} is not a LoRA, LoHa or LoKr tensor")
                raise SdgenError(f"{where}: not a LoRA file (first key: {one_line(key)[:100]!r})")
            name, (kind, part) = key[: -len(tail)], PARTS[tail]
        if name.startswith("base_model.model."):   # a PEFT model saved whole
            name = name[len("base_model.model."):]
        if part != "alpha" and not ref.is_float:
            raise SdgenError(f"{where}: {one_line(key)[:100]!r} is {str(ref.dtype).removeprefix('torch.')}, not floating point")
        mod = modules.setdefault(name, Module(name, kind, {}, None))
        if part == "alpha":
            if math.prod(ref.shape) != 1:
                raise SdgenError(f"{where}: {one_line(key)[:100]!r}: alpha must be one number, not shape {ref.shape}")
            mod.alpha = float(ref.load(torch.float32).reshape(()))
            continue
        if mod.kind and kind != mod.kind and mod.parts:
            raise SdgenError(f"{where}: module {one_line(name)[:100]!r} mixes {FORMATS[mod.kind]} and {FORMATS[kind]} tensors")
        mod.kind = kind
        mod.parts[part] = ref
    if not modules:
        raise SdgenError(f"{where}: holds no tensors: not a LoRA file")
    for mod in modules.values():
        _check_module(mod, where)
        if mod.alpha is None and mod.kind == "lora":
            mod.alpha = _peft_alpha(alphas, mod.name, mod.rank)
        if mod.alpha is not None and not math.isfinite(mod.alpha):
            raise SdgenError(f"{where}: module {one_line(mod.name)[:100]!r} has a non-finite alpha")
    return LoraFile(path, modules, metadata)


_NEEDED = {"lora": ({"down", "up"},), "loha": ({"w1_a", "w1_b", "w2_a", "w2_b"},),
           "lokr": ({"w1"}, {"w1_a", "w1_b"})}


def _check_module(mod: Module, where: str):
    p = mod.parts
    if not mod.kind:
        raise SdgenError(f"{where}: module {one_line(mod.name)[:100]!r} has an alpha but no weights")
    if mod.kind == "lokr":
        ok = (("w1" in p) or {"w1_a", "w1_b"} <= set(p)) and (("w2" in p) or {"w2_a", "w2_b"} <= set(p))
    else:
        ok = _NEEDED[mod.kind][0] <= set(p)
    if not ok:
        raise SdgenError(f"{where}: module {one_line(mod.name)[:100]!r} lacks some of its {FORMATS[mod.kind]} tensors "
                         f"(has {', '.join(sorted(p))})")
    for part, ref in p.items():
        if len(ref.shape) not in (2, 4):
            raise SdgenError(f"{where}: {one_line(mod.name)[:100]!r}.{part} has shape {ref.shape}; expected a matrix or "
                             "a conv kernel")


def _peft_alphas(metadata: dict, where: str) -> dict:
    """diffusers' `lora_adapter_metadata`: {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {...}, ...}."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise SdgenError(f"{where}: its lora_adapter_metadata is not JSON") from None
    return data if isinstance(data, dict) else {}


def _peft_alpha(alphas: dict, name: str, rank: int | None) -> float | None:
    """PEFT's lora_alpha for a module (alpha_pattern by module-name suffix first); None: alpha = rank."""
    prefix, _, module = name.partition(".")
    pattern = alphas.get(f"{prefix}.alpha_pattern") or {}
    for key, value in (pattern.items() if isinstance(pattern, dict) else ()):
        if module == key or module.endswith("." + key):
            return float(value)
    value = alphas.get(f"{prefix}.lora_alpha")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ------------------------------------------------------------------------------------------ binding to a model


@dataclass(eq=False)
class Patch:
    """One module of a LoRA file bound to one weight of a network."""

    component: str
    key: str                  # the parameter, e.g. "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    shape: tuple              # the parameter's shape
    text: bool
    module: Module
    rows: tuple[int, int] | None = None   # the update covers these rows of the weight (a fused q/k/v block)

    def delta(self, device=None) -> Tensor:
        """The update (shape) in float32, before the user's multiplier."""
        return update(self.module, self.shape, device)

    def add_to(self, acc: Tensor, mult: float) -> None:
        """acc (out, in*kh*kw) float32 += mult * the update; a plain LoRA as one fused multiply-add (no update
        tensor of the weight's size is built)."""
        m = self.module
        if m.kind == "lora" and "mid" not in m.parts:
            up, down = (m.parts[k].load(torch.float32, acc.device) for k in ("up", "down"))
            rank = down.shape[0]
            scale = m.alpha / rank if m.alpha is not None else 1.0
            acc.addmm_(up.reshape(up.shape[0], -1), down.reshape(rank, -1), alpha=scale * mult)
        else:
            acc.add_(self.delta(acc.device).reshape(acc.shape), alpha=mult)


def update(m: Module, shape: tuple, device=None) -> Tensor:
    """The module's update for a weight of `shape`, float32, scale included (the formulas in the module doc)."""
    p = {k: r.load(torch.float32, device) for k, r in m.parts.items()}
    flat = lambda t: t.reshape(t.shape[0], -1)
    if m.kind == "lora":
        up, down = p["up"], p["down"]
        rank = down.shape[0]
        if "mid" in p:
            d = torch.einsum("n m k l, i n, m j -> i j k l", p["mid"], flat(up), flat(down))
        else:
            d = flat(up) @ flat(down)
    elif m.kind == "loha":
        rank = p["w1_b"].shape[0]
        d = _hada_side(p, "1") * _hada_side(p, "2")
    else:
        w1 = p["w1"] if "w1" in p else p["w1_a"] @ p["w1_b"]
        if "w2" in p:
            w2 = p["w2"]
        elif "t2" in p:
            w2 = _cp(p["t2"], p["w2_a"], p["w2_b"])
        else:
            w2 = p["w2_a"] @ p["w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        d = torch.kron(w1, w2)
        rank = p["w1_b"].shape[0] if "w1_b" in p else p["w2_b"].shape[0] if "w2_b" in p else None
    scale = m.alpha / rank if m.alpha is not None and rank else 1.0
    if d.numel() != math.prod(shape):
        raise ValueError(tuple(d.shape))
    return d.reshape(shape).mul_(scale)


def _hada_side(p: dict, i: str) -> Tensor:
    a, b, t = p[f"w{i}_a"], p[f"w{i}_b"], p.get(f"t{i}")
    if t is not None:
        return _cp(t, a, b)
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)


def _cp(t: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """LyCORIS' Tucker rebuild: t (r, r, kh, kw) with a (r, out) and b (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1))


def module_names(family: str, components: dict[str, tuple[dict, dict]]) -> dict[str, tuple[Target, str, int | None]]:
    """{a LoRA module name in any layout: (target, our weight's key, part)}, for a model whose components are
    {name: ({diffusers key: our key}, {our key: shape})}. part i: the module is the i-th equal block of rows of a
    fused weight (OpenCLIP's in_proj_weight holds q, k, v: the table names them `in_proj_weight#0/1/2`)."""
    names: dict[str, tuple[Target, str, int | None]] = {}
    for target in TARGETS.get(family, ()):
        if target.component not in components:
            continue
        renames, shapes = components[target.component]
        pairs = [(k, k) for k in shapes] + list(renames.items())
        for theirs, ours in pairs:
            ours, _, part = ours.partition("#")
            if not theirs.endswith(".weight") or ours not in shapes or len(shapes[ours]) not in (2, 4) \
                    or (part and not part.isdigit()):
                continue
            theirs = theirs[: -len(".weight")]
            value = (target, ours, int(part) if part else None)
            names.setdefault(target.kohya + theirs.replace(".", "_"), value)
            for prefix in target.peft:
                names.setdefault(prefix + theirs, value)
    return names


def bind(lora: LoraFile, family: str, family_label: str, components: dict[str, tuple[dict, dict]],
         names: dict[str, tuple[Target, str]] | None = None) -> list[Patch]:
    """The LoRA's modules as patches of the model's weights. A LoRA for another family, a module the model does not
    have, or an update whose shape does not fit its weight: one line naming the file."""
    where = one_line(str(lora.path))
    made_for = lora.family
    if made_for is not None and made_for != family:
        raise SdgenError(f"{where}: a LoRA for {FAMILY_LABELS.get(made_for, made_for)}; this model is {family_label}")
    names = module_names(family, components) if names is None else names
    patches = []
    for m in lora.modules.values():
        if m.name not in names:
            raise SdgenError(f"{where}: LoRA module {one_line(m.name)[:120]!r} matches no layer of this "
                             f"{family_label} model (a LoRA for another model?)")
        target, key, part = names[m.name]
        shape = tuple(components[target.component][1][key])
        rows = None
        if part is not None:   # a block of a fused q/k/v weight
            n = shape[0] // 3
            rows, shape = (part * n, (part + 1) * n), (n, *shape[1:])
        want = _update_shape(m)
        if want is not None and math.prod(want) != math.prod(shape):
            raise SdgenError(f"{where}: LoRA module {one_line(m.name)[:120]!r} gives a {want} update for a {shape} "
                             f"weight (a LoRA for another model?)")
        patches.append(Patch(target.component, key, shape, target.text, m, rows))
    return patches


def _update_shape(m: Module) -> tuple | None:
    """The update's shape from the headers alone (before any tensor is read)."""
    p = {k: r.shape for k, r in m.parts.items()}
    if m.kind == "lora":
        if "mid" in p:
            return (p["up"][0], p["down"][1], *p["mid"][2:])
        return (p["up"][0], math.prod(p["down"][1:]))
    if m.kind == "loha":
        if "t1" in p:
            return (p["w1_a"][1], p["w1_b"][1], *p["t1"][2:])
        return (p["w1_a"][0], math.prod(p["w1_b"][1:]))
    w1 = p["w1"] if "w1" in p else (p["w1_a"][0], p["w1_b"][1])
    w2 = p["w2"] if "w2" in p else (p["w2_a"][1], p["w2_b"][1], *p["t2"][2:]) if "t2" in p else (p["w2_a"][0], p["w2_b"][1])
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


# ------------------------------------------------------------------------------------------ a model's LoRAs


class LoraLibrary:
    """The LoRA folders of a pipeline (--lora-dir) and the files opened from them, bound to one checkpoint."""

    def __init__(self, dirs, ckpt):
        self.dirs = [Path(d).expanduser() for d in (dirs or ())]
        for d in self.dirs:
            if not d.is_dir():
                raise SdgenError(f"{one_line(str(d))}: LoRA folder not found")
        self.ckpt = ckpt
        self._names = None
        self._opened: dict[tuple, tuple[LoraFile, list[Patch]]] = {}

    def _components(self) -> dict[str, tuple[dict, dict]]:
        ckpt = self.ckpt
        return {c.name: (c.renames(ckpt.configs[c.name]), ckpt.shapes(c.name)) for c in ckpt.family.components}

    def find(self, name: str) -> Path | None:
        """A LoRA by name: NAME.safetensors (.pt, .ckpt, .bin) in the folders or below (A1111 names them so)."""
        for d in self.dirs:
            for suffix in SUFFIXES:
                hits = sorted(p for p in d.rglob(f"{glob_escape(name)}{suffix}") if p.is_file())
                if hits:
                    return hits[0]
        return None

    def open(self, source) -> tuple[LoraFile, list[Patch]]:
        """(the file, its patches) for a path or a name in the folders; checked against the model."""
        path = Path(source).expanduser() if isinstance(source, (str, Path)) else None
        if path is None:
            raise SdgenError(f"a LoRA is a file path or a name, not {type(source).__name__}")
        if not path.is_file():
            found = self.find(str(source)) if "/" not in str(source) and path.suffix not in SUFFIXES else None
            if found is None:
                folders = ", ".join(one_line(str(d)) for d in self.dirs) or "none given (--lora-dir)"
                raise SdgenError(f"unknown LoRA {one_line(str(source))[:100]!r}: not a file, and not in the LoRA "
                                 f"folders ({folders})")
            path = found
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in self._opened:
            lora = read_lora(path)
            ckpt = self.ckpt
            if self._names is None:
                self._names = module_names(ckpt.family.name, self._components())
            patches = bind(lora, ckpt.family.name, ckpt.family.label, self._components(), self._names)
            self._opened[key] = (lora, patches)
        return self._opened[key]


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


class Patcher:
    """The LoRAs merged into a pipeline's networks now, and the original tensor of every weight they touch."""

    def __init__(self):
        self.active: tuple = ()
        self._saved: dict[tuple[str, str], Tensor] = {}

    def set(self, nets: dict[str, nn.Module], wanted: list[tuple[LoraFile, list[Patch], float, float]]) -> None:
        """Make the networks the base model plus exactly `wanted` [(file, patches, te weight, unet weight)]."""
        key = tuple((lora.identity, te, unet) for lora, _, te, unet in wanted)
        if key == self.active:
            return
        self.restore(nets)
        by_weight: dict[tuple[str, str], list[tuple[Patch, float]]] = {}
        for _, patches, te, unet in wanted:
            for patch in patches:
                mult = te if patch.text else unet
                if mult != 0:
                    by_weight.setdefault((patch.component, patch.key), []).append((patch, mult))
        # outside inference mode: the merged tensors become parameters, usable in any mode afterwards
        with torch.inference_mode(False), torch.no_grad():
            try:
                for (component, name), items in by_weight.items():
                    param = nets[component].get_parameter(name)
                    base = param.data
                    acc = torch.empty((base.shape[0], base[0].numel()), dtype=torch.float32, device=base.device)
                    acc.view(base.shape).copy_(base)
                    for patch, mult in items:   # summed in float32, rounded to the weight's dtype once
                        patch.add_to(acc if patch.rows is None else acc[patch.rows[0] : patch.rows[1]], mult)
                    if base.dtype == torch.float32 and base.is_contiguous():
                        merged = acc.view(base.shape)
                    else:
                        merged = torch.empty_like(base)     # keeps the weight's layout (channels_last convs)
                        merged.copy_(acc.view(base.shape))
                    self._saved[(component, name)] = base
                    param.data = merged
            except BaseException:
                self.restore(nets)
                raise
        self.active = key

    def restore(self, nets: dict[str, nn.Module]) -> None:
        """Every touched weight back to its original tensor (the very same tensor: bit for bit)."""
        for (component, name), base in self._saved.items():
            nets[component].get_parameter(name).data = base
        self._saved.clear()
        self.active = ()


def describe(lora: LoraFile) -> list[str]:
    """What `sdgen info` prints for a LoRA file."""
    fam = lora.family
    counts = lora.component_counts()
    ranks = lora.ranks
    alphas = sorted({m.alpha for m in lora.modules.values() if m.alpha is not None})
    lines = [f"lora:       {one_line(str(lora.path))}",
             f"format:     {lora.format}",
             f"family:     {FAMILY_LABELS.get(fam, fam) if fam else 'unknown (no metadata; widths not recognised)'}",
             f"modules:    {len(lora.modules)} ({', '.join(f'{n} {c}' for c, n in sorted(counts.items()))})",
             f"rank:       {', '.join(map(str, ranks)) if ranks else 'full (LoKr, unfactored)'}",
             f"alpha:      {', '.join(f'{a:g}' for a in alphas) if alphas else 'none (alpha = rank)'}",
             f"hash:       {lora.shorthash} (A1111 'Lora hashes')"]
    return lines
