"""The OpenCLIP text transformer (SD2's ViT-H/14, SDXL's ViT-bigG/14), named like the checkpoint.

Attribute paths are the open_clip keys that original single files store under `cond_stage_model.model.` (SD2),
`conditioner.embedders.1.model.` (SDXL base) or `conditioner.embedders.0.model.` (SDXL refiner):
`token_embedding.weight`, `positional_embedding`, `transformer.resblocks.{i}.attn.in_proj_weight`,
`transformer.resblocks.{i}.mlp.c_fc.weight`, `ln_final.weight`, `text_projection`.
Pre-LN blocks, causal self-attention with fused q/k/v, exact-GELU MLP, final LayerNorm; SDXL's second encoder
also projects the pooled (end-of-text) token. Diffusers folders hold the same network as transformers'
CLIPTextModel(WithProjection): `diffusers_renames` maps those names here once (q/k/v join, projection transposed).
"""

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import SdgenError
from ..formats import Fields, index_of, shape_of
from .layers import LayerNorm, Linear, cast

HEAD_WIDTH = 64   # OpenCLIP text towers split their width in heads of 64 (ViT-H: 16 heads, bigG: 20)
PAD_ID = 0        # open_clip's tokenizer pads with 0 ("!"), not with end-of-text as OpenAI's CLIP does


@dataclass(frozen=True)
class OpenCLIPConfig:
    vocab_size: int = 49408
    width: int = 1024
    layers: int = 23
    heads: int = 16
    max_positions: int = 77
    mlp_width: int = 4096
    projection_dim: int = 0        # > 0: `text_projection` (width, projection_dim) gives the pooled output (SDXL)
    layer_norm_eps: float = 1e-5

    @property
    def num_layers(self) -> int:   # the name CLIPConfig uses (request checks clip skip against it)
        return self.layers

    @property
    def hidden_size(self) -> int:
        return self.width

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple]) -> "OpenCLIPConfig":
        """Sizes from the tensor shapes (keys as in this module); heads are width / 64, as in every OpenCLIP text
        tower Stable Diffusion uses."""
        vocab, width = shape_of(shapes, "token_embedding.weight", (2,), "text encoder")
        positions = shape_of(shapes, "positional_embedding", (2,), "text encoder")[0]
        mlp = shape_of(shapes, "transformer.resblocks.0.mlp.c_fc.weight", (2,), "text encoder")[0]
        prefix = "transformer.resblocks."
        layers = {index_of(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)} - {None}
        proj = shape_of(shapes, "text_projection", (2,), "text encoder")[1] if "text_projection" in shapes else 0
        config = cls(vocab_size=vocab, width=width, layers=len(layers), heads=max(1, width // HEAD_WIDTH),
                     max_positions=positions, mlp_width=mlp, projection_dim=proj)
        problem = config.problem()
        if problem:
            raise SdgenError(f"the text encoder weights describe {problem}")
        return config

    @classmethod
    def from_diffusers(cls, config: dict, where: str = "config.json") -> "OpenCLIPConfig":
        """A diffusers `text_encoder/config.json` or `text_encoder_2/config.json` (transformers' CLIPTextConfig);
        the projection exists when the saved class is CLIPTextModelWithProjection."""
        f = Fields(config, where)
        width = f.int("hidden_size", 1024, 1, _MAX_WIDTH)
        heads = f.int("num_attention_heads", 16, 1, width)
        if width % heads:
            raise f.error("num_attention_heads", f"{heads} heads do not divide hidden_size {width}")
        f.str("hidden_act", "gelu", choices=("gelu",))
        arch = config.get("architectures") or []
        projected = isinstance(arch, list) and any(isinstance(a, str) and a.endswith("WithProjection") for a in arch)
        out = cls(vocab_size=f.int("vocab_size", 49408, 1, _MAX_VOCAB), width=width,
                  layers=f.int("num_hidden_layers", 23, 1, _MAX_LAYERS), heads=heads,
                  max_positions=f.int("max_position_embeddings", 77, 1, _MAX_POSITIONS),
                  mlp_width=f.int("intermediate_size", 4 * width, 1, 4 * _MAX_WIDTH),
                  projection_dim=f.int("projection_dim", width, 1, _MAX_WIDTH) if projected else 0,
                  layer_norm_eps=f.float("layer_norm_eps", 1e-5, 0.0, 1.0, above=True))
        problem = out.problem()
        if problem:
            raise SdgenError(f"{where}: {problem}")
        return out

    def problem(self) -> str | None:
        bounds = [("vocab_size", self.vocab_size, _MAX_VOCAB), ("width", self.width, _MAX_WIDTH),
                  ("layers", self.layers, _MAX_LAYERS), ("heads", self.heads, _MAX_WIDTH),
                  ("max_positions", self.max_positions, _MAX_POSITIONS), ("mlp_width", self.mlp_width, 4 * _MAX_WIDTH)]
        for name, value, hi in bounds:
            if not 1 <= value <= hi:
                return f"{name}={value}, out of range (1 to {hi})"
        if self.width % self.heads:
            return f"width={self.width}, not a whole number of {self.heads} heads"
        if not 0 <= self.projection_dim <= _MAX_WIDTH:
            return f"projection_dim={self.projection_dim}, out of range"
        if not (math.isfinite(self.layer_norm_eps) and 0 < self.layer_norm_eps <= 1):
            return f"layer_norm_eps={self.layer_norm_eps}, not a small positive number"
        return None


_MAX_VOCAB, _MAX_WIDTH, _MAX_LAYERS, _MAX_POSITIONS = 2**20, 2**14, 256, 2**16

# transformers' CLIPTextModel names -> ours, per layer (weight and bias alike)
_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def diffusers_renames(config: OpenCLIPConfig) -> dict[str, str]:
    """transformers/diffusers key -> our key. Two of ours are not renames: q, k and v are separate there and one
    tensor here (`in_proj_weight#0/#1/#2`: the loader joins the parts along dim 0), and `text_projection` is
    stored transposed there (a Linear's (P, D) weight; `#T`: the loader transposes it)."""
    table = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for i in range(config.layers):
        theirs, ours = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            for a, b in _LAYER.items():
                table[f"{theirs}{a}.{part}"] = f"{ours}{b}.{part}"
            for n, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                table[f"{theirs}self_attn.{proj}.{part}"] = f"{ours}attn.in_proj_{part}#{n}"
    out = {}
    for k, v in table.items():  # transformers >= 5 saves without the `text_model.` level
        out["text_model." + k] = out[k] = v
    if config.projection_dim:
        out["text_projection.weight"] = "text_projection#T"
    return out


class Attention(nn.Module):
    def __init__(self, config: OpenCLIPConfig):
        super().__init__()
        d = config.width
        self.heads = config.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d))
        self.out_proj = Linear(d, d)

    def forward(self, x):  # (B, T, D) -> (B, T, D), causal
        b, t, d = x.shape
        qkv = F.linear(x, cast(self.in_proj_weight, x), cast(self.in_proj_bias, x))
        q, k, v = (p.view(b, t, self.heads, -1).transpose(1, 2) for p in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, config: OpenCLIPConfig):
        super().__init__()
        self.c_fc = Linear(config.width, config.mlp_width)
        self.c_proj = Linear(config.mlp_width, config.width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, config: OpenCLIPConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.ln_2 = LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: OpenCLIPConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))


class OpenCLIPTextModel(nn.Module):
    def __init__(self, config: OpenCLIPConfig, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype  # None: the parameters' dtype (see layers.py)
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.positional_embedding = nn.Parameter(torch.empty(config.max_positions, config.width))
        self.transformer = Transformer(config)
        self.ln_final = LayerNorm(config.width, eps=config.layer_norm_eps)
        if config.projection_dim:
            self.text_projection = nn.Parameter(torch.empty(config.width, config.projection_dim))

    def encode(self, ids: torch.LongTensor, clip_skip: int = 1, final_norm: bool = True, pooled: bool = False,
               extra: torch.Tensor | None = None):
        """(B, T) ids -> ((B, T, width) hidden states, (B, projection_dim) pooled or None).

        clip_skip=1: the last layer's output, 2: the penultimate's (A1111's convention), ...; final_norm applies
        ln_final to it (SD2 does, SDXL does not). pooled: ln_final of the LAST layer at the end-of-text token (the
        highest id: open_clip's argmax), through text_projection, whatever clip_skip says. extra: (N, width) token
        embeddings that ids vocab_size + i stand for (textual-inversion vectors; as in transformers, the argmax
        then finds such an id when the prompt has one)."""
        n = self.config.layers
        if not 1 <= clip_skip <= n:
            raise SdgenError(f"clip_skip must be between 1 and {n}, got {clip_skip}")
        if ids.shape[1] > self.config.max_positions:
            raise SdgenError(f"prompt has {ids.shape[1]} tokens, the text encoder takes at most "
                             f"{self.config.max_positions}")
        if pooled and not self.config.projection_dim:
            raise SdgenError("this text encoder has no projection: it gives no pooled output")
        dtype = self.compute_dtype or self.ln_final.weight.dtype
        vocab = self.config.vocab_size
        tokens = self.token_embedding(ids.clamp(max=vocab - 1))
        if extra is not None:
            added = ids >= vocab
            tokens[added] = extra.to(tokens)[ids[added] - vocab]
        x = (tokens + self.positional_embedding[: ids.shape[1]]).to(dtype)
        hidden = None
        for i, block in enumerate(self.transformer.resblocks[: n if pooled else n - (clip_skip - 1)]):
            x = block(x)
            if i == n - clip_skip:
                hidden = x
        if final_norm:
            hidden = self.ln_final(hidden)
        if not pooled:
            return hidden, None
        last = self.ln_final(x)[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        return hidden, last @ cast(self.text_projection, last)

    def forward(self, ids: torch.LongTensor, clip_skip: int = 1, extra: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, width): as CLIPTextModel.forward, the final LayerNorm applied (SD2's use)."""
        return self.encode(ids, clip_skip, extra=extra)[0]


def normalize_keys(keys) -> dict:
    """Original-file key -> our key, or None to ignore: `logit_scale` (the contrastive loss's temperature) and, for
    encoders whose pooled output no model reads, `text_projection` (see sd2.py)."""
    return {k: None if k in ("logit_scale", "attn_mask") else k for k in keys}
