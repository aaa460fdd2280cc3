"""The SD1 VAE (AutoencoderKL): images <-> latents.

Attribute paths are the original CompVis keys (after `first_stage_model.`), so an original checkpoint loads
as is; a diffusers `vae/` folder is renamed once by `diffusers_renames`. Mid-block attention weights come
either as 1x1 convs (C, C, 1, 1) or linear-shaped (C, C); `fix_shapes` makes them convs.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import SdgenError
from ..formats import Fields, shape_of
from .layers import Conv2d, GroupNorm, add_conv1x1_, norm_silu_conv, tiled, upsample_conv

SD1_NORM_GROUPS = 32
SD1_SCALING_FACTOR = 0.18215
_ATTN_DIFFUSERS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                   # names written by diffusers < 0.14, still found in some vae/ folders
                   "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_ATTN_PROJ = ("q", "k", "v", "proj_out")


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    norm_groups: int = 32
    scaling_factor: float = 0.18215

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple]) -> "VAEConfig":
        """Sizes from tensor shapes under our (original) key names, without the `first_stage_model.` prefix."""
        conv_in = shape_of(shapes, "encoder.conv_in.weight", (4,), "VAE")  # (ch, in, 3, 3)
        ch = conv_in[0]
        levels = 0
        while f"encoder.down.{levels}.block.0.conv1.weight" in shapes:
            levels += 1
        blocks = 0
        while f"encoder.down.0.block.{blocks}.conv1.weight" in shapes:
            blocks += 1
        widths = [shape_of(shapes, f"encoder.down.{i}.block.0.conv2.weight", (4,), "VAE")[0] for i in range(levels)]
        if any(w % ch for w in widths):
            raise SdgenError(f"the VAE weights describe widths {widths}, not multiples of the first conv's {ch}")
        config = cls(in_channels=conv_in[1], out_channels=shape_of(shapes, "decoder.conv_out.weight", (4,), "VAE")[0],
                     latent_channels=shape_of(shapes, "decoder.conv_in.weight", (4,), "VAE")[1], ch=ch,
                     ch_mult=tuple(w // ch for w in widths), num_res_blocks=blocks, norm_groups=SD1_NORM_GROUPS,
                     scaling_factor=SD1_SCALING_FACTOR)
        problem = config.problem()
        if problem:
            raise SdgenError(f"the VAE weights describe {problem}")
        return config

    @classmethod
    def from_diffusers(cls, config: dict, where: str = "config.json") -> "VAEConfig":
        """From a diffusers `vae/config.json` (AutoencoderKL); a value of the wrong type or range, or one this VAE
        cannot build, is one line naming `where` and the field."""
        f = Fields(config, where)
        widths = f.ints("block_out_channels", (64,), 1, _MAX_CHANNELS, max_len=_MAX_LEVELS)
        ch = widths[0]
        if any(w % ch for w in widths):
            raise f.error("block_out_channels", f"{list(widths)} are not multiples of the first one")
        for key in ("use_quant_conv", "use_post_quant_conv"):
            if not f.bool(key, True):
                raise f.error(key, "false: a VAE without quant_conv/post_quant_conv is not an SD1 VAE")
        if not f.bool("mid_block_add_attention", True):
            raise f.error("mid_block_add_attention", "false: a VAE without mid-block attention is not an SD1 VAE")
        groups = f.int("norm_num_groups", 32, 1, _MAX_CHANNELS)
        if any(w % groups for w in widths):
            raise f.error("norm_num_groups", f"{groups} groups do not divide block_out_channels {list(widths)}")
        out = cls(in_channels=f.int("in_channels", 3, 1, _MAX_CHANNELS),
                  out_channels=f.int("out_channels", 3, 1, _MAX_CHANNELS),
                  latent_channels=f.int("latent_channels", 4, 1, _MAX_CHANNELS), ch=ch,
                  ch_mult=tuple(w // ch for w in widths), num_res_blocks=f.int("layers_per_block", 1, 1, _MAX_BLOCKS),
                  norm_groups=groups,
                  # latents are multiplied by it and divided by it: zero, NaN or infinite would poison every image
                  scaling_factor=f.float("scaling_factor", SD1_SCALING_FACTOR, 0.0, 100.0, above=True))
        problem = out.problem()
        if problem:
            raise SdgenError(f"{where}: {problem}")
        return out

    def problem(self) -> str | None:
        """What makes these sizes unbuildable or absurd (a lying file or config), or None."""
        widths = [self.ch * m for m in self.ch_mult]
        bounds = [("in_channels", self.in_channels, _MAX_CHANNELS), ("out_channels", self.out_channels, _MAX_CHANNELS),
                  ("latent_channels", self.latent_channels, _MAX_CHANNELS), ("ch", self.ch, _MAX_CHANNELS),
                  ("levels", len(widths), _MAX_LEVELS), ("num_res_blocks", self.num_res_blocks, _MAX_BLOCKS),
                  ("norm_groups", self.norm_groups, _MAX_CHANNELS),
                  *((f"channels of level {i}", c, _MAX_CHANNELS) for i, c in enumerate(widths))]
        for name, value, hi in bounds:
            if not 1 <= value <= hi:
                return f"{name}={value}, out of range (1 to {hi})"
        bad = next((c for c in widths if c % self.norm_groups), None)
        if bad is not None:
            return f"{bad} channels, not a multiple of {self.norm_groups} norm groups"
        if not (math.isfinite(self.scaling_factor) and 0 < self.scaling_factor <= 100):
            return f"scaling_factor={self.scaling_factor}, not a positive finite number"
        return None


_MAX_CHANNELS = 2**14  # real VAEs: 512 channels at most
_MAX_LEVELS = 8        # real: 4
_MAX_BLOCKS = 64       # real: 2

# Tiled decode/encode (layers.tiled): context around each tile, in latent pixels (decoder) and image pixels (encoder),
# and the band over which neighbouring tiles are cross-faded. Measured on the SD1.5-size VAE (tests/test_tiling.py,
# README): larger halos shrink the difference to the untiled result, at (1 + 2*halo/tile)^2 times the arithmetic.
DECODE_HALO = 8
ENCODE_HALO = 64
SHARED_NORMS = True   # tiles share the whole image's group-norm statistics (layers.NormStats): 2x the work, no shifts
DECODE_PEAK = 4.0   # peak activation bytes / (full-resolution pixels x widest top-level channels x itemsize)
ENCODE_PEAK = 4.0


def diffusers_renames(config: VAEConfig) -> dict[str, str]:
    """Every diffusers AutoencoderKL key -> our key."""
    prefixes = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    n = len(config.ch_mult)
    widths = [config.ch * m for m in config.ch_mult]

    def resnet(src, dst, cin, cout):
        for part in ("norm1", "conv1", "norm2", "conv2"):
            prefixes[f"{src}.{part}"] = f"{dst}.{part}"
        if cin != cout:
            prefixes[f"{src}.conv_shortcut"] = f"{dst}.nin_shortcut"

    for side in ("encoder", "decoder"):
        prefixes[f"{side}.conv_in"] = f"{side}.conv_in"
        prefixes[f"{side}.conv_norm_out"] = f"{side}.norm_out"
        prefixes[f"{side}.conv_out"] = f"{side}.conv_out"
        for j in range(2):
            resnet(f"{side}.mid_block.resnets.{j}", f"{side}.mid.block_{j + 1}", widths[-1], widths[-1])
        for src, dst in _ATTN_DIFFUSERS.items():
            prefixes[f"{side}.mid_block.attentions.0.{src}"] = f"{side}.mid.attn_1.{dst}"

    cin = config.ch
    for i in range(n):
        for j in range(config.num_res_blocks):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", cin, widths[i])
            cin = widths[i]
        if i != n - 1:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"

    # diffusers runs up_blocks 0..n-1 from the latent side; the original indexes `up` by resolution level
    cin = widths[-1]
    for k in range(n):
        level = n - 1 - k
        for j in range(config.num_res_blocks + 1):
            resnet(f"decoder.up_blocks.{k}.resnets.{j}", f"decoder.up.{level}.block.{j}", cin, widths[level])
            cin = widths[level]
        if level != 0:
            prefixes[f"decoder.up_blocks.{k}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"

    return {f"{src}.{p}": f"{dst}.{p}" for src, dst in prefixes.items() for p in ("weight", "bias")}


def fix_shapes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Mid-block attention projections stored linear-shaped (C, C) or conv1d-shaped (C, C, 1) -> (C, C, 1, 1)."""
    out = dict(state)
    for key, t in state.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3] == "attn_1" and parts[-2] in _ATTN_PROJ and parts[-1] == "weight" and t.ndim < 4:
            out[key] = t.reshape(*t.shape, *(1,) * (4 - t.ndim))
    return out


def _norm(channels, groups):
    return GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = Conv2d(cin, cout, 1)

    def forward(self, x):
        h = norm_silu_conv(x, self.norm1, self.conv1)
        h = norm_silu_conv(h, self.norm2, self.conv2, inplace=True)  # h is ours: no third full-size tensor
        # in place into the fresh conv output (conv backward does not need it): saves a full-size buffer
        return add_conv1x1_(h, self.nin_shortcut, x) if hasattr(self, "nin_shortcut") else h.add_(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):  # (B, C, H, W)
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, 1, HW, C), made contiguous: PyTorch's fused (flash) CPU kernel needs the channel dim dense and otherwise
        # falls back to building the HW x HW scores: 64 MB more at 512x512, 16 GB at 2048x2048
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(-1, -2).contiguous() for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj_out(y.transpose(-1, -2).reshape(b, c, h, w)).add_(x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # the original pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return upsample_conv(x, self.conv)


def _mid(channels, groups):
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups)
    return mid


def _run_mid(mid, x):
    return mid.block_2(mid.attn_1(mid.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        g, widths = config.norm_groups, [config.ch * m for m in config.ch_mult]
        self.conv_in = Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = config.ch
        for i, width in enumerate(widths):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                level.block.append(ResnetBlock(cin, width, g))
                cin = width
            if i != len(widths) - 1:
                level.downsample = Downsample(width)
            self.down.append(level)
        self.mid = _mid(cin, g)
        self.norm_out = _norm(cin, g)
        self.conv_out = Conv2d(cin, 2 * config.latent_channels, 3, padding=1)

    def forward(self, x, tile: int | None = None):  # (B, in, H, W) -> (B, 2*latent, H/2^(L-1), W/2^(L-1))
        """tile: run the full-resolution levels in overlapping tiles of about `tile` pixels (layers.tiled); the
        mid block (attention over all positions) always sees the whole image."""
        if tile is None:
            h = self._down(x)
        else:
            h = tiled(self._down, x, tile, ENCODE_HALO, down=2 ** (len(self.down) - 1), shared_norms=SHARED_NORMS).to(x.dtype)
        h = _run_mid(self.mid, h)
        return norm_silu_conv(h, self.norm_out, self.conv_out)

    def _down(self, x):  # (B, in, H, W) -> (B, C, H/2^(L-1), W/2^(L-1)): everything before the mid block
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return h


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        g, widths = config.norm_groups, [config.ch * m for m in config.ch_mult]
        cin = widths[-1]
        self.conv_in = Conv2d(config.latent_channels, cin, 3, padding=1)
        self.mid = _mid(cin, g)
        levels = []
        for i in reversed(range(len(widths))):  # built from the latent side, indexed by resolution level
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, widths[i], g))
                cin = widths[i]
            if i != 0:
                level.upsample = Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin, g)
        self.conv_out = Conv2d(cin, config.out_channels, 3, padding=1)

    def forward(self, z, tile: int | None = None):  # (B, latent, h, w) -> (B, out, h*2^(L-1), w*2^(L-1))
        """tile: run the levels above the mid block in overlapping tiles of about `tile` latent pixels (layers.tiled,
        output in fp32); the mid block's attention always sees the whole latent, which is small."""
        h = _run_mid(self.mid, self.conv_in(z))
        if tile is None:
            return self._up(h)
        return tiled(self._up, h, tile, DECODE_HALO, up=2 ** (len(self.up) - 1), shared_norms=SHARED_NORMS)

    def _up(self, h):  # (B, C, h, w) after the mid block -> (B, out, h*2^(L-1), w*2^(L-1))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return norm_silu_conv(h, self.norm_out, self.conv_out)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        z = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = Conv2d(z, z, 1)

        self.compute_dtype = compute_dtype  # None: the parameters' dtype (see layers.py)

    def _place(self, x, scale=1.0) -> Tensor:
        """x on the weights' device, divided by `scale` in at least fp32, then in the compute dtype. Kept NCHW, unlike
        the UNet: PyTorch's channels_last CPU GroupNorm sums x and x^2 in fp32, 1e-4 off at 512x512 (NCHW: 1e-7),
        and is 2x slower there, which eats the convolutions' gain."""
        p = self.post_quant_conv.weight
        dtype = self.compute_dtype or p.dtype
        if scale != 1.0:
            wide = torch.promote_types(torch.promote_types(x.dtype, dtype), torch.float32)
            x = x.to(p.device, wide) / scale
        return x.to(p.device, dtype)

    def encode_moments(self, images, tile: int | None = None) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, 4, H/8, W/8), unscaled. tile: pixels, see
        Encoder.forward."""
        moments = self.quant_conv(self.encoder(self._place(images), tile))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images, tile: int | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> posterior mean * scaling_factor, (B, 4, H/8, W/8), as samplers expect."""
        return self.encode_moments(images, tile)[0] * self.config.scaling_factor

    def decode(self, latents, tile: int | None = None) -> Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1], not clamped; in the compute dtype
        (fp32 when tiled). tile: latent pixels, see Decoder.forward."""
        z = self._place(latents, self.config.scaling_factor)
        return self.decoder(self.post_quant_conv(z), tile)

    # ---- memory: what a decode/encode of one image needs, and the tile that keeps it under a budget ----------
    def decode_bytes(self, h: int, w: int, tile: int | None = None) -> int:
        """Peak bytes of activations decoding one (1, 4, h, w) latent (tile: one tile's, halo included). The top
        levels dominate: the upsampled second level and the first level's blocks at full resolution, about
        DECODE_PEAK of the wider one's size (measured: tests/test_memory.py)."""
        if tile is not None:
            h, w = min(h, tile + 2 * DECODE_HALO), min(w, tile + 2 * DECODE_HALO)
        f = 2 ** (len(self.config.ch_mult) - 1)
        widest = self.config.ch * max(self.config.ch_mult[:2])
        return int(DECODE_PEAK * (h * f) * (w * f) * widest * self._act_bytes())

    def encode_bytes(self, height: int, width: int, tile: int | None = None) -> int:
        """Peak bytes of activations encoding one (1, 3, height, width) image (tile: one tile's, halo included)."""
        if tile is not None:
            height, width = min(height, tile + 2 * ENCODE_HALO), min(width, tile + 2 * ENCODE_HALO)
        widest = self.config.ch * max(self.config.ch_mult[:2])
        return int(ENCODE_PEAK * height * width * widest * self._act_bytes())

    def decode_tile(self, h: int, w: int, budget: int) -> int | None:
        """None when decoding a (1, 4, h, w) latent fits `budget` bytes, else the largest tile (latent pixels) that
        does (at least 16: below that the halo costs more than the tile)."""
        if self.decode_bytes(h, w) <= budget:
            return None
        tile = max(h, w)
        while tile > 16 and self.decode_bytes(h, w, tile) > budget:
            tile -= 8
        return tile

    def encode_tile(self, height: int, width: int, budget: int) -> int | None:
        """The same for encoding a (1, 3, height, width) image; tiles in pixels (at least 128)."""
        if self.encode_bytes(height, width) <= budget:
            return None
        tile = max(height, width)
        while tile > 128 and self.encode_bytes(height, width, tile) > budget:
            tile -= 64
        return tile

    def _act_bytes(self) -> int:
        return (self.compute_dtype or self.post_quant_conv.weight.dtype).itemsize
