"""CLIP text transformer (the SD1 text encoder), named like the checkpoint.

Attribute paths are transformers' `CLIPTextModel` keys, which SD1 single files store under
`cond_stage_model.transformer.`: `text_model.embeddings.token_embedding.weight`,
`text_model.encoder.layers.{i}.self_attn.q_proj.weight`, `text_model.final_layer_norm.bias`, ...
Pre-LN blocks, causal self-attention, quick-GELU MLP, final LayerNorm.
"""

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import SdgenError
from ..formats import Fields, index_of, shape_of
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
        vocab_size, hidden = shape_of(shapes, "text_model.embeddings.token_embedding.weight", (2,), "text encoder")
        max_positions = shape_of(shapes, "text_model.embeddings.position_embedding.weight", (2,), "text encoder")[0]
        intermediate = shape_of(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", (2,), "text encoder")[0]
        prefix = "text_model.encoder.layers."
        layers = {index_of(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)} - {None}
        config = cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_layers=len(layers),
                     num_heads=cls.num_heads, max_positions=max_positions)
        problem = config.problem()
        if problem:
            raise SdgenError(f"the text encoder weights describe {problem}")
        return config

    @classmethod
    def from_diffusers(cls, config: dict, where: str = "config.json") -> "CLIPConfig":
        """A diffusers `text_encoder/config.json` (transformers' CLIPTextConfig); a value of the wrong type or range,
        or one this encoder cannot build, is one line naming `where` and the field."""
        f, d = Fields(config, where), cls()
        hidden = f.int("hidden_size", d.hidden_size, 1, _MAX_WIDTH)
        heads = f.int("num_attention_heads", d.num_heads, 1, hidden)
        if hidden % heads:
            raise f.error("num_attention_heads", f"{heads} heads do not divide hidden_size {hidden}")
        out = cls(
            vocab_size=f.int("vocab_size", d.vocab_size, 1, _MAX_VOCAB),
            hidden_size=hidden,
            intermediate_size=f.int("intermediate_size", d.intermediate_size, 1, 4 * _MAX_WIDTH),
            num_layers=f.int("num_hidden_layers", d.num_layers, 1, _MAX_LAYERS),
            num_heads=heads,
            max_positions=f.int("max_position_embeddings", d.max_positions, 1, _MAX_POSITIONS),
            layer_norm_eps=f.float("layer_norm_eps", d.layer_norm_eps, 0.0, 1.0, above=True),
            act=f.str("hidden_act", d.act, choices=_ACTS),
        )
        problem = out.problem()
        if problem:
            raise SdgenError(f"{where}: {problem}")
        return out

    def problem(self) -> str | None:
        """What makes these sizes unbuildable or absurd (a lying file or config), or None."""
        bounds = [("vocab_size", self.vocab_size, _MAX_VOCAB), ("hidden_size", self.hidden_size, _MAX_WIDTH),
                  ("intermediate_size", self.intermediate_size, 4 * _MAX_WIDTH),
                  ("num_layers", self.num_layers, _MAX_LAYERS), ("num_heads", self.num_heads, _MAX_WIDTH),
                  ("max_positions", self.max_positions, _MAX_POSITIONS)]
        for name, value, hi in bounds:
            if not 1 <= value <= hi:
                return f"{name}={value}, out of range (1 to {hi})"
        if self.hidden_size % self.num_heads:
            return f"hidden_size={self.hidden_size}, not a whole number of {self.num_heads} heads"
        if not (math.isfinite(self.layer_norm_eps) and 0 < self.layer_norm_eps <= 1):
            return f"layer_norm_eps={self.layer_norm_eps}, not a small positive number"
        if self.act not in _ACTS:
            return f"activation {self.act!r}, not one of {', '.join(_ACTS)}"
        return None


_MAX_VOCAB = 2**20      # CLIP: 49408
_MAX_WIDTH = 2**14      # CLIP ViT-L: 768, OpenCLIP ViT-bigG: 1280
_MAX_LAYERS = 256       # real: 12 to 32
_MAX_POSITIONS = 2**16  # real: 77
_ACTS = ("quick_gelu", "gelu")


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

    def forward(self, ids, extra=None):  # (B, T) -> (B, T, D)
        positions = torch.arange(ids.shape[1], device=ids.device)  # computed here: no buffer in the checkpoint
        if extra is None:
            return self.token_embedding(ids) + self.position_embedding(positions)
        # textual inversion: ids >= vocab_size are rows of `extra` (N, D), as if appended to the table
        vocab = self.token_embedding.num_embeddings
        tokens = self.token_embedding(ids.clamp(max=vocab - 1))
        added = ids >= vocab
        tokens[added] = extra.to(tokens)[ids[added] - vocab]
        return tokens + self.position_embedding(positions)


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

    def forward(self, ids: torch.LongTensor, clip_skip: int = 1, final_norm: bool = True,
                extra: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, hidden). clip_skip=1: the last layer's output; clip_skip=2 (A1111's
        convention): the penultimate layer's, and so on; the final LayerNorm is applied unless final_norm=False
        (SDXL reads the penultimate hidden state as it is). extra: (N, D) token embeddings that ids vocab_size + i
        stand for (textual-inversion vectors)."""
        tm = self.text_model
        n = len(tm.encoder.layers)
        if not 1 <= clip_skip <= n:
            raise SdgenError(f"clip_skip must be between 1 and {n}, got {clip_skip}")
        if ids.shape[1] > self.config.max_positions:
            raise SdgenError(f"prompt has {ids.shape[1]} tokens, the text encoder takes at most {self.config.max_positions}")
        x = tm.embeddings(ids, extra).to(self.compute_dtype or tm.final_layer_norm.weight.dtype)
        for layer in tm.encoder.layers[: n - (clip_skip - 1)]:
            x = layer(x)
        return tm.final_layer_norm(x) if final_norm else x
