"""Samplers: plain generator functions over a denoiser, k-diffusion style.

    sample_xxx(denoiser, x, sigmas, noise, **extra) -> Iterator[Tensor]

- denoiser(x, sigma) -> x0 estimate; x (B, C, h, w) with x = x0 + sigma * eps, sigma a 0-d float tensor.
- sigmas: (n+1,) the noise level before each of the n steps, then that of the result (0: clean).
- noise(x): a fresh standard-normal tensor like x. Each sampler calls it exactly when, and as often as, the
  diffusers scheduler of the same name draws noise, so that the same generators give the same images.
- Each sampler yields x after every step. The yielded tensor is the one the sampler continues from, so a
  consumer may modify it in place (inpainting blends it) and the sampler carries on from the modified x.

Each function is the diffusers scheduler of the same name rewritten in sigma space; where diffusers departs
from the textbook method, the docstring says how, and we follow diffusers.
"""

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterator, Mapping

from torch import Tensor

from .. import SdgenError

Denoiser = Callable[[Tensor, Tensor], Tensor]
Noise = Callable[[Tensor], Tensor]


def _clip(x0: Tensor, clip: float | None) -> Tensor:
    return x0 if clip is None else x0.clamp(-clip, clip)


def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise) -> Iterator[Tensor]:
    """Euler on dx/dsigma = (x - x0) / sigma (EulerDiscreteScheduler, s_churn = 0)."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoiser(x, s)) / s
        x = x + d * (s_next - s)
        yield x


def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise) -> Iterator[Tensor]:
    """Euler down to sigma_down, then fresh noise up to sigma_next (EulerAncestralDiscreteScheduler).

    Noise is drawn at every step, the last one included (where it is multiplied by 0), as diffusers does.
    """
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, s)
        s_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        s_down = (s_next**2 - s_up**2) ** 0.5
        x = x + (x - x0) / s * (s_down - s) + noise(x) * s_up
        yield x


def sample_ddpm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise, clip: float | None = None
                ) -> Iterator[Tensor]:
    """DDPM ancestral sampling with variance "fixed_small" (DDPMScheduler).

    In sigma space the posterior q(x_prev | x_t, x0) is N(x0 + (s'/s)^2 (x - x0), s'^2 (1 - s'^2/s^2)):
    the ancestral Euler step. clip: clamp x0 to [-clip, clip] (clip_sample).
    """
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = _clip(denoiser(x, s), clip)
        x = x0 + (s_next / s) ** 2 * (x - x0) + noise(x) * s_next * (1 - (s_next / s) ** 2) ** 0.5
        yield x


def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise, clip: float | None = None
                ) -> Iterator[Tensor]:
    """Heun's 2nd order method; the step to sigma = 0 is a plain Euler step (HeunDiscreteScheduler)."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - _clip(denoiser(x, s), clip)) / s
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - _clip(denoiser(x_euler, s_next), clip)) / s_next
            x = x + (d + d_next) / 2 * (s_next - s)
        yield x


def _lms_coefficient(sigmas: list, i: int, order: int, k: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial of node sigmas[i-k] on the
    nodes sigmas[i], ..., sigmas[i-order+1]. Gauss-Legendre with 3 points is exact up to degree 5."""

    def basis(tau):
        p = 1.0
        for j in range(order):
            if j != k:
                p *= (tau - sigmas[i - j]) / (sigmas[i - k] - sigmas[i - j])
        return p

    a, b = sigmas[i], sigmas[i + 1]
    mid, half = (a + b) / 2, (b - a) / 2
    r = math.sqrt(3 / 5)
    return half * (5 / 9 * basis(mid - half * r) + 8 / 9 * basis(mid) + 5 / 9 * basis(mid + half * r))


def sample_lms(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise, order: int = 4) -> Iterator[Tensor]:
    """Linear multistep on dx/dsigma with coefficients integrated over the true sigma spacing
    (LMSDiscreteScheduler); the order ramps up 1, 2, 3, 4 as derivatives accumulate.

    Unlike diffusers in img2img, the ramp restarts with the shortened schedule: diffusers takes the order from
    the absolute step index and weights its single first derivative with a 4th-order coefficient.
    """
    ds = []
    sig = sigmas.double().tolist()
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        ds = (ds + [(x - denoiser(x, s)) / s])[-order:]
        coeffs = [_lms_coefficient(sig, i, len(ds), k) for k in range(len(ds))]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        yield x


def _rescale(x: Tensor, landed: float, s_next: float) -> Tensor:
    """x landed at noise level `landed` but diffusers hands it on as if at `s_next` (the same variance-preserving
    latent): in sigma space that is a rescale. With s_next = 0 this returns diffusers' final latent."""
    if landed == s_next:
        return x
    return x * math.sqrt((s_next**2 + 1) / (landed**2 + 1))


def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise, targets: list | None = None,
                eta: float = 0.0, clip: float | None = None) -> Iterator[Tensor]:
    """DDIM (DDIMScheduler); with eta = 0 it is Euler in sigma space.

    targets[i]: the level step i lands at. diffusers steps from t to t - N // steps whatever the spacing, and its
    last step ends at the "final alpha" (alphas_cumprod[0] unless set_alpha_to_one), not at 0; the next model
    call then sees that latent as if it were at sigmas[i+1]. Default targets: sigmas[1:].
    clip (clip_sample) clamps x0 but, as in diffusers, eps stays the model's.
    """
    sig = sigmas.double().tolist()
    targets = sig[1:] if targets is None else targets
    for i in range(len(sigmas) - 1):
        s, to = sigmas[i], targets[i]
        x0 = denoiser(x, s)
        eps = (x - x0) / s
        x0 = _clip(x0, clip)
        if eta > 0:
            std = eta * to * max(1 - to**2 / sig[i] ** 2, 0.0) ** 0.5
            x = x0 + (to**2 - std**2) ** 0.5 * eps + std * noise(x)
        else:
            x = x0 + to * eps
        x = _rescale(x, to, sig[i + 1])
        yield x


def sample_pndm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise, targets: list | None = None,
                rk: list | None = None) -> Iterator[Tensor]:
    """Pseudo linear multistep (PNDMScheduler): Adams-Bashforth on eps, each step a DDIM step.

    skip_prk_steps (rk None, PLMS): step 0 evaluates eps at sigmas[0], takes a DDIM step, evaluates again at
    sigmas[1] and redoes step 0 with the average (n + 1 model calls in all); the history then holds the first eps,
    not the average, and the order grows 2, 3, 4. `targets` as for sample_ddim.

    Without skip_prk_steps (F-PNDM, rk given): the first three steps are classical Runge-Kutta steps on eps
    (eps1 + 2 eps2 + 2 eps3 + eps4) / 6 with four model calls each, every stage a DDIM step from x; the history
    keeps each step's first eps, so the first multistep step is already 4th order. rk[i] = (land, told): stage 1
    lands at `land` (diffusers' t - N//steps//2) and the model is told `told` (t_next + N//steps//2); stage 2
    lands at `told`, stage 3 at sigmas[i+1], and the step itself lands at sigmas[i+1] (not at targets[i]).

    Matches diffusers for "leading" spacing (SD's). Where diffusers contradicts itself we stay consistent:
    in img2img its slice drops the repeated timestep (or cuts into the Runge-Kutta stages), so every later call
    is told another step's timestep; with other spacings its warm-up redo uses t + N // steps, not the previous
    timestep. With v_prediction diffusers converts the combined model outputs to eps with the current step's alpha
    and sample, not each output at its own step; we convert each (the results differ by several percent).
    """
    sig = sigmas.double().tolist()
    targets = sig[1:] if targets is None else targets
    eps = lambda x, s: (x - denoiser(x, s)) / s
    level = lambda s: sigmas.new_tensor(s)
    n_rk = 0 if rk is None else min(3, len(rk))
    ets = []
    for i in range(len(sigmas) - 1):
        s, to = sigmas[i], targets[i]
        e = eps(x, s)
        if i < n_rk:
            land, told = rk[i]
            ets.append(e)
            e2 = eps(_rescale(x + (land - sig[i]) * e, land, told), level(told))
            e3 = eps(x + (told - sig[i]) * e2, level(told))
            e4 = eps(x + (sig[i + 1] - sig[i]) * e3, sigmas[i + 1])
            e, to = (e + 2 * e2 + 2 * e3 + e4) / 6, sig[i + 1]
        elif i == 0:
            ets.append(e)
            if len(sigmas) > 2:  # (a one-step schedule has nothing to evaluate at: a plain DDIM step, as diffusers)
                e = (e + eps(_rescale(x + (to - sig[0]) * e, to, sig[1]), sigmas[1])) / 2
        else:
            ets = (ets + [e])[-4:]
            if len(ets) == 2:
                e = (3 * ets[-1] - ets[-2]) / 2
            elif len(ets) == 3:
                e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
            else:
                e = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        x = _rescale(x + (to - sig[i]) * e, to, sig[i + 1])
        yield x


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise) -> Iterator[Tensor]:
    """DPM-Solver++(2M) (DPMSolverMultistepScheduler, dpmsolver++, order 2, midpoint).

    First order on the first step and on the step to sigma = 0 (lower_order_final), second order between.
    With lambda = -log(sigma): x' = (s'/s) x - expm1(-h) D, D = x0 or (1 + 1/2r) x0 - (1/2r) x0_prev.
    """
    sig = sigmas.double().tolist()
    x0_prev = None
    for i in range(len(sigmas) - 1):
        s, s_next = sig[i], sig[i + 1]
        x0 = denoiser(x, sigmas[i])
        if s_next == 0:
            x = x0
        else:
            h = math.log(s / s_next)
            if x0_prev is None:
                D = x0
            else:
                r = math.log(sig[i - 1] / s) / h
                D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (s_next / s) * x - math.expm1(-h) * D
        x0_prev = x0
        yield x


def _unipc_b(h: float, order: int) -> list:
    """UniPC's right-hand side b_k = k! phi_{k+1}(-h) / B(h) with B(h) = expm1(-h) ("bh2")."""
    hh = -h
    B = math.expm1(hh)
    phi = math.expm1(hh) / hh - 1
    fact, b = 1, []
    for k in range(1, order + 1):
        b.append(phi * fact / B)
        fact *= k + 1
        phi = phi / hh - 1 / fact
    return b


def sample_unipc(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise, order: int = 2) -> Iterator[Tensor]:
    """UniPC (UniPCMultistepScheduler defaults: bh2, predict_x0, order 2, corrector on every step).

    Each model call first corrects the previous step (UniC, using the new x0), then predicts the next (UniP).
    The order is 1 on the first and the last step (lower_order_final). lambda = -log(sigma), h = lambda' - lambda.
    """
    sig = sigmas.double().tolist()
    n = len(sigmas) - 1
    x0s, x_last, last_order = [], None, 1

    def base(x, m0, s, s_next):
        # the first-order (DDIM) update: in sigma space alpha_t drops out of UniPC's formulas
        return (s_next / s) * x - math.expm1(-math.log(s / s_next)) * m0 if s_next > 0 else m0

    for i in range(n):
        x0 = denoiser(x, sigmas[i])
        if i > 0:  # UniC: redo step i-1 from x_last, now knowing the model's answer at its end
            s0, s = sig[i - 1], sig[i]
            h = math.log(s0 / s)
            m0, b = x0s[-1], _unipc_b(h, last_order)
            if last_order == 1:
                corr = 0.5 * (x0 - m0)
            else:
                rk = math.log(s0 / sig[i - 2]) / h  # lambda_{i-2} - lambda_{i-1}, < 0
                # solve [[1, 1], [rk, 1]] rho = b
                rho0 = (b[0] - b[1]) / (1 - rk)
                rho1 = b[0] - rho0
                corr = rho0 * (x0s[-2] - m0) / rk + rho1 * (x0 - m0)
            x = base(x_last, m0, s0, s) - math.expm1(-h) * corr
        x0s = (x0s + [x0])[-order:]
        this_order = min(order, n - i, i + 1)
        x_last = x
        s, s_next = sig[i], sig[i + 1]
        x = base(x, x0, s, s_next)
        if this_order == 2 and s_next > 0:  # UniP, 2nd order: rho_p = 1/2
            h = math.log(s / s_next)
            rk = math.log(s / sig[i - 1]) / h
            x = x - math.expm1(-h) * 0.5 * (x0s[-2] - x0) / rk
        last_order = this_order
        yield x


def sample_lcm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise, c_skip: list, c_out: list,
               clip: float | None = None) -> Iterator[Tensor]:
    """Latent Consistency Model multistep sampling (LCMScheduler).

    Each step: the consistency function denoised = c_skip(t) * x_vp + c_out(t) * x0, with x_vp = x / sqrt(s^2+1)
    diffusers' variance-preserving latent; then fresh noise up to the next level (none after the last step).
    """
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x = c_out[i] * _clip(denoiser(x, s), clip) + c_skip[i] * (x / (s**2 + 1) ** 0.5)
        if i < len(sigmas) - 2:
            x = x + s_next * noise(x)
        yield x


@dataclass(frozen=True)
class Sampler:
    """Everything sdgen knows about one sampler; SAMPLERS below is the only table of them."""

    name: str            # what `sampler=` takes: "euler_a"
    fn: Callable[..., Iterator[Tensor]]   # the sampler itself: sample_euler_ancestral
    label: str           # AUTOMATIC1111's name, written to and read from PNG metadata: "Euler a"
    scheduler: str       # the diffusers class it reproduces number for number: "EulerAncestralDiscreteScheduler"
    timesteps: str       # how that class picks its timesteps (schedule.plan): "discrete" (integer, DDIM/DDPM/PNDM),
                         # "euler" (fractional, interpolated sigmas), "multistep" (DPM-Solver/UniPC), "lcm"
    vp_native: bool      # it works on the variance-preserving latent (init_noise_sigma = 1)
    karras: bool         # the karras schedule is allowed: the class takes use_karras_sigmas (Euler a lacks it
                         # in diffusers; it runs on the karras sigmas EulerDiscreteScheduler would use)
    defaults: Mapping[str, object]   # the class's __init__ default of every scheduler_config.json key it honours;
                                     # a key it lacks is not here and cannot change its result

    def __post_init__(self):
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))   # read-only, like the rest


# diffusers' __init__ defaults (0.42.1), shared by most classes; tests/test_scheduler_configs.py checks each table
# against inspect.signature of the class.
_BASE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
         "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "linspace", "steps_offset": 0}
_CLIP = {"clip_sample": False, "clip_sample_range": 1.0}

SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddim", sample_ddim, "DDIM", "DDIMScheduler", "discrete", vp_native=True, karras=False, defaults={
        **_BASE, "timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0,
        "set_alpha_to_one": True, "rescale_betas_zero_snr": False}),
    Sampler("ddpm", sample_ddpm, "DDPM", "DDPMScheduler", "discrete", vp_native=True, karras=False, defaults={
        **_BASE, "timestep_spacing": "leading", "clip_sample": True, "clip_sample_range": 1.0,
        "rescale_betas_zero_snr": False}),
    Sampler("pndm", sample_pndm, "PLMS", "PNDMScheduler", "discrete", vp_native=True, karras=False, defaults={
        **_BASE, "timestep_spacing": "leading", "skip_prk_steps": False, "set_alpha_to_one": False}),
    Sampler("lms", sample_lms, "LMS", "LMSDiscreteScheduler", "euler", vp_native=False, karras=True,
            defaults=_BASE),
    Sampler("euler", sample_euler, "Euler", "EulerDiscreteScheduler", "euler", vp_native=False, karras=True,
            defaults={**_BASE, "rescale_betas_zero_snr": False}),
    Sampler("euler_a", sample_euler_ancestral, "Euler a", "EulerAncestralDiscreteScheduler", "euler",
            vp_native=False, karras=True, defaults={**_BASE, "rescale_betas_zero_snr": False}),
    Sampler("heun", sample_heun, "Heun", "HeunDiscreteScheduler", "euler", vp_native=False, karras=True, defaults={
        **_BASE, "beta_start": 0.00085, "beta_end": 0.012, **_CLIP}),
    Sampler("dpmpp_2m", sample_dpmpp_2m, "DPM++ 2M", "DPMSolverMultistepScheduler", "multistep", vp_native=True,
            karras=True, defaults={**_BASE, "rescale_betas_zero_snr": False}),
    Sampler("unipc", sample_unipc, "UniPC", "UniPCMultistepScheduler", "multistep", vp_native=True, karras=True,
            defaults={**_BASE, "rescale_betas_zero_snr": False}),
    # LCMScheduler also takes timestep_spacing, steps_offset and set_alpha_to_one but never reads them
    Sampler("lcm", sample_lcm, "LCM", "LCMScheduler", "lcm", vp_native=True, karras=False, defaults={
        "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "trained_betas": None, "prediction_type": "epsilon", "original_inference_steps": 50, "timestep_scaling": 10.0,
        **_CLIP, "rescale_betas_zero_snr": False}),
)}


def by_label(text: str) -> Sampler:
    """The sampler named `text`: our name or A1111's label, any case ("euler_a", "Euler a", "DPM++ 2M")."""
    key = str(text).strip().lower()
    for s in SAMPLERS.values():
        if key in (s.name, s.label.lower()):
            return s
    choices = ", ".join(f"{s.name} ({s.label})" for s in SAMPLERS.values())
    raise SdgenError(f"unknown sampler {text!r}: choose one of {choices}")
