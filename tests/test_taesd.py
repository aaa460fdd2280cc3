"""TAESD (nets/taesd.py) against diffusers' AutoencoderTiny on the same random weights, from every layout."""

import pytest
import torch
from safetensors.torch import save_file

from sdgen import SdgenError
from sdgen.nets.taesd import load_taesd


def reference(seed=0, **config):
    """AutoencoderTiny with TAESD's real sizes (64 channels, 1.2M parameters a part) unless told; every weight random
    (diffusers' init leaves nothing zero here, but scale them so that activations stay O(1) through 20 layers)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    ref = AutoencoderTiny(**config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.8 / max(1, p[0].numel()) ** 0.5))
    return ref


def original_layout(ref, part):
    """madebyollin's taesd_{part}.pth keys: the nn.Sequential's own; the decoder's index 0 is the (weightless) clamp."""
    shift = 1 if part == "decoder" else 0
    out = {}
    for k, v in ref.state_dict().items():
        side, _, i, rest = k.split(".", 3)
        if side == part:
            out[f"{int(i) + shift}.{rest}"] = v.clone()
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("taesd")
    ref = reference()
    ref.save_pretrained(tmp / "taesd")  # a diffusers AutoencoderTiny folder
    paths = {"folder": tmp / "taesd"}
    for part in ("decoder", "encoder"):
        state = original_layout(ref, part)
        save_file(state, tmp / f"taesd_{part}.safetensors")
        torch.save(state, tmp / f"taesd_{part}.pth")
        paths[part + ".safetensors"] = tmp / f"taesd_{part}.safetensors"
        paths[part + ".pth"] = tmp / f"taesd_{part}.pth"
    return ref, paths


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("layout", ["folder", "safetensors", "pth"])
def test_decoder_matches_autoencoder_tiny(files, layout):
    ref, paths = files
    dec = load_taesd(paths["folder" if layout == "folder" else f"decoder.{layout}"])
    assert dec.factor == 8 and dec.latent_channels == 4
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 12, 8, generator=g) * 2  # UNet-space, as the sampler leaves them
    out = dec(latents)
    with torch.no_grad():
        expect = ref.decode(latents).sample  # diffusers' pipeline divides by scaling_factor = 1.0
    assert out.shape == (2, 3, 96, 64) and out.dtype == torch.float32
    assert expect.abs().max() > 0.5  # not a degenerate output
    assert max_err(out, expect) < 1e-4


@pytest.mark.parametrize("layout", ["folder", "safetensors", "pth"])
def test_encoder_matches_autoencoder_tiny(files, layout):
    ref, paths = files
    enc = load_taesd(paths["folder" if layout == "folder" else f"encoder.{layout}"], part="encoder")
    assert enc.factor == 8 and enc.latent_channels == 4
    images = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(4)) * 2 - 1
    out = enc(images)
    with torch.no_grad():
        expect = ref.encode(images).latents
    assert out.shape == (1, 4, 8, 10)
    assert max_err(out, expect) < 1e-4


def test_other_sizes_read_off_the_weights(tmp_path):
    """Widths, block counts and latent channels come from the tensors (e.g. TAESD for 16-channel latents)."""
    ref = reference(seed=5, encoder_block_out_channels=(24,) * 4, decoder_block_out_channels=(32,) * 4,
                    num_encoder_blocks=(1, 2, 1, 2), num_decoder_blocks=(2, 1, 2, 1), latent_channels=16)
    ref.save_pretrained(tmp_path / "t")
    dec, enc = load_taesd(tmp_path / "t"), load_taesd(tmp_path / "t", part="encoder")
    assert dec.latent_channels == 16 and enc.latent_channels == 16
    z = torch.randn(1, 16, 5, 6, generator=torch.Generator().manual_seed(6))
    images = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        assert max_err(dec(z), ref.decode(z).sample) < 1e-4
        assert max_err(enc(images), ref.encode(images).latents) < 1e-4


def test_bf16(files):
    ref, paths = files
    dec = load_taesd(paths["decoder.safetensors"], dtype=torch.bfloat16)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expect = ref.decode(latents).sample
    out = dec(latents)
    assert out.dtype == torch.float32 and max_err(out, expect) < 0.1 * expect.abs().max().item()


def test_bad_files(files, tmp_path):
    ref, paths = files
    with pytest.raises(SdgenError, match="layer 0 holds weights"):
        load_taesd(paths["encoder.safetensors"])  # an encoder where a decoder is wanted
    with pytest.raises(SdgenError, match="no such TAESD"):
        load_taesd(tmp_path / "missing.safetensors")
    save_file({"model.diffusion_model.x.weight": torch.zeros(2, 2)}, tmp_path / "sd.safetensors")
    with pytest.raises(SdgenError, match="not a TAESD decoder: unexpected tensor"):
        load_taesd(tmp_path / "sd.safetensors")
    state = original_layout(ref, "decoder")
    state["3.conv.0.weight"] = torch.zeros(64, 32, 3, 3)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(SdgenError, match="not a TAESD decoder"):
        load_taesd(tmp_path / "bad.safetensors")
    with pytest.raises(SdgenError, match="part must be"):
        load_taesd(paths["folder"], part="middle")
