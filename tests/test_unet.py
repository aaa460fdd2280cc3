import gc

import pytest
import torch

import reference
from sdgen import SdgenError
from sdgen.nets.unet import UNet, UNetConfig, diffusers_renames


def ours_from(ref):
    """Our UNet sharing the reference's tensors, renamed by the diffusers table."""
    config = UNetConfig.from_diffusers(dict(ref.config))
    renames = diffusers_renames(config)
    sd = ref.state_dict()
    assert set(renames) == set(sd), "the rename table must cover every diffusers key and nothing else"
    with torch.device("meta"):
        ours = UNet(config)
    ours.load_state_dict({renames[k]: v for k, v in sd.items()}, assign=True, strict=True)
    return ours.eval(), config


def run_both(ref, ours, x, t, ctx):
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx)
    return got, want


@pytest.mark.parametrize("in_channels", [4, 9])
def test_tiny_matches_diffusers(in_channels):
    ref = reference.randomize_(reference.tiny_unet(in_channels=in_channels))
    ours, config = ours_from(ref)
    assert config.in_channels == in_channels and config.attention_levels == (0, 1) and config.num_heads == 8
    assert UNetConfig.from_shapes({k: v.shape for k, v in ours.state_dict().items()}) == config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 77, reference.CLIP_HIDDEN, generator=g)
    for t in (999, 1, 500.5, torch.tensor(250), torch.tensor([10.0, 900.0]), torch.tensor([3, 700])):
        got, want = run_both(ref, ours, x, t, ctx)
        assert got.shape == want.shape == (2, 4, 16, 16)
        assert reference.relerr(got, want) < 1e-4, t


def test_odd_latent_size_and_input_dtype():
    """Sides that are not multiples of 2^levels upsample to the skip's size, as diffusers does."""
    ref = reference.randomize_(reference.tiny_unet())
    ours, _ = ours_from(ref)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 13, 10, generator=g)
    ctx = torch.randn(2, 5, reference.CLIP_HIDDEN, generator=g)
    got, want = run_both(ref, ours, x, 321, ctx)
    assert reference.relerr(got, want) < 1e-4
    with torch.no_grad():
        got64 = ours(x.double(), 321, ctx.double())
    assert got64.dtype == torch.float64 and reference.relerr(got64, want) < 1e-4


def test_renames_are_exact_and_loop_built():
    ref = reference.tiny_unet()
    config = UNetConfig.from_diffusers(dict(ref.config))
    renames = diffusers_renames(config)
    with torch.device("meta"):
        ours = UNet(config)
    assert set(renames) == set(ref.state_dict())
    assert sorted(renames.values()) == sorted(ours.state_dict())
    assert renames["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
    assert renames["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.5.2.conv.weight"
    assert renames["down_blocks.1.resnets.0.conv_shortcut.weight"] == "input_blocks.4.0.skip_connection.weight"
    assert renames["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == \
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight"


def test_linear_projection_sd2_style():
    """SD2 layout: Linear proj_in/proj_out, 'attention_head_dim' per level meaning heads of constant width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = reference.randomize_(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32).eval())
    ours, config = ours_from(ref)
    assert config.linear_proj and config.head_channels == 16
    assert UNetConfig.from_shapes({k: v.shape for k, v in ours.state_dict().items()}).linear_proj
    g = torch.Generator().manual_seed(3)
    got, want = run_both(ref, ours, torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 600]),
                         torch.randn(2, 7, 24, generator=g))
    assert reference.relerr(got, want) < 1e-4


def test_bf16_close_to_fp32():
    ref = reference.randomize_(reference.tiny_unet())
    ours, _ = ours_from(ref)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, reference.CLIP_HIDDEN, generator=g)
    with torch.no_grad():
        want = ours(x, 400, ctx)
        ours.to(torch.bfloat16)
        got = ours(x, 400, ctx)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert reference.relerr(got, want) < 5e-2


def test_config_errors():
    with pytest.raises(SdgenError):
        UNetConfig.from_shapes({"input_blocks.0.0.weight": (320, 4, 3, 3)})
    with pytest.raises(SdgenError):
        UNetConfig.from_diffusers({"block_out_channels": (320, 640), "down_block_types": ("A", "B"),
                                   "addition_embed_type": "text_time"})


def test_full_sd15_size():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).eval()  # random init, ~20 s
    with torch.no_grad():  # only norms start constant (ones, zeros); randomize_ on all 860M would take ~40 s more
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    ours, config = ours_from(ref)
    assert config == UNetConfig()
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    assert UNetConfig.from_shapes({k: v.shape for k, v in ours.state_dict().items()}) == config
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
    got, want = run_both(ref, ours, x, 981, ctx)
    err = reference.relerr(got, want)
    print(f"full SD1.5 UNet relerr {err:.2e}")
    assert err < 1e-4
    del ref, ours
    gc.collect()
