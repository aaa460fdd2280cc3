"""Same seed, same image as diffusers: final latents of whole pipelines, every sampler and schedule."""

import numpy as np
import pytest
import torch
from PIL import Image

import sdgen
from reference import relerr

SCHEDULERS = {  # our sampler name -> (diffusers scheduler class name, extra from_config arguments)
    "ddim": ("DDIMScheduler", {}), "ddpm": ("DDPMScheduler", {}), "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}), "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}), "lcm": ("LCMScheduler", {}),
}
CASES = [(s, "normal") for s in SCHEDULERS] + [(s, "karras") for s in ("euler", "lms", "heun", "dpmpp_2m")]
PROMPT, NEGATIVE, SEED, STEPS = "a red cube on a table", "blurry, low quality", 1234, 7


def diffusers_pipeline(cls_name, ref, sampler, schedule="normal"):
    import diffusers

    name, extra = SCHEDULERS[sampler]
    if schedule == "karras":
        extra = {**extra, "use_karras_sigmas": True}
    scheduler = getattr(diffusers, name).from_config(ref.scheduler.config, **extra)
    return getattr(diffusers, cls_name)(**{**ref.components, "scheduler": scheduler})


def generators(n, seed=SEED):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def make_image(seed, size=64, mode="RGB"):
    rng = np.random.default_rng(seed)
    if mode == "L":  # a mask: white (repaint) rectangle on black
        a = np.zeros((size, size), np.uint8)
        a[size // 4 : size * 3 // 4, size // 8 : size // 2] = 255
        return Image.fromarray(a, "L")
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ours(tiny):
    return sdgen.load(str(tiny[1]["diffusers"]))


@pytest.mark.parametrize("sampler,schedule", CASES)
def test_txt2img_matches_diffusers(tiny, ours, sampler, schedule):
    ref = diffusers_pipeline("StableDiffusionPipeline", tiny[0], sampler, schedule)
    expected = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5, height=64, width=64,
                   num_images_per_prompt=2, generator=generators(2), output_type="latent").images
    got = ours.generate(PROMPT, NEGATIVE, steps=STEPS, guidance_scale=7.5, sampler=sampler, schedule=schedule,
                        seed=SEED, width=64, height=64, batch_size=2, output_type="latent")
    assert got.shape == expected.shape == (2, 4, 8, 8)
    assert relerr(got, expected) < 2e-3


def test_non_square_and_no_guidance(tiny, ours):
    ref = diffusers_pipeline("StableDiffusionPipeline", tiny[0], "euler")
    expected = ref(PROMPT, num_inference_steps=5, guidance_scale=1.0, height=48, width=80,
                   generator=generators(1), output_type="latent").images
    got = ours.generate(PROMPT, steps=5, guidance_scale=1.0, sampler="euler", seed=SEED, width=80, height=48,
                        output_type="latent")
    assert got.shape == (1, 4, 6, 10)
    assert relerr(got, expected) < 2e-3


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "euler_a"])
def test_img2img_matches_diffusers(tiny, ours, sampler):
    ref = diffusers_pipeline("StableDiffusionImg2ImgPipeline", tiny[0], sampler)
    init = make_image(5)
    expected = ref(PROMPT, image=init, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=10,
                   guidance_scale=7.5, num_images_per_prompt=2, generator=generators(2), output_type="latent").images
    got = ours.generate(PROMPT, NEGATIVE, steps=10, guidance_scale=7.5, sampler=sampler, seed=SEED, init_image=init,
                        strength=0.6, batch_size=2, output_type="latent")
    assert relerr(got, expected) < 2e-3


def check_inpaint(ref_components, ours, sampler, strength, image_seed):
    ref = diffusers_pipeline("StableDiffusionInpaintPipeline", ref_components, sampler)
    init, mask = make_image(image_seed), make_image(0, mode="L")
    expected = ref(PROMPT, image=init, mask_image=mask, strength=strength, negative_prompt=NEGATIVE, height=64, width=64,
                   num_inference_steps=8, guidance_scale=7.5, num_images_per_prompt=2, generator=generators(2),
                   output_type="latent").images
    got = ours.generate(PROMPT, NEGATIVE, steps=8, guidance_scale=7.5, sampler=sampler, seed=SEED, init_image=init,
                        mask_image=mask, strength=strength, batch_size=2, output_type="latent")
    assert relerr(got, expected) < 2e-3


@pytest.mark.parametrize("sampler,strength", [("euler", 1.0), ("ddim", 0.75), ("dpmpp_2m", 1.0)])
def test_inpaint_ordinary_checkpoint_matches_diffusers(tiny, ours, sampler, strength):
    check_inpaint(tiny[0], ours, sampler, strength, 6)


@pytest.mark.parametrize("sampler,strength", [("euler", 1.0), ("ddim", 0.7)])
def test_inpaint_9_channel_checkpoint_matches_diffusers(tiny_inpaint, sampler, strength):
    ours = sdgen.load(str(tiny_inpaint[1]["safetensors"]))
    assert ours.checkpoint.inpainting
    check_inpaint(tiny_inpaint[0], ours, sampler, strength, 7)


def test_pil_output_matches_diffusers(tiny, ours):
    ref = diffusers_pipeline("StableDiffusionPipeline", tiny[0], "dpmpp_2m")
    expected = ref(PROMPT, num_inference_steps=4, height=64, width=64, generator=generators(1)).images[0]
    got = ours.generate(PROMPT, steps=4, sampler="dpmpp_2m", seed=SEED, width=64, height=64)[0]
    diff = np.abs(np.asarray(got, np.int16) - np.asarray(expected, np.int16))
    assert got.size == (64, 64) and diff.max() <= 1


def test_batch_image_is_independent_of_batch_size(ours):
    """Image i uses seed + i: the second image of a batch of 2 is the first image for seed + 1."""
    two = ours.generate(PROMPT, steps=4, seed=SEED, width=64, height=64, batch_size=2, output_type="latent")
    one = ours.generate(PROMPT, steps=4, seed=SEED + 1, width=64, height=64, output_type="latent")
    assert relerr(two[1:], one) < 1e-5


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"guidance_scale": float("nan")}, "guidance"),
    ({"guidance_scale": -1.0}, "guidance"), ({"strength": 1.5}, "strength"), ({"sampler": "nope"}, "sampler"),
    ({"schedule": "weird"}, "schedule"), ({"width": 63}, "width"), ({"height": 10**6}, "height"),
    ({"batch_size": 0}, "batch"), ({"seed": -3}, "seed"),
])
def test_bad_arguments(ours, kwargs, message):
    with pytest.raises(sdgen.SdgenError, match=message):
        ours.generate(PROMPT, **{"steps": 2, **kwargs})


def test_long_prompt_is_chunked_not_truncated(ours):
    """A1111: 200 tokens are 3 chunks of 75, each encoded on its own (tests/test_prompts.py has the details)."""
    assert ours.encode_prompt(["a cat " * 100]).shape == (1, 3 * 77, 48)
    x = ours.generate("a cat " * 100, steps=1, seed=1, width=64, height=64, output_type="latent")
    assert torch.isfinite(x).all()
