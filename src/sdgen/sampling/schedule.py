"""Noise schedules: betas -> sigmas, each sampler's timestep selection, Karras spacing, img2img truncation.

Everything here lives in the "variance-exploding" space of k-diffusion: x = x0 + sigma * eps with
sigma = sqrt((1 - abar) / abar). A diffusers latent in "variance-preserving" form is x / sqrt(sigma^2 + 1).
Each sampler's plan reproduces the choices of the diffusers scheduler of the same name (which timesteps,
which sigmas, where it ends, how it scales the starting noise), so results match diffusers number for number.
"""

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from .. import SdgenError
from .samplers import SAMPLERS

# runwayml/stable-diffusion-v1-5's scheduler/scheduler_config.json (diffusers 0.6.0): what a single file implies.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
SCHEDULES = ("normal", "karras")


@dataclass(frozen=True)
class SchedulerConfig:
    """The keys of a diffusers scheduler_config.json that we honour, as the file gave them; None: left out.

    diffusers fills a key the file leaves out with the __init__ default of the scheduler class it loads the file
    into, so one file means different things to DDIMScheduler (clip_sample=True, linear betas, ...) and to
    EulerDiscreteScheduler. for_sampler(name) does the same with SAMPLERS[name].defaults.
    """

    num_train_timesteps: int | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    trained_betas: tuple | None = None
    prediction_type: str | None = None
    timestep_spacing: str | None = None
    steps_offset: int | None = None
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None
    clip_sample_range: float | None = None
    skip_prk_steps: bool | None = None
    rescale_betas_zero_snr: bool | None = None
    original_inference_steps: int | None = None  # LCM: the distillation schedule it picks its timesteps from
    timestep_scaling: float | None = None  # LCM: boundary-condition scaling of the timestep

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not (f.name == "beta_schedule" and self.trained_betas is not None):
                object.__setattr__(self, f.name, _checked(f.name, value))

    @classmethod
    def from_diffusers(cls, config: Mapping | None) -> "SchedulerConfig":
        """The keys we honour of a scheduler_config.json dict; other keys are ignored, null counts as left out, and
        so do the keys an in-memory diffusers config lists in `_use_default_values`. None: SD1.5's file."""
        if config is None:
            config = SD15_SCHEDULER
        if not isinstance(config, Mapping):
            raise SdgenError(f"scheduler config: expected a JSON object, not {type(config).__name__}")
        left_out = set(config.get("_use_default_values") or ())
        return cls(**{f.name: config[f.name] for f in fields(cls)
                      if config.get(f.name) is not None and f.name not in left_out})

    def for_sampler(self, sampler: str) -> "SchedulerConfig":
        """The config SAMPLERS[sampler]'s diffusers class would run with: every key it honours from the file, else
        its own default; keys it does not have stay None (so they cannot change its result)."""
        out = SchedulerConfig(**{k: default if getattr(self, k) is None else getattr(self, k)
                                 for k, default in SAMPLERS[sampler].defaults.items()})
        if out.trained_betas is not None and len(out.trained_betas) != out.num_train_timesteps:
            raise SdgenError(f"scheduler config: trained_betas has {len(out.trained_betas)} values but "
                             f"num_train_timesteps is {out.num_train_timesteps}")
        return out


_CHOICES = {"beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
            "prediction_type": ("epsilon", "v_prediction", "sample"),
            "timestep_spacing": ("leading", "linspace", "trailing")}
_WHOLE = {"num_train_timesteps": 1, "steps_offset": 0, "original_inference_steps": 1}   # the smallest allowed
_FLAGS = ("set_alpha_to_one", "clip_sample", "skip_prk_steps", "rescale_betas_zero_snr")


def _whole(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _checked(name: str, v):
    """A scheduler config value, normalized (JSON 1000.0 -> 1000, a list of betas -> a tuple), or one SdgenError
    line naming the field."""
    def bad(what):
        raise SdgenError(f"scheduler config: {name} must be {what}, not {v!r}")

    if name in _CHOICES:
        if v not in _CHOICES[name]:
            raise SdgenError(f"scheduler config: unsupported {name} {v!r}: sdgen supports {', '.join(_CHOICES[name])}")
        return v
    if name in _FLAGS:
        return v if isinstance(v, bool) else bad("true or false")
    if name in _WHOLE:
        if not _real(v) or v != int(v) or v < _WHOLE[name]:
            bad(f"a whole number from {_WHOLE[name]}")
        return int(v)
    if name == "trained_betas":
        if isinstance(v, (str, bytes, Mapping)) or not hasattr(v, "__iter__"):
            bad("a list of numbers")
        betas = tuple(v)
        if not betas or not all(_real(b) and 0 < b < 1 for b in betas):
            bad("a list of numbers between 0 and 1 (exclusive)")
        return tuple(float(b) for b in betas)
    if name in ("beta_start", "beta_end"):
        return float(v) if _real(v) and 0 < v < 1 else bad("a number between 0 and 1 (exclusive)")
    return float(v) if _real(v) and v > 0 else bad("a positive number")   # clip_sample_range, timestep_scaling


def betas(config: SchedulerConfig) -> Tensor:
    """(N,) float32 training betas, computed exactly as diffusers does (float32 linspace)."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        b = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":
        b = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        b = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        b = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    else:
        raise SdgenError(f"unsupported beta_schedule {config.beta_schedule!r}")
    if config.rescale_betas_zero_snr:
        # Shift and scale sqrt(abar) so that the last step has exactly zero signal (Lin et al. 2023).
        s = torch.cumprod(1 - b, 0).sqrt()
        s0, sT = s[0].clone(), s[-1].clone()
        s = (s - sT) * (s0 / (s0 - sT))
        ab = s**2
        b = 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return b


def alphas_cumprod(config: SchedulerConfig) -> Tensor:
    ac = torch.cumprod(1.0 - betas(config), 0)
    if config.rescale_betas_zero_snr:
        ac[-1] = 2**-24  # zero SNR would be sigma = inf; diffusers' Euler keeps it finite the same way
    return ac


def train_sigmas(config: SchedulerConfig) -> Tensor:
    """(N,) float32 sigma of every training timestep, increasing with t."""
    ac = alphas_cumprod(config)
    return ((1 - ac) / ac) ** 0.5


def sigma_to_t(sigma: Tensor, log_sigmas: Tensor) -> Tensor:
    """Fractional training timestep of `sigma` by linear interpolation in log-sigma (diffusers' _sigma_to_t).

    log_sigmas: (N,) increasing. Works elementwise on any shape; returns float64.
    """
    ls = torch.as_tensor(sigma, dtype=torch.float64).clamp_min(1e-10).log()
    log_sigmas = log_sigmas.to(torch.float64)
    low = (torch.searchsorted(log_sigmas, ls.reshape(-1), right=True) - 1).clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - ls.reshape(-1)) / (lo - hi)).clamp(0, 1)
    return (low + w).reshape(ls.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) spacing: uniform in sigma^(1/rho), from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _spaced(spacing: str, n: int, N: int, offset: int, integer: bool) -> np.ndarray:
    """n timesteps in decreasing order, the way DDIM/PNDM/DDPM (integer) and Euler-family (float) pick them."""
    if spacing == "linspace":
        t = np.linspace(0, N - 1, n)
        t = t.round().astype(np.int64) if integer else t.astype(np.float32)
        return t[::-1].copy()
    if spacing == "leading":
        return ((np.arange(n) * (N // n)).round() + offset)[::-1].astype(np.int64 if integer else np.float32)
    if spacing == "trailing":
        return (np.arange(N, 0, -N / n).round() - 1).astype(np.int64 if integer else np.float32)
    raise SdgenError(f"unsupported timestep_spacing {spacing!r}")


def _spaced_multistep(spacing: str, n: int, N: int, offset: int) -> np.ndarray:
    """DPM-Solver / UniPC: linspace and leading divide the range into n + 1 and drop the last point."""
    if spacing == "linspace":
        return np.linspace(0, N - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return ((np.arange(n + 1) * (N // (n + 1))).round()[::-1][:-1] + offset).astype(np.int64)
    return _spaced("trailing", n, N, offset, True)


def _lcm_timesteps(n: int, N: int, original_steps: int) -> np.ndarray:
    """LCM picks n of the `original_steps` timesteps it was distilled on: k-1, 2k-1, ... , N-1 (k = N // original)."""
    origin = np.arange(1, original_steps + 1) * (N // original_steps) - 1
    if n > len(origin):
        raise SdgenError(f"lcm supports at most {len(origin)} steps (original_inference_steps)")
    return origin[::-1][np.floor(np.linspace(0, len(origin), n, endpoint=False)).astype(np.int64)].copy()


@dataclass
class Plan:
    """A sampler's schedule in sigma space, ready to run.

    sigmas:    (n+1,) float32, the noise level of x before each step, then the level of the result (0 = clean)
    timesteps: (n,) float32, the training timestep the model is told at sigmas[i] (the scheduler's own choice)
    init_scale: txt2img start = unit noise * init_scale (diffusers' init_noise_sigma, in sigma space)
    config:    the scheduler config resolved for this sampler (SchedulerConfig.for_sampler): every key its class reads
    extra:     keyword arguments the sampler function needs besides (denoiser, x, sigmas, noise)
    """

    sampler: str
    sigmas: Tensor
    timesteps: Tensor
    init_scale: float
    config: SchedulerConfig
    extra: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def start(self, noise: Tensor, init_latents: Tensor | None = None) -> Tensor:
        """txt2img: scaled unit noise; img2img: init_latents noised to the first sigma (diffusers' add_noise)."""
        if init_latents is None:
            return noise * self.init_scale
        return init_latents + self.sigmas[0].to(init_latents.dtype) * noise

    def noised(self, init_latents: Tensor, noise: Tensor, i: int) -> Tensor:
        """init_latents at the noise level x has after step i (inpainting's blend); after the last step: itself."""
        if i >= self.steps - 1:
            return init_latents
        return init_latents + self.sigmas[i + 1].to(init_latents.dtype) * noise

    def tail(self, start: int) -> "Plan":
        """The plan from step `start` on, as diffusers' schedulers begin part-way (img2img's strength, the SDXL
        refiner's denoising_start): same sigmas and per-step facts, the first `start` steps left out."""
        if not start:
            return self
        extra = {k: v[start:] if isinstance(v, list) else v for k, v in self.extra.items()}
        return Plan(self.sampler, self.sigmas[start:], self.timesteps[start:], self.init_scale, self.config, extra)

    def run(self, denoiser: Callable, x: Tensor, noise: Callable[[Tensor], Tensor]) -> Iterator[Tensor]:
        """Run the sampler; yields x after every step (see samplers.py).

        A model denoiser (guidance.ModelDenoiser) is first bound to this plan: the model is told exactly the
        timesteps the diffusers scheduler would pass, and reads its prediction type from this plan's config."""
        bind = getattr(denoiser, "for_plan", None)
        if bind is not None:
            denoiser = bind(self)
        return SAMPLERS[self.sampler].fn(denoiser, x, self.sigmas, noise, **self.extra)


def plan(sampler: str, steps: int, config: SchedulerConfig, schedule: str = "normal", strength: float = 1.0) -> Plan:
    """The schedule diffusers' scheduler `sampler` would use for `steps` steps, with the scheduler config `config`
    loaded into that scheduler's class (missing keys take the class's defaults).

    schedule: "normal" or "karras" (diffusers' use_karras_sigmas=True).
    strength < 1: img2img's shortened schedule, exactly as diffusers' img2img pipeline's get_timesteps.
    Refuses, with one SdgenError line, every request that cannot run; cheap enough to check requests before a load.
    """
    s = SAMPLERS.get(sampler) if isinstance(sampler, str) else None
    if s is None:
        raise SdgenError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if schedule not in SCHEDULES:
        raise SdgenError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if schedule == "karras" and not s.karras:
        raise SdgenError(f"the karras schedule is not available for {sampler}: use the normal schedule or one of "
                         f"{', '.join(k.name for k in SAMPLERS.values() if k.karras)}")
    c = config.for_sampler(sampler)
    N = c.num_train_timesteps
    if not _whole(steps) or not 1 <= steps <= N:
        raise SdgenError(f"steps must be a whole number from 1 to {N}, not {steps!r}")
    if not _real(strength) or not 0 <= strength <= 1:
        raise SdgenError(f"strength must be a number from 0 to 1, not {strength!r}")
    init = min(int(steps * strength), steps)  # diffusers' img2img get_timesteps
    if strength == 0:
        raise SdgenError("strength 0 leaves the init image unchanged: raise --strength above 0")
    if init < 1:
        least = next(k / 1000 for k in range(math.ceil(1000 / steps), 1001) if int(steps * k / 1000) >= 1)
        need = math.floor(1 / strength)
        need += int(need * strength) < 1
        more = f", or {need} steps at strength {strength:g}" if need <= N else ""
        raise SdgenError(f"strength {strength:g} with {steps} steps runs no denoising step: raise --strength or "
                         f"--steps (at least {least:g} for {steps} steps{more})")
    if s.timesteps == "lcm":
        if c.original_inference_steps > N:
            raise SdgenError(f"scheduler config: original_inference_steps {c.original_inference_steps} is more than "
                             f"num_train_timesteps {N}")
        if steps > c.original_inference_steps:
            raise SdgenError(f"lcm runs at most {c.original_inference_steps} steps (the scheduler's "
                             f"original_inference_steps), not {steps}: lower --steps")

    train = train_sigmas(c)
    tr = train.numpy()  # float32, as diffusers' numpy copies
    log_sigmas = torch.from_numpy(np.log(tr))
    to_sigma = lambda t: tr[np.asarray(t, dtype=np.int64)].astype(np.float64)
    spacing = c.timestep_spacing
    extra = {}

    if s.timesteps == "discrete":  # DDIM, DDPM, PNDM: integer timesteps
        ts = _spaced(spacing, steps, N, c.steps_offset, integer=True)
        sig = to_sigma(ts)
        if c.set_alpha_to_one is not None:
            # DDIM/PNDM step from t to t - N // steps whatever the spacing, then past 0 to the "final alpha"; after the
            # last step diffusers hands back the variance-preserving latent, which the sampler rescales to sigma 0.
            # (DDPM steps to the next timestep and from the last one to alpha_prod = 1.)
            final = 0.0 if c.set_alpha_to_one else float(tr[0])
            extra["targets"] = [float(tr[p]) if p >= 0 else final for p in ts - N // steps]
        if c.skip_prk_steps is False:
            # F-PNDM's Runge-Kutta stages: from t, the model is told t_next + h after landing at t - h (h = N//steps//2)
            h = N // steps // 2
            extra["rk"] = [(float(tr[t - h]), float(tr[t_next + h])) for t, t_next in zip(ts[:-1], ts[1:])]
    elif s.timesteps == "lcm":
        ts = _lcm_timesteps(steps, N, c.original_inference_steps)
        sig = to_sigma(ts)
    elif s.timesteps == "multistep":  # DPM-Solver, UniPC
        ts = _spaced_multistep(spacing, steps, N, c.steps_offset)
        if schedule == "karras":
            sig = karras_sigmas(float(tr[0]), float(tr[-1]), steps)
            ts = sigma_to_t(torch.from_numpy(sig), log_sigmas).numpy().round()
        else:
            sig = to_sigma(ts)
    else:  # "euler": Euler, Euler a, Heun, LMS; fractional timesteps, interpolated sigmas
        ts = _spaced(spacing, steps, N, c.steps_offset, integer=False)
        sig = np.interp(ts, np.arange(N), tr)
        if schedule == "karras":
            sig = karras_sigmas(float(sig[-1]), float(sig[0]), steps)
            ts = sigma_to_t(torch.from_numpy(sig), log_sigmas).numpy()

    sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    timesteps = torch.from_numpy(np.asarray(ts).astype(np.float32))
    s0 = float(sigmas.max())
    # diffusers' init_noise_sigma: 1 on the variance-preserving latent (= sqrt(s0^2+1) here); the Euler family
    # uses sqrt(s0^2+1) for "leading" spacing but s0 itself for "linspace"/"trailing".
    vp_like = s.vp_native or spacing == "leading"
    init_scale = math.sqrt(s0**2 + 1) if vp_like else s0
    if s.timesteps == "lcm":
        # LCM's consistency boundary condition: denoised = c_skip(t) * x_vp + c_out(t) * x0
        st = timesteps.double() * c.timestep_scaling
        extra["c_skip"] = (0.25 / (st**2 + 0.25)).tolist()
        extra["c_out"] = (st / (st**2 + 0.25) ** 0.5).tolist()
    if c.clip_sample:  # None for the classes that do not have it
        extra["clip"] = c.clip_sample_range

    return Plan(sampler, sigmas, timesteps, init_scale, c, extra).tail(steps - init)
