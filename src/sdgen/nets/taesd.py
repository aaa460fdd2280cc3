"""TAESD: madebyollin's tiny autoencoder, a fast stand-in for the SD VAE (previews, quick decodes).

    dec = load_taesd("taesd_decoder.safetensors")            # or .pth, or a diffusers AutoencoderTiny folder/repo
    images = dec(latents)    # UNet-space latents (B, 4, h, w), what the sampler produces -> (B, 3, 8h, 8w) in [-1, 1]
    enc = load_taesd("madebyollin/taesd", part="encoder")
    latents = enc(images)    # (B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8), already in UNet space

The architecture is madebyollin/taesd's `taesd.py`: plain 3x3 convs, ReLU, residual blocks of three convs, no
norms, no attention. TAESD was trained on the *scaled* latents (scaling factor 1.0 in diffusers' AutoencoderTiny),
so unlike the SD VAE nothing is divided by 0.18215; the decoder clamps its input softly (tanh(x / 3) * 3) and its
images are in [0, 1], which we map to [-1, 1] as Pipeline.decode returns them.

Names mirror the original files: `taesd_decoder.pth` is an nn.Sequential, so its keys are `1.weight`,
`3.conv.0.weight`, `3.skip.weight`, ...; our decoder/encoder are that Sequential. A diffusers AutoencoderTiny
(`decoder.layers.{i}`, `encoder.layers.{i}`) is renamed once: its decoder lacks the leading clamp, so index i is
our i + 1. The layer sequence (block counts, widths, latent channels, where resolution changes) is read off the
weights: a conv without bias is a resolution change (stride 2 in the encoder, after a 2x upsampling in the decoder).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import SdgenError
from ..formats import TensorRef, is_repo_id, read_component, read_json, read_weights_file, snapshot
from .layers import Conv2d, upsample_conv

PARTS = ("decoder", "encoder")
_MAX_CHANNELS = 4096   # real TAESDs: 64
_MAX_LAYERS = 256      # real: 20
_KEY = re.compile(r"(\d+)\.(weight|bias|conv\.[024]\.(?:weight|bias)|skip\.weight)")
_DIFFUSERS_KEY = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(.+)")
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3): the decoder never saw larger values in training."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """relu(conv(relu(conv(relu(conv(x))))) + skip(x)); keys conv.0, conv.2, conv.4, skip (when widths differ)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                                  Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True),
                                  Conv2d(cout, cout, 3, padding=1))
        self.skip = Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.fuse = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.fuse(self.conv(x).add_(self.skip(x)))


class Upsample(nn.Module):
    """Nearest 2x; TinyDecoder fuses it with the conv that follows (layers.upsample_conv)."""

    def forward(self, x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Tiny(nn.Sequential):
    """The original nn.Sequential (module i is key prefix `i.`), run in the weights' dtype."""

    part: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def factor(self) -> int:
        """Pixels per latent pixel along one side (8 for SD's TAESD)."""
        return 2 ** sum(isinstance(m, Upsample) or (isinstance(m, nn.Conv2d) and m.stride == (2, 2)) for m in self)

    @property
    def latent_channels(self) -> int:
        convs = [m for m in self if isinstance(m, nn.Conv2d)]
        return convs[0].in_channels if self.part == "decoder" else convs[-1].out_channels

    def _layers(self, x):
        mods = list(self)
        i = 0
        while i < len(mods):
            m = mods[i]
            if isinstance(m, Upsample) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.Conv2d):
                x = upsample_conv(x, mods[i + 1])  # the 4x larger upsampled input is never built
                i += 2
                continue
            x = m(x)
            i += 1
        return x


class TinyDecoder(Tiny):
    part = "decoder"

    @torch.inference_mode()
    def forward(self, latents: Tensor) -> Tensor:  # (B, C, h, w) UNet-space -> (B, 3, 8h, 8w) float32 in [-1, 1]
        x = latents.to(self[1].weight.device, self.dtype)
        return self._layers(x).float().mul_(2).sub_(1)


class TinyEncoder(Tiny):
    part = "encoder"

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:  # (B, 3, H, W) in [-1, 1] -> (B, C, H/8, W/8) float32, UNet-space
        x = images.to(self[0].weight.device, torch.float32).add(1).div_(2).to(self.dtype)
        return self._layers(x).float()


def build(part: str, shapes: dict[str, tuple]) -> Tiny:
    """The Sequential the weights describe (meta device: no memory), under our (original) key names."""
    if part not in PARTS:
        raise SdgenError(f"TAESD part must be one of {', '.join(PARTS)}, not {part!r}")
    bad = next((k for k in shapes if not _KEY.fullmatch(k)), None)
    if bad is not None:
        raise SdgenError(f"not a TAESD {part}: unexpected tensor {bad[:80]!r}")
    if not shapes:
        raise SdgenError(f"not a TAESD {part}: no tensors")
    top = max(int(k.split(".", 1)[0]) for k in shapes)
    if top >= _MAX_LAYERS:
        raise SdgenError(f"not a TAESD {part}: layer index {top} (at most {_MAX_LAYERS - 1})")

    def conv_shape(key):
        s = shapes[key]
        if len(s) != 4 or s[2] != s[3] or s[2] not in (1, 3) or not all(1 <= c <= _MAX_CHANNELS for c in s[:2]):
            raise SdgenError(f"not a TAESD {part}: {key} has shape {tuple(s)}")
        return s

    layers: list[nn.Module | None] = [None] * (top + 1)
    convs = [i for i in range(top + 1) if f"{i}.weight" in shapes]
    for i in range(top + 1):
        if f"{i}.conv.0.weight" in shapes:
            s0, s4 = conv_shape(f"{i}.conv.0.weight"), conv_shape(f"{i}.conv.4.weight")
            layers[i] = Block(s0[1], s4[0])
        elif f"{i}.weight" in shapes:
            o, c, k, _ = conv_shape(f"{i}.weight")
            bias = f"{i}.bias" in shapes
            # a conv without bias changes the resolution: stride 2 in the encoder (the decoder's follows an upsampling)
            stride = 2 if part == "encoder" and not bias else 1
            layers[i] = Conv2d(c, o, k, stride=stride, padding=k // 2, bias=bias)
        elif part == "decoder" and i == 0:
            layers[i] = Clamp()
        elif part == "decoder" and convs and i == convs[0] + 1:
            layers[i] = nn.ReLU(inplace=True)
        elif part == "decoder" and i + 1 in convs and f"{i + 1}.bias" not in shapes:
            layers[i] = Upsample()
        else:
            raise SdgenError(f"not a TAESD {part}: no layer {i}")
    if part == "decoder" and not isinstance(layers[0], Clamp):
        raise SdgenError("not a TAESD decoder: layer 0 holds weights (is this an encoder?)")
    # the widths must chain
    width = None
    for i, m in enumerate(layers):
        cin, cout = ((m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else
                     (m.conv[0].in_channels, m.conv[4].out_channels) if isinstance(m, Block) else (None, None))
        if cin is None:
            continue
        if width is not None and cin != width:
            raise SdgenError(f"not a TAESD {part}: layer {i} takes {cin} channels but gets {width}")
        width = cout
    with torch.device("meta"):
        return (TinyDecoder if part == "decoder" else TinyEncoder)(*layers)


def _refs(source: Path | str, part: str) -> dict[str, TensorRef]:
    """{our key: TensorRef} from a taesd_*.safetensors/.pth file, a diffusers AutoencoderTiny folder or repo id."""
    path = Path(source)
    if path.is_file():
        refs, _ = read_weights_file(path)
    elif path.is_dir():
        names = {f"{path.name}/{p.name}" for p in path.iterdir() if p.is_file()}
        if not any(n.split("/", 1)[1] in _WEIGHT_NAMES for n in names):
            raise SdgenError(f"{path}: no TAESD weights (a diffusers AutoencoderTiny folder has "
                             "diffusion_pytorch_model.safetensors)")
        if (path / "config.json").is_file():
            config = read_json(path / "config.json")
            if config.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
                raise SdgenError(f"{path}: a {str(config.get('_class_name'))[:40]}, not an AutoencoderTiny (TAESD)")
        refs = read_component(path.parent, path.name, None, names)
    elif isinstance(source, str) and is_repo_id(source):
        return snapshot(source, lambda names: ["config.json", "diffusion_pytorch_model.safetensors"],
                        lambda folder: _refs(folder, part))
    else:
        raise SdgenError(f"{source}: no such TAESD file or folder")
    if any(_DIFFUSERS_KEY.fullmatch(k) for k in refs):  # AutoencoderTiny: both parts in one file
        out = {}
        for k, ref in refs.items():
            m = _DIFFUSERS_KEY.fullmatch(k)
            if m and m.group(1) == part:
                out[f"{int(m.group(2)) + (part == 'decoder')}.{m.group(3)}"] = ref
        return out
    return refs


def load_taesd(source, part: str = "decoder", device="cpu", dtype: torch.dtype = torch.float32) -> Tiny:
    """The TAESD decoder (UNet-space latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1], float32) or encoder
    (the reverse) from a taesd_decoder/taesd_encoder .safetensors/.pth file, or a diffusers AutoencoderTiny folder or
    repo id. Weights (a few MB) are stored and computed in `dtype`."""
    if part not in PARTS:
        raise SdgenError(f"TAESD part must be one of {', '.join(PARTS)}, not {part!r}")
    refs = _refs(source, part)
    if not all(r.is_float for r in refs.values()):
        raise SdgenError(f"{source}: TAESD weights must be floating point")
    net = build(part, {k: r.shape for k, r in refs.items()})
    net.load_state_dict({k: r.load(dtype, device) for k, r in refs.items()}, strict=True, assign=True)
    return net.eval().requires_grad_(False)
