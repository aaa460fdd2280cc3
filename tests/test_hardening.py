"""Careless and hostile use of the API, the CLI and image files: one clear line (or a correct result), no
traceback, nothing left behind. Hostile model files are in test_hostile.py, the output paths in test_request.py."""

import numpy as np
import pytest
import torch
from PIL import Image

import sdgen
from sdgen import SdgenError
from sdgen.cli import main


@pytest.fixture(scope="module")
def pipe(tiny):
    return sdgen.load(str(tiny[1]["safetensors"]))


SMALL = dict(steps=2, width=64, height=64, output_type="latent")


@pytest.mark.parametrize("call,message", [
    (lambda: sdgen.load(123), "not int"),
    (lambda: sdgen.load("x", device="tpu"), "device"),
    (lambda: sdgen.load("x", dtype=torch.int8), "dtype"),
    (lambda: sdgen.load("x", dtype=torch.complex64), "dtype"),
    (lambda: sdgen.load("x", dtype="float8"), "precision"),
])
def test_bad_load_arguments(call, message):
    with pytest.raises(SdgenError, match=message):
        call()


def test_api_inputs(pipe):
    # diffusers' default negative prompt is None: accepted as ""
    a = pipe.generate("a cat", None, seed=1, **SMALL)
    b = pipe.generate("a cat", "", seed=1, **SMALL)
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(SdgenError, match="no prompt"):
        pipe.generate([], **SMALL)
    with pytest.raises(SdgenError, match="more than 64 images"):
        pipe.generate(["a"] * 5, batch_size=13, **SMALL)
    # numpy images as diffusers takes them: uint8 or floats in [0, 1]
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    x = pipe.generate("a cat", init_image=rgb, strength=0.5, seed=2, **SMALL)
    y = pipe.generate("a cat", init_image=Image.fromarray(rgb), strength=0.5, seed=2, **SMALL)
    assert torch.equal(x.latents, y.latents)
    pipe.generate("a cat", init_image=rgb / 255.0, strength=0.5, seed=2, **SMALL)
    for bad in (torch.zeros(3, 64, 64), np.full((64, 64, 3), np.nan), np.zeros((2, 2, 2, 2)), 42):
        with pytest.raises(SdgenError, match="init image"):
            pipe.generate("a cat", init_image=bad, **SMALL)


def test_not_finite_output_is_said(tiny, recwarn):
    pipe = sdgen.load(str(tiny[1]["safetensors"]))
    with torch.no_grad():
        pipe.unet.out[2].bias.fill_(float("nan"))
    pipe.generate("a cat", seed=1, **SMALL)
    assert any("not finite" in str(w.message) for w in recwarn)


def _exif_rotated(path):
    """A 64x32 image whose EXIF says: rotate 90 degrees to display (as phones write portrait photos)."""
    im = Image.new("RGB", (64, 32), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW
    im.save(path, exif=exif)


def test_images_exif_orientation_and_raster_only(tmp_path):
    from sdgen.images import open_image

    _exif_rotated(tmp_path / "phone.jpg")
    assert open_image(tmp_path / "phone.jpg").size == (32, 64)  # upright, as diffusers' load_image
    (tmp_path / "doc.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n")
    with pytest.raises(SdgenError, match="PNG, JPEG, WebP"):
        open_image(tmp_path / "doc.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(SdgenError, match="is a folder"):
        open_image(tmp_path / "folder.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(SdgenError, match="1x1"):
        open_image(tmp_path / "dot.png")
    gif = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    gif[0].save(tmp_path / "a.gif", save_all=True, append_images=gif[1:])
    assert open_image(tmp_path / "a.gif").convert("RGB").getpixel((0, 0)) == (255, 0, 0)  # the first frame


def test_info_escapes_names_from_the_file(tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    sd = load_file(tiny[1]["safetensors"])
    sd["\x1b]52;c;cHduZWQ=\x07evil\x1b[2J"] = torch.zeros(1)
    save_file(sd, tmp_path / "m.safetensors")
    assert main(["info", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "evil" in out


def test_unexpected_errors_are_one_line(monkeypatch, tiny, tmp_path, capsys):
    from sdgen import pipeline

    def boom(*a, **k):
        raise ValueError("a bug\nover two lines")

    monkeypatch.setattr(pipeline, "load", boom)
    assert main(["generate", "a cat", "--model", str(tiny[1]["safetensors"]), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error (ValueError" in err[0]
