"""A tiny random SD1 model saved in every format sdgen loads, plus the diffusers reference pipeline for it.

The original-layout single files are written by inverting sdgen's diffusers->original renaming tables; a test
(test_formats.py) loads those files back with diffusers' own single-file converter to prove they are genuine
original-layout checkpoints.
"""

import json
from pathlib import Path

import torch

import reference as ref

SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer."}
# what real SD1 files carry besides the three networks
EXTRA_KEYS = {"betas": (1000,), "alphas_cumprod": (1000,), "alphas_cumprod_prev": (1000,), "model_ema.decay": (),
              "model_ema.num_updates": (), "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
              "logvar": (1000,)}


def fp16_exact_(module):
    """Round every weight through fp16 so that fp32 and fp16 files hold the very same model."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def reference_pipeline(folder: Path, inpainting=False, seed=0):
    """diffusers StableDiffusionPipeline with tiny random components (fp16-exact weights)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    unet = fp16_exact_(ref.randomize_(ref.tiny_unet(seed, in_channels=9 if inpainting else 4), seed))
    vae = fp16_exact_(ref.randomize_(ref.tiny_vae(seed + 1), seed + 1))
    text = fp16_exact_(ref.randomize_(ref.tiny_text_encoder(seed + 2), seed + 2))
    tok = ref.clip_tokenizer(folder / "_tok")
    sched = PNDMScheduler.from_config(SD15_SCHEDULER)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def original_state_dict(pipe, dtype=torch.float32):
    """The reference pipeline's weights under the original (CompVis/LDM) single-file key names."""
    from sdgen.nets import clip, unet, vae

    out = {}
    for name, module, table in (
        ("unet", pipe.unet, unet.diffusers_renames(unet.UNetConfig.from_diffusers(dict(pipe.unet.config)))),
        ("vae", pipe.vae, vae.diffusers_renames(vae.VAEConfig.from_diffusers(dict(pipe.vae.config)))),
        ("text_encoder", pipe.text_encoder, clip.diffusers_renames(clip.CLIPConfig.from_diffusers(pipe.text_encoder.config.to_dict()))),
    ):
        sd = module.state_dict()
        sd.pop("text_model.embeddings.position_ids", None)
        renamed = {table[k]: v for k, v in sd.items()}
        if name == "vae":
            renamed = vae.fix_shapes(renamed)  # original files store the mid attention as 1x1 convs
        out.update({PREFIX[name] + k: v.to(dtype).contiguous() for k, v in renamed.items()})
    for k, shape in EXTRA_KEYS.items():
        out[k] = torch.arange(77).reshape(shape) if k.endswith("position_ids") else torch.rand(shape)
    return out


def write_all_formats(folder: Path, inpainting=False) -> tuple[object, dict[str, Path]]:
    """Save one tiny model as: diffusers folder, original safetensors fp32 and fp16, .ckpt."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    pipe = reference_pipeline(folder, inpainting)
    paths = {"diffusers": folder / "diffusers", "safetensors": folder / "model.safetensors",
             "safetensors_fp16": folder / "model-fp16.safetensors", "ckpt": folder / "model.ckpt"}
    pipe.save_pretrained(paths["diffusers"])
    # the real SD1.5 scheduler_config.json (diffusers 0.6.0) names no timestep_spacing: each scheduler then uses
    # its own default, in diffusers and in sdgen alike (save_pretrained would write PNDM's "leading")
    (paths["diffusers"] / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))
    save_file(original_state_dict(pipe), paths["safetensors"])
    save_file(original_state_dict(pipe, torch.float16), paths["safetensors_fp16"])
    torch.save({"state_dict": original_state_dict(pipe), "global_step": 470000, "epoch": 6}, paths["ckpt"])
    return pipe, paths
