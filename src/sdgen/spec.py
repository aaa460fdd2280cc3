"""Which model family a checkpoint is, and its sizes, read off the keys and shapes.

sdgen runs Stable Diffusion 1.x (and SD1 inpainting). Other families are recognised only to refuse them
with a line that says what the file is, instead of failing later on a missing or misshapen key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from . import SdgenError

if TYPE_CHECKING:
    from .weights import Checkpoint

SUPPORTED = "sdgen supports Stable Diffusion 1.x"
_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer."}


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "sd1"
    unet: Any  # UNetConfig
    vae: Any  # VAEConfig
    text_encoder: Any  # CLIPConfig
    inpainting: bool  # 9-channel UNet: latents + mask + masked-image latents


def _other_family(keys: list[str], shapes: Mapping[str, tuple]) -> str | None:
    """A name for a known non-SD1 layout, from original single-file keys."""
    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

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
    if has("lora_unet_") or has("lora_te_") or any(".lora_" in k or "lora_down" in k for k in keys):
        return "a LoRA file, not a full model"
    if not has("model.diffusion_model.") and has("encoder.") and has("decoder.") and has("post_quant_conv."):
        return "a standalone VAE, not a full model"
    return None


def check_family(name: str, refs: Mapping[str, Any]) -> None:
    """Refuse a single file that is not a complete SD1 checkpoint, naming what it is."""
    keys = list(refs)
    shapes = {k: tuple(r.shape) for k, r in refs.items()}
    other = _other_family(keys, shapes)
    if other:
        raise SdgenError(f"{name}: this is {other}; {SUPPORTED}")
    present = [c for c, p in _PREFIXES.items() if any(k.startswith(p) for k in keys)]
    if not present:
        first = f" (first key: {keys[0]!r})" if keys else " (it holds no tensors)"
        raise SdgenError(f"{name}: not a Stable Diffusion checkpoint: no key starts with "
                         f"{', '.join(_PREFIXES.values())}{first}")
    missing = [c for c in _PREFIXES if c not in present]
    if missing:
        raise SdgenError(f"{name}: incomplete Stable Diffusion checkpoint: no {' or '.join(missing)} weights "
                         f"({', '.join(_PREFIXES[c] + '*' for c in missing)})")


def check_diffusers_family(name: str, model_index: dict) -> None:
    cls = str(model_index.get("_class_name", ""))
    if "XL" in cls or "text_encoder_2" in model_index:
        raise SdgenError(f"{name}: this is an SDXL model ({cls or 'two text encoders'}); {SUPPORTED}")
    if "unet" not in model_index and "transformer" in model_index:
        raise SdgenError(f"{name}: this is a transformer-based model ({cls}), not Stable Diffusion 1.x; {SUPPORTED}")


def detect(ckpt: Checkpoint) -> ModelSpec:
    """Sizes from the diffusers configs when the checkpoint has them, else from the tensor shapes."""
    from .weights import _module

    configs = {}
    for comp in ("unet", "vae", "text_encoder"):
        _, config_cls = _module(comp)
        if ckpt.configs.get(comp):
            configs[comp] = config_cls.from_diffusers(ckpt.configs[comp])
        else:
            configs[comp] = config_cls.from_shapes(ckpt.shapes(comp))
    unet = configs["unet"]
    name = ckpt.path.name
    if getattr(unet, "context_dim", 768) == 1024 or getattr(unet, "linear_proj", False) \
            or getattr(unet, "head_channels", 0):
        raise SdgenError(f"{name}: this is an SD2.x model (context {unet.context_dim}); {SUPPORTED}")
    conv_in = ckpt.shapes("unet").get("input_blocks.0.0.weight")
    in_channels = conv_in[1] if conv_in else getattr(unet, "in_channels", 4)
    if in_channels not in (4, 9):
        raise SdgenError(f"{name}: a UNet with {in_channels} input channels is not SD1 text-to-image (4) or "
                         f"inpainting (9); {SUPPORTED}")
    return ModelSpec(family="sd1", unet=unet, vae=configs["vae"], text_encoder=configs["text_encoder"],
                     inpainting=in_channels == 9)
