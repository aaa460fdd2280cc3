"""Every public API output matches diffusers/transformers in fp32, loaded from every format."""

import pytest
import torch

import sdgen
from reference import relerr

FORMATS = ["diffusers", "safetensors", "safetensors_fp16", "ckpt"]
PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "café, 3 dogs & a 🐈 — don't stop!"]


@pytest.fixture(scope="module", params=FORMATS)
def loaded(request, tiny):
    ref, paths = tiny
    return ref, sdgen.load(str(paths[request.param]), dtype="float32"), request.param


def test_written_single_files_are_genuine_original_checkpoints(tiny):
    """diffusers' own single-file converter reads our original-layout file back to the same weights."""
    from diffusers import StableDiffusionPipeline

    ref, paths = tiny
    back = StableDiffusionPipeline.from_single_file(str(paths["safetensors"]), config=str(paths["diffusers"]),
                                                    local_files_only=True, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ref, name).state_dict(), getattr(back, name).state_dict()
        for k, v in a.items():
            if k.endswith("position_ids"):
                continue
            assert torch.equal(v, b[k].reshape(v.shape)), (name, k)


def test_tokenize(loaded):
    ref, pipe, _ = loaded
    expected = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(pipe.tokenize(PROMPTS), expected)


@torch.no_grad()
def test_encode_prompt(loaded):
    ref, pipe, _ = loaded
    ids = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    expected = ref.text_encoder(ids).last_hidden_state
    ours = pipe.encode_prompt(PROMPTS)
    assert ours.shape == expected.shape
    assert relerr(ours, expected) < 1e-4


@torch.no_grad()
def test_unet(loaded):
    ref, pipe, _ = loaded
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 48, generator=g)
    for t in (torch.tensor([999, 10]), 500, torch.tensor(1.5)):
        expected = ref.unet(x, t, ctx).sample
        assert relerr(pipe.unet(x, t, ctx), expected) < 1e-4


@torch.no_grad()
def test_vae(loaded):
    ref, pipe, _ = loaded
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    sf = ref.vae.config.scaling_factor
    assert relerr(pipe.decode(latents), ref.vae.decode(latents / sf).sample) < 1e-4
    images = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1
    assert relerr(pipe.encode(images), ref.vae.encode(images).latent_dist.mean * sf) < 1e-4


def test_info_and_family(loaded):
    _, pipe, fmt = loaded
    assert pipe.checkpoint.family.name == "sd1" and not pipe.checkpoint.inpainting
    assert pipe.checkpoint.format == ("diffusers" if fmt == "diffusers" else fmt.split("_")[0])
    if fmt != "diffusers":
        assert "betas" in pipe.checkpoint.ignored and "model_ema.decay" in pipe.checkpoint.ignored


def test_low_precision_loads_straight_to_dtype(tiny):
    ref, paths = tiny
    pipe = sdgen.load(str(paths["safetensors"]), dtype="bfloat16")
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 48)
    with torch.no_grad():
        assert relerr(pipe.unet(x, 10, ctx).float(), ref.unet(x, 10, ctx).sample) < 5e-2
