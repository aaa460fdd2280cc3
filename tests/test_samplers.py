"""Schedules, samplers and guidance against diffusers' schedulers, on diffusers' own tiny UNet.

The model is diffusers' UNet2DConditionModel (reference.tiny_unet, randomized) so that the samplers are
tested alone: the same model, the same CFG, the same per-image generators, diffusers' pipeline loop vs ours.
"""

import inspect
from dataclasses import replace

import diffusers
import pytest
import torch

import reference
from sdgen import SdgenError
from sdgen.sampling.guidance import cfg, model_denoiser
from sdgen.sampling.schedule import SchedulerConfig, plan
from sdgen.sampling.samplers import SAMPLERS, by_label

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}
SD15_CONFIG = SchedulerConfig.from_diffusers(SD15)
SHAPE = (2, 4, 8, 8)
TOL = 2e-3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    unet = reference.randomize_(reference.tiny_unet())
    g = torch.Generator().manual_seed(123)
    cond, uncond = torch.randn(2, 77, 48, generator=g), torch.randn(2, 77, 48, generator=g)
    init = torch.randn(SHAPE, generator=g)

    def call(x, t, context):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=context).sample

    return call, cond, uncond, init


def draw(gens, shape):
    """diffusers' randn_tensor with a list of generators: one draw per image, in order."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens])


def scheduler(name, schedule="normal", **extra):
    if schedule == "karras":
        extra["use_karras_sigmas"] = True
    return getattr(diffusers, SAMPLERS[name].scheduler).from_config(SD15, **extra)


def run_diffusers(model, name, steps, schedule="normal", strength=1.0, seed=0, **extra):
    """The StableDiffusion(Img2Img)Pipeline denoising loop; returns (latents, scheduler)."""
    call, cond, uncond, init = model
    sched = scheduler(name, schedule, **extra)
    sched.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    timesteps = sched.timesteps
    if strength < 1:  # img2img's get_timesteps + add_noise
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = sched.timesteps[t_start * sched.order:]
        sched.set_begin_index(t_start * sched.order) if hasattr(sched, "set_begin_index") else None
        latents = sched.add_noise(init, draw(gens, SHAPE), timesteps[:1].repeat(SHAPE[0]))
    else:
        latents = draw(gens, SHAPE) * sched.init_noise_sigma
    kw = {"generator": gens} if "generator" in inspect.signature(sched.step).parameters else {}
    context = torch.cat([uncond, cond])
    for t in timesteps:
        out = call(sched.scale_model_input(torch.cat([latents] * 2), t), t, context)
        out_uncond, out_cond = out.chunk(2)
        latents = sched.step(out_uncond + 7.5 * (out_cond - out_uncond), t, latents, **kw).prev_sample
    return latents, sched


def run_ours(model, name, steps, schedule="normal", strength=1.0, seed=0, **extra):
    """The same with sdgen; returns (latents, plan)."""
    call, cond, uncond, init = model
    config = SchedulerConfig.from_diffusers({**SD15, **extra})
    p = plan(name, steps, config, schedule, strength)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    noise = lambda x: draw(gens, x.shape)
    x = p.start(draw(gens, SHAPE), init if strength < 1 else None)
    count = 0
    for x in p.run(model_denoiser(cfg(call, cond, uncond, 7.5), config), x, noise):
        count += 1
    assert count == p.steps
    return x, p


def check(model, name, steps=8, schedule="normal", strength=1.0, **extra):
    ref, sched = run_diffusers(model, name, steps, schedule, strength, **extra)
    ours, p = run_ours(model, name, steps, schedule, strength, **extra)
    # the model was told the same timesteps (diffusers repeats some: Heun's and PNDM's second evaluations)
    assert sorted(set(sched.timesteps.double().tolist())) == sorted(set(p.timesteps.double().tolist())) \
        or strength < 1
    if not SAMPLERS[name].vp_native and strength == 1:  # sigmas correspond one to one on the Euler family
        assert torch.allclose(p.sigmas, sched.sigmas.unique_consecutive(), rtol=1e-6)
    assert reference.relerr(ours, ref) < TOL, reference.relerr(ours, ref)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_matches_diffusers(model, name):
    check(model, name)


@pytest.mark.parametrize("name", ["euler", "lms", "heun", "dpmpp_2m"])
def test_karras_matches_diffusers(model, name):
    check(model, name, schedule="karras")


@pytest.mark.parametrize("name,spacing,steps", [("euler", "trailing", 8), ("euler", "leading", 8),
                                                ("ddim", "trailing", 9), ("ddim", "linspace", 8)])
def test_spacing_variants(model, name, spacing, steps):
    # 9 trailing / 8 linspace DDIM steps: diffusers' step lands at t - 1000 // steps, not at the next timestep
    check(model, name, steps, timestep_spacing=spacing)


@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim", "dpmpp_2m", "unipc", "heun"])
def test_img2img_matches_diffusers(model, name):
    check(model, name, steps=10, strength=0.6)


@pytest.mark.parametrize("name", ["euler", "ddim", "lcm", "dpmpp_2m"])
def test_img2img_start(model, name):
    """plan(strength=0.6).start(noise, init) is diffusers' get_timesteps + add_noise (in sigma space)."""
    init = model[3]
    sched = scheduler(name)
    sched.set_timesteps(10)
    t_start = 10 - int(10 * 0.6)
    ts = sched.timesteps[t_start * sched.order:]
    sched.set_begin_index(t_start * sched.order) if hasattr(sched, "set_begin_index") else None
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ref = sched.add_noise(init, noise, ts[:1].repeat(2))
    p = plan(name, 10, SchedulerConfig.from_diffusers(SD15), strength=0.6)
    assert p.steps == len(ts)
    assert p.timesteps.tolist() == ts.float().tolist()
    ours = p.start(noise, init)
    if SAMPLERS[name].vp_native:  # diffusers holds the variance-preserving latent x / sqrt(sigma^2 + 1)
        ours = ours / (p.sigmas[0] ** 2 + 1) ** 0.5
    assert reference.relerr(ours, ref) < 1e-5


@pytest.mark.parametrize("name", ["euler", "ddim"])
def test_noised_for_inpainting(model, name):
    """noised(init, noise, i) is diffusers' add_noise(init, noise, timesteps[i + 1]), init after the last step."""
    init, noise = model[3], torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    sched = scheduler(name)
    sched.set_timesteps(8)
    p = plan(name, 8, SchedulerConfig.from_diffusers(SD15))
    for i in range(p.steps - 1):
        ref = sched.add_noise(init, noise, sched.timesteps[i + 1:i + 2])
        ours = p.noised(init, noise, i)
        if SAMPLERS[name].vp_native:
            ours = ours / (p.sigmas[i + 1] ** 2 + 1) ** 0.5
        assert reference.relerr(ours, ref) < 1e-5
    assert p.noised(init, noise, p.steps - 1) is init


DETERMINISTIC = ["euler", "heun", "lms", "dpmpp_2m", "unipc", "ddim", "pndm"]


@pytest.mark.parametrize("name,prk", [(name, False) for name in DETERMINISTIC] + [("pndm", True)])
def test_known_answer_single_point(name, prk):
    """Data concentrated on one point x*: the exact denoiser returns x* for every x, and a deterministic
    sampler must end there (DDIM/PNDM in diffusers' final-latent scale: at sigma_min, not at 0)."""
    target = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    # set_alpha_to_one so that DDIM/PNDM also end at sigma = 0; prk: PNDM with its Runge-Kutta warm-up
    config = replace(SD15_CONFIG, set_alpha_to_one=True, skip_prk_steps=not prk)
    p = plan(name, 10, config)
    assert ("rk" in p.extra) == prk
    x = p.start(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)))
    for x in p.run(lambda x, sigma: target.expand_as(x), x, lambda x: torch.randn_like(x)):
        pass
    assert reference.relerr(x, target) < 1e-5


def test_known_answer_gaussian_data():
    """Data ~ N(0, c^2): the exact denoiser is x * c^2 / (c^2 + sigma^2) and the probability-flow ODE maps
    x(sigma) = x_T * sqrt(c^2 + sigma^2) / sqrt(c^2 + sigma_T^2); higher-order samplers follow it more closely
    (30 Karras steps: UniPC 2e-4, LMS 2e-3, Heun and DPM++ 2M 4e-3, Euler 6e-2)."""
    c = 0.5
    config = SD15_CONFIG
    for name, tol in [("unipc", 1e-3), ("lms", 5e-3), ("heun", 1e-2), ("dpmpp_2m", 1e-2), ("euler", 0.1)]:
        p = plan(name, 30, config, "karras")
        x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
        x = x_T.clone()
        for x in p.run(lambda x, sigma: x * c**2 / (c**2 + sigma**2), x, None):
            pass
        exact = x_T * c / (c**2 + p.sigmas[0] ** 2) ** 0.5
        assert reference.relerr(x, exact) < tol, (name, reference.relerr(x, exact))


def test_yielded_tensor_is_continued_from():
    """A consumer's in-place change of the yielded x is what the sampler continues from (inpainting)."""
    p = plan("dpmpp_2m", 6, SD15_CONFIG)
    seen = []

    def denoiser(x, sigma):
        seen.append(x.clone())
        return torch.zeros_like(x)

    x = p.start(torch.ones(1, 4, 2, 2))
    for i, x in enumerate(p.run(denoiser, x, None)):
        x.fill_(float(i + 10))
    assert [float(s.flatten()[0]) for s in seen[1:]] == [10.0, 11.0, 12.0, 13.0, 14.0]


def test_config_from_diffusers():
    assert SchedulerConfig.from_diffusers(SD15) == SchedulerConfig.from_diffusers(None)
    c = SchedulerConfig.from_diffusers({**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
                                        "unknown_key": 3})
    assert c.prediction_type == "v_prediction" and c.timestep_spacing == "trailing"
    with pytest.raises(SdgenError):
        SchedulerConfig.from_diffusers({"prediction_type": "flow"})
    with pytest.raises(SdgenError):
        plan("nope", 10, c)
    with pytest.raises(SdgenError):
        plan("ddim", 10, c, "karras")
    with pytest.raises(SdgenError):
        plan("euler", 10, c, strength=0.05)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "heun", "lcm"])
def test_clip_sample(model, name):
    check(model, name, steps=6, clip_sample=True, clip_sample_range=0.5)


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_prediction_types(model, kind):
    check(model, "euler", steps=6, prediction_type=kind)
    check(model, "ddim", steps=6, prediction_type=kind)


def test_cfg_single_call_without_guidance():
    calls = []

    def unet(x, t, context):
        calls.append(x.shape[0])
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)

    x, cond, uncond = torch.ones(2, 4, 2, 2), torch.full((2, 77, 8), 2.0), torch.full((2, 77, 8), 1.0)
    assert torch.equal(cfg(unet, cond, uncond, 1.0)(x, 0), x * 2)
    assert torch.equal(cfg(unet, cond, None, 7.5)(x, 0), x * 2)
    assert torch.allclose(cfg(unet, cond, uncond, 7.5)(x, 0), x * (1 + 7.5 * (2 - 1)))
    assert calls == [2, 2, 4]


def test_sampler_table():
    """One record per sampler: its function, A1111 label and diffusers class, found by name or label."""
    for name, s in SAMPLERS.items():
        assert s.name == name and s.fn.__name__.startswith("sample_") and hasattr(diffusers, s.scheduler)
        assert by_label(s.label) is by_label(name.upper()) is by_label(f" {s.label.lower()} ") is s
    assert by_label("Euler a").name == "euler_a" and by_label("DPM++ 2M").name == "dpmpp_2m"
    assert by_label("PLMS").name == "pndm"
    with pytest.raises(SdgenError, match="DPM\\+\\+ 2M"):
        by_label("Euler Karras")
