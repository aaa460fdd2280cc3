"""The HTTP API's request shapes (AUTOMATIC1111's and OpenAI's) and their translation to a GenerationRequest.

    body = Txt2Img.model_validate(json)                  # types checked by pydantic; unknown fields ignored
    request, n_iter, model = a1111_request(body, limits, options, library)    # FieldError names the bad field

Fields a client leaves out take sdgen's own defaults (those of `sdgen generate`: 20 steps, CFG 7.5, Euler, the
model's native size), so that the same fields give the same image from the API as from the CLI.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict

from .. import SdgenError, images
from ..request import SCHEDULES, GenerationRequest
from ..sampling.samplers import SAMPLERS, by_label


class FieldError(SdgenError):
    """A request refused because of one field: answered 422 with "field: message"."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's --max-* options). Beyond it: 422 naming the field."""

    max_body: int = 32 * 2**20     # bytes of a request body (an init image as base64 is 4/3 of its PNG)
    max_side: int = 2048           # width and height, pixels
    max_steps: int = 150
    max_images: int = 16           # batch_size x n_iter (OpenAI: n)
    max_prompt: int = 20_000       # characters of a prompt or negative prompt


# ----------------------------------------------------------------------------------------------- shapes


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")   # A1111 clients send many fields sdgen has no use for


class Txt2Img(_Body):
    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    cfg_scale: float | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None      # older clients send the sampler's name here
    scheduler: str | None = None          # "Automatic", "Karras" (A1111 1.9+)
    seed: int | None = -1                 # -1: random
    batch_size: int = 1
    n_iter: int = 1
    width: int | None = None
    height: int | None = None
    clip_skip: int | None = None          # SillyTavern sends it here as well as in override_settings
    override_settings: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False


class Img2Img(Txt2Img):
    init_images: list[str] | None = None  # base64, data-URL or plain; the first is used (as A1111 does)
    mask: str | None = None               # white = repaint
    inpainting_mask_invert: int | bool = 0
    denoising_strength: float | None = None


class Options(_Body):
    model_config = ConfigDict(extra="allow")
    sd_model_checkpoint: str | None = None
    CLIP_stop_at_last_layers: int | None = None


class PngInfo(_Body):
    image: str


class OpenAIImages(_Body):
    prompt: str
    n: int = 1
    size: str | None = None               # "512x512"; None or "auto": the model's native size
    response_format: str = "b64_json"     # or "url" (answered with a data: URL; nothing is stored)
    model: str | None = None
    negative_prompt: str | None = None    # not OpenAI's, but harmless and handy


# -------------------------------------------------------------------------------------------- conversion


def _check_text(name: str, text: str, limits: Limits) -> str:
    if len(text) > limits.max_prompt:
        raise FieldError(name, f"{len(text)} characters; at most {limits.max_prompt}")
    return text


def _sampler_and_schedule(body: Txt2Img) -> dict:
    out = {}
    field, label = ("sampler_name", body.sampler_name) if body.sampler_name else ("sampler_index", body.sampler_index)
    if label:
        label = label.strip()
        if label.endswith(" Karras"):   # before A1111 1.9 the schedule was part of the name: "DPM++ 2M Karras"
            label, out["schedule"] = label[: -len(" Karras")], "karras"
        try:
            out["sampler"] = by_label(label).name
        except SdgenError as e:
            raise FieldError(field, str(e)) from None
    if body.scheduler:
        key = body.scheduler.strip().lower()
        by_name = {**{k: k for k in SCHEDULES}, **{v.lower(): k for k, v in SCHEDULES.items()}}
        if key not in by_name:
            raise FieldError("scheduler", f"unknown scheduler {body.scheduler!r}: sdgen has "
                             f"{', '.join(SCHEDULES.values())}")
        if not (key == "automatic" and "schedule" in out):
            out["schedule"] = by_name[key]
    return out


def _clip_skip(body: Txt2Img, options: dict) -> int:
    overrides = body.override_settings or {}
    for field, value in (("override_settings.CLIP_stop_at_last_layers", overrides.get("CLIP_stop_at_last_layers")),
                         ("clip_skip", body.clip_skip)):
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FieldError(field, f"must be a whole number from 1, not {value!r}")
            return value
    return options.get("CLIP_stop_at_last_layers", 1)


def a1111_request(body: Txt2Img, limits: Limits, options: dict, library,
                  init_image=None, mask=None) -> tuple[GenerationRequest, int, object]:
    """(request, n_iter, model) for an A1111 txt2img/img2img body, every field checked, nothing loaded."""
    fields: dict[str, Any] = {"prompt": _check_text("prompt", body.prompt, limits),
                              "negative_prompt": _check_text("negative_prompt", body.negative_prompt, limits)}
    if body.steps is not None:
        if not 1 <= body.steps <= limits.max_steps:
            raise FieldError("steps", f"must be from 1 to {limits.max_steps}, not {body.steps}")
        fields["steps"] = body.steps
    if body.cfg_scale is not None:
        fields["guidance_scale"] = body.cfg_scale
    fields.update(_sampler_and_schedule(body))
    if body.seed is not None and body.seed != -1:
        fields["seed"] = body.seed
    for name in ("batch_size", "n_iter"):
        if getattr(body, name) < 1:
            raise FieldError(name, f"must be at least 1, not {getattr(body, name)}")
    if body.batch_size * body.n_iter > limits.max_images:
        raise FieldError("batch_size", f"batch_size x n_iter is {body.batch_size * body.n_iter} images; "
                         f"at most {limits.max_images}")
    fields["batch_size"] = body.batch_size
    for name in ("width", "height"):
        v = getattr(body, name)
        if v is not None:
            if not 8 <= v <= limits.max_side or v % 8:
                raise FieldError(name, f"must be a multiple of 8 from 8 to {limits.max_side}, not {v}")
            fields[name] = v
    fields["clip_skip"] = _clip_skip(body, options)
    if init_image is not None:
        fields["init_image"] = init_image
        fields["mask_image"] = mask
        if getattr(body, "denoising_strength", None) is not None:
            fields["strength"] = body.denoising_strength
    model = library.find(options["sd_model_checkpoint"])
    want = (body.override_settings or {}).get("sd_model_checkpoint")
    if want:
        try:
            model = library.find(want)
        except SdgenError as e:
            raise FieldError("override_settings.sd_model_checkpoint", str(e)) from None
    request = GenerationRequest(**fields)
    check(request)
    check_loras(request, library)
    if request.seed is not None and request.seed + body.n_iter * request.count >= 2**63 - 64:
        raise FieldError("seed", f"too large for {body.n_iter * request.count} images")
    return request, body.n_iter, model


def check_loras(request: GenerationRequest, library) -> None:
    """Every `<lora:NAME:w>` in the prompts must be a file listed in --lora-dir: a request never names a path (the
    pipeline would open any file a path points to)."""
    from ..pipeline import wanted_loras

    try:
        wanted = wanted_loras(request)
    except SdgenError as e:
        raise FieldError("prompt", str(e).removeprefix("prompt: ")) from None
    known = {lora["name"] for lora in library.loras()}
    for name, *_ in wanted:
        if name not in known:
            raise FieldError("prompt", f"unknown LoRA {name[:100]!r}: the server has "
                                       f"{', '.join(sorted(known)[:20]) or 'none (start it with --lora-dir)'}")


# the request's own messages start with the field's name: point them at the API's field
_MESSAGE_FIELD = (("steps", "steps"), ("guidance scale", "cfg_scale"), ("seed", "seed"), ("batch size", "batch_size"),
                  ("strength", "denoising_strength"), ("width", "width"), ("height", "height"),
                  ("clip skip", "clip_skip"), ("a mask", "mask"), ("the mask", "mask"), ("mask", "mask"),
                  ("init image", "init_images"), ("unknown sampler", "sampler_name"),
                  ("unknown schedule", "scheduler"), ("prompt", "prompt"), ("no prompt", "prompt"))


def check(request: GenerationRequest, model=None) -> GenerationRequest:
    """request.check(model), its SdgenError turned into a FieldError naming the API field when it can."""
    try:
        request.check(model)
    except FieldError:
        raise
    except SdgenError as e:
        raise as_field_error(e) from None
    return request


def as_field_error(e: SdgenError) -> SdgenError:
    if isinstance(e, FieldError):
        return e
    text = str(e)
    for prefix, field in _MESSAGE_FIELD:
        if text.lower().startswith(prefix):
            return FieldError(field, text)
    return e


# ----------------------------------------------------------------------------------------------- images


_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.I)


def decode_image(text: str, field: str) -> Image.Image:
    """An image sent as base64 (plain or a data: URL), with the checks a file gets: raster formats only, no
    decompression bomb, EXIF orientation applied."""
    if not isinstance(text, str) or not text:
        raise FieldError(field, "no image data")
    data = _DATA_URL.sub("", text.strip(), count=1)
    data = re.sub(r"\s+", "", data)
    data += "=" * (-len(data) % 4)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        try:
            raw = base64.urlsafe_b64decode(data)
        except (binascii.Error, ValueError):
            raise FieldError(field, "not valid base64") from None
    try:
        return images.read_image(io.BytesIO(raw))
    except images.ImageRefused as e:
        raise FieldError(field, str(e)) from None


def img2img_images(body: Img2Img) -> tuple[Image.Image, Image.Image | None]:
    if not body.init_images:
        raise FieldError("init_images", "img2img needs an image: init_images is empty")
    init = decode_image(body.init_images[0], "init_images[0]")
    mask = None
    if body.mask:
        mask = decode_image(body.mask, "mask")
        if body.inpainting_mask_invert:
            mask = ImageOps.invert(mask.convert("L"))
        if mask.size != init.size:
            raise FieldError("mask", f"the mask is {mask.size[0]}x{mask.size[1]} but the init image is "
                                     f"{init.size[0]}x{init.size[1]}; they must match")
    return init, mask


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """Base64 PNG, with the A1111 `parameters` chunk when given (as A1111's API answers)."""
    from PIL import PngImagePlugin

    info = None
    if parameters:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def openai_request(body: OpenAIImages, limits: Limits, library) -> GenerationRequest:
    fields: dict[str, Any] = {"prompt": _check_text("prompt", body.prompt, limits),
                              "negative_prompt": _check_text("negative_prompt", body.negative_prompt or "", limits)}
    if not 1 <= body.n <= limits.max_images:
        raise FieldError("n", f"must be from 1 to {limits.max_images}, not {body.n}")
    fields["batch_size"] = body.n
    if body.response_format not in ("b64_json", "url"):
        raise FieldError("response_format", f"must be 'b64_json' or 'url', not {body.response_format!r}")
    if body.size and body.size != "auto":
        m = re.fullmatch(r"(\d{1,5})x(\d{1,5})", body.size.strip())
        if not m:
            raise FieldError("size", f"must be WIDTHxHEIGHT (e.g. 512x512) or 'auto', not {body.size!r}")
        w, h = int(m.group(1)), int(m.group(2))
        for v in (w, h):
            if not 8 <= v <= limits.max_side or v % 8:
                raise FieldError("size", f"sides must be multiples of 8 from 8 to {limits.max_side}, not {body.size}")
        fields["width"], fields["height"] = w, h
    request = check(GenerationRequest(**fields))
    check_loras(request, library)
    return request


def samplers() -> list[dict]:
    return [{"name": s.label, "aliases": [s.name], "options": {}} for s in SAMPLERS.values()]


def schedulers() -> list[dict]:
    return [{"name": k if k != "normal" else "automatic", "label": v, "aliases": None, "default_rho": -1,
             "need_inner_model": False} for k, v in SCHEDULES.items()]
