"""Stable Diffusion 1.x: CLIP ViT-L text encoder, the SD1 UNet (4 or 9 input channels), the SD1 VAE.

Files of families sdgen does not run are recognised here only to refuse them with a line that says what the
file is, instead of failing later on a missing or misshapen key (SD2 and SDXL have their own modules).
"""

from __future__ import annotations

from typing import Mapping

from .. import SdgenError
from ..nets import clip, unet, vae
from ..sampling.schedule import SD15_SCHEDULER  # what a single file implies
from . import Component, Family

SUPPORTED = "sdgen supports Stable Diffusion 1.x, 2.x and XL (base and refiner)"

COMPONENTS = (
    Component("unet", "model.diffusion_model.", unet.UNet, unet.UNetConfig, unet.diffusers_renames),
    Component("vae", "first_stage_model.", vae.VAE, vae.VAEConfig, vae.diffusers_renames, shapes=vae.fix_shapes),
    Component("text_encoder", "cond_stage_model.transformer.", clip.CLIPTextModel, clip.CLIPConfig,
              clip.diffusers_renames, keys=clip.normalize_keys),
)


def owns(shapes: Mapping[str, tuple]) -> bool:
    """A complete SD1 single file: all three prefixes, a 768-wide cross attention, no other family's keys."""
    if other_family(shapes):
        return False
    return all(any(k.startswith(c.prefix) for k in shapes) for c in COMPONENTS)


def check(name: str, configs: Mapping) -> None:
    u = configs["unet"]
    if u.context_dim != configs["text_encoder"].hidden_size:
        raise SdgenError(f"{name}: the UNet attends to {u.context_dim}-wide text, the text encoder gives "
                         f"{configs['text_encoder'].hidden_size}")
    if u.linear_proj or u.head_channels:
        raise SdgenError(f"{name}: this is an SD2.x model (linear projections, per-head widths); {SUPPORTED}")
    if u.in_channels not in (4, 9):
        raise SdgenError(f"{name}: a UNet with {u.in_channels} input channels is not SD1 text-to-image (4) or "
                         f"inpainting (9); {SUPPORTED}")


def encode_chunk(nets: Mapping, ids, clip_skip: int = 1, extras: Mapping = {}):
    """(B, 77) ids -> ((B, 77, 768) CLIP ViT-L hidden states after the final LayerNorm, no pooled output).
    extras: {component: (N, D) textual-inversion vectors for ids vocab_size + i}."""
    return nets["text_encoder"](ids, clip_skip=clip_skip, extra=extras.get("text_encoder")), None


def folder_size(raw: Mapping, configs: Mapping) -> tuple[int, int]:
    """diffusers' default: unet sample_size (latent pixels) times the VAE's downscaling."""
    scale = 2 ** (len(configs["vae"].ch_mult) - 1)
    s = raw["unet"].get("sample_size", 64)
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return int(w) * scale, int(h) * scale


FAMILY = Family(name="sd1", label="Stable Diffusion 1.x", components=COMPONENTS, native_size=512,
                scheduler=SD15_SCHEDULER, owns=owns, check=check, pipeline="StableDiffusionPipeline",
                folder_size=folder_size, encode_chunk=encode_chunk,
                claims=lambda shapes: any(k.startswith(COMPONENTS[2].prefix) for k in shapes))


def other_family(shapes: Mapping[str, tuple]) -> str | None:
    """A name for a known non-SD1 layout, from original single-file keys and shapes."""
    def has(prefix):
        return any(k.startswith(prefix) for k in shapes)

    if has("conditioner.embedders."):
        return "an SDXL checkpoint"
    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        return "a Stable Diffusion 3 checkpoint"
    if has("model.diffusion_model.double_blocks.") or has("double_blocks."):
        return "a Flux checkpoint"
    if has("cond_stage_model.model."):
        return "an SD2.x checkpoint (OpenCLIP text encoder)"
    to_k = shapes.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if to_k is not None and len(to_k) == 2 and to_k[1] == 1024:
        return "an SD2.x checkpoint (1024-wide cross attention)"
    if has("lora_unet_") or has("lora_te_") or any(".lora_" in k or "lora_down" in k for k in shapes):
        return "a LoRA file, not a full model"
    if not has("model.diffusion_model.") and has("encoder.") and has("decoder.") and has("post_quant_conv."):
        return "a standalone VAE, not a full model"
    return None


def check_diffusers_family(name: str, model_index: dict) -> None:
    cls = str(model_index.get("_class_name", ""))
    if "unet" not in model_index and "transformer" in model_index:
        raise SdgenError(f"{name}: this is a transformer-based model ({cls}), not Stable Diffusion 1.x; {SUPPORTED}")
