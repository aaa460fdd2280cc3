"""Live previews of a running job: latents -> a small RGB picture, cheap enough to make at every step.

    preview = LatentPreview()                       # or TaesdPreview("taesd_decoder.safetensors")
    image = preview(latents)                        # (1, 4, h, w) UNet-space latents -> PIL (8w x 8h)

The default is a linear mix of each latent pixel's 4 channels into RGB (as AUTOMATIC1111's "Approx cheap"), no
network at all. A1111 ships factors fitted to the SD1 VAE; sdgen fits them to the loaded model's own VAE when the
model loads (`LatentPreview.fitted(pipe)`: a dozen small synthetic images through its encoder, least squares),
so fine-tuned VAEs and the demo model preview in their true colours. With a TAESD decoder file the preview is a
real (tiny) decode.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

from .. import images

# SD1 latent channel -> (R, G, B) in [-1, 1], as A1111's sd_samplers_common.samples_to_image_grid "Approx cheap"
SD1_LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208],
                               [0.187, 0.286, 0.173],
                               [-0.158, 0.189, 0.264],
                               [-0.184, -0.271, -0.473]])


class LatentPreview:
    """The linear latent -> RGB projection: microseconds per step, at latent resolution, upscaled for display."""

    name = "latent projection"

    def __init__(self, factors: Tensor = SD1_LATENT_RGB, bias: Tensor | None = None):
        self.factors = factors                       # (4, 3)
        self.bias = torch.zeros(3) if bias is None else bias

    @classmethod
    @torch.inference_mode()
    def fitted(cls, pipe, seed: int = 0) -> "LatentPreview":
        """Factors for `pipe`'s VAE: random blocks of flat colour (what a latent pixel's 8x8 patch mostly is),
        encoded, and the least-squares map from each latent pixel to its patch's mean colour."""
        g = torch.Generator().manual_seed(seed)
        blocks = torch.rand(12, 3, 4, 4, generator=g) * 2 - 1                 # (12, 3, 4, 4) colours in [-1, 1]
        pictures = blocks.repeat_interleave(16, 2).repeat_interleave(16, 3)     # (12, 3, 64, 64)
        latents = pipe.encode(pictures).float().cpu()                           # (12, 4, 8, 8)
        colours = torch.nn.functional.avg_pool2d(pictures, 8)                   # (12, 3, 8, 8)
        x = torch.cat([latents, torch.ones_like(latents[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1, 5)
        y = colours.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(x.double(), y.double()).solution.float()  # (5, 3)
        if not torch.isfinite(solution).all():
            return cls()
        return cls(solution[:4], solution[4])

    def __call__(self, latents: Tensor) -> Image.Image:
        x = latents[:1].float().cpu()                                     # (1, 4, h, w)
        rgb = torch.einsum("bchw,cr->brhw", x, self.factors) + self.bias[None, :, None, None]   # (1, 3, h, w)
        image = images.to_pil(rgb)[0]
        return image.resize((image.width * 8, image.height * 8), Image.BILINEAR)


class TaesdPreview:
    """madebyollin's TAESD decoder (sdgen.nets.taesd): a real decode in a few ms per step at preview sizes."""

    name = "TAESD"

    def __init__(self, path, device="cpu"):
        from ..nets.taesd import load_taesd

        self.device = torch.device(device)
        self.decoder = load_taesd(path, part="decoder", device=self.device, dtype=torch.float32)

    @torch.inference_mode()
    def __call__(self, latents: Tensor) -> Image.Image:
        return images.to_pil(self.decoder(latents[:1].float().to(self.device)).cpu())[0]   # (1, 3, 8h, 8w)
