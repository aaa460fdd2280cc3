"""Scheduler configs as diffusers reads them: a key the file leaves out takes the default of the class it is loaded
into (DDIMScheduler.from_config(d) clips samples and uses linear betas when d does not say), per sampler.

The sampler-level matrix runs on an analytic eps model (fast, and sensitive to every timestep and sigma); whole
pipelines run on the tiny random model of tests/models.py.
"""

import inspect
import json
import math
import shutil
import time
from dataclasses import fields

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import reference
import sdgen
from sdgen import SdgenError
from sdgen.sampling.guidance import model_denoiser
from sdgen.sampling.samplers import SAMPLERS
from sdgen.sampling.schedule import SD15_SCHEDULER, SchedulerConfig, plan

CLASS_ONLY = {"_class_name": "PNDMScheduler"}
BETAS_ONLY = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
CONFIGS = {"class_only": CLASS_ONLY, "betas_only": BETAS_ONLY, "sd15": SD15_SCHEDULER}
SHAPE = (2, 4, 8, 8)
TOL = 2e-3
# keys a class takes but never reads (LCMScheduler's set_timesteps and step ignore them)
UNREAD = {"lcm": {"timestep_spacing", "steps_offset", "set_alpha_to_one"}}


def diffusers_class(name):
    return getattr(diffusers, SAMPLERS[name].scheduler)


# ---- the table ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_defaults_are_the_diffusers_class_defaults(name):
    s = SAMPLERS[name]
    params = inspect.signature(diffusers_class(name).__init__).parameters
    assert {k: params[k].default for k in s.defaults} == dict(s.defaults)
    # every key we honour that the class has is in its table (so a file's value for it is used)
    ours = {f.name for f in fields(SchedulerConfig)}
    assert (ours & set(params)) - set(s.defaults) == UNREAD.get(name, set())


def test_every_config_key_is_some_class_default():
    assert set().union(*(s.defaults for s in SAMPLERS.values())) == {f.name for f in fields(SchedulerConfig)}


def test_sd15_and_single_files():
    """A single file has no scheduler config: it means the real SD1.5 file, with each class's defaults besides."""
    assert SchedulerConfig.from_diffusers(None) == SchedulerConfig.from_diffusers(dict(SD15_SCHEDULER))
    c = SchedulerConfig.from_diffusers(None)
    assert c.prediction_type is None and c.timestep_spacing is None  # the file does not say
    assert c.for_sampler("ddim").timestep_spacing == "leading" and c.for_sampler("euler").timestep_spacing == "linspace"
    assert c.for_sampler("ddim").clip_sample is False and c.for_sampler("ddim").steps_offset == 1


def test_resolution_per_class():
    c = SchedulerConfig.from_diffusers(CLASS_ONLY)
    assert c == SchedulerConfig()
    ddim, pndm, heun, lcm, euler = (c.for_sampler(n) for n in ("ddim", "pndm", "heun", "lcm", "euler"))
    assert (ddim.clip_sample, ddim.set_alpha_to_one, ddim.steps_offset, ddim.beta_schedule) == (True, True, 0, "linear")
    assert (pndm.skip_prk_steps, pndm.set_alpha_to_one, pndm.clip_sample) == (False, False, None)
    assert (heun.beta_start, heun.beta_end, heun.beta_schedule) == (0.00085, 0.012, "linear")
    assert (lcm.beta_schedule, lcm.original_inference_steps, lcm.timestep_spacing) == ("scaled_linear", 50, None)
    assert euler.clip_sample is None and euler.timestep_spacing == "linspace"


def test_in_memory_diffusers_config():
    """dict(scheduler.config) lists the keys diffusers defaulted in _use_default_values: those were not given."""
    sched = diffusers.PNDMScheduler.from_config(BETAS_ONLY)
    assert SchedulerConfig.from_diffusers(dict(sched.config)) == SchedulerConfig.from_diffusers(BETAS_ONLY)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_keys_the_class_lacks_change_nothing(name):
    s = SAMPLERS[name]
    odd = {"set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 0.3, "skip_prk_steps": False,
           "rescale_betas_zero_snr": True, "original_inference_steps": 7, "timestep_scaling": 3.0,
           "timestep_spacing": "trailing", "steps_offset": 3}
    base = SchedulerConfig.from_diffusers(SD15_SCHEDULER)
    other = SchedulerConfig.from_diffusers({**SD15_SCHEDULER, **{k: v for k, v in odd.items() if k not in s.defaults}})
    a, b = plan(name, 8, base), plan(name, 8, other)
    assert a.config == b.config
    assert torch.equal(a.sigmas, b.sigmas) and torch.equal(a.timesteps, b.timesteps) and a.extra == b.extra


# ---- sampler level: ours vs the diffusers class loaded with the same dict ---------------------------------------
def eps_model(x, t):
    """A smooth nonlinear stand-in for a UNet: depends on every timestep it is told."""
    t = float(t)
    return torch.tanh(x * (0.3 + t / 800)) + 0.2 * math.cos(t / 90) * x


def draw(gens, shape):
    return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens])


def generators(seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(SHAPE[0])]


def reference_scheduler(name, conf, schedule):
    if schedule == "karras" and name == "euler_a":
        # EulerAncestralDiscreteScheduler has no use_karras_sigmas: give it the karras sigmas Euler would use
        sched = diffusers_class(name).from_config(conf)
        karras = diffusers.EulerDiscreteScheduler.from_config(conf, use_karras_sigmas=True)
        return sched, karras
    kw = {"use_karras_sigmas": True} if schedule == "karras" else {}
    return diffusers_class(name).from_config(conf, **kw), None


def run_diffusers(name, conf, steps, schedule="normal", strength=1.0, init=None):
    """The StableDiffusion(Img2Img)Pipeline loop without guidance; returns (latents, timesteps, model calls)."""
    sched, karras = reference_scheduler(name, conf, schedule)
    sched.set_timesteps(steps)
    if karras is not None:
        karras.set_timesteps(steps)
        sched.sigmas, sched.timesteps = karras.sigmas, karras.timesteps
    gens = generators()
    timesteps = sched.timesteps
    if strength < 1:
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        sched.set_begin_index(t_start * sched.order) if hasattr(sched, "set_begin_index") else None
        latents = sched.add_noise(init, draw(gens, SHAPE), timesteps[:1].repeat(SHAPE[0]))
    else:
        latents = draw(gens, SHAPE) * sched.init_noise_sigma
    kw = {"generator": gens} if "generator" in inspect.signature(sched.step).parameters else {}
    for t in timesteps:
        latents = sched.step(eps_model(sched.scale_model_input(latents, t), t), t, latents, **kw).prev_sample
    return latents, timesteps, len(timesteps)


def run_ours(name, conf, steps, schedule="normal", strength=1.0, init=None):
    p = plan(name, steps, SchedulerConfig.from_diffusers(conf), schedule, strength)
    gens = generators()
    calls = []

    def counted(x, t):
        calls.append(float(t))
        return eps_model(x, t)

    x = p.start(draw(gens, SHAPE), init if strength < 1 else None)
    for x in p.run(model_denoiser(counted), x, lambda x: draw(gens, x.shape)):
        pass
    return x, p, calls


CASES = [(c, n, s) for c in CONFIGS for n in SAMPLERS for s in ("normal", "karras") if s == "normal" or SAMPLERS[n].karras]


@pytest.mark.parametrize("config,name,schedule", CASES)
def test_sampler_matches_diffusers_class_on_config(config, name, schedule):
    conf = CONFIGS[config]
    ref, ref_timesteps, ref_calls = run_diffusers(name, conf, 8, schedule)
    ours, p, calls = run_ours(name, conf, 8, schedule)
    assert len(calls) == ref_calls  # PNDM without skip_prk_steps: 4 calls in each of its 3 Runge-Kutta steps
    assert set(calls) == set(ref_timesteps.double().tolist())  # the model is told the very same timesteps
    assert reference.relerr(ours, ref) < TOL, reference.relerr(ours, ref)


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_few_steps(name, steps):
    ref, _, ref_calls = run_diffusers(name, SD15_SCHEDULER, steps)
    ours, _, calls = run_ours(name, SD15_SCHEDULER, steps)
    assert len(calls) == ref_calls
    assert reference.relerr(ours, ref) < TOL, reference.relerr(ours, ref)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_pndm_runge_kutta_with_fewer_steps_than_diffusers_allows(steps):
    """diffusers needs 4 steps for F-PNDM's 3 Runge-Kutta steps; with fewer, we run them on all but the last step."""
    ours, p, calls = run_ours("pndm", CLASS_ONLY, steps)
    assert len(calls) == 4 * (steps - 1) + 1
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "dpmpp_2m", "lcm"])
def test_img2img_on_minimal_config(name):
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    ref, _, _ = run_diffusers(name, CLASS_ONLY, 10, strength=0.6, init=init)
    ours, _, _ = run_ours(name, CLASS_ONLY, 10, strength=0.6, init=init)
    assert reference.relerr(ours, ref) < TOL, reference.relerr(ours, ref)


@pytest.mark.parametrize("steps", [5, 9])  # 9: N // steps is odd, the Runge-Kutta stages land between timesteps
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_pndm_runge_kutta_warmup(steps, spacing):
    conf = {**CLASS_ONLY, "timestep_spacing": spacing}
    ref, _, ref_calls = run_diffusers("pndm", conf, steps)
    ours, p, calls = run_ours("pndm", conf, steps)
    assert len(calls) == ref_calls == steps + 9
    assert reference.relerr(ours, ref) < TOL, reference.relerr(ours, ref)


# ---- refusals: one line each, before any model is loaded ---------------------------------------------------------
SD = SchedulerConfig.from_diffusers(None)


@pytest.mark.parametrize("args,match", [
    (("nope", 10), "unknown sampler"),
    (("euler", 10, SD, "exponential"), "unknown schedule"),
    (("ddim", 10, SD, "karras"), "karras schedule is not available for ddim"),
    (("lcm", 10, SD, "karras"), "karras"),
    (("euler", 0), "steps must be"),
    (("euler", 1001), "steps must be a whole number from 1 to 1000"),
    (("euler", 2.5), "steps must be"),
    (("euler", True), "steps must be"),
    (("lcm", 51), "lcm runs at most 50 steps"),
    (("euler", 20, SD, "normal", 0.01), r"strength 0.01 with 20 steps runs no denoising step: raise --strength or "
                                        r"--steps \(at least 0.05 for 20 steps, or 100 steps at strength 0.01\)"),
    (("euler", 3, SD, "normal", 0.3), "at least 0.334 for 3 steps"),
    (("euler", 20, SD, "normal", 0.0), "strength 0 leaves the init image unchanged"),
    (("euler", 20, SD, "normal", 1.5), "strength must be a number from 0 to 1"),
    (("euler", 20, SD, "normal", -0.2), "strength must be"),
    (("euler", 20, SD, "normal", float("nan")), "strength must be"),
])
def test_plan_refuses(args, match):
    name, steps, *rest = args
    config = rest[0] if rest else SD
    with pytest.raises(SdgenError, match=match):
        plan(name, steps, config, *rest[1:])


def test_plan_refuses_what_the_config_rules_out():
    with pytest.raises(SdgenError, match="original_inference_steps 2000"):
        plan("lcm", 4, SchedulerConfig.from_diffusers({"original_inference_steps": 2000}))
    small = SchedulerConfig.from_diffusers({"num_train_timesteps": 100})
    with pytest.raises(SdgenError, match="from 1 to 100"):
        plan("euler", 101, small)
    with pytest.raises(SdgenError, match="trained_betas has 3 values"):
        plan("euler", 2, SchedulerConfig.from_diffusers({"trained_betas": [0.1, 0.2, 0.3]}))
    plan("euler", 2, SchedulerConfig.from_diffusers({"trained_betas": [0.1, 0.2, 0.3], "num_train_timesteps": 3,
                                                     "beta_schedule": "custom"}))


@pytest.mark.parametrize("bad,field", [
    ({"beta_schedule": "cosine"}, "beta_schedule"), ({"prediction_type": "flow"}, "prediction_type"),
    ({"timestep_spacing": "even"}, "timestep_spacing"), ({"beta_start": 1.5}, "beta_start"),
    ({"beta_end": 0}, "beta_end"), ({"beta_end": "0.01"}, "beta_end"), ({"num_train_timesteps": "1000"}, "num_train"),
    ({"num_train_timesteps": 10.5}, "num_train"), ({"steps_offset": -1}, "steps_offset"),
    ({"clip_sample": "yes"}, "clip_sample"), ({"trained_betas": [0.1, 1.0]}, "trained_betas"),
    ({"trained_betas": "0.1"}, "trained_betas"), ({"clip_sample_range": float("inf")}, "clip_sample_range"),
    ({"original_inference_steps": 0}, "original_inference_steps"),
])
def test_config_refuses_bad_values(bad, field):
    with pytest.raises(SdgenError, match=field) as e:
        SchedulerConfig.from_diffusers({**SD15_SCHEDULER, **bad})
    assert "\n" not in str(e.value)


def test_plan_is_cheap():
    """Requests are checked with plan() before a model loads: it must not cost noticeable time."""
    t0 = time.perf_counter()
    for name in SAMPLERS:
        plan(name, 50, SD)
    assert (time.perf_counter() - t0) / len(SAMPLERS) < 0.05


# ---- whole pipelines on a diffusers folder whose scheduler_config.json is minimal --------------------------------
# The reference is diffusers' pipeline with `pipe.scheduler = Cls.from_config(file)`. (Passing the scheduler to the
# pipeline's __init__, as from_pretrained does, would also rewrite its config: steps_offset 1, and clip_sample False
# except for the inpainting pipeline, with a deprecation warning.)
PROMPT, NEGATIVE, SEED = "a red cube on a table", "blurry, low quality", 1234


@pytest.fixture(scope="module", params=["class_only", "betas_only"])
def minimal(request, tiny, tmp_path_factory):
    """(reference components, sdgen pipeline, the scheduler dict) for the tiny model with a minimal scheduler."""
    folder = tmp_path_factory.mktemp(request.param) / "model"
    shutil.copytree(tiny[1]["diffusers"], folder)
    conf = CONFIGS[request.param]
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(conf))
    return tiny[0].components, sdgen.load(str(folder), device="cpu", dtype="float32"), conf


def latents_of(result):
    return getattr(result, "latents", result)


def pipeline_generators(n):
    return [torch.Generator().manual_seed(SEED + i) for i in range(n)]


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "pndm"])
def test_txt2img_on_minimal_scheduler_config(minimal, name):
    components, ours, conf = minimal
    ref = diffusers.StableDiffusionPipeline(**components)
    ref.scheduler = diffusers_class(name).from_config(conf)  # not via __init__, which rewrites clip_sample, steps_offset
    expected = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5, height=64, width=64,
                   num_images_per_prompt=2, generator=pipeline_generators(2), output_type="latent").images
    got = latents_of(ours.generate(PROMPT, NEGATIVE, steps=6, guidance_scale=7.5, sampler=name, seed=SEED, width=64,
                                   height=64, batch_size=2, output_type="latent"))
    assert got.shape == expected.shape
    assert reference.relerr(got, expected) < TOL, reference.relerr(got, expected)


def test_inpaint_ddim_on_minimal_scheduler_config(minimal):
    """An ordinary checkpoint inpainting (mask blending on the init image's noise trajectory) with DDIM."""
    components, ours, conf = minimal
    ref = diffusers.StableDiffusionInpaintPipeline(**components)
    ref.scheduler = diffusers.DDIMScheduler.from_config(conf)
    rng = np.random.default_rng(6)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    m = np.zeros((64, 64), np.uint8)
    m[16:48, 8:32] = 255
    mask = Image.fromarray(m, "L")
    expected = ref(PROMPT, image=init, mask_image=mask, strength=0.75, negative_prompt=NEGATIVE, height=64, width=64,
                   num_inference_steps=8, guidance_scale=7.5, num_images_per_prompt=2,
                   generator=pipeline_generators(2), output_type="latent").images
    got = latents_of(ours.generate(PROMPT, NEGATIVE, steps=8, guidance_scale=7.5, sampler="ddim", seed=SEED,
                                   init_image=init, mask_image=mask, strength=0.75, batch_size=2, output_type="latent"))
    assert reference.relerr(got, expected) < TOL, reference.relerr(got, expected)
