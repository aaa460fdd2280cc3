"""The SD1/SD2/SDXL denoising UNet, laid out as CompVis `openaimodel.py` (SDXL: sgm's copy of it).

Every module path is the original checkpoint key after `model.diffusion_model.`, so an original checkpoint
loads with `load_state_dict(assign=True, strict=True)` and no converter. Diffusers folders are renamed once
by `diffusers_renames`.

Block layout (L = len(channel_mult), n = num_res_blocks):
  input_blocks.0            conv_in
  input_blocks.{1+l*(n+1)+r} [ResBlock, SpatialTransformer if l in attention_levels]   r < n
  input_blocks.{(l+1)*(n+1)} [Downsample]                                              l < L-1
  middle_block              ResBlock, SpatialTransformer, ResBlock
  output_blocks.{u*(n+1)+r} [ResBlock, SpatialTransformer?, Upsample if r == n and not last]  u = L-1-l
  out                       GroupNorm, SiLU, conv
  label_emb.0               Linear, SiLU, Linear: SDXL's added conditioning vector y (B, adm_in_channels) -> emb
"""

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import SdgenError
from ..formats import Fields, index_of, shape_of
from .layers import Conv2d, channels_last_, GroupNorm, LayerNorm, Linear, silu_, upsample_conv


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)  # levels (indices into channel_mult) that have cross attention
    context_dim: int = 768
    num_heads: int = 8
    norm_groups: int = 32
    transformer_depth: int | tuple = 1  # blocks per SpatialTransformer; a tuple: per level (SDXL), middle = last
    linear_proj: bool = False
    head_channels: int = 0  # > 0: heads = channels // head_channels (SD2 uses 64); 0: num_heads everywhere (SD1)
    adm_in_channels: int = 0  # > 0: label_emb takes a (B, adm_in_channels) vector y (SDXL: pooled text + time ids)

    def heads(self, channels):
        return channels // self.head_channels if self.head_channels > 0 else self.num_heads

    def depth(self, level: int | None) -> int:
        """Transformer blocks at `level` (None: the middle block)."""
        d = self.transformer_depth
        if isinstance(d, int):
            return d
        return d[-1] if level is None else d[level]

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple]) -> "UNetConfig":
        """Sizes off the tensor shapes (our key names); heads and groups are SD1 family constants."""
        shapes = {k: tuple(v) for k, v in shapes.items()}
        conv_in = shape_of(shapes, "input_blocks.0.0.weight", (4,), "UNet")
        out_channels = shape_of(shapes, "out.2.weight", (4,), "UNet")[0]
        mc = conv_in[0]
        blocks = {k: index_of(k.split(".")[1]) for k in shapes if k.startswith("input_blocks.")}
        downs = sorted(i for k, i in blocks.items() if i is not None and k.endswith(".0.op.weight"))
        n_levels = len(downs) + 1
        last = max((i for i in blocks.values() if i is not None), default=0)
        n = downs[0] - 1 if downs else last  # input_blocks.{n+1} is the first Downsample
        mult, attn = [], []
        for level in range(min(n_levels, _MAX_LEVELS + 1)):
            first = f"input_blocks.{1 + level * (n + 1)}"
            w = shapes.get(f"{first}.0.out_layers.3.weight")
            if w is None or len(w) != 4 or w[0] % mc:
                raise SdgenError(f"unexpected UNet layout at {first}")
            mult.append(w[0] // mc)
            if f"{first}.1.proj_in.weight" in shapes:
                attn.append(level)
        proj = shape_of(shapes, "middle_block.1.proj_in.weight", (2, 4), "UNet")
        to_k = shape_of(shapes, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", (2,), "UNet")

        def blocks_in(prefix):
            return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})

        depths = [blocks_in(f"input_blocks.{1 + level * (n + 1)}.1.transformer_blocks.") for level in range(len(mult))]
        adm = shape_of(shapes, "label_emb.0.0.weight", (2,), "UNet")[1] if "label_emb.0.0.weight" in shapes else 0
        config = cls(in_channels=conv_in[1], out_channels=out_channels, model_channels=mc, channel_mult=tuple(mult),
                     num_res_blocks=n, attention_levels=tuple(attn), context_dim=to_k[1],
                     transformer_depth=_depths(depths, attn, blocks_in("middle_block.1.transformer_blocks.")),
                     linear_proj=len(proj) == 2, adm_in_channels=adm)
        problem = config.problem()
        if problem:
            raise SdgenError(f"the UNet weights describe {problem}")
        return config

    @classmethod
    def from_diffusers(cls, config: dict, where: str = "config.json") -> "UNetConfig":
        """From a diffusers UNet2DConditionModel config.json; a value of the wrong type or range, or one this UNet
        cannot build, is one line naming `where` and the field."""
        f = Fields(config, where)
        for key in ("class_embed_type", "time_cond_proj_dim", "encoder_hid_dim"):
            if config.get(key) is not None:
                raise f.error(key, "is set: not an SD1/SD2/SDXL UNet (unsupported)")
        adm = 0
        if config.get("addition_embed_type") is not None:
            f.str("addition_embed_type", None, choices=("text_time",))  # SDXL's pooled text + time ids
            if f.int("addition_time_embed_dim", 256, 1, _MAX_CHANNELS) != TIME_ID_DIM:
                raise f.error("addition_time_embed_dim", f"must be {TIME_ID_DIM} (SDXL's; unsupported otherwise)")
            adm = f.int("projection_class_embeddings_input_dim", None, 1, _MAX_CHANNELS)
            if adm is None:
                raise f.error("projection_class_embeddings_input_dim", "is missing (needed with text_time)")
        boc = f.ints("block_out_channels", (320, 640, 1280, 1280), 1, _MAX_CHANNELS, max_len=_MAX_LEVELS)
        mc = boc[0]
        if any(c % mc for c in boc):
            raise f.error("block_out_channels", f"{list(boc)}: each must be a multiple of the first (unsupported)")
        down = f.strs("down_block_types", _DOWN_BLOCKS, max_len=_MAX_LEVELS)
        if len(down) != len(boc):
            raise f.error("down_block_types", f"has {len(down)} entries, block_out_channels {len(boc)}")
        attention_levels = tuple(i for i, t in enumerate(down) if "CrossAttn" in t)
        uniform = {}
        depths = f.ints("transformer_layers_per_block", 1, 1, _MAX_BLOCKS, max_len=_MAX_LEVELS, scalar=True)
        if len(depths) not in (1, len(boc)):
            raise f.error("transformer_layers_per_block", f"has {len(depths)} entries, block_out_channels {len(boc)}")
        if config.get("reverse_transformer_layers_per_block") is not None:
            raise f.error("reverse_transformer_layers_per_block", "is set (unsupported)")
        depths = depths * len(boc) if len(depths) == 1 else depths
        for key, default, hi in (("layers_per_block", 2, _MAX_BLOCKS), ("cross_attention_dim", 768, _MAX_CHANNELS)):
            values = f.ints(key, default, 1, hi, max_len=_MAX_LEVELS, scalar=True)
            if len(set(values)) != 1:
                raise f.error(key, f"{list(values)} differs between levels (unsupported)")
            uniform[key] = values[0]
        groups = f.int("norm_num_groups", 32, 1, _MAX_CHANNELS)
        if any(c % groups for c in boc):
            raise f.error("norm_num_groups", f"{groups} groups do not divide block_out_channels {list(boc)}")
        # Legacy naming: without num_attention_heads, diffusers reads attention_head_dim as the number of HEADS.
        heads_key = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
        heads = f.ints(heads_key, 8, 1, _MAX_CHANNELS, max_len=_MAX_LEVELS, scalar=True)
        num_heads, head_channels = 8, 0
        if len(set(heads)) == 1:
            num_heads = heads[0]
        elif len(heads) == len(boc) and len({c // h for c, h in zip(boc, heads)}) == 1 and \
                all(c % h == 0 for c, h in zip(boc, heads)):
            head_channels = boc[0] // heads[0]  # SD2: constant 64 channels per head
        else:
            raise f.error(heads_key, f"{list(heads)}: heads that vary this way are unsupported")
        for i, c in enumerate(boc):  # attention splits these widths in heads (the middle block attends at the last)
            h = c // head_channels if head_channels else num_heads
            if (i in attention_levels or i == len(boc) - 1) and (h < 1 or c % h):
                raise f.error(heads_key, f"{h} heads do not divide the {c} channels of level {i}")
        sample = config.get("sample_size")
        if sample is not None:  # families read it for the native size: an integer or [height, width]
            sizes = f.ints("sample_size", None, 1, 2**16, max_len=2, scalar=True)
            if type(sample) is not int and len(sizes) != 2:
                raise f.error("sample_size", f"{list(sizes)} is neither a size nor [height, width]")
        out = cls(in_channels=f.int("in_channels", 4, 1, _MAX_CHANNELS),
                  out_channels=f.int("out_channels", 4, 1, _MAX_CHANNELS),
                  model_channels=mc, channel_mult=tuple(c // mc for c in boc),
                  num_res_blocks=uniform["layers_per_block"], attention_levels=attention_levels,
                  context_dim=uniform["cross_attention_dim"], num_heads=num_heads, norm_groups=groups,
                  transformer_depth=_depths(depths, attention_levels, depths[-1]),
                  linear_proj=f.bool("use_linear_projection", False), head_channels=head_channels,
                  adm_in_channels=adm)
        problem = out.problem()
        if problem:
            raise SdgenError(f"{where}: {problem}")
        return out

    def problem(self) -> str | None:
        """What makes these sizes unbuildable or absurd (a lying file or config), or None: every width a whole
        number of norm groups and of attention heads, counts within what any real UNet uses."""
        widths = [self.model_channels * m for m in self.channel_mult]
        bounds = [("in_channels", self.in_channels, _MAX_CHANNELS), ("out_channels", self.out_channels, _MAX_CHANNELS),
                  ("model_channels", self.model_channels, _MAX_CHANNELS), ("levels", len(widths), _MAX_LEVELS),
                  ("num_res_blocks", self.num_res_blocks, _MAX_BLOCKS),
                  *((f"transformer depth at level {i}", self.depth(i), _MAX_BLOCKS) for i in self.attention_levels),
                  ("transformer depth in the middle", self.depth(None), _MAX_BLOCKS),
                  ("adm_in_channels", self.adm_in_channels or 1, _MAX_CHANNELS),
                  ("context_dim", self.context_dim, _MAX_CHANNELS), ("num_heads", self.num_heads, _MAX_CHANNELS),
                  ("norm_groups", self.norm_groups, _MAX_CHANNELS),
                  *((f"channels of level {i}", c, _MAX_CHANNELS) for i, c in enumerate(widths))]
        for name, value, hi in bounds:
            if not 1 <= value <= hi:
                return f"{name}={value}, out of range (1 to {hi})"
        if any(not 0 <= level < len(widths) for level in self.attention_levels):
            return f"attention at levels {self.attention_levels} of {len(widths)}"
        if not isinstance(self.transformer_depth, int) and len(self.transformer_depth) != len(widths):
            return f"transformer depths {self.transformer_depth} for {len(widths)} levels"
        for i, c in enumerate(widths):
            if c % self.norm_groups:
                return f"{c} channels at level {i}, not a multiple of {self.norm_groups} norm groups"
            attends = i in self.attention_levels or i == len(widths) - 1  # the middle block attends at the last
            if attends and (self.head_channels < 0 or c % (self.head_channels or self.num_heads)
                            or self.heads(c) < 1):
                return f"{c} channels at level {i}, not a whole number of attention heads"
        return None


_MAX_CHANNELS = 2**14  # the widest real UNet: 1280 channels (SD1/SD2/SDXL), 2048-wide text
_MAX_LEVELS = 8        # real: 3 or 4
_MAX_BLOCKS = 64       # res blocks per level (real: 2) and transformer depth (SDXL: 10)
_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # diffusers' default
TIME_ID_DIM = 256      # SDXL embeds each time id (sizes, crop, aesthetic score) in 256 Fourier features


def _depths(depths, attention_levels, middle) -> int | tuple:
    """One int when every transformer (each attention level and the middle) has the same depth, as in SD1/SD2 and
    the SDXL refiner; else a tuple per level, 0 where a level has no attention (SDXL base: (0, 2, 10))."""
    used = {depths[i] for i in attention_levels} | {middle}
    if len(used) == 1:
        return middle
    out = tuple(depths[i] if i in attention_levels else 0 for i in range(len(depths)))
    if out[-1] != middle:
        raise SdgenError(f"a middle transformer depth {middle} other than the last level's {out[-1]} is unsupported")
    return out


# ---------------------------------------------------------------------------------------------- layers


def timestep_embedding(t, dim, max_period=10000):
    """(B,) float -> (B, dim) fp32: [cos, sin] of t * max_period^(-i/half), as diffusers with
    flip_sin_to_cos=True, downscale_freq_shift=0 (and CompVis `timestep_embedding`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, groups):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm(groups, cin), nn.SiLU(), Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(GroupNorm(groups, cout), nn.SiLU(), nn.Identity(),  # .2 is dropout
                                        Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):  # (B, cin, h, w), (B, emb_dim) -> (B, cout, h, w)
        # the Sequentials only carry the checkpoint names; run by hand to act in place on fresh buffers
        h = self.in_layers[2](silu_(self.in_layers[0](x)))
        h = h.add_(self.emb_layers[1](F.silu(emb))[:, :, None, None])
        h = self.out_layers[3](silu_(self.out_layers[0](h)))
        return h.add_(self.skip_connection(x))  # conv backward does not need its output: add in place


class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim, dim, bias=False)
        self.to_v = Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(Linear(dim, dim))

    def forward(self, x, context=None):  # (B, N, dim), (B, M, context_dim) -> (B, N, dim)
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(x)  # into the fresh gelu output: one (N, inner) buffer less


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), Linear(4 * dim, dim))  # .1 is dropout

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)

    def forward(self, x, context):
        # residuals added into the fresh output of each branch's last Linear (its backward does not need it)
        x = self.attn1(self.norm1(x)).add_(x)
        x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    def __init__(self, ch, config: UNetConfig, depth: int):
        super().__init__()
        self.linear = config.linear_proj  # SD2 projects with Linear, SD1 with 1x1 convs: same maths
        proj = (lambda: Linear(ch, ch)) if self.linear else (lambda: Conv2d(ch, ch, 1))
        self.norm = GroupNorm(config.norm_groups, ch, eps=1e-6)
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(ch, config.context_dim, config.heads(ch)) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x, context):  # (B, C, h, w), (B, M, ctx) -> (B, C, h, w)
        b, c, h, w = x.shape
        t = self.norm(x)
        if not self.linear:
            t = self.proj_in(t)
        t = t.flatten(2).transpose(1, 2)  # (B, h*w, C); a free view when x is channels_last
        if self.linear:
            t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context)
        if self.linear:
            t = self.proj_out(t)
        t = t.transpose(1, 2).reshape(b, c, h, w)  # a channels_last view of the contiguous (B, h*w, C)
        if not self.linear:
            t = self.proj_out(t)
        return t.add_(x)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        # size: the next skip's (h, w), which differs from 2x when a latent side is not a multiple of 2^levels
        return upsample_conv(x, self.conv, size)


class TimestepBlock(nn.Sequential):
    """A sequence of layers, each given what it needs: ResBlocks the time embedding, transformers the context."""

    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------- model


class UNet(nn.Module):
    def __init__(self, config: UNetConfig, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = c = config
        mc, g, emb_dim = c.model_channels, c.norm_groups, 4 * c.model_channels
        self.compute_dtype = compute_dtype  # None: the parameters' dtype (see layers.py)
        self.time_embed = nn.Sequential(Linear(mc, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
        if c.adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(Linear(c.adm_in_channels, emb_dim), nn.SiLU(),
                                                         Linear(emb_dim, emb_dim)))

        self.input_blocks = nn.ModuleList([TimestepBlock(Conv2d(c.in_channels, mc, 3, padding=1))])
        skips, ch = [mc], mc  # channels of every skip, in the order the input blocks produce them
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(ch, mult * mc, emb_dim, g)]
                ch = mult * mc
                if level in c.attention_levels:
                    layers.append(SpatialTransformer(ch, c, c.depth(level)))
                self.input_blocks.append(TimestepBlock(*layers))
                skips.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(TimestepBlock(Downsample(ch)))
                skips.append(ch)

        self.middle_block = TimestepBlock(ResBlock(ch, ch, emb_dim, g), SpatialTransformer(ch, c, c.depth(None)),
                                          ResBlock(ch, ch, emb_dim, g))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for r in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mult * mc, emb_dim, g)]
                ch = mult * mc
                if level in c.attention_levels:
                    layers.append(SpatialTransformer(ch, c, c.depth(level)))
                if level and r == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepBlock(*layers))

        self.out = nn.Sequential(GroupNorm(g, ch), nn.SiLU(), Conv2d(ch, c.out_channels, 3, padding=1))
        channels_last_(self)  # it runs on channels_last activations (see forward)

    def forward(self, x, timesteps, context, y=None):
        """(B, in, h, w), scalar or (B,) timesteps, (B, M, context_dim), SDXL's (B, adm_in_channels) added
        conditioning -> (B, out, h, w) in x's dtype."""
        dtype = self.compute_dtype or self.out[2].weight.dtype
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))
        if (y is None) != (not self.config.adm_in_channels):
            raise SdgenError("this UNet takes an added conditioning vector y" if y is None else
                             "this UNet takes no added conditioning vector y")
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        # channels_last: oneDNN convolutions run without reordering activations, and the transformers'
        # (B, C, h, w) <-> (B, h*w, C) transposes become free views
        h = x.to(dtype).contiguous(memory_format=torch.channels_last)
        context = context.to(dtype)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context, hs[-1].shape[-2:] if hs else None)
        h = self.out[2](silu_(self.out[0](h)))
        return h.to(x.dtype).contiguous()


# ---------------------------------------------------------------------------------------------- diffusers names

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def diffusers_renames(config: UNetConfig) -> dict[str, str]:
    """Every diffusers UNet2DConditionModel key -> our key.

    Module prefixes are mapped by loops over levels and blocks; the keys themselves come from our model built
    on the meta device, so the table is exact (transformer internals share their names in both layouts)."""
    n, levels = config.num_res_blocks + 1, len(config.channel_mult)
    prefixes = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
                "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
                "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
                "middle_block.2": "mid_block.resnets.1"}
    for level in range(levels):
        att = level in config.attention_levels
        for r in range(n - 1):
            prefixes[f"input_blocks.{1 + level * n + r}.0"] = f"down_blocks.{level}.resnets.{r}"
            prefixes[f"input_blocks.{1 + level * n + r}.1"] = f"down_blocks.{level}.attentions.{r}"
        prefixes[f"input_blocks.{(level + 1) * n}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
        u = levels - 1 - level  # diffusers numbers up blocks from the bottom
        for r in range(n):
            prefixes[f"output_blocks.{u * n + r}.0"] = f"up_blocks.{u}.resnets.{r}"
            prefixes[f"output_blocks.{u * n + r}.1"] = f"up_blocks.{u}.attentions.{r}"
        prefixes[f"output_blocks.{u * n + n - 1}.{2 if att else 1}.conv"] = f"up_blocks.{u}.upsamplers.0.conv"

    with torch.device("meta"):
        keys = list(UNet(config).state_dict())
    table = {}
    for key in keys:
        parts = key.split(".")
        # longest mapped prefix: "output_blocks.2.1.conv" (an Upsample) before "output_blocks.2.1" (attention)
        cut = next(i for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in prefixes)
        head, rest = prefixes[".".join(parts[:cut])], ".".join(parts[cut:])
        for ours, theirs in _RESNET.items():
            if rest.startswith(ours + "."):
                rest = theirs + rest[len(ours):]
        table[f"{head}.{rest}"] = key
    return table
