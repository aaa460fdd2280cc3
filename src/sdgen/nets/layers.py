"""Layers shared by the networks: storage dtype apart from compute dtype.

Weights may be STORED in bf16/fp16 (half the memory) while the arithmetic runs in another dtype: on CPUs
without native bf16 (no AVX512_BF16/AMX) bf16 matrix products are emulated and 50-300x slower than fp32.
Each network casts its inputs once, on entry, to its `compute_dtype` (None: the parameters' dtype); these
layers then cast their weights to the dtype of what they are given. When the two agree the cast is a no-op;
when they differ only one layer's weight exists in the wider dtype at any time.

The classes subclass their torch counterparts, so parameter names (checkpoint keys), meta-device construction
and `load_state_dict(assign=True)` are unchanged.
"""

import contextvars
import threading

import torch
import torch.nn.functional as F
from torch import nn

CL = torch.channels_last
WIDE = torch.float32  # statistics (norms) are computed at least in this precision


def cast(p, x):
    """p in x's dtype; the very same tensor when it already is (or p is None).

    A weight matrix cast for inference is written into a per-thread scratch buffer reused by every layer: a fresh
    allocation for each layer's wide weight made the kernel fault in new pages at every call (1.0 s of a 13.5 s
    SD1.5 UNet step on 2 cores; the copy into warm memory takes 0.1 s). The result is therefore only valid until
    the next weight cast: a caller casts one weight, uses it, and drops it (biases and norm vectors, 1-D, are
    allocated as before)."""
    if p is None or p.dtype == x.dtype:
        return p
    if p.ndim < 2 or p.numel() < _SCRATCH_MIN or torch.is_grad_enabled() or torch.compiler.is_compiling() \
            or not (p.is_contiguous() or p.is_contiguous(memory_format=CL)):
        return p.to(x.dtype)
    return _scratch(p.numel(), x.dtype, x.device).as_strided(p.shape, p.stride()).copy_(p)


_SCRATCH_MIN = 1 << 16  # elements; smaller casts come from the allocator's warm pool anyway
_SCRATCH = threading.local()


def release_scratch() -> None:
    """Drop this thread's cast buffers (the next weight cast makes a new one): between stages, so the VAE decode
    does not sit on the UNet's 52 MB."""
    _SCRATCH.__dict__.pop("buffers", None)


def _scratch(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's cast buffer for (dtype, device), grown to the largest weight seen (52 MB fp32 for SD1.5/SDXL)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (dtype, device)
    if key not in buffers or buffers[key].numel() < n:
        buffers.pop(key, None)  # the old one goes before the larger one is allocated
        buffers[key] = torch.empty(n, dtype=dtype, device=device)
    return buffers[key]


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
        shared = SHARED_NORMS.get()
        if shared is not None:  # a tile of a tiled run: the whole image's statistics (NormStats)
            a, d = _affine(self, *shared(x, self.num_groups), x.shape[1])
            return (x.to(a.dtype) * a).add_(d).to(x.dtype)
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
    bias = cast(conv.bias, x)
    out = torch.empty((b, o, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=layout)
    if b * h * w * o * 4 < BAND_ELEMENTS:  # small: one conv with 4*O outputs is fastest
        k = k.reshape(4 * o, -1, 2, 2).contiguous(memory_format=layout)
        y = F.conv2d(x, k, None if bias is None else bias.repeat(4), padding=1).unflatten(1, (2, 2, o))
        for a in (0, 1):  # (B, 2, 2, O, h+1, w+1): phase (a, c) of output pixel (i, j) is window (i + a, j + c)
            for c in (0, 1):
                out[:, :, a::2, c::2] = y[:, a, c, :, a:a + h, c:c + w]
        return out
    # large (the VAE's top levels): one phase and one band of rows at a time, each band padded on its own, so
    # besides x and the output only band-sized pieces exist (a whole phase and a padded copy of x were ~135 MB
    # more at the 512x512 VAE's top, fp32)
    rows = max(1, BAND_ELEMENTS // (BANDS * o * w * b))
    for a in (0, 1):
        for c in (0, 1):
            kac = k[a, c].contiguous(memory_format=layout)
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                # output row i of phase a reads input rows i + a - 1 and i + a (zeros outside the image)
                band = F.pad(x[:, :, max(0, r0 + a - 1):min(h, r1 + a)],
                             (1 - c, c, 1 if r0 + a == 0 else 0, 1 if r1 + a > h else 0))
                out[:, :, 2 * r0 + a:2 * r1:2, c::2] = F.conv2d(band, kac, bias)
    return out


BAND_ELEMENTS = 1 << 24  # inputs larger than this (64 MB in fp32) go through norm_silu_conv in row bands
BANDS = 16  # ... of about BAND_ELEMENTS / BANDS elements each (4 MB in fp32; against 16 MB bands a probe of the
#             512x512 fp32 decode peaked 0.03-0.09 GiB lower, in the same time)


def group_stats(x, groups: int):
    """(var, mean) of each (image, group) of (B, C, H, W) x, each (B, G), in at least fp32: a few groups at a time, so
    a bf16 activation is never copied whole into fp32 (at 512x512 that copy was 256 MB, a third of the decode's
    peak). var_mean in one pass per chunk, no other temporary."""
    b = x.shape[0]
    xg = x.reshape(b, groups, -1)
    wide = torch.promote_types(x.dtype, WIDE)
    if wide == x.dtype:
        return torch.var_mean(xg, dim=-1, correction=0)
    step = max(1, BAND_ELEMENTS // max(1, b * xg.shape[-1]))
    parts = [torch.var_mean(xg[:, i:i + step].to(wide), dim=-1, correction=0) for i in range(0, groups, step)]
    return torch.cat([v for v, _ in parts], 1), torch.cat([m for _, m in parts], 1)


def _affine(norm: nn.GroupNorm, var, mean, c: int):
    """Group norm as y = x * a + d per channel, from (B, G) statistics: a, d each (B, C, 1, 1)."""
    g = var.shape[1]
    scale = torch.rsqrt(var + norm.eps)  # (B, G)
    per_channel = lambda t: t.repeat_interleave(c // g, dim=1)[:, :, None, None]  # (B, G) -> (B, C, 1, 1)
    gamma, beta = cast(norm.weight, scale)[None, :, None, None], cast(norm.bias, scale)[None, :, None, None]
    a = per_channel(scale) * gamma                 # (x - mean) * scale * gamma + beta
    return a, beta - per_channel(mean) * a


class NormStats:
    """Group-norm statistics shared by the tiles of a tiled run, so that no tile is normalised differently (which
    shows as a colour or contrast shift between tiles). A first pass over all tiles records, for every norm call (in
    call order, the same in every tile), the sums of x and x^2 over each tile's core (its halo belongs to a
    neighbour); a second pass normalises every tile with the whole image's mean and variance. The first pass's
    own inputs were normalised per tile, so the statistics are close to, not exactly, the untiled ones."""

    def __init__(self):
        self.totals: list[list] = []   # per norm call: [sum (B, G), sum of squares (B, G), count], fp64
        self.frozen = False
        self.core = (0.0, 1.0, 0.0, 1.0)
        self.calls = 0

    def tile(self, core: tuple[float, float, float, float]):
        """A new tile; its core as fractions (top, bottom, left, right) of the tile's extent."""
        self.core, self.calls = core, 0

    def __call__(self, x, groups: int):  # -> (var, mean), each (B, G), to normalise x with
        i, self.calls = self.calls, self.calls + 1
        if self.frozen:
            s, ss, n = self.totals[i]
            mean = s / n
            wide = torch.promote_types(x.dtype, WIDE)
            return (ss / n - mean * mean).clamp_min(0).to(wide), mean.to(wide)
        h, w = x.shape[2:]
        t, b, l, r = self.core
        core = x[:, :, round(t * h):round(b * h), round(l * w):round(r * w)]  # a view: reduced per channel, no copy
        step = max(1, BAND_ELEMENTS // max(1, core[:, :1].numel()))
        parts = [torch.var_mean(core[:, i:i + step].to(torch.promote_types(x.dtype, WIDE)), dim=(2, 3), correction=0)
                 for i in range(0, x.shape[1], step)]
        var_c, mean_c = torch.cat([v for v, _ in parts], 1).double(), torch.cat([m for _, m in parts], 1).double()
        n = core[0, 0].numel()
        s = (mean_c * n).view(x.shape[0], groups, -1).sum(-1)                      # (B, G)
        ss = ((var_c + mean_c ** 2) * n).view(x.shape[0], groups, -1).sum(-1)
        n *= x.shape[1] // groups
        if i == len(self.totals):
            self.totals.append([s, ss, n])
        else:
            self.totals[i][0] += s
            self.totals[i][1] += ss
            self.totals[i][2] += n
        return group_stats(x, groups)


SHARED_NORMS: contextvars.ContextVar[NormStats | None] = contextvars.ContextVar("shared_norms", default=None)


def norm_silu_conv(x, norm: nn.GroupNorm, conv: nn.Conv2d, inplace: bool = False):
    """conv(silu(norm(x))) for a 3x3, stride 1, padding 1 conv, without building the full normalised tensor.

    At 512x512 the VAE decoder's top blocks hold 256-channel activations of 268 MB each (fp32); normalising in one
    go doubles that. Here the group statistics are taken in one pass over x (var_mean builds no temporary), then
    bands of rows are normalised, activated and convolved into the preallocated output, each band with the
    one-row halo the 3x3 kernel reads. inplace (x a fresh tensor the caller owns, as many output channels as
    input): each output band overwrites its own input rows, keeping the one original row the next band's halo
    still needs, so no second full-size tensor exists. Same maths as the plain path; small inputs take the plain
    path. (B, C, H, W) -> (B, O, H, W)."""
    if torch.is_grad_enabled() or x.numel() < BAND_ELEMENTS or x.ndim != 4 or x.is_contiguous(memory_format=CL) \
            and not x.is_contiguous():
        return conv(silu_(norm(x)))
    b, c, h, w = x.shape
    shared = SHARED_NORMS.get()
    a, d = _affine(norm, *(shared(x, norm.num_groups) if shared is not None else group_stats(x, norm.num_groups)), c)
    weight, bias = cast(conv.weight, x), cast(conv.bias, x)
    inplace = inplace and weight.shape[0] == c
    out = x if inplace else torch.empty((b, weight.shape[0], h, w), dtype=x.dtype, device=x.device)
    rows = max(1, BAND_ELEMENTS // (BANDS * c * w * b))
    above = None  # inplace: the original row r0 - 1, already overwritten in x
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        hi = min(h, r1 + 1)
        src = x[:, :, max(0, r0 - 1):hi] if above is None else torch.cat([above, x[:, :, r0:hi]], 2)
        band = F.silu((src.to(a.dtype) * a).add_(d), inplace=True).to(x.dtype)
        # zero rows where the band touches the image border, as the conv's own padding would
        band = F.pad(band, (0, 0, 1 if r0 == 0 else 0, 1 if r1 == h else 0))
        y = F.conv2d(band, weight, bias, padding=(0, 1))
        if inplace:
            above = x[:, :, r1 - 1:r1].clone()
        out[:, :, r0:r1] = y
        del band, y, src
    return out


def tiled(fn, x, tile: int, halo: int, up: int = 1, down: int = 1, blend: int | None = None,
          shared_norms: bool = False):
    """fn over overlapping tiles of x, blended into one output: (B, C, H, W) -> (B, O, H*up/down, W*up/down).

    For networks whose memory grows with the image (the VAE's full-resolution levels) but whose output pixel only
    depends on a neighbourhood of the input: the image is cut into a grid of cores of about `tile` input pixels, each
    run with `halo` more pixels of context on every side (cut at the image border, where fn pads as it always does).
    Neighbouring outputs overlap by 2*`blend` input pixels (blend <= halo) and are cross-faded with linear weights
    that sum to one, so no seam is left where per-tile differences (norm statistics) meet. Core edges and the halo
    are multiples of `down` (the encoder's stride-2 convs stay aligned). Only one tile's activations exist at a time.
    shared_norms: first run every tile to gather the whole image's group-norm statistics (NormStats), then run them
    again with those: twice the arithmetic, no per-tile shifts.
    """
    b, _, h, w = x.shape
    blend = halo // 2 if blend is None else blend
    blend = max(0, min(blend, halo))

    def cores(n):  # boundaries of about equal cores, multiples of `down`, each at least 2*blend wide
        count = max(1, -(-n // max(tile, 2 * blend + down, down)))
        edges = [min(n, round(n * i / count / down) * down) for i in range(count + 1)]
        edges[-1] = n
        return [(a, e) for a, e in zip(edges, edges[1:]) if e > a]

    def ramp(c0, c1, n, length):  # (length,) weights of output pixels [c0 - blend, c1 + blend) clipped to the image
        first = max(0, c0 - blend) * up // down  # the first kept output pixel, as _blend_tiles cuts it
        pos = (torch.arange(length, dtype=torch.float64) + first + 0.5) * down / up  # its centre, in input pixels
        wgt = torch.ones(length, dtype=torch.float64)
        if c0 > 0 and blend:
            wgt *= ((pos - (c0 - blend)) / (2 * blend)).clamp(0, 1)
        if c1 < n and blend:
            wgt *= (((c1 + blend) - pos) / (2 * blend)).clamp(0, 1)
        return wgt

    grid = [(r0, r1, c0, c1, max(0, r0 - halo), min(h, r1 + halo), max(0, c0 - halo), min(w, c1 + halo))
            for r0, r1 in cores(h) for c0, c1 in cores(w)]
    stats = NormStats() if shared_norms and len(grid) > 1 else None
    token = SHARED_NORMS.set(stats)
    try:
        if stats is not None:
            for r0, r1, c0, c1, y0, y1, x0, x1 in grid:
                stats.tile(((r0 - y0) / (y1 - y0), (r1 - y0) / (y1 - y0), (c0 - x0) / (x1 - x0), (c1 - x0) / (x1 - x0)))
                fn(x[:, :, y0:y1, x0:x1])
            stats.frozen = True
        return _blend_tiles(fn, x, grid, stats, blend, up, down, ramp)
    finally:
        SHARED_NORMS.reset(token)


def _blend_tiles(fn, x, grid, stats, blend, up, down, ramp):
    """tiled()'s output pass: each tile's core and blend band, weighted, summed into one fp32 image."""
    b, _, h, w = x.shape
    out = None
    for r0, r1, c0, c1, y0, y1, x0, x1 in grid:
        if stats is not None:
            stats.tile((0.0, 1.0, 0.0, 1.0))
        y = fn(x[:, :, y0:y1, x0:x1])
        if out is None:
            out = torch.zeros((b, y.shape[1], h * up // down, w * up // down), dtype=torch.float32, device=y.device)
        # the kept part: the core plus the blend band, in output pixels
        k0, k1 = max(0, r0 - blend) * up // down, min(h, r1 + blend) * up // down
        j0, j1 = max(0, c0 - blend) * up // down, min(w, c1 + blend) * up // down
        part = y[:, :, k0 - y0 * up // down:k1 - y0 * up // down, j0 - x0 * up // down:j1 - x0 * up // down]
        wgt = (ramp(r0, r1, h, k1 - k0)[:, None] * ramp(c0, c1, w, j1 - j0)[None, :]).to(out.device, out.dtype)
        out[:, :, k0:k1, j0:j1].add_(part.float() * wgt)
        del y, part
    return out


def add_conv1x1_(out, conv: nn.Conv2d, x):
    """out += conv(x) for a 1x1 conv (a residual shortcut), in row bands when x is large: oneDNN would otherwise build
    a reordered copy of all of x and a full-size output before the add (at 512x512 in the VAE: ~200 MB more).
    (B, C, H, W), out (B, O, H, W) -> out."""
    if torch.is_grad_enabled() or x.numel() < BAND_ELEMENTS or x.ndim != 4:
        return out.add_(conv(x))
    weight, bias = cast(conv.weight, x), cast(conv.bias, x)
    rows = max(1, BAND_ELEMENTS // (BANDS * x.shape[1] * x.shape[3] * x.shape[0]))
    for r0 in range(0, x.shape[2], rows):
        out[:, :, r0:r0 + rows] += F.conv2d(x[:, :, r0:r0 + rows], weight, bias)
    return out
