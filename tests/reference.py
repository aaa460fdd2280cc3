"""Tiny random reference models built with diffusers/transformers (test-only dependencies).

Sizes keep the SD1 family constants that single files cannot tell us (8 UNet heads, 32 GroupNorm groups,
12 text-encoder heads) so that every format, single files included, describes the same model.
"""

import gzip
import json
from importlib import resources

import torch

CLIP_HIDDEN = 48  # 12 heads of 4


def relerr(ours, ref):
    """Max abs difference over the reference's max abs value."""
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def write_clip_tokenizer_files(folder):
    """vocab.json + merges.txt as in openai/clip-vit-large-patch14, derived from the shipped BPE file."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = resources.files("sdgen").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


def clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)


def tiny_text_encoder(seed=0, hidden=CLIP_HIDDEN, layers=2):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=hidden, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def tiny_unet(seed=0, in_channels=4, cross_dim=CLIP_HIDDEN):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=32,
    ).eval()


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215, sample_size=64,
    ).eval()


def randomize_(module, seed=0, scale=0.2):
    """Fresh diffusers models zero some output layers; fill every parameter so that all of them matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight") and "norm" in name:
                p.copy_(1 + scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5 * 3)
    return module
