"""SD 2.x: tiny random epsilon and v-prediction models (OpenCLIP text encoder, linear projections, heads of 64)
in every format, matched against diffusers: text encoder, UNet, VAE, whole-pipeline final latents."""

import json

import pytest
import torch

import sdgen
from models_xl import SD2_EPS, SD2_V, sd2_pipeline, write_all_formats
from reference import relerr
from sdgen import SdgenError
from sdgen.families import open_checkpoint
from test_generate import diffusers_pipeline, generators, make_image

PROMPTS = ["a red cube on a table", "wow, a cat", ""]
NEGATIVE, SEED = "blurry, low quality", 1234
FORMATS = ("diffusers", "safetensors", "safetensors_fp16", "ckpt")


@pytest.fixture(scope="module")
def eps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2_eps")
    pipe = sd2_pipeline(folder)
    return pipe, write_all_formats(folder, pipe, "sd2", SD2_EPS)


@pytest.fixture(scope="module")
def vpred(tmp_path_factory):
    """The 768-v kind: single files say v by their metadata (safetensors) and A1111's YAML beside them (.ckpt)."""
    folder = tmp_path_factory.mktemp("sd2_v")
    pipe = sd2_pipeline(folder, v=True, seed=40)
    return pipe, write_all_formats(folder, pipe, "sd2", SD2_V, metadata={"modelspec.prediction_type": "v"},
                                   yaml='model:\n  params:\n    parameterization: "v"\n')


@pytest.fixture(scope="module")
def loaded(eps):
    return {fmt: sdgen.load(str(eps[1][fmt])) for fmt in FORMATS}


def test_detection_sizes_and_scheduler(eps, vpred):
    first = open_checkpoint(eps[1]["diffusers"])
    for fmt in FORMATS:
        e, v = open_checkpoint(eps[1][fmt]), open_checkpoint(vpred[1][fmt])
        assert e.family.name == v.family.name == "sd2", fmt
        for c in ("unet", "vae", "text_encoder"):
            assert e.configs[c] == first.configs[c], (fmt, c)
        u, t = e.configs["unet"], e.configs["text_encoder"]
        assert u.linear_proj and u.head_channels == 64 and u.context_dim == 128 and t.layers == 3 and t.heads == 2
        assert e.scheduler.prediction_type == "epsilon" and v.scheduler.prediction_type == "v_prediction", fmt
    # the single file's unused last block, projection and logit scale are recognised and left out
    single = open_checkpoint(eps[1]["safetensors"])
    assert any("resblocks.3." in k for k in single.ignored) and any(k.endswith("logit_scale") for k in single.ignored)
    assert single.native_size == (512, 512) and open_checkpoint(vpred[1]["safetensors"]).native_size == (768, 768)


def test_text_encoder_unet_vae_match(eps, loaded):
    ref = eps[0]
    for fmt, pipe in loaded.items():
        want = ref.encode_prompt(PROMPTS, "cpu", 1, False)[0]
        assert relerr(pipe.encode_prompt(PROMPTS), want) < 1e-4, fmt
        ids = ref.tokenizer(PROMPTS[:1], padding="max_length", max_length=77, return_tensors="pt").input_ids
        te = ref.text_encoder   # diffusers' clip_skip=1, our 2: the penultimate layer, then the final norm
        with torch.no_grad():
            want2 = getattr(te, "text_model", te).final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])
        assert relerr(pipe.encode_prompt(PROMPTS[:1], clip_skip=2), want2) < 1e-4, fmt
    pipe = loaded["safetensors"]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 128, generator=g)
    with torch.no_grad():
        assert relerr(pipe.unet(x, 321, ctx), ref.unet(x, 321, ctx).sample) < 1e-4
        img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        assert relerr(pipe.encode(img), ref.vae.encode(img).latent_dist.mean * ref.vae.config.scaling_factor) < 1e-4


@pytest.mark.parametrize("kind,sampler,fmt", [("eps", "euler", "ckpt"), ("eps", "dpmpp_2m", "diffusers"),
                                              ("v", "ddim", "safetensors"), ("v", "euler_a", "ckpt"),
                                              ("v", "dpmpp_2m", "diffusers")])
def test_txt2img_matches_diffusers(eps, vpred, kind, sampler, fmt):
    ref, paths = eps if kind == "eps" else vpred
    expected = diffusers_pipeline("StableDiffusionPipeline", ref, sampler)(
        PROMPTS[0], negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5, height=64, width=64,
        num_images_per_prompt=2, generator=generators(2), output_type="latent").images
    got = sdgen.load(str(paths[fmt])).generate(PROMPTS[0], NEGATIVE, steps=6, sampler=sampler, seed=SEED, width=64,
                                               height=64, batch_size=2, output_type="latent")
    assert relerr(got, expected) < 2e-3


def test_img2img_v_matches_diffusers(vpred):
    ref = diffusers_pipeline("StableDiffusionImg2ImgPipeline", vpred[0], "ddim")
    init = make_image(5)
    expected = ref(PROMPTS[0], image=init, strength=0.7, negative_prompt=NEGATIVE, num_inference_steps=8,
                   generator=generators(1), output_type="latent").images
    got = sdgen.load(str(vpred[1]["safetensors_fp16"]), dtype="float32").generate(
        PROMPTS[0], NEGATIVE, steps=8, sampler="ddim", seed=SEED, init_image=init, strength=0.7, output_type="latent")
    assert relerr(got, expected) < 2e-3


def test_zero_snr_trailing_v_matches_diffusers(vpred, tmp_path):
    """A v-model whose scheduler asks for zero terminal SNR and trailing spacing (SD2.1-style fine-tunes)."""
    import shutil

    folder = tmp_path / "ztsnr"
    shutil.copytree(vpred[1]["diffusers"], folder)
    config = {**SD2_V, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    from diffusers import DDIMScheduler

    ref = diffusers_pipeline("StableDiffusionPipeline", vpred[0], "ddim")
    ref.scheduler = DDIMScheduler.from_config(config)
    expected = ref(PROMPTS[1], num_inference_steps=5, height=64, width=64, generator=generators(1),
                   output_type="latent").images
    got = sdgen.load(str(folder)).generate(PROMPTS[1], steps=5, sampler="ddim", seed=SEED, width=64, height=64,
                                           output_type="latent")
    assert relerr(got, expected) < 2e-3


def test_inpainting_9_channel_matches_diffusers(tmp_path):
    pipe = sd2_pipeline(tmp_path, inpainting=True, seed=50)
    paths = write_all_formats(tmp_path / "m", pipe, "sd2", SD2_EPS)
    ours = sdgen.load(str(paths["safetensors"]))
    assert ours.checkpoint.inpainting and ours.checkpoint.family.name == "sd2"
    init, mask = make_image(7), make_image(0, mode="L")
    expected = diffusers_pipeline("StableDiffusionInpaintPipeline", pipe, "euler")(
        PROMPTS[0], image=init, mask_image=mask, strength=1.0, negative_prompt=NEGATIVE, height=64, width=64,
        num_inference_steps=6, generator=generators(1), output_type="latent").images
    got = ours.generate(PROMPTS[0], NEGATIVE, steps=6, sampler="euler", seed=SEED, init_image=init, mask_image=mask,
                        strength=1.0, output_type="latent")
    assert relerr(got, expected) < 2e-3


def test_variants_refused_and_info_names_family(eps, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from sdgen.cli import main

    sd = load_file(eps[1]["safetensors"])
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, w[:, :1]], 1)   # 5 channels: depth model
    save_file(sd, tmp_path / "depth.safetensors")
    with pytest.raises(SdgenError, match="depth.safetensors: this is an SD2 depth-to-image model"):
        open_checkpoint(tmp_path / "depth.safetensors")
    assert main(["info", str(eps[1]["ckpt"])]) == 0
    out = capsys.readouterr().out
    assert "family:     sd2 (Stable Diffusion 2.x)" in out and "text_encoder_2" not in out


def test_full_size_unet_matches_diffusers():
    """The SD2.1 UNet at full size (865M random weights, shared by both) at a small latent."""
    from dataclasses import replace

    from models_xl import SD21_UNET, full_size_pair

    theirs, ours, from_file = full_size_pair(SD21_UNET)
    assert replace(from_file, head_channels=64) == ours.config   # what a single file gives, with the SD2 constant
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 1024, generator=g)
    with torch.no_grad():
        assert relerr(ours(x, 700, ctx), theirs(x, 700, ctx).sample) < 1e-4
