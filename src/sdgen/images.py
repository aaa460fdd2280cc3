"""Images in and out: PIL <-> tensors (as diffusers' VaeImageProcessor does), PNG metadata, safe file names."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from . import SdgenError

MAX_PIXELS = 4096 * 4096  # an init image or mask larger than this is refused before it is decoded


def open_image(path, what="image"):
    """Open a user's image file without ever decoding a decompression bomb."""
    path = Path(path)
    if not path.is_file():
        raise SdgenError(f"{path}: {what} not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise SdgenError(f"{path}: {what} is {w}x{h}, larger than the {MAX_PIXELS // 1_000_000} megapixels sdgen accepts")
            im.load()
            return im.copy()
    except SdgenError:
        raise
    except Image.DecompressionBombError:  # PIL refuses the header before we see the size
        raise SdgenError(f"{path}: {what} is larger than the {MAX_PIXELS // 1_000_000} megapixels sdgen accepts") from None
    except (OSError, ValueError) as e:
        raise SdgenError(f"{path}: not a readable {what} ({e.__class__.__name__}: {e})") from None


def to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL -> (1, 3, H, W) in [-1, 1], resized with Lanczos when the size differs (as diffusers does)."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return (x.permute(2, 0, 1)[None] * 2.0 - 1.0).contiguous()


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL -> (1, 1, H, W) binary mask, 1 = repaint (white), as diffusers' mask processor (binarized at 0.5)."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.LANCZOS)
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return (m >= 0.5).float()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images; rounding as diffusers' postprocess."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (x * 255).round().astype("uint8")]


def parameters_text(prompt, negative_prompt, steps, sampler, guidance_scale, seed, width, height, model, **extra) -> str:
    """The A1111 'parameters' chunk that A1111, ComfyUI and image sites read back."""
    fields = {"Steps": steps, "Sampler": sampler, "CFG scale": guidance_scale, "Seed": seed,
              "Size": f"{width}x{height}", "Model": model, **{k: v for k, v in extra.items() if v is not None}}
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def free_path(path: Path) -> Path:
    """`path` if nothing is there, else the first of name-1.png, name-2.png, ... that is free."""
    if not path.exists():
        return path
    n = 1
    while (candidate := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    return candidate


def save_png(image: Image.Image, path: Path, parameters: str) -> Path:
    """Write a PNG with its parameters chunk to the first free name at `path`; never overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    while True:
        path = free_path(path)
        try:
            with open(path, "xb") as f:  # exclusive create: a file that appears meanwhile is never clobbered
                image.save(f, format="PNG", pnginfo=info)
            return path
        except FileExistsError:
            continue
