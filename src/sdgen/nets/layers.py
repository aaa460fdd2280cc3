"""Layers shared by the networks: storage dtype apart from compute dtype.

Weights may be STORED in bf16/fp16 (half the memory) while the arithmetic runs in another dtype: on CPUs
without native bf16 (no AVX512_BF16/AMX) bf16 matrix products are emulated and 50-300x slower than fp32.
Each network casts its inputs once, on entry, to its `compute_dtype` (None: the parameters' dtype); these
layers then cast their weights to the dtype of what they are given. When the two agree the cast is a no-op;
when they differ only one layer's weight exists in the wider dtype at any time.

The classes subclass their torch counterparts, so parameter names (checkpoint keys), meta-device construction
and `load_state_dict(assign=True)` are unchanged.
"""

import torch
import torch.nn.functional as F
from torch import nn

CL = torch.channels_last
WIDE = torch.float32  # statistics (norms) are computed at least in this precision


def cast(p, x):
    """p in x's dtype; the very same tensor when it already is (or p is None)."""
    return p if p is None or p.dtype == x.dtype else p.to(x.dtype)


def silu_(x):
    """SiLU, in place when no graph is being recorded (the input is a fresh norm output we own)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class Linear(nn.Linear):
    def forward(self, x):
        return F.linear(x, cast(self.weight, x), cast(self.bias, x))


class Conv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, cast(self.weight, x), cast(self.bias, x))


def channels_last_(module: nn.Module) -> nn.Module:
    """Store every 4-D weight of `module` channels_last, once, when the network is built (any device, meta too).

    A network that runs on channels_last activations (the UNet) wants its conv weights in the same layout: oneDNN
    would otherwise reorder each weight at every call (~1 s per SD1.5 UNet call). Deciding it at construction,
    never while running, keeps results independent of what ran before in the process; the loader keeps each
    parameter's layout. Values and state-dict keys are unchanged."""
    for p in module.parameters():
        if p.ndim == 4:
            p.data = p.data.contiguous(memory_format=CL)
    return module


class GroupNorm(nn.GroupNorm):
    """Statistics in (at least) fp32 whatever the dtypes: fp16 variance overflows, bf16 sums lose too much."""

    def forward(self, x):
        xw = x.to(torch.promote_types(x.dtype, WIDE))
        if xw.device.type == "cpu" and xw.ndim == 4 and xw.is_contiguous(memory_format=CL) and not xw.is_contiguous():
            # PyTorch's channels_last CPU kernel takes the variance as E[x^2] - E[x]^2, which cancels badly when a
            # group's mean is large against its spread (1e-3 relative error at mean/std = 30, 512x512). Group norm
            # is invariant to a per-group constant shift: subtract an estimate of each group's mean (from <= ~4k
            # pixels) first. One cheap pass, versus two layout copies to use the NCHW kernel.
            b, c, h, w = xw.shape
            step = max(1, int((h * w / 4096) ** 0.5))
            shift = xw[:, :, ::step, ::step].mean((2, 3)).view(b, self.num_groups, -1).mean(-1, keepdim=True)
            xw = xw - shift.expand(b, self.num_groups, c // self.num_groups).reshape(b, c, 1, 1)
        return F.group_norm(xw, self.num_groups, cast(self.weight, xw), cast(self.bias, xw), self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    def forward(self, x):
        xw = x.to(torch.promote_types(x.dtype, WIDE))
        return F.layer_norm(xw, self.normalized_shape, cast(self.weight, xw), cast(self.bias, xw), self.eps).to(x.dtype)


def upsample_conv(x, conv: nn.Conv2d, size=None):
    """conv(nearest 2x upsampling of x) for a 3x3, stride 1, padding 1 conv: (B, I, h, w) -> (B, O, 2h, 2w).

    Each output phase (row parity a, column parity b) of that composition only ever sees a 2x2 window of x,
    with the 3x3 taps that land on the same input pixel summed. One 2x2 conv with 4*O outputs computes all
    four phases: 16 multiply-adds per output channel and input pixel instead of 36, and the 4x larger upsampled
    input is never built. Small inputs stay on the plain path: there the 4x larger weight costs more to
    reorder than the arithmetic saves. Same maths up to rounding (the summed taps)."""
    b, _, h, w = x.shape
    if (size is not None and tuple(size) != (2 * h, 2 * w)) or b * h * w < 2048:
        up = F.interpolate(x, size=size, mode="nearest") if size is not None else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return conv(up)
    k = cast(conv.weight, x)  # (O, I, 3, 3)
    o = k.shape[0]
    # rows: phase 0 reads input rows (i-1, i) with taps (0, 1+2); phase 1 reads (i, i+1) with taps (0+1, 2)
    k = torch.stack([torch.stack([k[:, :, 0], k[:, :, 1] + k[:, :, 2]], 2),
                     torch.stack([k[:, :, 0] + k[:, :, 1], k[:, :, 2]], 2)])  # (2, O, I, 2, 3)
    k = torch.stack([torch.stack([k[..., 0], k[..., 1] + k[..., 2]], -1),
                     torch.stack([k[..., 0] + k[..., 1], k[..., 2]], -1)], 1)  # (2, 2, O, I, 2, 2)
    layout = CL if x.is_contiguous(memory_format=CL) and not x.is_contiguous() else torch.contiguous_format
    k = k.reshape(4 * o, -1, 2, 2).contiguous(memory_format=layout)
    bias = cast(conv.bias, x)
    y = F.conv2d(x, k, None if bias is None else bias.repeat(4), padding=1)  # (B, 4*O, h+1, w+1)
    y = y.unflatten(1, (2, 2, o))
    out = torch.empty((b, o, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=layout)
    for a in (0, 1):
        for c in (0, 1):  # phase (a, c) of output pixel (i, j) is window (i + a, j + c) of the padded conv
            out[:, :, a::2, c::2] = y[:, a, c, :, a:a + h, c:c + w]
    return out


BAND_ELEMENTS = 1 << 24  # inputs larger than this (64 MB in fp32) go through norm_silu_conv in row bands


def norm_silu_conv(x, norm: nn.GroupNorm, conv: nn.Conv2d):
    """conv(silu(norm(x))) for a 3x3, stride 1, padding 1 conv, without building the full normalised tensor.

    At 512x512 the VAE decoder's top blocks hold 256-channel activations of 268 MB each; normalising in one go
    doubles that. Here the group statistics are taken in one pass over x (var_mean builds no temporary), then
    bands of rows are normalised, activated and convolved into the preallocated output, each band with the
    one-row halo the 3x3 kernel reads. Same maths as the plain path; small inputs take the plain path.
    (B, C, H, W) -> (B, O, H, W)."""
    if torch.is_grad_enabled() or x.numel() < BAND_ELEMENTS or x.ndim != 4 or x.is_contiguous(memory_format=CL) \
            and not x.is_contiguous():
        return conv(silu_(norm(x)))
    b, c, h, w = x.shape
    g = norm.num_groups
    var, mean = torch.var_mean(x.view(b, g, -1).to(torch.promote_types(x.dtype, WIDE)), dim=-1, correction=0)
    scale = torch.rsqrt(var + norm.eps)  # (B, G)
    per_channel = lambda t: t.repeat_interleave(c // g, dim=1)[:, :, None, None]  # (B, G) -> (B, C, 1, 1)
    gamma, beta = cast(norm.weight, scale)[None, :, None, None], cast(norm.bias, scale)[None, :, None, None]
    a = per_channel(scale) * gamma                 # y = x * a + d  is  (x - mean) * scale * gamma + beta
    d = beta - per_channel(mean) * a
    weight, bias = cast(conv.weight, x), cast(conv.bias, x)
    out = torch.empty((b, weight.shape[0], h, w), dtype=x.dtype, device=x.device)
    rows = max(1, BAND_ELEMENTS // (4 * c * w * b))
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        lo, hi = max(0, r0 - 1), min(h, r1 + 1)
        band = F.silu((x[:, :, lo:hi].to(a.dtype) * a).add_(d), inplace=True).to(x.dtype)
        # zero rows where the band touches the image border, as the conv's own padding would
        band = F.pad(band, (0, 0, 1 if r0 == 0 else 0, 1 if r1 == h else 0))
        out[:, :, r0:r1] = F.conv2d(band, weight, bias, padding=(0, 1))
    return out
