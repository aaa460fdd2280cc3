"""SDXL base and refiner: tiny random models in every format, matched against diffusers: both text encoders and
the pooled text, the UNet with added conditioning, the VAE's scaling factor, whole-pipeline final latents
(txt2img, img2img, the refiner hand-off)."""

import pytest
import torch

import sdgen
from models_xl import EULER_XL, POOLED, refiner_pipeline, sdxl_pipeline, write_all_formats
from reference import relerr
from sdgen import SdgenError
from sdgen.families import open_checkpoint
from test_generate import diffusers_pipeline, generators, make_image

PROMPTS = ["a red cube on a table", "a cat, in a hat", ""]
NEGATIVE, SEED = "blurry, low quality", 1234
FORMATS = ("diffusers", "safetensors", "safetensors_fp16", "ckpt")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    pipe = sdxl_pipeline(folder)
    return pipe, write_all_formats(folder, pipe, "sdxl", EULER_XL)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_refiner")
    pipe = refiner_pipeline(folder)
    return pipe, write_all_formats(folder, pipe, "refiner", EULER_XL)


@pytest.fixture(scope="module")
def ours(base):
    return sdgen.load(str(base[1]["safetensors"]))


def test_detection_and_sizes(base, refiner):
    first = open_checkpoint(base[1]["diffusers"])
    for fmt in FORMATS:
        b, r = open_checkpoint(base[1][fmt]), open_checkpoint(refiner[1][fmt])
        assert (b.family.name, r.family.name) == ("sdxl", "sdxl-refiner"), fmt
        for c in ("unet", "vae", "text_encoder", "text_encoder_2"):
            assert b.configs[c] == first.configs[c], (fmt, c)
        u = b.configs["unet"]
        assert u.transformer_depth == (0, 1, 2) and u.adm_in_channels == POOLED + 6 * 256 and u.head_channels == 64
        assert r.configs["unet"].transformer_depth == 2 and r.configs["unet"].adm_in_channels == POOLED + 5 * 256
        assert b.configs["vae"].scaling_factor == 0.13025 and b.configs["text_encoder_2"].projection_dim == POOLED
        assert b.zero_negative and not r.zero_negative
    assert open_checkpoint(base[1]["ckpt"]).native_size == (1024, 1024)


def test_text_encoders_and_unet_match(base, refiner):
    ref = base[0]
    for fmt in ("diffusers", "ckpt"):
        pipe = sdgen.load(str(base[1][fmt]))
        embeds, _, pooled, _ = ref.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        context, _, our_pooled = pipe._encode(PROMPTS, 1)
        assert context.shape == (3, 77, 48 + 128)
        assert relerr(context, embeds) < 1e-4 and relerr(our_pooled, pooled) < 1e-4, fmt
    ref_r = refiner[0]
    pipe = sdgen.load(str(refiner[1]["safetensors_fp16"]))
    embeds, _, pooled, _ = ref_r.encode_prompt(PROMPTS[:2], device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)
    context, _, our_pooled = pipe._encode(PROMPTS[:2], 1)
    assert relerr(context, embeds) < 1e-4 and relerr(our_pooled, pooled) < 1e-4
    # the UNet with SDXL's added conditioning, y built from the pooled text and diffusers' default time ids
    ours = sdgen.load(str(base[1]["safetensors"]))
    g = torch.Generator().manual_seed(0)
    x, ctx, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 176, generator=g), torch.randn(2, POOLED, generator=g)
    time_ids = torch.tensor([[64.0, 96, 0, 0, 64, 96]] * 2)
    with torch.no_grad():
        want = ref.unet(x, 500, ctx, added_cond_kwargs={"text_embeds": text, "time_ids": time_ids}).sample
        y = ours.checkpoint.family.added(text, 96, 64, False, ours.unet.config)
        assert relerr(ours.unet(x, 500, ctx, y), want) < 1e-4


@pytest.mark.parametrize("sampler,fmt,negative", [("euler", "safetensors", NEGATIVE), ("euler_a", "diffusers", None),
                                                  ("dpmpp_2m", "ckpt", NEGATIVE)])
def test_txt2img_matches_diffusers(base, sampler, fmt, negative):
    """negative None: diffusers' all-zero negative conditioning (force_zeros_for_empty_prompt), our empty one."""
    ref = diffusers_pipeline("StableDiffusionXLPipeline", base[0], sampler)
    expected = ref(PROMPTS[0], negative_prompt=negative, num_inference_steps=6, guidance_scale=7.5, height=64,
                   width=96, num_images_per_prompt=2, generator=generators(2), output_type="latent").images
    got = sdgen.load(str(base[1][fmt])).generate(PROMPTS[0], negative or "", steps=6, sampler=sampler, seed=SEED,
                                                 width=96, height=64, batch_size=2, output_type="latent")
    assert got.shape == (2, 4, 8, 12)
    assert relerr(got, expected) < 2e-3


def test_img2img_matches_diffusers(base, ours):
    ref = diffusers_pipeline("StableDiffusionXLImg2ImgPipeline", base[0], "euler")
    init = make_image(5)
    expected = ref(PROMPTS[1], image=init, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=10,
                   guidance_scale=7.5, generator=generators(1), output_type="latent").images
    got = ours.generate(PROMPTS[1], NEGATIVE, steps=10, sampler="euler", seed=SEED, init_image=init, strength=0.6,
                        output_type="latent")
    assert relerr(got, expected) < 2e-3


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_refiner_hand_off_matches_diffusers(base, refiner, sampler):
    """diffusers' ensemble of experts: base(denoising_end=0.8) latents -> refiner(denoising_start=0.8)."""
    b = diffusers_pipeline("StableDiffusionXLPipeline", base[0], sampler)
    r = diffusers_pipeline("StableDiffusionXLImg2ImgPipeline", refiner[0], sampler)
    r.register_to_config(requires_aesthetics_score=True)
    latents = b(PROMPTS[0], negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, height=64, width=64,
                denoising_end=0.8, generator=generators(1), output_type="latent").images
    expected = r(PROMPTS[0], negative_prompt=NEGATIVE, image=latents, num_inference_steps=10, guidance_scale=7.5,
                 denoising_start=0.8, generator=generators(1), output_type="latent").images
    pipe = sdgen.load(str(base[1]["safetensors"]), refiner=str(refiner[1]["ckpt"]))
    steps = []
    got = pipe.generate(PROMPTS[0], NEGATIVE, steps=10, sampler=sampler, seed=SEED, width=64, height=64,
                        refiner_start=0.8, output_type="latent", progress=lambda i, n: steps.append((i, n)))
    assert steps[-1] == (10, 10)
    assert relerr(got, expected) < 2e-3
    assert "Refiner switch at: 0.8" in got.request.parameters("m")


def test_refiner_refusals(base, refiner, ours):
    with pytest.raises(SdgenError, match="refiner_start needs a pipeline loaded with a refiner"):
        ours.generate(PROMPTS[0], steps=4, seed=1, width=64, height=64, refiner_start=0.8)
    with pytest.raises(SdgenError, match="refiner start must be a number between 0 and 1"):
        ours.generate(PROMPTS[0], steps=4, seed=1, width=64, height=64, refiner_start=1.5)
    with pytest.raises(SdgenError, match="a refiner stage needs SDXL models"):
        from models import write_all_formats as sd1_formats  # an SD1 model as the "refiner"

        sdgen.load(str(base[1]["safetensors"]), refiner=str(sd1_formats(base[1]["ckpt"].parent / "sd1")[1]["ckpt"]))


def test_info_names_family(base, refiner, capsys):
    from sdgen.cli import main

    assert main(["info", str(base[1]["safetensors_fp16"])]) == 0
    out = capsys.readouterr().out
    assert "family:     sdxl (Stable Diffusion XL)" in out and "text_encoder_2:" in out and "float16 on disk" in out
    assert main(["info", str(refiner[1]["diffusers"])]) == 0
    assert "family:     sdxl-refiner (Stable Diffusion XL refiner)" in capsys.readouterr().out


def test_full_size_unet_matches_diffusers():
    """The SDXL base UNet at full size (2.6B random weights, one copy shared by both) at a small latent. Stored in
    bf16 (5 GB: fp32 would take 10 GB of a 24 GB machine shared with other jobs), computed in float32 by both:
    diffusers' layers get their weights upcast one layer at a time, as sdgen's do."""
    from dataclasses import replace

    from models_xl import SDXL_UNET, compute_in_float32_, full_size_pair
    from sdgen.families import sdxl

    theirs, ours, from_file = full_size_pair(SDXL_UNET, torch.bfloat16)
    compute_in_float32_(theirs)
    assert replace(from_file, head_channels=64) == ours.config and ours.config.transformer_depth == (0, 2, 10)
    g = torch.Generator().manual_seed(1)
    x, ctx, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])
    with torch.no_grad():
        want = theirs(x, 700, ctx, added_cond_kwargs={"text_embeds": text, "time_ids": time_ids}).sample
        y = sdxl.added(text, 1024, 1024, False, ours.config)
        assert relerr(ours(x, 700, ctx, y), want) < 1e-4


def test_cli_refiner(base, refiner, tmp_path):
    from sdgen.cli import main
    from sdgen.images import read_parameters

    out = tmp_path / "x.png"
    assert main(["generate", "a red cube", "-m", str(base[1]["safetensors"]), "--refiner", str(refiner[1]["ckpt"]),
                 "--refiner-start", "0.7", "--steps", "4", "-W", "64", "-H", "64", "--seed", "1", "-o", str(out)]) == 0
    assert "Refiner switch at: 0.7" in read_parameters(out)
    assert main(["generate", "a red cube", "--refiner-start", "0.7", "-o", str(out)]) == 1


def test_kohya_lora_and_embedding_match_diffusers(base, tmp_path):
    """A kohya SDXL LoRA over the UNet and both text encoders (lora_te1_, lora_te2_: the bigG q/k/v blocks land in
    its fused in_proj_weight), and an SDXL embedding (clip_l, clip_g), against diffusers."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from test_lora import TARGETS, TE_TARGETS, layers

    ref = StableDiffusionXLPipeline.from_pretrained(str(base[1]["diffusers"]))
    g = torch.Generator().manual_seed(3)
    lora = {}
    for prefix, found in (("lora_unet_", layers(ref.unet, TARGETS)), ("lora_te1_", layers(ref.text_encoder, TE_TARGETS)),
                          ("lora_te2_", layers(ref.text_encoder_2, TE_TARGETS))):
        for name, m in found:
            key = prefix + name.replace(".", "_")
            lora[key + ".lora_down.weight"] = torch.randn(4, m.in_features, generator=g) * 0.3
            lora[key + ".lora_up.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.3
            lora[key + ".alpha"] = torch.tensor(2.0)
    save_file(lora, tmp_path / "xl_style.safetensors")
    emb = {"clip_l": torch.randn(1, 48, generator=g), "clip_g": torch.randn(1, 128, generator=g)}
    (tmp_path / "emb").mkdir()
    save_file(emb, tmp_path / "emb" / "shiny.safetensors")

    ref.load_lora_weights(str(tmp_path / "xl_style.safetensors"), adapter_name="a")
    ref.set_adapters(["a"], adapter_weights=[0.7])
    ref.load_textual_inversion(emb["clip_l"][0], token="shiny", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(emb["clip_g"][0], token="shiny", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    prompt = "a shiny red cube"
    expected = ref(prompt, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
                   generator=generators(1), output_type="latent").images
    pipe = sdgen.load(str(base[1]["safetensors"]), embedding_dirs=[tmp_path / "emb"])
    got = pipe.generate(prompt, NEGATIVE, steps=4, sampler="euler", seed=SEED, width=64, height=64,
                        loras=[(str(tmp_path / "xl_style.safetensors"), 0.7)], output_type="latent")
    assert relerr(got, expected) < 2e-3
    plain = pipe.generate("a red cube", NEGATIVE, steps=4, sampler="euler", seed=SEED, width=64, height=64,
                          output_type="latent")   # the LoRA taken out again
    ref.unload_lora_weights()
    want_plain = ref("a red cube", negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.5, height=64,
                     width=64, generator=generators(1), output_type="latent").images
    assert relerr(plain, want_plain) < 2e-3


def test_weighted_long_prompt_with_break(base, ours):
    """A1111 prompt syntax on SDXL: both encoders see the same chunks; the context grows by 77 per chunk and the
    pooled text is the first chunk's."""
    long = ", ".join(["a (red:1.3) cube"] * 30) + " BREAK [blue] sky"
    context, _, pooled = ours._encode([long, "a cat"], 1)
    assert context.shape[1] % 77 == 0 and context.shape[1] >= 3 * 77 and context.shape[2] == 176
    first, _, pooled_first = ours._encode(["a cat"], 1)
    assert torch.allclose(pooled[1:], pooled_first, atol=1e-5) and torch.allclose(context[1:, :77], first, atol=1e-5)
    got = ours.generate(long, steps=2, seed=1, width=64, height=64, output_type="latent")
    assert torch.isfinite(got.latents).all()
