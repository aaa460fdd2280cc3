"""The request object: defaults, every rule checked before anything loads, A1111 text both ways, results."""

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from PIL import Image

import sdgen
from sdgen import SdgenError
from sdgen.cli import main
from sdgen.request import GenerationRequest
from sdgen.sampling.schedule import SchedulerConfig


@dataclass
class Facts:  # what an opened checkpoint tells a request
    scheduler: SchedulerConfig = SchedulerConfig.from_diffusers(None)
    native_size: tuple = (512, 512)
    inpainting: bool = False
    text_layers: int = 12


IMAGE = Image.new("RGB", (64, 48), (200, 10, 10))
MASK = Image.new("L", (64, 48), 255)


# ---------------------------------------------------------------------------------------------- A1111 text


@pytest.mark.parametrize("req", [
    GenerationRequest("a cat on a beach", seed=42),
    GenerationRequest("a cat, (best quality:1.2), 8k", "blurry, low quality", steps=31, guidance_scale=6.5,
                      sampler="dpmpp_2m", schedule="karras", seed=2**40, width=640, height=384, clip_skip=2),
    GenerationRequest("line one\nline two: with a colon, and \"quotes\"", "neg\nsecond line", sampler="euler_a",
                      seed=0, width=64, height=64),
    GenerationRequest("a dog", sampler="ddim", guidance_scale=1, seed=5, width=512, height=768, batch_size=3),
])
def test_parameters_round_trip(req):
    req = req.resolve(Facts())
    for i in range(req.count):
        text = req.parameters("my-model", i)
        back, rest = GenerationRequest.from_parameters(text)
        assert rest == {"Model": "my-model"}
        assert back == replace(req, seed=req.seed + i, batch_size=1, init_image=None, mask_image=None,
                               prompt=req.prompts[i], negative_prompt=req.negative_prompts[i])


def test_parameters_text_is_a1111s():
    req = GenerationRequest("a cat", "blurry", steps=20, sampler="euler_a", schedule="karras", guidance_scale=7,
                            seed=7, width=512, height=512, init_image=Image.new("RGB", (512, 512)), strength=0.6,
                            clip_skip=2).resolve(Facts())
    assert req.parameters("sd15").split("\n") == [
        "a cat", "Negative prompt: blurry",
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 7, Size: 512x512, Model: sd15, Schedule type: Karras, "
        "Denoising strength: 0.6, Clip skip: 2"]


def test_reads_real_a1111_text():
    text = ("masterpiece, best quality, 1girl\nNegative prompt: lowres, bad anatomy\nSteps: 28, Sampler: DPM++ 2M Karras, "
            "CFG scale: 7, Seed: 3887226339, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
            "Denoising strength: 0.55, Clip skip: 2, Hires upscale: 2, Lora hashes: \"add_detail: 7c6bad76eb54\", "
            "Version: v1.6.0")
    req, rest = GenerationRequest.from_parameters(text)
    assert (req.prompt, req.negative_prompt) == ("masterpiece, best quality, 1girl", "lowres, bad anatomy")
    assert (req.steps, req.sampler, req.schedule, req.guidance_scale, req.seed) == (28, "dpmpp_2m", "karras", 7.0, 3887226339)
    assert (req.width, req.height, req.clip_skip) == (512, 768, 2)
    assert rest["Lora hashes"] == "add_detail: 7c6bad76eb54" and rest["Denoising strength"] == "0.55"
    assert rest["Model"] == "v1-5-pruned-emaonly" and rest["Version"] == "v1.6.0"
    req, _ = GenerationRequest.from_parameters("a\nSteps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, "
                                               "Seed: 1, Size: 64x64")
    assert (req.sampler, req.schedule) == ("euler_a", "karras")


@pytest.mark.parametrize("text", ["", "just a prompt", "a\nSteps: many, Seed: 1", "a\nSteps: 20, Sampler: Magic",
                                  "a\nSteps: 20, Size: big"])
def test_bad_parameters_text(text):
    with pytest.raises(SdgenError):
        GenerationRequest.from_parameters(text)


# ---------------------------------------------------------------------------------------------- rules


def test_defaults_are_filled_in_one_place():
    req = GenerationRequest("a cat")
    assert (req.width, req.height, req.seed) == (None, None, None)
    r = req.resolve(Facts(native_size=(128, 96)))
    assert (r.width, r.height) == (128, 96) and isinstance(r.seed, int)
    r = GenerationRequest("a cat", init_image=Image.new("RGB", (100, 61))).resolve(Facts())
    assert (r.width, r.height) == (96, 56)  # the init image's size, rounded down to 8
    r = GenerationRequest("a cat", width=64).resolve(Facts())
    assert (r.width, r.height) == (64, 512)


@pytest.mark.parametrize("kwargs,facts,message", [
    (dict(init_image=IMAGE, strength=0.01, steps=20), {}, "no denoising step"),
    (dict(init_image=IMAGE, strength=0), {}, "strength"),
    (dict(sampler="ddim", schedule="karras"), {}, "karras"),
    (dict(sampler="pndm", schedule="karras"), {}, "karras"),
    (dict(sampler="lcm", steps=51), {}, "lcm"),
    (dict(clip_skip=13), {}, "clip skip"),
    (dict(clip_skip=3), {"text_layers": 2}, "from 1 to 2"),
    (dict(clip_skip=0), {}, "clip skip"),
    (dict(), {"inpainting": True}, "inpainting model"),
    (dict(init_image=IMAGE), {"inpainting": True}, "inpainting model"),
    (dict(mask_image=MASK), {}, "init image"),
    (dict(init_image=IMAGE, mask_image=Image.new("L", (8, 8))), {}, "mask"),
    (dict(steps=0), {}, "steps"), (dict(steps=2.5), {}, "steps"), (dict(steps=True), {}, "steps"),
    (dict(guidance_scale=float("nan")), {}, "guidance"), (dict(guidance_scale=1e9), {}, "guidance"),
    (dict(seed=-1), {}, "seed"), (dict(width=100), {}, "width"), (dict(height=0), {}, "height"),
    (dict(batch_size=65), {}, "batch"), (dict(negative_prompt=None), {}, "strings"),
    (dict(sampler="magic"), {}, "sampler"), (dict(schedule="cosine"), {}, "schedule"),
    (dict(init_image="photo.png"), {}, "PIL image"), (dict(init_image=Image.new("RGB", (1, 1))), {}, "1x1"),
])
def test_every_rule_is_checked_before_loading(kwargs, facts, message):
    with pytest.raises(SdgenError, match=message) as e:
        GenerationRequest("a cat", **kwargs).resolve(Facts(**facts))
    assert "\n" not in str(e.value)


def test_batch_limit_counts_all_images():
    with pytest.raises(SdgenError, match="more than 64 images"):
        GenerationRequest(["a", "b", "c"], batch_size=30).check()
    with pytest.raises(SdgenError, match="no prompt"):
        GenerationRequest([]).check()


def test_img2img_strength_that_runs_steps_is_accepted():
    GenerationRequest("a cat", init_image=IMAGE, strength=0.05, steps=20).resolve(Facts())  # int(20 * 0.05) = 1 step


# ---------------------------------------------------------------------------------------------- through the CLI


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if anything tries to load a model's weights."""
    from sdgen import families

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(families.Checkpoint, "load", refuse)


@pytest.mark.parametrize("args,message", [
    (["--init-image", "{init}", "--strength", "0.01", "--steps", "20"], "no denoising step"),
    (["--init-image", "{init}", "--strength", "0"], "strength"),
    (["--sampler", "ddim", "--schedule", "karras"], "karras"),
    (["--sampler", "lcm", "--steps", "60"], "lcm"),
    (["--clip-skip", "13"], "clip skip"),
    (["--clip-skip", "3"], "clip skip"),     # the tiny test model's text encoder has 2 layers
])
def test_cli_refuses_before_loading(tiny, tmp_path, capsys, no_load, args, message):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64)).save(init)
    args = [a.replace("{init}", str(init)) for a in args]
    out = tmp_path / "x.png"
    assert main(["generate", "a cat", "--model", str(tiny[1]["safetensors"]), "-o", str(out), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sdgen: error:") and message in err[0], err
    assert not out.exists()


def test_inpainting_checkpoint_without_init_image_refused_before_loading(tiny_inpaint, tmp_path, capsys, no_load):
    assert main(["generate", "a cat", "--model", str(tiny_inpaint[1]["safetensors"]), "-o", str(tmp_path / "x.png")]) == 1
    assert "inpainting model" in capsys.readouterr().err


def test_from_png_reproduces_the_image(tiny, tmp_path, capsys):
    model = str(tiny[1]["safetensors"])
    first = tmp_path / "first.png"
    assert main(["generate", "a red cube, (on a table:1.1)", "-n", "blurry", "--sampler", "Euler a", "--steps", "3",
                 "--width", "64", "--height", "48", "--guidance", "6", "--clip-skip", "2", "--model", model,
                 "--precision", "fp32", "-o", str(first)]) == 0
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(first), "--model", model, "--precision", "fp32", "-o", str(again)]) == 0
    a, b = Image.open(first), Image.open(again)
    assert a.text["parameters"] == b.text["parameters"]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # options given on the command line override the stored ones
    third = tmp_path / "third.png"
    assert main(["generate", "--from-png", str(first), "--seed", "5", "--model", model, "--precision", "fp32",
                 "-o", str(third)]) == 0
    assert "Seed: 5," in Image.open(third).text["parameters"]
    capsys.readouterr()
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert main(["generate", "--from-png", str(plain), "--model", model, "-o", str(tmp_path / "y.png")]) == 1
    assert "no generation parameters" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- results and state


def test_generate_returns_images_seeds_and_timings(tiny):
    pipe = sdgen.load(str(tiny[1]["safetensors"]))
    result = pipe.generate(GenerationRequest("a cat", steps=2, seed=11, width=64, height=64, batch_size=2))
    assert result.seeds == [11, 12] and len(result.images) == 2 and result[0] is result.images[0]
    assert set(result.timings) == {"text", "prepare", "denoise", "decode"}
    assert result.request.width == 64 and result.latents.shape == (2, 4, 8, 8)
    assert not hasattr(pipe, "timings")  # nothing is left on the pipeline
    latent = pipe.generate("a cat", steps=2, seed=11, width=64, height=64, output_type="latent")
    assert torch.allclose(latent.latents, result.latents[:1], rtol=1e-4, atol=1e-3) and latent.shape == (1, 4, 8, 8)
    with pytest.raises(SdgenError, match="unknown generation option"):
        pipe.generate("a cat", stepz=2)
    random = pipe.generate("a cat", steps=1, width=64, height=64, output_type="latent")
    assert 0 <= random.seeds[0] < 2**32


def test_same_request_same_pixels_whatever_ran_before(tiny):
    """A long-lived process (the server) gives the same pixels for the same request, whatever ran before:
    layouts are chosen when the networks are built, never while they run."""
    path = str(tiny[1]["diffusers"])
    req = GenerationRequest("a cat", steps=3, seed=3, width=64, height=64)
    fresh = sdgen.load(path)
    a = fresh.generate(req, output_type="latent").latents
    busy = sdgen.load(path)
    busy.generate(replace(req, batch_size=2, width=72, height=40), output_type="latent")
    busy.generate(replace(req, init_image=Image.new("RGB", (64, 64), (9, 9, 9)), strength=0.5), output_type="latent")
    b = busy.generate(req, output_type="latent").latents
    c = sdgen.load(path).generate(req, output_type="latent").latents
    assert torch.equal(a, b) and torch.equal(a, c)
    for net in (busy.unet,):
        convs = [p for p in net.parameters() if p.ndim == 4]
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)


def test_impossible_size_refused_before_loading(tiny, tmp_path, capsys, no_load):
    out = tmp_path / "x.png"
    assert main(["generate", "a cat", "--model", str(tiny[1]["safetensors"]), "--width", "8192", "--height", "8192",
                 "-b", "64", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "8192x8192" in err[0] and "GiB" in err[0] and not out.exists()


def test_output_location_checked_before_loading(tiny, tmp_path, capsys, no_load):
    (tmp_path / "file").write_text("x")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for bad in (tmp_path / "file" / "x.png", dangling / "x.png"):
        assert main(["generate", "a cat", "--model", str(tiny[1]["safetensors"]), "-o", str(bad)]) == 1
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_dangling_link_as_output_is_skipped_not_looped(tiny, tmp_path):
    link = tmp_path / "out.png"
    link.symlink_to(tmp_path / "missing-target.png")
    assert main(["generate", "a cat", "--model", str(tiny[1]["safetensors"]), "--steps", "1", "--width", "64",
                 "--height", "64", "-o", str(link)]) == 0
    assert (tmp_path / "out-1.png").is_file() and link.is_symlink() and not (tmp_path / "missing-target.png").exists()
    assert not list(tmp_path.glob(".*part"))  # no temporary file left behind
