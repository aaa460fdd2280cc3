"""Tiled VAE decode/encode (layers.tiled, vae.py) and the pipeline's --vae-tiling / --vae-decoder taesd."""

import pytest
import torch
from torch import nn

import reference
from sdgen import SdgenError, pipeline
from sdgen.cli import main as cli_main
from sdgen.nets import layers, vae as vae_mod
from test_vae import ours_from


def local_net(seed=0):
    """Convs only (no norm): every output pixel sees a 7x7 input window, so halo >= 3 makes tiling exact."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 2, 3, padding=1)).eval()


@pytest.mark.parametrize("up,down", [(1, 1), (4, 1), (1, 2)])
def test_tiles_blend_to_the_whole(up, down):
    """Cores, halos, crops and cross-fade weights: on a network with a small receptive field the tiled result is
    the untiled one, whatever the tile and blend sizes (the weights sum to one everywhere), once the halo covers
    the blend band plus the receptive radius."""
    net = local_net()

    def fn(x):
        y = net(x)
        if up > 1:
            y = torch.nn.functional.interpolate(y, scale_factor=up, mode="nearest")
        return y[:, :, ::down, ::down]

    x = torch.randn(2, 3, 36, 52, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = fn(x)
        for tile, blend in ((8, 2), (16, 3), (10, 0), (64, 3)):
            halo = blend + 3 + (blend + 3) % down  # the kept band's edge still sees the 3-pixel receptive radius
            out = layers.tiled(fn, x, tile, halo=halo, up=up, down=down, blend=blend)
            assert out.shape == whole.shape
            assert (out - whole).abs().max() < 1e-5


@pytest.fixture(scope="module")
def tiny_vae():
    return ours_from(reference.randomize_(reference.tiny_vae()))[0]


@pytest.mark.parametrize("shared", [False, True])
def test_vae_tiles_with_full_context_are_exact(tiny_vae, shared, monkeypatch):
    """With a halo that reaches across the image every tile computes the whole decode/encode: bit-for-bit the same
    pixels, in both passes of the shared-statistics mode."""
    monkeypatch.setattr(vae_mod, "SHARED_NORMS", shared)
    monkeypatch.setattr(vae_mod, "DECODE_HALO", 64)
    monkeypatch.setattr(vae_mod, "ENCODE_HALO", 512)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 24, 32, generator=g)
    images = torch.rand(1, 3, 192, 256, generator=g) * 2 - 1
    with torch.no_grad():
        assert (tiny_vae.decode(z, 8) - tiny_vae.decode(z)).abs().max() < 1e-5
        assert (tiny_vae.encode(images, 64) - tiny_vae.encode(images)).abs().max() < 1e-5


def test_vae_tiled_against_untiled(tiny_vae):
    """The real settings (halo 8 latent / 64 image pixels, shared norm statistics) against the untiled result, on a
    random VAE whose outputs react far more to context than a trained one's. Measured here: decode max 0.40 (mean
    0.05) for outputs up to 2.8, encode max 0.007 for latents up to 0.23 (README: the SD1.5-size VAE)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 32, 40, generator=g)
    images = torch.rand(1, 3, 256, 320, generator=g) * 2 - 1
    with torch.no_grad():
        full, tiled = tiny_vae.decode(z), tiny_vae.decode(z, 16)
        assert tiled.shape == full.shape and tiled.dtype == torch.float32
        err = (tiled - full).abs()
        assert err.max() < 0.2 * full.abs().max() and err.mean() < 0.03 * full.abs().max()
        enc_full, enc_tiled = tiny_vae.encode(images), tiny_vae.encode(images, 128)
        assert (enc_tiled - enc_full).abs().max() < 0.1 * enc_full.abs().max()


def test_no_seams(tiny_vae):
    """Seamless: the step between neighbouring pixels across a tile boundary is no larger than elsewhere."""
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = tiny_vae.decode(z, 16)  # one boundary at latent 16 = pixel 128 in each direction
    steps = (out[..., 1:] - out[..., :-1]).abs().mean((0, 1, 2))  # (W-1,) mean horizontal step per column gap
    assert steps[127] < 1.5 * steps.median()


def test_tile_sizes_follow_the_budget(tiny_vae):
    vae = tiny_vae
    assert vae.decode_tile(64, 64, vae.decode_bytes(64, 64)) is None  # fits: untiled
    tile = vae.decode_tile(256, 256, vae.decode_bytes(64, 64))
    assert tile is not None and vae.decode_bytes(256, 256, tile) <= vae.decode_bytes(64, 64)
    assert vae.encode_tile(512, 512, vae.encode_bytes(512, 512)) is None
    assert vae.encode_tile(2048, 2048, vae.encode_bytes(512, 512)) is not None


def test_pipeline_tiling_modes(tiny, monkeypatch):
    ref, paths = tiny
    pipe = pipeline.load(paths["diffusers"], dtype="float32")
    z = torch.randn(1, 4, 24, 24, generator=torch.Generator().manual_seed(5))
    off = pipe.decode(z, "off")
    assert torch.equal(pipe.decode(z), off)  # auto: fits the budget, untiled
    monkeypatch.setattr(pipeline, "DECODE_BUDGET", 1)  # nothing fits: auto tiles
    auto = pipe.decode(z)
    assert not torch.equal(auto, off) and (auto - off).abs().mean() < 0.05 * off.abs().max()
    assert torch.equal(pipe.decode(z, "on"), auto)
    with pytest.raises(SdgenError, match="vae tiling must be one of"):
        pipe.decode(z, "sometimes")
    with pytest.raises(SdgenError, match="vae tiling must be one of"):
        pipeline.load(paths["diffusers"], vae_tiling="maybe")


def test_cli_tiling_and_taesd(tiny, tmp_path):
    from test_taesd import original_layout, reference as taesd_reference
    from safetensors.torch import save_file

    ref, paths = tiny
    save_file(original_layout(taesd_reference(), "decoder"), tmp_path / "taesd_decoder.safetensors")
    common = ["generate", "a cat", "--model", str(paths["diffusers"]), "--steps", "2", "-W", "64", "-H", "64",
              "--precision", "fp32", "--seed", "1"]
    assert cli_main(common + ["--vae-tiling", "on", "-o", str(tmp_path / "a.png")]) == 0
    assert cli_main(common + ["--vae-decoder", "taesd", "--taesd", str(tmp_path / "taesd_decoder.safetensors"),
                              "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").is_file() and (tmp_path / "b.png").is_file()
    # a TAESD for other latents is refused before the model's weights load
    save_file(original_layout(taesd_reference(latent_channels=16), "decoder"), tmp_path / "t16.safetensors")
    assert cli_main(common + ["--vae-decoder", "taesd", "--taesd", str(tmp_path / "t16.safetensors"),
                              "-o", str(tmp_path / "c.png")]) == 1
    assert not (tmp_path / "c.png").exists()
