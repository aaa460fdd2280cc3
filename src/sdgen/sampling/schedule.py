"""Noise schedules: betas -> sigmas, each sampler's timestep selection, Karras spacing, img2img truncation.

Everything here lives in the "variance-exploding" space of k-diffusion: x = x0 + sigma * eps with
sigma = sqrt((1 - abar) / abar). A diffusers latent in "variance-preserving" form is x / sqrt(sigma^2 + 1).
Each sampler's plan reproduces the choices of the diffusers scheduler of the same name (which timesteps,
which sigmas, where it ends, how it scales the starting noise), so results match diffusers number for number.
"""

import math
from dataclasses import dataclass, field, fields
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from . import SdgenError

# Samplers whose diffusers scheduler works on the variance-preserving latent (init_noise_sigma = 1, identity
# scale_model_input); the others (Euler family) work on x = x0 + sigma * eps directly.
VP_NATIVE = {"ddim", "ddpm", "pndm", "dpmpp_2m", "unipc", "lcm"}
# Default `timestep_spacing` of each diffusers scheduler when the config does not name one (SD1.5's doesn't).
DEFAULT_SPACING = {"ddim": "leading", "ddpm": "leading", "pndm": "leading", "lcm": "leading"}
KARRAS = {"euler", "euler_a", "heun", "lms", "dpmpp_2m", "unipc"}


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a diffusers scheduler_config.json that we honour. Defaults: SD1.5's scheduler."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None  # None: each sampler's diffusers default (see DEFAULT_SPACING)
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    skip_prk_steps: bool = True
    rescale_betas_zero_snr: bool = False
    original_inference_steps: int = 50  # LCM: the distillation schedule it picks its timesteps from
    timestep_scaling: float = 10.0  # LCM: boundary-condition scaling of the timestep

    @classmethod
    def from_diffusers(cls, config: dict | None) -> "SchedulerConfig":
        """A diffusers scheduler config dict (unknown keys ignored); None gives SD1.5's."""
        if config is None:
            return cls()
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in config.items() if k in known and v is not None}
        if "trained_betas" in kw:
            kw["trained_betas"] = tuple(float(b) for b in kw["trained_betas"])
        out = cls(**kw)
        if out.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2") and out.trained_betas is None:
            raise SdgenError(f"unsupported beta_schedule {out.beta_schedule!r}")
        if out.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise SdgenError(f"unsupported prediction_type {out.prediction_type!r}")
        if out.timestep_spacing not in (None, "leading", "linspace", "trailing"):
            raise SdgenError(f"unsupported timestep_spacing {out.timestep_spacing!r}")
        return out


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
    extra:     keyword arguments the sampler function needs besides (denoiser, x, sigmas, noise)
    """

    sampler: str
    sigmas: Tensor
    timesteps: Tensor
    init_scale: float
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

    def run(self, denoiser: Callable, x: Tensor, noise: Callable[[Tensor], Tensor]) -> Iterator[Tensor]:
        """Run the sampler; yields x after every step (see samplers.py)."""
        from .samplers import SAMPLERS

        pin = getattr(denoiser, "at_timesteps", None)
        if pin is not None:  # tell the model exactly the timesteps the diffusers scheduler would
            denoiser = pin(self.sigmas[:-1], self.timesteps)
        return SAMPLERS[self.sampler](denoiser, x, self.sigmas, noise, **self.extra)


def plan(sampler: str, steps: int, config: SchedulerConfig, schedule: str = "normal", strength: float = 1.0) -> Plan:
    """The schedule diffusers' scheduler `sampler` would use for `steps` steps.

    schedule: "normal" or "karras" (diffusers' use_karras_sigmas=True).
    strength < 1: img2img's shortened schedule, exactly as diffusers' img2img pipeline's get_timesteps.
    """
    from .samplers import SAMPLERS

    if sampler not in SAMPLERS:
        raise SdgenError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    if schedule not in ("normal", "karras"):
        raise SdgenError(f"unknown schedule {schedule!r}; choose 'normal' or 'karras'")
    if schedule == "karras" and sampler not in KARRAS:
        raise SdgenError(f"the karras schedule is not available for {sampler}")
    N = config.num_train_timesteps
    if not 1 <= steps <= N:
        raise SdgenError(f"steps must be between 1 and {N}")
    if not 0.0 < strength <= 1.0:
        raise SdgenError("strength must be in (0, 1]")
    spacing = config.timestep_spacing or DEFAULT_SPACING.get(sampler, "linspace")
    train = train_sigmas(config)
    tr = train.numpy()  # float32, as diffusers' numpy copies
    log_sigmas = torch.from_numpy(np.log(tr))
    to_sigma = lambda t: tr[np.asarray(t, dtype=np.int64)].astype(np.float64)
    extra = {}

    if sampler in ("ddim", "ddpm", "pndm"):
        ts = _spaced(spacing, steps, N, config.steps_offset, integer=True)
        sig = to_sigma(ts)
        final = 0.0 if config.set_alpha_to_one else float(tr[0])
        if sampler == "ddpm":
            end = 0.0  # DDPM's last step goes to alpha_prod = 1
        else:
            # DDIM/PNDM step from t to t - N // steps whatever the spacing, then past 0 to the "final alpha".
            prev = ts - N // steps
            extra["targets"] = [float(tr[p]) if p >= 0 else final for p in prev]
            end = 0.0  # after the last step diffusers hands back the variance-preserving latent: rescale to 0
    elif sampler == "lcm":
        ts = _lcm_timesteps(steps, N, config.original_inference_steps)
        sig, end = to_sigma(ts), 0.0
    elif sampler in ("dpmpp_2m", "unipc"):
        ts = _spaced_multistep(spacing, steps, N, config.steps_offset)
        if schedule == "karras":
            sig = karras_sigmas(float(tr[0]), float(tr[-1]), steps)
            ts = sigma_to_t(torch.from_numpy(sig), log_sigmas).numpy().round()
        else:
            sig = to_sigma(ts)
        end = 0.0
    else:  # euler, euler_a, heun, lms
        ts = _spaced(spacing, steps, N, config.steps_offset, integer=False)
        sig = np.interp(ts, np.arange(N), tr)
        if schedule == "karras":
            sig = karras_sigmas(float(sig[-1]), float(sig[0]), steps)
            ts = sigma_to_t(torch.from_numpy(sig), log_sigmas).numpy()
        end = 0.0

    sigmas = torch.from_numpy(np.concatenate([sig, [end]]).astype(np.float32))
    timesteps = torch.from_numpy(np.asarray(ts).astype(np.float32))
    s0 = float(sigmas.max())
    # diffusers' init_noise_sigma: 1 on the variance-preserving latent (= sqrt(s0^2+1) here); the Euler family
    # uses sqrt(s0^2+1) for "leading" spacing but s0 itself for "linspace"/"trailing".
    vp_like = sampler in VP_NATIVE or spacing == "leading"
    init_scale = math.sqrt(s0**2 + 1) if vp_like else s0
    if sampler == "lcm":
        # LCM's consistency boundary condition: denoised = c_skip(t) * x_vp + c_out(t) * x0
        st = timesteps.double() * config.timestep_scaling
        extra["c_skip"] = (0.25 / (st**2 + 0.25)).tolist()
        extra["c_out"] = (st / (st**2 + 0.25) ** 0.5).tolist()

    if config.clip_sample and sampler in ("ddim", "ddpm", "heun", "lcm"):  # the schedulers that honour it
        extra["clip"] = config.clip_sample_range

    init = min(int(steps * strength), steps)
    t_start = max(steps - init, 0)
    if t_start >= steps:
        raise SdgenError("strength is too low: no denoising step would run")
    if t_start:
        sigmas, timesteps = sigmas[t_start:], timesteps[t_start:]
        extra = {k: v[t_start:] if isinstance(v, list) else v for k, v in extra.items()}
    return Plan(sampler, sigmas, timesteps, init_scale, extra)
