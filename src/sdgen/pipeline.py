"""load() and generate(): text -> embeddings -> sigmas -> starting latent -> denoiser -> sampler -> VAE -> images.

    pipe = load("model.safetensors", device="cpu", dtype="float32")
    result = pipe.generate(GenerationRequest("a cat", seed=1))     # or pipe.generate("a cat", seed=1)
    result.images[0].save("cat.png"); result.seeds; result.timings

Each mode (txt2img, img2img, inpainting) prepares its start: the first latent, the model it denoises with and a
hook run after every step. One loop then runs the sampler over it.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from . import SdgenError, images
from .families import Checkpoint, open_checkpoint
from .nets.clip import CLIPTextModel
from .nets.tokenizer import Tokenizer
from .nets.unet import UNet
from .nets.vae import VAE
from .precision import Precision, resolve_device, resolve_precision
from .request import GenerationRequest
from .sampling import guidance
from .sampling.schedule import Plan, plan as make_plan

def load(model=None, device="cpu", dtype="float32", *, variant=None, log=None) -> Pipeline:
    """Load a model from a single file, a diffusers folder, a Hugging Face repo id or "demo". No model: SD1.5
    from the local cache or the hub, else the built-in demo model (see families.open_checkpoint)."""
    device = resolve_device(device)
    precision = resolve_precision(dtype, device)
    t0 = time.perf_counter()
    ckpt = model if isinstance(model, Checkpoint) else open_checkpoint(model, variant=variant,
                                                                         log=log or _stderr)
    tokenizer = Tokenizer.from_folder(ckpt.tokenizer_dir) if ckpt.tokenizer_dir else Tokenizer.default()
    text = ckpt.configs["text_encoder"]
    if max(tokenizer.vocab.values()) >= text.vocab_size or tokenizer.max_length > text.max_positions:
        raise SdgenError(f"{ckpt.path.name}: the tokenizer (ids up to {max(tokenizer.vocab.values())}, "
                         f"{tokenizer.max_length} tokens) does not fit the text encoder ({text.vocab_size} ids, "
                         f"{text.max_positions} positions)")
    nets = ckpt.load(precision, device)
    pipe = Pipeline(tokenizer=tokenizer, text_encoder=nets["text_encoder"], unet=nets["unet"], vae=nets["vae"],
                    checkpoint=ckpt, device=device, precision=precision, load_seconds=time.perf_counter() - t0)
    (log or (lambda msg: None))(f"loaded {ckpt.path.name} ({ckpt.format}, {ckpt.family.name}{' inpainting' if ckpt.inpainting else ''}) "
        f"as {precision} on {device} in {pipe.load_seconds:.1f} s")
    return pipe


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Result:
    """What a generation returns: the images (PIL, or the latents with output_type="latent"), the latents, the
    seed of each image, the seconds per stage, and the request as run (defaults filled).

    It also reads as its images: `result[0]`, `len(result)`, `for image in result`. With output_type="latent",
    a Result stands in for the latents tensor (`result.shape`, `result - other`, torch functions), as
    generate(..., output_type="latent") returned the bare tensor before there was a Result."""

    images: list | Tensor
    latents: Tensor                 # (B, 4, H/8, W/8), the sampler's final latents
    seeds: list[int]
    timings: dict[str, float]
    request: GenerationRequest

    def __getitem__(self, i):
        return self.images[i]

    def __len__(self):
        return len(self.images)

    def __iter__(self):
        return iter(self.images)

    def __getattr__(self, name):  # only reached for names a Result does not have: the latents tensor's
        images = self.__dict__.get("images")
        if isinstance(images, Tensor):
            return getattr(images, name)
        raise AttributeError(name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda a: a.latents if isinstance(a, Result) else a
        return func(*map(unwrap, args), **{k: unwrap(v) for k, v in (kwargs or {}).items()})

    def __sub__(self, other):
        return self.latents - other

    def __rsub__(self, other):
        return other - self.latents


@dataclass
class Start:
    """How a mode begins: x at the plan's first sigma, the eps model it denoises with, a hook after each step."""

    x: Tensor                                             # (B, 4, h, w)
    unet: Callable[[Tensor, Tensor, Tensor], Tensor]      # unet(x, t, context) -> eps
    after_step: Callable[[Tensor, int], None] | None = None   # modifies x in place after step i


@dataclass
class Pipeline:
    tokenizer: Tokenizer
    text_encoder: CLIPTextModel
    unet: UNet               # pipe.unet(latents, timesteps, context) -> noise prediction
    vae: VAE
    checkpoint: Checkpoint
    device: torch.device
    precision: Precision
    load_seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @property
    def scheduler(self):
        return self.checkpoint.scheduler

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.storage

    # ---- the building blocks (also a public API) -------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> Tensor:
        """(B, 77) ids: BOS, BPE ids, EOS, padding; truncated to 77 as CLIPTokenizer does."""
        return self.tokenizer(list(prompts))

    @torch.inference_mode()
    def encode_prompt(self, prompts: list[str], clip_skip: int = 1) -> Tensor:
        """(B, 77, 768): the text encoder's last hidden state after the final layer norm."""
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids, clip_skip=clip_skip).float()

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1] (not clamped)."""
        return self.vae.decode(latents.to(self.device)).float()

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> posterior mean times the scaling factor, (B, 4, H/8, W/8)."""
        return self.vae.encode(images.to(self.device)).float()

    def _encode_sample(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """A posterior sample of one image (1, 3, H, W), drawing from `generator` as diffusers does."""
        mean, logvar = self.vae.encode_moments(image.to(self.device))
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(self.device)
        return (mean.float() + torch.exp(0.5 * logvar.float()) * eps) * self.vae.config.scaling_factor

    # ---- generation ----------------------------------------------------------------------------------
    def request(self, request=None, /, *args, **kwargs) -> GenerationRequest:
        """A GenerationRequest as given, or built from generate()'s keyword form; defaults filled, checked."""
        if isinstance(request, GenerationRequest):
            if args or kwargs:
                raise SdgenError("give either a GenerationRequest or keyword arguments, not both")
        else:
            if args:
                kwargs["negative_prompt"] = args[0]
            if len(args) > 1:
                raise SdgenError("generate(prompt, negative_prompt, **options): options are keywords")
            unknown = sorted(set(kwargs) - set(GenerationRequest.__dataclass_fields__))
            if unknown:
                raise SdgenError(f"unknown generation option {unknown[0]!r}")
            if kwargs.get("negative_prompt", "") is None:  # diffusers' default
                kwargs["negative_prompt"] = ""
            for key in ("init_image", "mask_image"):
                if kwargs.get(key) is not None:
                    kwargs[key] = images.as_image(kwargs[key], key.replace("_", " "))
            request = GenerationRequest(**kwargs) if request is None else GenerationRequest(request, **kwargs)
        return request.resolve(self.checkpoint)

    def generate(self, request=None, /, *args, output_type: str = "pil", progress=None, **kwargs) -> Result:
        """Images for a GenerationRequest (or generate(prompt, negative_prompt, steps=..., ...) with its fields).

        output_type "latent" skips the VAE: result.images is then the latents (B, 4, H/8, W/8).
        progress: a callable (step, total) -> None called after every denoising step.
        """
        if output_type not in ("pil", "latent"):
            raise SdgenError(f"output_type must be 'pil' or 'latent', not {output_type!r}")
        req = self.request(request, *args, **kwargs)
        check_memory(req, self.checkpoint, self.precision, self.device, loaded=True)
        timings: dict[str, float] = {}
        x = None
        with _out_of_memory_as_error(req):
            for x, i, n in self._denoise(req, timings):
                if progress:
                    progress(i + 1, n)
            if not torch.isfinite(x).all():
                warnings.warn("the result is not finite (NaN/Inf): the model's weights or this precision overflow; "
                              "the images will be black (try --precision fp32)", stacklevel=2)
            if output_type == "latent":
                return Result(x, x, req.seeds, timings, req)
            t0 = time.perf_counter()
            pixels = torch.cat([self.decode(x[i : i + 1]) for i in range(len(x))])  # one image at a time: less memory
            timings["decode"] = time.perf_counter() - t0
        return Result(images.to_pil(pixels), x, req.seeds, timings, req)

    def denoise(self, request=None, /, *args, **kwargs) -> Iterator[tuple[Tensor, int, int]]:
        """The denoising loop as a generator: yields (latents, step, total) after every step."""
        return self._denoise(self.request(request, *args, **kwargs), {})

    @torch.inference_mode()
    def _denoise(self, req: GenerationRequest, timings: dict) -> Iterator[tuple[Tensor, int, int]]:
        generators = [torch.Generator("cpu").manual_seed(s) for s in req.seeds]

        def noise(like):  # (B, C, h, w) standard normal, one CPU generator per image: same on any device
            return torch.cat([torch.randn((1, *like.shape[1:]), generator=g) for g in generators]).to(like.device)

        t0 = time.perf_counter()
        self._warn_if_truncated(req.prompts + req.negative_prompts)
        cond = self.encode_prompt(req.prompts, clip_skip=req.clip_skip)
        uncond = self.encode_prompt(req.negative_prompts, clip_skip=req.clip_skip) if req.guidance_scale > 1 else None
        timings["text"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        p = make_plan(req.sampler, req.steps, self.scheduler, schedule=req.schedule,
                      strength=1.0 if req.mode == "txt2img" else req.strength)
        start = MODES[req.mode](self, req, p, generators, noise)
        denoiser = guidance.model_denoiser(guidance.cfg(start.unet, cond, uncond, req.guidance_scale), self.scheduler)
        timings["prepare"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for i, x in enumerate(p.run(denoiser, start.x, noise)):
            if start.after_step is not None:
                start.after_step(x, i)
            yield x, i, p.steps
        timings["denoise"] = time.perf_counter() - t0

    def _latent_shape(self, req: GenerationRequest) -> tuple[int, int, int, int]:
        return req.count, self.unet.config.out_channels, req.height // 8, req.width // 8

    def _warn_if_truncated(self, prompts):
        limit = self.tokenizer.max_length - 2
        for text in dict.fromkeys(prompts):
            count = len(self.tokenizer.encode(text))
            if count > limit:
                warnings.warn(f"prompt is {count} tokens long; CLIP reads the first {limit}, the rest is ignored",
                              stacklevel=4)


# ---------------------------------------------------------------------------------------------- memory


def available_memory(device: torch.device) -> int | None:
    """Bytes this process may still allocate on `device` (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()}
        return info.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        return None


def memory_needed(req: GenerationRequest, ckpt: Checkpoint, precision: Precision, loaded: bool) -> int:
    """A generous estimate of the bytes a request needs on top of what is already in memory: the weights (unless
    loaded), the UNet's activations for the CFG batch, and the VAE decoder's full-resolution activations for one
    image (images are decoded one at a time). Attention runs blockwise (SDPA), so no (tokens x tokens) matrix."""
    act = max(4, precision.compute.itemsize)
    weights = 0 if loaded else sum(ckpt.parameters(c.name) for c in ckpt.family.components) * precision.storage.itemsize
    batch = req.count * (2 if req.guidance_scale > 1 else 1)
    unet = ckpt.configs["unet"]
    latent_pixels = (req.width // 8) * (req.height // 8)
    unet_bytes = batch * latent_pixels * unet.model_channels * act * 24
    vae = ckpt.configs["vae"]
    widest_full_res = vae.ch * max(vae.ch_mult[:2])      # the upsampled level above full resolution
    decode_bytes = req.width * req.height * widest_full_res * act * 3
    return weights + max(unet_bytes, decode_bytes) + 2**28


def check_memory(req: GenerationRequest, ckpt: Checkpoint, precision: Precision, device, loaded: bool) -> None:
    """Refuse, in one line and before any work, a request that cannot fit in memory."""
    need, have = memory_needed(req, ckpt, precision, loaded), available_memory(torch.device(device))
    if have is not None and need > have:
        raise SdgenError(f"{req.width}x{req.height} x {req.count} image(s) needs about {need / 2**30:.1f} GiB of memory "
                         f"but {have / 2**30:.1f} GiB is available: use a smaller size or batch")


class _out_of_memory_as_error:
    """An allocation failure while generating becomes the one out-of-memory line."""

    def __init__(self, req):
        self.req = req

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if kind is None:
            return False
        text = str(error).lower()
        if issubclass(kind, MemoryError) or "out of memory" in text or "not enough memory" in text \
                or "can't allocate memory" in text or "failed to allocate" in text:
            raise SdgenError(f"out of memory generating {self.req.width}x{self.req.height} x {self.req.count}: "
                             "try a smaller size or batch, or --precision bf16") from None
        return False


# ---------------------------------------------------------------------------------------------- modes
# Each takes (pipe, request, plan, generators, noise) and returns its Start. Random draws happen in diffusers'
# order: img2img posterior samples (one per generator), then the starting noise; inpainting encodes its images
# with the first generator only.


def txt2img(pipe: Pipeline, req: GenerationRequest, p: Plan, generators, noise) -> Start:
    x = noise(torch.empty(pipe._latent_shape(req), device=pipe.device))
    return Start(p.start(x), pipe.unet)


def img2img(pipe: Pipeline, req: GenerationRequest, p: Plan, generators, noise) -> Start:
    """The init image's latents noised to the first sigma of the shortened schedule."""
    image = images.to_tensor(req.init_image, req.width, req.height)
    latents = torch.cat([pipe._encode_sample(image, g) for g in generators])  # the image repeated over the batch
    x = noise(latents)
    return Start(p.start(x, latents), pipe.unet)


def inpaint(pipe: Pipeline, req: GenerationRequest, p: Plan, generators, noise) -> Start:
    """9-channel checkpoints see [latents, mask, masked-image latents]; ordinary ones are blended after every
    step: the kept area follows the init image's noise trajectory (diffusers' StableDiffusionInpaintPipeline)."""
    n = req.count
    image = images.to_tensor(req.init_image, req.width, req.height)
    full = req.strength == 1     # start from pure noise
    nine = pipe.checkpoint.inpainting
    latents = None
    if not nine or not full:
        latents = pipe._encode_sample(image, generators[0]).expand(n, -1, -1, -1)
    noise0 = noise(torch.empty(pipe._latent_shape(req), device=pipe.device))
    x = p.start(noise0, None if full else latents)
    m = images.mask_to_tensor(req.mask_image, req.width, req.height)
    masked = pipe._encode_sample(image * (m < 0.5), generators[0]).expand(n, -1, -1, -1)
    m_lat = torch.nn.functional.interpolate(m, size=x.shape[2:]).to(pipe.device).expand(n, -1, -1, -1)
    if nine:
        def unet(x, t, context):
            reps = x.shape[0] // n   # CFG doubles the batch
            return pipe.unet(torch.cat([x, m_lat.repeat(reps, 1, 1, 1), masked.repeat(reps, 1, 1, 1)], 1), t, context)
        return Start(x, unet)

    def blend(x, i):
        x.copy_((1 - m_lat) * p.noised(latents, noise0, i) + m_lat * x)
    return Start(x, pipe.unet, blend)


MODES: dict[str, Callable[..., Start]] = {"txt2img": txt2img, "img2img": img2img, "inpaint": inpaint}
