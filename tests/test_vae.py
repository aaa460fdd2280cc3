import pytest
import torch

import reference
from sdgen import SdgenError
from sdgen.nets.vae import VAE, VAEConfig, diffusers_renames, fix_shapes

SF = 0.18215


def ours_from(ref):
    """Rename a diffusers AutoencoderKL's weights and load them into ours (meta build, assign, strict)."""
    config = VAEConfig.from_diffusers(dict(ref.config))
    renames = diffusers_renames(config)
    state = fix_shapes({renames[k]: v for k, v in ref.state_dict().items()})
    with torch.device("meta"):
        vae = VAE(config)
    vae.load_state_dict(state, assign=True, strict=True)
    return vae.eval(), state


@pytest.fixture(scope="module")
def tiny():
    ref = reference.randomize_(reference.tiny_vae())
    return ref, ours_from(ref)[0]


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_tiny_matches_diffusers(tiny, size):
    ref, vae = tiny
    h, w = size
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, h // 8, w // 8, generator=g)
    images = torch.rand(2, 3, h, w, generator=g) * 2 - 1
    with torch.no_grad():
        out = vae.decode(latents)
        expect = ref.decode(latents / SF).sample
        assert out.shape == (2, 3, h, w)
        assert reference.relerr(out, expect) < 1e-4
        enc = vae.encode(images)
        dist = ref.encode(images).latent_dist
        assert enc.shape == (2, 4, h // 8, w // 8)
        assert reference.relerr(enc, dist.mean * SF) < 1e-4
        mean, logvar = vae.encode_moments(images)
        assert reference.relerr(mean, dist.mean) < 1e-4
        assert reference.relerr(logvar, dist.logvar) < 1e-4


def test_tiny_exact_in_float64():
    """fp32 differences (~1e-5 here) are rounding amplified by random weights: in fp64 the maths is identical."""
    ref = reference.randomize_(reference.tiny_vae()).double()
    vae, _ = ours_from(ref)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 6, 10, generator=g, dtype=torch.float64)
    images = torch.rand(1, 3, 48, 80, generator=g, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        assert vae.decode(latents).dtype == torch.float64
        assert reference.relerr(vae.decode(latents), ref.decode(latents / SF).sample) < 1e-10
        assert reference.relerr(vae.encode(images), ref.encode(images).latent_dist.mean * SF) < 1e-10


def test_renames_cover_every_key_and_config_from_shapes(tiny):
    ref, _ = tiny
    config = VAEConfig.from_diffusers(dict(ref.config))
    renames = diffusers_renames(config)
    keys = set(ref.state_dict())
    assert keys <= set(renames)
    with torch.device("meta"):
        ours = set(VAE(config).state_dict())
    assert {renames[k] for k in keys} == ours
    # the decoder's `up` is indexed by resolution: diffusers up_blocks.0 is our last level
    assert renames["decoder.up_blocks.0.upsamplers.0.conv.weight"] == "decoder.up.3.upsample.conv.weight"
    assert renames["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"] == "decoder.up.0.block.0.nin_shortcut.weight"
    # legacy diffusers attention names map too
    assert renames["decoder.mid_block.attentions.0.proj_attn.weight"] == "decoder.mid.attn_1.proj_out.weight"

    shapes = {renames[k]: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert VAEConfig.from_shapes(shapes) == VAEConfig.from_diffusers({**dict(ref.config), "scaling_factor": None})
    assert VAEConfig.from_shapes(shapes) == config  # tiny_vae uses the SD1 constants
    sd1 = VAEConfig.from_diffusers({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2})
    assert sd1 == VAEConfig()
    with pytest.raises(SdgenError):
        VAEConfig.from_shapes({k: v for k, v in shapes.items() if k != "decoder.conv_in.weight"})


def test_fix_shapes_accepts_linear_and_conv_attention():
    c = 8
    state = {"encoder.mid.attn_1.q.weight": torch.ones(c, c), "decoder.mid.attn_1.proj_out.weight": torch.ones(c, c, 1),
             "encoder.mid.attn_1.k.weight": torch.ones(c, c, 1, 1), "encoder.mid.attn_1.norm.weight": torch.ones(c),
             "encoder.mid.attn_1.q.bias": torch.ones(c)}
    fixed = fix_shapes(state)
    assert {k: tuple(v.shape) for k, v in fixed.items()} == {
        "encoder.mid.attn_1.q.weight": (c, c, 1, 1), "decoder.mid.attn_1.proj_out.weight": (c, c, 1, 1),
        "encoder.mid.attn_1.k.weight": (c, c, 1, 1), "encoder.mid.attn_1.norm.weight": (c,),
        "encoder.mid.attn_1.q.bias": (c,)}
    assert state["encoder.mid.attn_1.q.weight"].shape == (c, c)  # input left alone


def test_sd1_size_matches_diffusers():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ref = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, sample_size=512).eval()
    reference.randomize_(ref)
    assert sum(p.numel() for p in ref.parameters()) == 83_653_863
    vae, state = ours_from(ref)  # assign=True: ours shares the reference's tensors, no extra memory
    assert VAEConfig.from_shapes({k: tuple(v.shape) for k, v in state.items()}) == VAEConfig()
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        assert reference.relerr(vae.decode(latents), ref.decode(latents / SF).sample) < 1e-4
        assert reference.relerr(vae.encode(images), ref.encode(images).latent_dist.mean * SF) < 1e-4


def test_gradients_flow(tiny):
    """The in-place activations/residuals must not break autograd (used when guiding through the decoder)."""
    ref, vae = tiny
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours, theirs = latents.clone().requires_grad_(), latents.clone().requires_grad_()
    vae.decode(ours).square().mean().backward()
    ref.decode(theirs / SF).sample.square().mean().backward()
    assert reference.relerr(ours.grad, theirs.grad) < 1e-4


def test_bf16_smoke(tiny):
    ref, vae = tiny
    _, state = ours_from(ref)
    with torch.device("meta"):
        low = VAE(vae.config)
    low.load_state_dict({k: v.bfloat16() for k, v in state.items()}, assign=True, strict=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        out, enc = low.decode(latents), low.encode(images)  # fp32 inputs are cast on entry
        assert out.dtype == enc.dtype == torch.bfloat16
        assert torch.isfinite(out).all() and torch.isfinite(enc).all()
        assert reference.relerr(out, vae.decode(latents)) < 0.1
        assert reference.relerr(enc, vae.encode(images)) < 0.1
