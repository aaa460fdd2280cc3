"""The fast paths (bf16 storage computed in fp32, channels_last, in-place fusions) against the plain fp32 maths.

Correctness only, not time: benchmarks/ measures speed."""

import pytest
import torch

import reference
import sdgen
from sdgen import precision
from reference import relerr
from sdgen.nets.layers import Conv2d, upsample_conv
from sdgen.nets.clip import CLIPConfig, CLIPTextModel, diffusers_renames as clip_renames
from sdgen.nets.unet import ResBlock, SpatialTransformer, UNet, UNetConfig, diffusers_renames as unet_renames
from sdgen.nets.vae import AttnBlock, ResnetBlock, VAE, VAEConfig, diffusers_renames as vae_renames, fix_shapes


def build(cls, config, state, dtype=torch.float32, compute=None):
    with torch.device("meta"):
        m = cls(config, compute_dtype=compute)
    m.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def unet_state():
    ref = reference.randomize_(reference.tiny_unet())
    config = UNetConfig.from_diffusers(dict(ref.config))
    renames = unet_renames(config)
    return ref, config, {renames[k]: v for k, v in ref.state_dict().items()}


@pytest.fixture(scope="module")
def vae_state():
    ref = reference.randomize_(reference.tiny_vae())
    config = VAEConfig.from_diffusers(dict(ref.config))
    renames = vae_renames(config)
    return ref, config, fix_shapes({renames[k]: v for k, v in ref.state_dict().items()})


@pytest.fixture(scope="module")
def clip_state():
    ref = reference.randomize_(reference.tiny_text_encoder())
    config = CLIPConfig.from_diffusers(ref.config.to_dict())
    renames = clip_renames(config)
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    return config, {renames[k]: v for k, v in sd.items()}


def unet_inputs(seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, reference.CLIP_HIDDEN, generator=g)


# ---------------------------------------------------------------------------------------------- bf16 storage


def test_unet_bf16_storage_fp32_compute(unet_state):
    _, config, state = unet_state
    x, ctx = unet_inputs()
    full, low = build(UNet, config, state), build(UNet, config, state, torch.bfloat16, torch.float32)
    with torch.no_grad():
        want, got = full(x, 400, ctx), low(x, 400, ctx)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}  # no fp32 copy was kept
    assert got.dtype == torch.float32
    # only the weights are rounded: far closer than bf16 arithmetic (test_unet allows 5e-2 for that)
    assert reference.relerr(got, want) < 2e-2


def test_vae_bf16_storage_fp32_compute(vae_state):
    _, config, state = vae_state
    full, low = build(VAE, config, state), build(VAE, config, state, torch.bfloat16, torch.float32)
    g = torch.Generator().manual_seed(3)
    latents, images = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        out, enc = low.decode(latents), low.encode(images)
        assert out.dtype == enc.dtype == torch.float32
        assert reference.relerr(out, full.decode(latents)) < 2e-2
        assert reference.relerr(enc, full.encode(images)) < 2e-2
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}


def test_clip_bf16_storage_fp32_compute(clip_state):
    config, state = clip_state
    full, low = build(CLIPTextModel, config, state), build(CLIPTextModel, config, state, torch.bfloat16, torch.float32)
    ids = torch.randint(0, config.vocab_size, (3, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = full(ids), low(ids)
    assert got.dtype == torch.float32
    assert reference.relerr(got, want) < 2e-2


def test_resolve_precision(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    P = precision.Precision
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    resolve = precision.resolve_precision
    assert resolve("float32", cpu) == P(torch.float32, torch.float32)
    assert resolve("bf16", cpu) == P(torch.bfloat16, torch.float32)
    assert resolve("float16", cpu) == P(torch.float16, torch.float32)
    assert resolve("auto", cpu) == P(torch.bfloat16, torch.float32)  # half the memory, fp32 speed
    assert resolve("auto", cuda) == P(torch.float16, torch.float16)
    assert resolve(torch.bfloat16, cuda) == P(torch.bfloat16, torch.bfloat16)
    assert str(resolve("bf16", cpu)) == "bfloat16 (computed in float32)"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve("bfloat16", cpu) == P(torch.bfloat16, torch.bfloat16)
    assert resolve("auto", cpu) == P(torch.bfloat16, torch.bfloat16)
    assert resolve("fp16", cpu) == P(torch.float16, torch.float32)  # no fast fp16 CPU kernels
    assert str(resolve("auto", cpu)) == "bfloat16"
    for bad in ("float8", torch.int8, torch.complex64, 3):
        with pytest.raises(sdgen.SdgenError):
            resolve(bad, cpu)


def test_native_bf16_honours_pytorch_limits(monkeypatch):
    """PyTorch held below the CPU (oneDNN's ISA cap, ATEN's dispatch level) emulates bf16: sdgen computes in fp32."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not precision.cpu_has_native_bf16()
    assert precision.resolve_precision("auto", torch.device("cpu")) == precision.Precision(torch.bfloat16, torch.float32)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not precision.cpu_has_native_bf16()


def test_load_bf16_stores_bf16_computes_fp32(tiny, monkeypatch):
    """On CPUs without native bf16 (forced here, whatever this CPU has)."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    ref, paths = tiny
    pipe = sdgen.load(str(paths["safetensors"]), dtype="bfloat16")
    assert pipe.dtype == torch.bfloat16 and pipe.precision == precision.Precision(torch.bfloat16, torch.float32)
    for net in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert net.compute_dtype == torch.float32
        assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 48)
    with torch.no_grad():
        got = pipe.unet(x, 10, ctx)
        want = ref.unet(x, 10, encoder_hidden_states=ctx).sample
    assert got.dtype == torch.float32 and reference.relerr(got, want) < 2e-2
    assert pipe.unet(x, 10, ctx).dtype == torch.float32
    images = pipe.decode(torch.randn(1, 4, 8, 8))
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    fp32 = sdgen.load(str(paths["safetensors"]), dtype="float32")
    assert fp32.unet.compute_dtype == torch.float32 and fp32.dtype == torch.float32
    a = fp32.generate("a cat", steps=2, seed=1, width=64, height=64, output_type="latent")
    b = pipe.generate("a cat", steps=2, seed=1, width=64, height=64, output_type="latent")
    assert reference.relerr(b, a) < 5e-2


# ---------------------------------------------------------------------------------------------- layout and fusions


def test_fp32_fast_path_matches_float64_maths(unet_state, vae_state):
    """channels_last + in-place fusions in fp32 against the same model in float64 (whose maths equals
    diffusers' to 1e-10, see test_vae): only fp32 rounding remains."""
    _, config, state = unet_state
    x, ctx = unet_inputs()
    fast, exact = build(UNet, config, state), build(UNet, config, state, torch.float64)
    with torch.no_grad():
        assert reference.relerr(fast(x, 400, ctx), exact(x.double(), 400, ctx.double())) < 1e-5
    _, vconfig, vstate = vae_state
    fast, exact = build(VAE, vconfig, vstate), build(VAE, vconfig, vstate, torch.float64)
    z = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(5))  # big enough for upsample_conv's fast path
    with torch.no_grad():
        assert reference.relerr(fast.decode(z), exact.decode(z.double())) < 1e-5


def test_blocks_same_in_both_layouts(unet_state, vae_state):
    """Every block gives the same numbers for NCHW and channels_last inputs (the networks switch to the latter)."""
    _, config, state = unet_state
    unet = build(UNet, config, state)
    _, vconfig, vstate = vae_state
    vae = build(VAE, vconfig, vstate)
    g = torch.Generator().manual_seed(6)
    emb, ctx = torch.randn(2, 4 * config.model_channels, generator=g), torch.randn(2, 7, reference.CLIP_HIDDEN, generator=g)
    cases = [(unet.input_blocks[1][0], torch.randn(2, 32, 8, 8, generator=g), (emb,)),
             (unet.input_blocks[4][0], torch.randn(2, 32, 8, 8, generator=g), (emb,)),  # 32 -> 64 with a 1x1 skip conv
             (unet.input_blocks[1][1], torch.randn(2, 32, 8, 6, generator=g), (ctx,)),
             (vae.decoder.mid.attn_1, torch.randn(1, 64, 6, 8, generator=g), ()),
             (vae.decoder.up[0].block[0], torch.randn(1, 64, 8, 8, generator=g), ())]
    assert isinstance(cases[0][0], ResBlock) and isinstance(cases[2][0], SpatialTransformer)
    assert isinstance(cases[3][0], AttnBlock) and isinstance(cases[4][0], ResnetBlock)
    with torch.no_grad():
        for block, x, extra in cases:
            plain = block(x.contiguous(), *extra)
            last = block(x.contiguous(memory_format=torch.channels_last), *extra)
            assert reference.relerr(last, plain) < 1e-5, type(block).__name__


def test_in_place_fusions_keep_gradients(unet_state):
    """Residuals and activations written in place must not break autograd (guidance through the UNet)."""
    ref, config, state = unet_state
    ours = build(UNet, config, state)
    x, ctx = unet_inputs(7)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(a, 300, ctx).square().mean().backward()
    ref(b, 300, encoder_hidden_states=ctx).sample.square().mean().backward()
    assert reference.relerr(a.grad, b.grad) < 1e-4


@pytest.mark.parametrize("shape", [(1, 8, 48, 64), (2, 8, 33, 32), (1, 8, 8, 8)])  # the last takes the plain path
def test_upsample_conv_equals_upsample_then_conv(shape):
    g = torch.Generator().manual_seed(8)
    conv = Conv2d(shape[1], 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
        x = torch.randn(shape, generator=g)
        want = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0), conv.weight, conv.bias,
                                          padding=1)
        for layout in (torch.contiguous_format, torch.channels_last):
            got = upsample_conv(x.contiguous(memory_format=layout), conv)
            assert got.shape == want.shape and reference.relerr(got, want) < 1e-5
        odd = (2 * shape[2] - 1, 2 * shape[3])  # a skip of odd size: the plain path with size=
        want = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, size=odd), conv.weight, conv.bias, padding=1)
        assert reference.relerr(upsample_conv(x, conv, odd), want) < 1e-5
        x64, conv64 = x.double(), Conv2d(shape[1], 5, 3, padding=1).double()
        conv64.load_state_dict(conv.state_dict())
        assert upsample_conv(x64, conv64).dtype == torch.float64
    xg = x.clone().requires_grad_()
    upsample_conv(xg, conv).square().sum().backward()
    xr = x.clone().requires_grad_()
    torch.nn.functional.conv2d(torch.nn.functional.interpolate(xr, scale_factor=2.0), conv.weight, conv.bias,
                               padding=1).square().sum().backward()
    assert reference.relerr(xg.grad, xr.grad) < 1e-5


@pytest.mark.parametrize("shape", [(1, 64, 37, 23, 32), (2, 32, 16, 16, 3), (1, 32, 29, 17, 32), (2, 32, 16, 16, 32)])
def test_banded_norm_silu_conv_equals_plain(monkeypatch, shape):
    """The VAE's memory-bounded norm -> SiLU -> conv (row bands with a halo) is the plain composition; so is the
    in-place variant (each band overwrites its own input rows), whenever output and input channels agree."""
    from sdgen.nets import layers

    monkeypatch.setattr(layers, "BAND_ELEMENTS", 1 << 12)  # force many bands on a small tensor
    b, c, h, w, o = shape
    torch.manual_seed(0)
    norm, conv = layers.GroupNorm(32, c, eps=1e-6), layers.Conv2d(c, o, 3, padding=1)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
        x = torch.randn(b, c, h, w) * 3 + 5  # a large mean, as real activations have
        expected = conv(torch.nn.functional.silu(norm(x)))
    with torch.inference_mode():
        got = layers.norm_silu_conv(x, norm, conv)
        assert relerr(got, expected) < 1e-5
        if o == c:
            y = x.clone()
            got = layers.norm_silu_conv(y, norm, conv, inplace=True)
            assert got.data_ptr() == y.data_ptr() and relerr(got, expected) < 1e-5


def test_vae_decode_with_bands_matches_diffusers(monkeypatch, vae_state):
    from sdgen.nets import layers

    monkeypatch.setattr(layers, "BAND_ELEMENTS", 1 << 14)
    ref, config, state = vae_state
    ours = build(VAE, config, state)
    z = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        got = ours.decode(z)
    assert relerr(got, ref.decode(z / ref.config.scaling_factor).sample.detach()) < 1e-4
