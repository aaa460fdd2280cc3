"""Stable Diffusion XL: base and refiner.

Base: CLIP ViT-L (`conditioner.embedders.0.transformer.`) and OpenCLIP ViT-bigG (`conditioner.embedders.1.model.`),
whose penultimate hidden states (no final LayerNorm) are concatenated to 2048-wide text; the UNet's added
conditioning y = [pooled bigG text through its projection (1280), Fourier features (256 each) of the time ids
original size (h, w), crop top-left (top, left), target size (h, w)]. Refiner: the bigG encoder alone
(`conditioner.embedders.0.model.`), time ids original size, crop, aesthetic score. The VAE is SD1's with the
scaling factor 0.13025 (the fp16-safe variants share it). Native size 1024x1024.

Defaults are diffusers': time ids from the image size, crop (0, 0), aesthetic score 6 (2.5 for the negative
side); the base pipeline's force_zeros_for_empty_prompt (an empty negative prompt is all zeros, not encoded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from .. import SdgenError
from ..nets import clip, openclip, unet, vae
from . import Component, Family, SUPPORTED
from .sd1 import folder_size
from .sd2 import says_v, zero_snr

SCALING_FACTOR = 0.13025
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5
EOS_ID = 49407  # CLIP's end-of-text: the second encoder's padding starts after the first one
# stabilityai/stable-diffusion-xl-base-1.0 (and the refiner), scheduler/scheduler_config.json
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
             "use_karras_sigmas": False}

_UNET = Component("unet", "model.diffusion_model.", unet.UNet, unet.UNetConfig, unet.diffusers_renames,
                  fixed={"head_channels": 64})
_VAE = Component("vae", "first_stage_model.", vae.VAE, vae.VAEConfig, vae.diffusers_renames, shapes=vae.fix_shapes,
                 fixed={"scaling_factor": SCALING_FACTOR})
COMPONENTS = (
    _UNET, _VAE,
    Component("text_encoder", "conditioner.embedders.0.transformer.", clip.CLIPTextModel, clip.CLIPConfig,
              clip.diffusers_renames, keys=clip.normalize_keys),
    Component("text_encoder_2", "conditioner.embedders.1.model.", openclip.OpenCLIPTextModel, openclip.OpenCLIPConfig,
              openclip.diffusers_renames, keys=openclip.normalize_keys),
)
REFINER_COMPONENTS = (
    _UNET, _VAE,
    Component("text_encoder_2", "conditioner.embedders.0.model.", openclip.OpenCLIPTextModel, openclip.OpenCLIPConfig,
              openclip.diffusers_renames, keys=openclip.normalize_keys),
)


def _has(shapes, prefix):
    return any(k.startswith(prefix) for k in shapes)


def claims(shapes) -> bool:
    return _has(shapes, "conditioner.embedders.0.transformer.")


def claims_refiner(shapes) -> bool:
    return _has(shapes, "conditioner.embedders.0.model.")


def _owns(components, claim):
    return lambda shapes: claim(shapes) and all(_has(shapes, c.prefix) for c in components)


def time_ids(config: unet.UNetConfig, pooled_dim: int) -> int:
    """How many time ids the UNet's added conditioning holds besides the pooled text (base 6, refiner 5)."""
    return (config.adm_in_channels - pooled_dim) // unet.TIME_ID_DIM


def _check(want_ids: int, what: str):
    def check(name: str, configs: Mapping) -> None:
        u, big = configs["unet"], configs["text_encoder_2"]
        width = big.width + (configs["text_encoder"].hidden_size if "text_encoder" in configs else 0)
        if u.context_dim != width:
            raise SdgenError(f"{name}: the UNet attends to {u.context_dim}-wide text, the text encoders give {width}")
        if not big.projection_dim:
            raise SdgenError(f"{name}: the second text encoder has no text_projection (SDXL's pooled text)")
        rest = u.adm_in_channels - big.projection_dim
        if rest != want_ids * unet.TIME_ID_DIM:
            raise SdgenError(f"{name}: the UNet's added conditioning is {u.adm_in_channels} wide, not the "
                             f"{big.projection_dim} of pooled text and {want_ids} time ids of an {what}")
        if u.in_channels not in (4, 9):
            raise SdgenError(f"{name}: an SDXL UNet with {u.in_channels} input channels is not text-to-image (4) "
                             f"or inpainting (9); {SUPPORTED}")
    return check


def repad(ids: torch.LongTensor, pad: int = openclip.PAD_ID) -> torch.LongTensor:
    """ids padded after their first end-of-text with `pad` (OpenCLIP's 0, where CLIP's tokenizer pads with EOS)."""
    eos = (ids == EOS_ID).int()
    after = (eos.cumsum(1) - eos) > 0
    return ids.masked_fill(after, pad)


def encode_chunk(nets: Mapping, ids: torch.LongTensor, clip_skip: int = 1, extras: Mapping = {}):
    """(B, 77) ids -> ((B, 77, 768 + 1280) penultimate hidden states of both encoders, (B, 1280) pooled bigG).
    clip_skip 1 is SDXL's own choice, the penultimate layer; 2 the one before (diffusers' clip_skip=1), ..."""
    h1 = nets["text_encoder"](ids, clip_skip=clip_skip + 1, final_norm=False, extra=extras.get("text_encoder"))
    h2, pooled = nets["text_encoder_2"].encode(repad(ids), clip_skip=clip_skip + 1, final_norm=False, pooled=True,
                                               extra=extras.get("text_encoder_2"))
    return torch.cat([h1, h2.to(h1.dtype)], dim=-1), pooled


def encode_chunk_refiner(nets: Mapping, ids: torch.LongTensor, clip_skip: int = 1, extras: Mapping = {}):
    """(B, 77) ids -> ((B, 77, 1280) penultimate bigG hidden states, (B, 1280) pooled)."""
    return nets["text_encoder_2"].encode(repad(ids), clip_skip=clip_skip + 1, final_norm=False, pooled=True,
                                         extra=extras.get("text_encoder_2"))


def added(pooled: torch.Tensor, width: int, height: int, negative: bool, config: unet.UNetConfig) -> torch.Tensor:
    """SDXL's added conditioning y (B, adm) = [pooled (B, P), 256 Fourier features of each time id]. The base
    takes (original h, w, crop top, left, target h, w), the refiner (original h, w, crop top, left, aesthetic
    score): diffusers' defaults, the image size and no crop."""
    n = time_ids(config, pooled.shape[1])
    if n == 6:
        values = [height, width, 0, 0, height, width]
    else:
        values = [height, width, 0, 0, NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE]
    ids = torch.tensor(values, dtype=torch.float32, device=pooled.device).repeat(pooled.shape[0], 1)
    fourier = unet.timestep_embedding(ids.flatten(), unet.TIME_ID_DIM).reshape(pooled.shape[0], -1)
    return torch.cat([pooled.float(), fourier], dim=-1)


def single_file(metadata: Mapping, refs: Mapping, path: Path) -> tuple[dict, int]:
    scheduler = dict(SCHEDULER)
    if says_v(metadata, refs, path):
        scheduler["prediction_type"] = "v_prediction"
    return zero_snr(scheduler, refs), 1024


FAMILY = Family(name="sdxl", label="Stable Diffusion XL", components=COMPONENTS, native_size=1024,
                scheduler=SCHEDULER, owns=_owns(COMPONENTS, claims), check=_check(6, "SDXL base model"),
                pipeline="StableDiffusionXLPipeline", folder_size=folder_size, encode_chunk=encode_chunk,
                added=added, claims=claims, single_file=single_file, zero_negative=True)
REFINER = Family(name="sdxl-refiner", label="Stable Diffusion XL refiner", components=REFINER_COMPONENTS,
                 native_size=1024, scheduler=SCHEDULER, owns=_owns(REFINER_COMPONENTS, claims_refiner),
                 check=_check(5, "SDXL refiner"), pipeline="StableDiffusionXLImg2ImgPipeline",
                 folder_size=folder_size, encode_chunk=encode_chunk_refiner, added=added, pad_token="!",
                 claims=claims_refiner, single_file=single_file)
