"""Wrappers that turn a noise-prediction network into a denoiser: prediction type, timestep, guidance.

    eps_model(x_in, t) -> model output         x_in the variance-preserving latent, t a training timestep
    denoiser(x, sigma) -> x0                   x = x0 + sigma * eps (see samplers.py)
"""

import math
from typing import Callable

import torch
from torch import Tensor

from .. import SdgenError
from .schedule import SchedulerConfig, sigma_to_t, train_sigmas


class ModelDenoiser:
    """denoiser(x, sigma) over an eps_model trained on a discrete schedule.

    The model sees x_in = x / sqrt(sigma^2 + 1) (diffusers' latent) and the timestep of sigma. Plan.run binds it to
    the plan (for_plan): the config becomes the plan's, resolved for its sampler (prediction type, training
    sigmas), and the model is told exactly the timesteps that sampler's diffusers scheduler would pass; a level the
    plan does not list gets its timestep by log-sigma interpolation.
    """

    def __init__(self, eps_model: Callable, config: SchedulerConfig | None = None, pinned: dict | None = None):
        self.eps_model = eps_model
        self.config = config
        self.pinned = pinned or {}
        self._log_sigmas = None

    def for_plan(self, plan) -> "ModelDenoiser":
        """This model under `plan` (a schedule.Plan): its resolved config and its timesteps."""
        return ModelDenoiser(self.eps_model, plan.config, dict(zip(plan.sigmas[:-1].tolist(), plan.timesteps.tolist())))

    def _resolved(self) -> SchedulerConfig:
        if self.config is None or self.config.prediction_type is None:
            raise SdgenError("the model denoiser has no scheduler config resolved for a sampler: run it through "
                             "Plan.run, or give it config.for_sampler(name)")
        return self.config

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The (fractional) training timestep of sigma, as a 0-d float32 tensor."""
        t = self.pinned.get(float(sigma))
        if t is None:
            if self._log_sigmas is None:  # float64 logs of the float32 sigmas: a training sigma maps to its exact t
                self._log_sigmas = train_sigmas(self._resolved()).double().log()
            t = float(sigma_to_t(sigma, self._log_sigmas))
        return torch.tensor(t, dtype=torch.float32)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:  # (B, C, h, w), 0-d -> (B, C, h, w)
        s = float(sigma)
        c_in = 1 / math.sqrt(s * s + 1)
        out = self.eps_model(x * c_in, self.sigma_to_t(sigma)).to(x.dtype)
        kind = self._resolved().prediction_type
        if kind == "epsilon":
            return x - sigma.to(x.dtype) * out
        if kind == "v_prediction":  # v = alpha * eps - sigma_vp * x0, with alpha = c_in, sigma_vp = s * c_in
            return x * (c_in * c_in) - out * (s * c_in)
        return out  # "sample": the model predicts x0


def model_denoiser(eps_model: Callable, config: SchedulerConfig | None = None) -> ModelDenoiser:
    """denoiser(x, sigma) -> x0 over eps_model(x_in, t); handles epsilon, v_prediction and sample models.
    Plan.run gives it the plan's resolved config; `config` only serves a denoiser used without a plan."""
    return ModelDenoiser(eps_model, config)


def cfg(unet: Callable, cond: Tensor, uncond: Tensor | None, scale: float) -> Callable:
    """Classifier-free guidance as an eps_model: one batched call on [uncond; cond], then
    uncond + scale * (cond - uncond). With scale <= 1 or no uncond: a single conditional call.

    unet(x, t, context) -> (B, C, h, w); cond/uncond (B, 77, D), or tuples of batch tensors (SDXL: context and
    added conditioning), each joined along the batch.
    """
    if uncond is None or scale <= 1:
        return lambda x, t: unet(x, t, cond)
    context = torch.cat([uncond, cond]) if isinstance(cond, Tensor) else \
        tuple(torch.cat([u, c]) for u, c in zip(uncond, cond))

    def eps_model(x, t):
        out_uncond, out_cond = unet(torch.cat([x, x]), t, context).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return eps_model
