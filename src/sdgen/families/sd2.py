"""Stable Diffusion 2.x: the OpenCLIP ViT-H/14 text encoder, the SD2 UNet (linear projections, heads of 64
channels, 1024-wide text), the SD1 VAE. 512 (epsilon, "base") and 768 (v-prediction) models, and the 9-channel
inpainting model; the depth-conditioned, upscaler and unCLIP variants are refused by name.

Single files name no prediction type. It is read, in order, from the safetensors metadata (`modelspec.
prediction_type`), the `v_pred` marker key (ComfyUI's), a `parameterization: "v"` line in a config YAML next to the
file (A1111's convention), and for full-size UNets ComfyUI's test on the weights (v-models' last attention block
has norm1 biases with std > 0.09); otherwise epsilon. A `ztsnr` marker key asks for zero-terminal-SNR betas with
trailing spacing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch

from .. import SdgenError
from ..nets import openclip, unet, vae
from . import Component, Family, SUPPORTED
from .sd1 import folder_size

_BETAS = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
          "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
          "trained_betas": None}
# stabilityai/stable-diffusion-2-base and stable-diffusion-2-1 (768-v), scheduler/scheduler_config.json
EPSILON_SCHEDULER = {"_class_name": "PNDMScheduler", **_BETAS, "prediction_type": "epsilon"}
V_SCHEDULER = {"_class_name": "DDIMScheduler", **_BETAS, "prediction_type": "v_prediction"}

TEXT_PREFIX = "cond_stage_model.model."
_V_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def text_keys(keys) -> dict:
    """Original text-encoder key -> ours or None. SD2 reads the penultimate layer (its FrozenOpenCLIPEmbedder's
    layer="penultimate"): the last block never runs, so it is left out, as diffusers' converter does; so are the
    contrastive head's `text_projection` and `logit_scale`, which nothing reads."""
    prefix = "transformer.resblocks."
    blocks = [int(k[len(prefix):].split(".")[0]) for k in keys
              if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()]
    last = f"{prefix}{max(blocks)}." if blocks else None
    return {k: None if k in ("text_projection", "logit_scale", "attn_mask") or (last and k.startswith(last)) else k
            for k in keys}


COMPONENTS = (
    Component("unet", "model.diffusion_model.", unet.UNet, unet.UNetConfig, unet.diffusers_renames,
              fixed={"head_channels": 64}),
    Component("vae", "first_stage_model.", vae.VAE, vae.VAEConfig, vae.diffusers_renames, shapes=vae.fix_shapes),
    Component("text_encoder", TEXT_PREFIX, openclip.OpenCLIPTextModel, openclip.OpenCLIPConfig,
              openclip.diffusers_renames, keys=openclip.normalize_keys, single_keys=text_keys),
)


def claims(shapes: Mapping[str, tuple]) -> bool:
    return any(k.startswith(TEXT_PREFIX) for k in shapes) and not any(k.startswith("conditioner.") for k in shapes)


def owns(shapes: Mapping[str, tuple]) -> bool:
    return claims(shapes) and all(any(k.startswith(c.prefix) for k in shapes) for c in COMPONENTS)


_VARIANTS = {5: "an SD2 depth-to-image model (5 input channels)", 7: "an SD2 x4 upscaler (7 input channels)"}


def check(name: str, configs: Mapping) -> None:
    u, text = configs["unet"], configs["text_encoder"]
    if u.adm_in_channels:
        raise SdgenError(f"{name}: this is an SD2 unCLIP model (image-embedding conditioning); {SUPPORTED}")
    if u.in_channels not in (4, 9):
        what = _VARIANTS.get(u.in_channels, f"an SD2 UNet with {u.in_channels} input channels")
        raise SdgenError(f"{name}: this is {what}, which sdgen does not run; {SUPPORTED}")
    if u.context_dim != text.width:
        raise SdgenError(f"{name}: the UNet attends to {u.context_dim}-wide text, the text encoder gives {text.width}")


def encode_chunk(nets: Mapping, ids: torch.LongTensor, clip_skip: int = 1, extras: Mapping = {}):
    """(B, 77) ids (padded with 0, as SD2's tokenizer pads) -> ((B, 77, 1024) hidden states after ln_final, None)."""
    return nets["text_encoder"](ids, clip_skip=clip_skip, extra=extras.get("text_encoder")), None


def _yaml_says_v(path: Path) -> bool | None:
    """`parameterization: "v"` in the config YAML A1111 reads next to a checkpoint (model.yaml)."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file() or yaml.stat().st_size > 2**20:
        return None
    text = yaml.read_text(errors="replace")
    m = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", text, re.M)
    return None if m is None else m.group(1) == "v"


def says_v(metadata: Mapping, refs: Mapping, path: Path) -> bool | None:
    """Whether a single file is a v-prediction model, by what it says about itself; None: it does not say."""
    kind = str(metadata.get("modelspec.prediction_type", "")).lower()
    if "v_pred" in refs or kind in ("v", "v_prediction", "v-prediction"):
        return True
    if kind in ("epsilon", "eps"):
        return False
    return _yaml_says_v(path)


def zero_snr(scheduler: dict, refs: Mapping) -> dict:
    """ComfyUI's `ztsnr` marker key: trained with zero terminal SNR, sampled with trailing spacing."""
    return {**scheduler, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if "ztsnr" in refs \
        else scheduler


def single_file(metadata: Mapping, refs: Mapping, path: Path) -> tuple[dict, int]:
    """(scheduler config, native size) of an SD2 single file (see the module docstring)."""
    v = says_v(metadata, refs, path)
    if v is None and _V_PROBE in refs and len(refs[_V_PROBE].shape) == 1:
        v = bool(refs[_V_PROBE].load(torch.float32).std(unbiased=False) > 0.09)
    return zero_snr(dict(V_SCHEDULER if v else EPSILON_SCHEDULER), refs), 768 if v else 512


FAMILY = Family(name="sd2", label="Stable Diffusion 2.x", components=COMPONENTS, native_size=512,
                scheduler=EPSILON_SCHEDULER, owns=owns, check=check, pipeline="StableDiffusionPipeline",
                folder_size=folder_size, encode_chunk=encode_chunk, pad_token="!", claims=claims,
                single_file=single_file)
