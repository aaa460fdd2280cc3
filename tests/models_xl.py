"""Tiny random SD2 and SDXL (base, refiner) models built with diffusers/transformers, saved in every format sdgen
loads: a diffusers folder, original single files (.safetensors fp32 and fp16, .ckpt).

The original key layout is written here from the published key tables (CompVis/sgm UNet and VAE names via the
same loop-built tables the SD1 helper inverts; open_clip text-tower names by the rules below, independent of
sdgen's OpenCLIP module), the way real SD2/SDXL files carry them, including what sdgen must ignore: SD2's last
text block (SD2 reads the penultimate layer), `text_projection`/`logit_scale` of the contrastive head.

Sizes keep the family constants single files cannot tell: 64 channels per attention head, 32 norm groups, 12
CLIP-L heads, OpenCLIP heads of 64, SDXL time ids of 256 Fourier features.
"""

import json
from pathlib import Path

import torch

import reference as ref
from models import fp16_exact_

EULER_XL = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
            "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
            "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
_BETAS = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
          "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
          "trained_betas": None}
SD2_EPS = {"_class_name": "PNDMScheduler", **_BETAS, "prediction_type": "epsilon"}
SD2_V = {"_class_name": "DDIMScheduler", **_BETAS, "prediction_type": "v_prediction"}
OPENCLIP_WIDTH, POOLED = 128, 64    # two heads of 64; the projection differs from the width on purpose


def tokenizer(folder, pad="<|endoftext|>"):
    from transformers import CLIPTokenizer

    ref.write_clip_tokenizer_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad, model_max_length=77)


def openclip_text(seed, layers=3, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=OPENCLIP_WIDTH, intermediate_size=2 * OPENCLIP_WIDTH,
                         num_hidden_layers=layers, num_attention_heads=OPENCLIP_WIDTH // 64, max_position_embeddings=77,
                         hidden_act="gelu", projection_dim=POOLED, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()
    return fp16_exact_(ref.randomize_(model, seed))


def unet(seed, *, channels, down, depth, heads, context, adm=None, in_channels=4, sample=8):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    up = tuple(reversed([d.replace("Down", "Up") for d in down]))
    extra = {} if adm is None else dict(addition_embed_type="text_time", addition_time_embed_dim=256,
                                        projection_class_embeddings_input_dim=adm)
    model = UNet2DConditionModel(
        sample_size=sample, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=channels,
        down_block_types=down, up_block_types=up, transformer_layers_per_block=depth, attention_head_dim=heads,
        cross_attention_dim=context, use_linear_projection=True, norm_num_groups=32, **extra).eval()
    return fp16_exact_(ref.randomize_(model, seed))


def vae(seed, scaling):
    model = fp16_exact_(ref.randomize_(ref.tiny_vae(seed), seed))
    model.register_to_config(scaling_factor=scaling)
    return model


# ------------------------------------------------------------------------------------------ the models


def sd2_pipeline(folder: Path, v=False, inpainting=False, seed=10):
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    u = unet(seed, channels=(64, 128), down=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), depth=1, heads=(1, 2),
             context=OPENCLIP_WIDTH, in_channels=9 if inpainting else 4)
    sched = (DDIMScheduler if v else PNDMScheduler).from_config(SD2_V if v else SD2_EPS)
    return StableDiffusionPipeline(vae=vae(seed + 1, 0.18215), text_encoder=openclip_text(seed + 2),
                                   tokenizer=tokenizer(folder / "_tok", pad="!"), unet=u, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sdxl_pipeline(folder: Path, seed=20, inpainting=False):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    te1 = fp16_exact_(ref.randomize_(ref.tiny_text_encoder(seed), seed))
    u = unet(seed + 1, channels=(64, 128, 128), down=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             depth=(1, 1, 2), heads=(1, 2, 2), context=ref.CLIP_HIDDEN + OPENCLIP_WIDTH, adm=POOLED + 6 * 256,
             in_channels=9 if inpainting else 4)
    return StableDiffusionXLPipeline(
        vae=vae(seed + 2, 0.13025), text_encoder=te1, text_encoder_2=openclip_text(seed + 3, projection=True),
        tokenizer=tokenizer(folder / "_tok"), tokenizer_2=tokenizer(folder / "_tok2", pad="!"), unet=u,
        scheduler=EulerDiscreteScheduler.from_config(EULER_XL))


def refiner_pipeline(folder: Path, seed=30):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    u = unet(seed + 1, channels=(64, 128, 128), down=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
             depth=2, heads=(1, 2, 2), context=OPENCLIP_WIDTH, adm=POOLED + 5 * 256)
    return StableDiffusionXLImg2ImgPipeline(
        vae=vae(seed + 2, 0.13025), text_encoder=None, text_encoder_2=openclip_text(seed + 3, projection=True),
        tokenizer=None, tokenizer_2=tokenizer(folder / "_tok2", pad="!"), unet=u,
        scheduler=EulerDiscreteScheduler.from_config(EULER_XL), requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False)


# ------------------------------------------------------------------------------------------ original layout


def openclip_original(model, extra_block=False, seed=0) -> dict:
    """A transformers CLIPTextModel(WithProjection) under open_clip's text-tower names (q/k/v fused into
    in_proj, the projection as the (width, dim) matrix open_clip multiplies by), with a contrastive head's
    `logit_scale` and `text_projection` as real files carry them; extra_block: one more (unused) last block, as
    SD2 files hold the full 24-layer tower of which SD2 reads 23."""
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if "position_ids" not in k}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "logit_scale": torch.tensor(4.6052)}
    layers = model.config.num_hidden_layers
    for i in range(layers + extra_block):
        src = f"encoder.layers.{min(i, layers - 1)}."
        dst = f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{part}"] = torch.cat([sd[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{b}.{part}"] = sd[f"{src}{a}.{part}"]
        if i == layers:  # the unused block: different numbers, so that running it would show
            g = torch.Generator().manual_seed(seed)
            for k in [k for k in out if k.startswith(dst)]:
                out[k] = torch.randn(out[k].shape, generator=g)
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].t()
    else:  # SD2: present in the file, read by nothing
        out["text_projection"] = torch.randn(model.config.hidden_size, model.config.hidden_size)
    return out


def _renamed(module, table, dtype, fix=None):
    sd = {table[k]: v for k, v in module.state_dict().items() if "position_ids" not in k}
    return fix(sd) if fix else sd


def original_state_dict(pipe, kind: str, dtype=torch.float32) -> dict:
    """The pipeline's weights under original single-file names; kind: "sd2", "sdxl" or "refiner"."""
    from sdgen.nets import clip, unet as unet_, vae as vae_

    u = _renamed(pipe.unet, unet_.diffusers_renames(unet_.UNetConfig.from_diffusers(dict(pipe.unet.config))), dtype)
    v = _renamed(pipe.vae, vae_.diffusers_renames(vae_.VAEConfig.from_diffusers(dict(pipe.vae.config))), dtype,
                 vae_.fix_shapes)
    out = {**{"model.diffusion_model." + k: t for k, t in u.items()}, **{"first_stage_model." + k: t for k, t in v.items()}}
    if kind == "sd2":
        out.update({"cond_stage_model.model." + k: t for k, t in
                    openclip_original(pipe.text_encoder, extra_block=True).items()})
    elif kind == "sdxl":
        te1 = pipe.text_encoder.state_dict()
        table = clip.diffusers_renames(clip.CLIPConfig.from_diffusers(pipe.text_encoder.config.to_dict()))
        out.update({"conditioner.embedders.0.transformer." + table[k]: t for k, t in te1.items()
                    if "position_ids" not in k})
        out["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        out.update({"conditioner.embedders.1.model." + k: t for k, t in openclip_original(pipe.text_encoder_2).items()})
    else:
        out.update({"conditioner.embedders.0.model." + k: t for k, t in openclip_original(pipe.text_encoder_2).items()})
    out["alphas_cumprod"] = torch.rand(1000)
    return {k: t.to(dtype).contiguous() if t.is_floating_point() else t for k, t in out.items()}


def write_all_formats(folder: Path, pipe, kind: str, scheduler: dict, metadata: dict | None = None,
                      yaml: str | None = None) -> dict[str, Path]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"diffusers": folder / "diffusers", "safetensors": folder / "model.safetensors",
             "safetensors_fp16": folder / "model-fp16.safetensors", "ckpt": folder / "model.ckpt"}
    pipe.save_pretrained(paths["diffusers"])
    (paths["diffusers"] / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    save_file(original_state_dict(pipe, kind), paths["safetensors"], metadata=metadata)
    save_file(original_state_dict(pipe, kind, torch.float16), paths["safetensors_fp16"], metadata=metadata)
    torch.save({"state_dict": original_state_dict(pipe, kind), "global_step": 1}, paths["ckpt"])
    if yaml:
        paths["ckpt"].with_suffix(".yaml").write_text(yaml)
    return paths


# ------------------------------------------------------------------------------------------ full size

SD21_UNET = {"attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
             "cross_attention_dim": 1024, "use_linear_projection": True, "layers_per_block": 2, "sample_size": 96,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "upcast_attention": True}
SDXL_UNET = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
             "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "layers_per_block": 2,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
             "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True}


def full_size_pair(config: dict, dtype=torch.float32):
    """(diffusers UNet, ours) of a real-size config with the same random weights stored in `dtype`, sharing their
    storage (one copy in memory), and our config read off the original-layout shapes as a single file would give
    it. Ours computes in float32 whatever the storage."""
    from diffusers import UNet2DConditionModel

    from sdgen.nets.unet import UNet, UNetConfig, diffusers_renames

    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config).eval()
    ours_config = UNetConfig.from_diffusers(config)
    table = diffusers_renames(ours_config)
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(1 << 24, generator=g)   # drawing 10^9 numbers one by one takes minutes on a shared CPU:
    state = {}                                  # each tensor is a window of one pool, at its own random start
    for k, p in theirs.state_dict().items():
        n, start = p.numel(), int(torch.randint(0, 1 << 24, (1,), generator=g))
        if start + n <= pool.numel():
            t = pool[start : start + n].reshape(p.shape)
        else:
            t = torch.cat([pool[start:], pool.repeat(-(-n // pool.numel()))])[:n].reshape(p.shape)
        if k.endswith("weight") and "norm" in k:
            t = 1 + 0.1 * t
        elif k.endswith("bias"):
            t = 0.02 * t
        else:
            t = t / max(1, p[0].numel()) ** 0.5
        state[k] = t.to(dtype)
    theirs.load_state_dict(state, assign=True, strict=True)
    with torch.device("meta"):
        ours = UNet(ours_config, compute_dtype=torch.float32).eval()
    ours.load_state_dict({table[k]: v for k, v in state.items()}, assign=True, strict=True)
    from_file = UNetConfig.from_shapes({k: tuple(v.shape) for k, v in ours.state_dict().items()})
    return theirs, ours, from_file


def compute_in_float32_(module):
    """Run a module stored in bf16 with float32 arithmetic: each layer's own parameters are upcast just before it
    runs and put back after (one layer in float32 at a time), as sdgen's layers cast theirs."""
    def before(m, args):
        m._stored = {n: p.data for n, p in m.named_parameters(recurse=False)}
        for p in m.parameters(recurse=False):
            p.data = p.data.float()

    def after(m, args, out):
        for n, p in m.named_parameters(recurse=False):
            p.data = m._stored[n]
        del m._stored

    for m in module.modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.register_forward_pre_hook(before)
            m.register_forward_hook(after)
    return module
