"""CLIP text transformer (the SD1 text encoder), named like the checkpoint.

Attribute paths are transformers' `CLIPTextModel` keys, which SD1 single files store under
`cond_stage_model.transformer.`: `text_model.embeddings.token_embedding.weight`,
`text_model.encoder.layers.{i}.self_attn.q_proj.weight`, `text_model.final_layer_norm.bias`, ...
Pre-LN blocks, causal self-attention, quick-GELU MLP, final LayerNorm.
"""

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import SdgenError
from .layers import LayerNorm, Linear


@dataclass(frozen=True)
class CLIPConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    layer_norm_eps: float = 1e-5
    act: str = "quick_gelu"

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple]) -> "CLIPConfig":
        """Sizes from the tensor shapes (keys as in this module). Heads are not in the shapes: the SD1 family
        constant (12, CLIP ViT-L/14) applies."""
        try:
            vocab_size, hidden = shapes["text_model.embeddings.token_embedding.weight"]
            max_positions = shapes["text_model.embeddings.position_embedding.weight"][0]
            intermediate = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
        except KeyError as e:
            raise SdgenError(f"text encoder weights lack {e.args[0]}") from None
        prefix = "text_model.encoder.layers."
        layers = {int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)}
        return cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_layers=len(layers),
                   num_heads=cls.num_heads, max_positions=max_positions)

    @classmethod
    def from_diffusers(cls, config: dict) -> "CLIPConfig":
        """A diffusers `text_encoder/config.json` (transformers' CLIPTextConfig)."""
        d = cls()
        return cls(
            vocab_size=config.get("vocab_size", d.vocab_size),
            hidden_size=config.get("hidden_size", d.hidden_size),
            intermediate_size=config.get("intermediate_size", d.intermediate_size),
            num_layers=config.get("num_hidden_layers", d.num_layers),
            num_heads=config.get("num_attention_heads", d.num_heads),
            max_positions=config.get("max_position_embeddings", d.max_positions),
            layer_norm_eps=config.get("layer_norm_eps", d.layer_norm_eps),
            act=config.get("hidden_act", d.act),
        )


def _keys(config: CLIPConfig):
    """Every parameter name of CLIPTextModel(config)."""
    keys = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    for i in range(config.num_layers):
        for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                    "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"text_model.encoder.layers.{i}.{sub}.weight", f"text_model.encoder.layers.{i}.{sub}.bias"]
    keys += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    return keys


def diffusers_renames(config: CLIPConfig) -> dict[str, str]:
    """diffusers/transformers text_encoder key -> our key. Our names are transformers', so this is the identity,
    except that transformers >= 5 saves the keys without the `text_model.` level. Older saves also carry the
    `position_ids` buffer: it is left out here, and normalize_keys() marks it as ignored."""
    renames = {}
    for key in _keys(config):
        renames[key] = key
        renames[key.removeprefix("text_model.")] = key
    return renames


def normalize_keys(keys) -> dict:
    """Original-file key (after `cond_stage_model.transformer.`) -> our key, or None for keys to ignore.
    Old checkpoints (transformers < 4.20 era) lack the `text_model.` level; `position_ids` is a buffer, not a weight."""
    out = {}
    for key in keys:
        ours = key if key.startswith("text_model.") else "text_model." + key
        out[key] = None if ours == "text_model.embeddings.position_ids" else ours
    return out


class Attention(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(d, d) for _ in range(4))

    def forward(self, x):  # (B, T, D) -> (B, T, D), causal
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        if config.act not in ("quick_gelu", "gelu"):
            raise SdgenError(f"unsupported text encoder activation {config.act!r}")
        self.quick = config.act == "quick_gelu"
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        x = self.fc1(x)
        # quick_gelu is what OpenAI's CLIP was trained with (SD1); exact gelu is OpenCLIP's (SD2).
        x = x * torch.sigmoid(1.702 * x) if self.quick else F.gelu(x)
        return self.fc2(x)


class EncoderLayer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden_size)

    def forward(self, ids):  # (B, T) -> (B, T, D)
        positions = torch.arange(ids.shape[1], device=ids.device)  # computed here: no buffer in the checkpoint
        return self.token_embedding(ids) + self.position_embedding(positions)


class Encoder(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))


class TextTransformer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPConfig, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.compute_dtype = compute_dtype  # None: the parameters' dtype (see layers.py)
        self.text_model = TextTransformer(config)

    def forward(self, ids: torch.LongTensor, clip_skip: int = 1) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden). clip_skip=1: the last layer's output; clip_skip=2 (A1111's
        convention): the penultimate layer's, and so on; the final LayerNorm is applied in every case."""
        tm = self.text_model
        n = len(tm.encoder.layers)
        if not 1 <= clip_skip <= n:
            raise SdgenError(f"clip_skip must be between 1 and {n}, got {clip_skip}")
        if ids.shape[1] > self.config.max_positions:
            raise SdgenError(f"prompt has {ids.shape[1]} tokens, the text encoder takes at most {self.config.max_positions}")
        x = tm.embeddings(ids).to(self.compute_dtype or tm.final_layer_norm.weight.dtype)
        for layer in tm.encoder.layers[: n - (clip_skip - 1)]:
            x = layer(x)
        return tm.final_layer_norm(x)
