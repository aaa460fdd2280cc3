"""Images in and out: PIL <-> tensors (as diffusers' VaeImageProcessor does), PNG metadata, safe file names."""

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from . import SdgenError

MAX_PIXELS = 4096 * 4096  # an init image or mask larger than this is refused before it is decoded


RASTER_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")  # what we decode; never EPS/PDF & co.
MIN_SIDE = 8


def open_image(path, what="image"):
    """Open a user's image file: raster formats only (by content, whatever the name says), never decoding a
    decompression bomb, EXIF orientation applied (phone photos come in upright, as diffusers' load_image does),
    a GIF's first frame."""
    path = Path(path)
    if not path.exists():
        raise SdgenError(f"{path}: {what} not found")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise SdgenError(f"{path}: {what} is {kind}; give an image file (PNG, JPEG, WebP, BMP, TIFF, GIF)")
    try:
        return read_image(path, what)
    except ImageRefused as e:
        raise SdgenError(f"{path}: {e}") from None


class ImageRefused(ValueError):
    """Why read_image refused an image: one line, without the name of where it came from."""


def read_image(source, what="image") -> Image.Image:
    """An image from a path or a binary file object (an upload, decoded base64), with the checks of open_image:
    raster formats only, size limits read from the header before any decode, EXIF orientation, the first frame,
    the PNG text chunks kept in .info. Raises ImageRefused."""
    try:
        with Image.open(source, formats=RASTER_FORMATS) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageRefused(f"{what} is {w}x{h}, larger than the {MAX_PIXELS // 1_000_000} megapixels sdgen accepts")
            if min(w, h) < MIN_SIDE:
                raise ImageRefused(f"{what} is {w}x{h}; it must be at least {MIN_SIDE}x{MIN_SIDE} pixels")
            im.seek(0)
            im.load()
            text = dict(getattr(im, "text", {}) or {})
            out = ImageOps.exif_transpose(im)
            out = out.copy() if out is im else out
            out.info.update(text)
            return out
    except ImageRefused:
        raise
    except Image.DecompressionBombError:  # PIL refuses the header before we see the size
        raise ImageRefused(f"{what} is larger than the {MAX_PIXELS // 1_000_000} megapixels sdgen accepts") from None
    except Image.UnidentifiedImageError:
        raise ImageRefused(f"not a readable {what}: sdgen reads PNG, JPEG, WebP, BMP, TIFF and GIF") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageRefused(f"not a readable {what} ({e.__class__.__name__}: {e})") from None


def as_image(image, what="image") -> Image.Image:
    """What the API accepts as an image: a PIL image, a path, or a numpy array (H, W[, 3]) of uint8 or of floats in
    [0, 1] (as diffusers takes them)."""
    if isinstance(image, (str, Path)):
        return open_image(image, what)
    if isinstance(image, np.ndarray):
        a = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)) or a.size == 0:
            raise SdgenError(f"{what}: a numpy image must be (H, W), (H, W, 3) or (H, W, 4), not {image.shape}")
        if a.dtype != np.uint8:
            if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise SdgenError(f"{what}: a numpy image must be uint8, or floats in [0, 1]")
            a = (a * 255).round().astype(np.uint8)
        return check_image(Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a), what)
    return check_image(image, what)


def check_image(image, what="image") -> Image.Image:
    """A PIL image handed to the API: same size limits as a file."""
    if not isinstance(image, Image.Image):
        raise SdgenError(f"{what} must be a PIL image or a path to an image file, not {type(image).__name__}")
    w, h = image.size
    if w * h > MAX_PIXELS or min(w, h) < MIN_SIDE:
        raise SdgenError(f"{what} is {w}x{h}; it must be from {MIN_SIDE}x{MIN_SIDE} to {MAX_PIXELS // 1_000_000} megapixels")
    return image


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


def read_parameters(path) -> str:
    """The A1111 `parameters` text stored in a PNG (tEXt/iTXt chunk)."""
    image = open_image(path, "PNG")
    text = image.info.get("parameters")
    if not isinstance(text, str) or not text.strip():
        raise SdgenError(f"{path}: holds no generation parameters (no A1111 'parameters' text)")
    return text


def check_output(path: Path) -> Path:
    """Refuse an output location that cannot be written, before any work: not .png, a folder, a parent that is a
    file or not writable."""
    if path.suffix.lower() != ".png":
        raise SdgenError(f"{path}: the output must be a .png file")
    if path.is_dir():
        raise SdgenError(f"{path}: is a folder; give a file name like {path / 'image.png'}")
    parent = path.parent
    while not parent.exists():  # the nearest existing folder is where the missing ones will be made
        if parent.is_symlink():
            raise SdgenError(f"{parent}: is a dangling link; give another output folder")
        parent = parent.parent
    if not parent.is_dir():
        raise SdgenError(f"{parent}: is a file, not a folder; give another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SdgenError(f"{parent}: cannot write here (permission denied); give another output path")
    return path


MAX_NAMES = 100_000  # name-1.png ... name-99999.png: past this something is wrong with the folder


def save_png(image: Image.Image, path: Path, parameters: str) -> Path:
    """Write a PNG with its parameters chunk to the first free name at `path`; never overwrites, never leaves a
    partial file: the PNG is written to a temporary file in the same folder, then linked to the free name (a link
    fails if the name exists, even when another process took it meanwhile) and the temporary name removed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdgenError(f"{path.parent}: cannot create the output folder ({e.strerror})") from None
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png.part", dir=path.parent)
    except OSError as e:
        raise SdgenError(f"{path.parent}: cannot write here ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        for n in range(MAX_NAMES):
            candidate = path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")
            if os.path.lexists(candidate):  # lexists: a dangling link is taken too
                continue
            try:
                os.link(tmp, candidate)
                return candidate
            except FileExistsError:
                continue
        raise SdgenError(f"{path}: no free name left ({path.stem}-1 ... {path.stem}-{MAX_NAMES - 1} all exist)")
    except OSError as e:
        raise SdgenError(f"{path}: could not write the image ({e.strerror or e}); nothing was written") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
