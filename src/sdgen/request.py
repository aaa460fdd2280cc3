"""One generation request: every parameter, one place for defaults, one check, the A1111 text both ways.

    req = GenerationRequest("a cat", steps=20, sampler="euler", seed=1)
    req = req.resolve(ckpt)          # defaults filled from the model (size, seed) and every rule checked
    text = req.parameters("model-name")                   # the A1111 `parameters` PNG text of image 0
    again = GenerationRequest.from_parameters(text)       # ... and back

The CLI, the Python API and the server build this object and check it before any model is loaded, so a request
that cannot run is refused in one line before a slow load or download.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, fields, replace
from typing import Protocol

from PIL import Image

from . import SdgenError
from .images import check_image
from .prompts import NetworkTag, extract_networks
from .sampling.samplers import SAMPLERS, by_label
from .sampling.schedule import SchedulerConfig, plan

MAX_SIDE = 8192      # pixels; beyond this a latent alone is gigabytes
MAX_IMAGES = 64      # images per request: prompts x batch size
MAX_STEPS = 1000
MAX_GUIDANCE = 100
SCHEDULES = {"normal": "Automatic", "karras": "Karras"}   # ours -> A1111's "Schedule type"
MODES = ("txt2img", "img2img", "inpaint")


class ModelFacts(Protocol):
    """What a request is checked against: an opened (not loaded) checkpoint has all of it."""

    scheduler: SchedulerConfig
    native_size: tuple[int, int]
    inpainting: bool
    text_layers: int


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | tuple[str, ...]
    negative_prompt: str | tuple[str, ...] = ""
    steps: int = 20
    guidance_scale: float = 7.5
    sampler: str = "euler"
    schedule: str = "normal"            # "normal" or "karras"
    seed: int | None = None             # None: random (resolve() picks it); image i uses seed + i
    width: int | None = None            # None: the init image's size (rounded down to 8), else the model's native size
    height: int | None = None
    batch_size: int = 1                 # images per prompt
    init_image: Image.Image | None = None    # img2img; with mask_image: inpainting
    strength: float = 0.8               # img2img/inpainting: how far to move from the init image
    mask_image: Image.Image | None = None    # white = repaint
    clip_skip: int = 1                  # 1 = the last CLIP layer, 2 = the penultimate (A1111's convention)
    # LoRAs besides the prompts' <lora:NAME:WEIGHT> tags: ((path or name, weight or (te, unet)), ...)
    loras: tuple = ()
    # SDXL refiner hand-off (a pipeline loaded with a refiner): the base denoises while the training timestep is at
    # least (1 - refiner_start) * 1000, the refiner the rest (diffusers' denoising_end / denoising_start)
    refiner_start: float | None = None
    # A1111 fields the pipeline adds as it runs (("Lora hashes", "name: 0123456789ab"), ("TI hashes", ...))
    extra_params: tuple = ()

    # ---- derived ---------------------------------------------------------------------------------------
    @property
    def prompts(self) -> list[str]:
        """One prompt per image, in batch order: prompt i's images are i * batch_size, ..."""
        ps = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        return [p for p in ps for _ in range(self.batch_size)]

    @property
    def negative_prompts(self) -> list[str]:
        ps = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        ns = [self.negative_prompt] if isinstance(self.negative_prompt, str) else list(self.negative_prompt)
        ns = ns * len(ps) if len(ns) == 1 else ns
        return [n for n in ns for _ in range(self.batch_size)]

    @property
    def count(self) -> int:
        return len(self.prompts)

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask_image is None else "inpaint"

    @property
    def seeds(self) -> list[int]:
        if self.seed is None:
            raise SdgenError("the request has no seed yet: resolve() it first")
        return [self.seed + i for i in range(self.count)]

    # ---- defaults and rules ----------------------------------------------------------------------------
    def resolve(self, model: ModelFacts | None = None) -> GenerationRequest:
        """A copy with every default filled (size from the init image or the model, a random seed), checked
        against the model's facts (or SD1.5's when the model is not known yet)."""
        self.check(model)
        width, height = self.width, self.height
        if self.init_image is not None:
            w0, h0 = self.init_image.size
            width, height = width or max(8, w0 // 8 * 8), height or max(8, h0 // 8 * 8)
        native = model.native_size if model is not None else (512, 512)
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little")
        out = replace(self, width=width or native[0], height=height or native[1], seed=seed)
        out.check(model)
        return out

    def check(self, model: ModelFacts | None = None) -> None:
        """Every rule a request must satisfy, each broken one a single clear line (SdgenError). Cheap: it runs
        before the model loads. `model`: an opened checkpoint (its scheduler, size limits, inpainting)."""
        def bad(msg):
            raise SdgenError(msg)

        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        negatives = [self.negative_prompt] if isinstance(self.negative_prompt, str) else self.negative_prompt
        if not isinstance(prompts, (list, tuple)) or not isinstance(negatives, (list, tuple)):
            bad("the prompt must be a string or a list of strings")
        if not prompts:
            bad("no prompt given (an empty list)")
        if not all(isinstance(p, str) for p in [*prompts, *negatives]):
            bad("prompts must be strings (use \"\" for no negative prompt)")
        if len(negatives) not in (1, len(prompts)):
            bad(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if not _whole(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            bad(f"steps must be a whole number from 1 to {MAX_STEPS}, not {self.steps!r}")
        if not _number(self.guidance_scale) or not 0 <= self.guidance_scale <= MAX_GUIDANCE:
            bad(f"guidance scale must be a number from 0 to {MAX_GUIDANCE}, not {self.guidance_scale!r}")
        if self.sampler not in SAMPLERS:
            bad(f"unknown sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.schedule not in SCHEDULES:
            bad(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.seed is not None and (not _whole(self.seed) or not 0 <= self.seed < 2**63 - MAX_IMAGES):
            bad(f"seed must be a whole number from 0 to 2**63-{MAX_IMAGES + 1}, not {self.seed!r}")
        if not _whole(self.batch_size) or not 1 <= self.batch_size <= MAX_IMAGES:
            bad(f"batch size must be a whole number from 1 to {MAX_IMAGES}, not {self.batch_size!r}")
        if len(prompts) * self.batch_size > MAX_IMAGES:
            bad(f"{len(prompts)} prompts x batch size {self.batch_size} is more than {MAX_IMAGES} images")
        if not _number(self.strength) or not 0 <= self.strength <= 1:
            bad(f"strength must be a number from 0 to 1, not {self.strength!r}")
        if self.refiner_start is not None:
            if not _number(self.refiner_start) or not 0 < self.refiner_start < 1:
                bad(f"refiner start must be a number between 0 and 1 (exclusive), not {self.refiner_start!r}")
            if self.sampler == "heun":   # diffusers counts its doubled timesteps: a hand-off we do not reproduce
                bad("the refiner hand-off does not work with heun: choose another sampler")
            if self.mask_image is not None:
                bad("the refiner continues txt2img and img2img, not inpainting")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (not _whole(v) or not 8 <= v <= MAX_SIDE or v % 8):
                bad(f"{name} must be a multiple of 8 from 8 to {MAX_SIDE}, not {v!r}")
        for name in ("init_image", "mask_image"):
            if getattr(self, name) is not None:
                check_image(getattr(self, name), name.replace("_", " "))
        layers = model.text_layers if model is not None else 12
        lora_weights(self.loras)
        for text in {*prompts, *negatives}:
            extract_networks(text)  # tag syntax (weights are numbers); the names are looked up when the model loads
        if not _whole(self.clip_skip) or not 1 <= self.clip_skip <= layers:
            bad(f"clip skip must be a whole number from 1 to {layers} (the text encoder's layers), "
                f"not {self.clip_skip!r}")
        init, mask = self.init_image, self.mask_image
        if mask is not None and init is None:
            bad("a mask needs an init image to inpaint")
        if mask is not None and mask.size != init.size:
            bad(f"the mask is {mask.size[0]}x{mask.size[1]} but the init image is {init.size[0]}x{init.size[1]}; "
                "they must match")
        if model is not None and model.inpainting and mask is None:
            bad("this is an inpainting model: give an init image and a mask")
        if init is not None and self.strength == 0:
            bad("strength 0 leaves the init image unchanged: use a strength above 0")
        # the plan's own rules (sampler/schedule pairs, step limits, img2img steps that would run)
        scheduler = model.scheduler if model is not None else SchedulerConfig.from_diffusers(None)
        plan(self.sampler, self.steps, scheduler, schedule=self.schedule,
             strength=self.strength if init is not None else 1.0)

    # ---- A1111 `parameters` text, both ways -----------------------------------------------------------
    def parameters(self, model_name: str | None = None, index: int = 0) -> str:
        """The A1111 `parameters` text of image `index` (seed + index), as A1111, ComfyUI and image sites read it."""
        fields_ = {"Steps": self.steps, "Sampler": SAMPLERS[self.sampler].label,
                   "CFG scale": _num(self.guidance_scale), "Seed": self.seeds[index],
                   "Size": f"{self.width}x{self.height}", "Model": model_name,
                   "Schedule type": SCHEDULES[self.schedule] if self.schedule != "normal" else None,
                   "Denoising strength": _num(self.strength) if self.init_image is not None else None,
                   "Clip skip": self.clip_skip if self.clip_skip != 1 else None,
                   "Refiner switch at": _num(self.refiner_start) if self.refiner_start is not None else None}
        # explicit LoRAs are written as the tags A1111 would read (as A1111 itself does for its sd_lora setting)
        lines = [self.prompts[index] + "".join(tag.text for tag in lora_tags(self.loras))]
        if self.negative_prompts[index]:
            lines.append(f"Negative prompt: {self.negative_prompts[index]}")
        fields_.update(dict(self.extra_params))
        lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields_.items() if v is not None))
        return "\n".join(lines)

    @classmethod
    def from_parameters(cls, text: str) -> tuple[GenerationRequest, dict]:
        """(request, other fields) from A1111 `parameters` text: the prompt lines, `Negative prompt: ...`, and the
        `Steps: ..., Sampler: ...` line. Fields we do not use (Model, Model hash, ...) come back in the dict;
        `Denoising strength` is returned there too, since it needs an init image to mean anything."""
        if not isinstance(text, str) or not text.strip():
            raise SdgenError("no generation parameters in the text")
        lines = text.strip("\n").split("\n")
        last = lines[-1] if _PARAM.search(lines[-1] or "") and "Steps:" in lines[-1] else None
        if last is None:
            raise SdgenError("not A1111 generation parameters: no 'Steps: ...' line")
        body = lines[:-1]
        neg_at = next((i for i, line in enumerate(body) if line.startswith("Negative prompt:")), None)
        prompt = "\n".join(body if neg_at is None else body[:neg_at])
        negative = "" if neg_at is None else "\n".join(body[neg_at:])[len("Negative prompt:"):].strip()
        found = {k.strip(): _unquote(v) for k, v in _PARAM.findall(last)}
        kw, rest = {"prompt": prompt, "negative_prompt": negative}, {}
        for key, value in found.items():
            try:
                if key == "Steps":
                    kw["steps"] = int(value)
                elif key == "Sampler":
                    label = value
                    if label.endswith(" Karras"):  # A1111 before 1.9 folded the schedule into the name
                        label, kw["schedule"] = label[: -len(" Karras")], "karras"
                    kw["sampler"] = by_label(label).name
                elif key == "Schedule type":
                    kw["schedule"] = "karras" if value.lower() == "karras" else "normal"
                elif key == "CFG scale":
                    kw["guidance_scale"] = float(value)
                elif key == "Seed":
                    kw["seed"] = int(value)
                elif key == "Size":
                    kw["width"], kw["height"] = (int(v) for v in value.lower().split("x"))
                elif key == "Clip skip":
                    kw["clip_skip"] = int(value)
                elif key == "Refiner switch at":
                    kw["refiner_start"] = float(value)
                else:
                    rest[key] = value
            except ValueError:
                raise SdgenError(f"generation parameters: {key}: {value!r} is not valid") from None
        return cls(**kw), rest


def lora_weights(loras) -> list[tuple[str, float, float]]:
    """[(path or name, text-encoder weight, UNet weight)] from a request's `loras`; a malformed entry is one line."""
    if isinstance(loras, (str, os.PathLike)) or not isinstance(loras, (list, tuple)):
        raise SdgenError("loras must be a list of (path or name, weight) pairs")
    out = []
    for item in loras:
        if isinstance(item, (str, os.PathLike)):
            item = (item, 1.0)
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], (str, os.PathLike)):
            raise SdgenError(f"each LoRA is (path or name, weight), not {item!r:.80}")
        source, w = item
        if isinstance(w, (list, tuple)):
            te, unet = w if len(w) == 2 else (None, None)
        else:
            te = unet = w
        if not (_number(te) and _number(unet)):
            raise SdgenError(f"LoRA {str(source)[:80]!r}: the weight must be a finite number or a pair (text encoder, "
                             f"UNet), not {w!r:.40}")
        out.append((os.fspath(source), float(te), float(unet)))
    return out


def lora_tags(loras) -> list:
    """The `<lora:NAME:WEIGHT>` tags that stand for a request's explicit LoRAs (NAME: the file name's stem)."""
    from pathlib import Path

    name = lambda s: Path(s).stem if Path(s).suffix.lower() in (".safetensors", ".pt", ".ckpt", ".bin") else Path(s).name
    return [NetworkTag("lora", name(source), te, unet) for source, te, unet in lora_weights(loras)]


_PARAM = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(v) -> str:
    text = str(v)
    return text if not any(c in text for c in ',:"\n') else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return re.sub(r"\\(.)", r"\1", v[1:-1])
    return v


def _num(x) -> str:
    """7.0 -> '7', 7.5 -> '7.5' (as A1111 writes its numbers)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _whole(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


REQUEST_FIELDS = tuple(f.name for f in fields(GenerationRequest))
