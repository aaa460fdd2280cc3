"""load() and generate(): text -> embeddings -> sigmas -> starting latent -> denoiser -> sampler -> VAE -> images."""

import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from . import SdgenError, guidance, images
from .schedule import SchedulerConfig, plan as make_plan
from .clip import CLIPTextModel
from .samplers import SAMPLERS
from .spec import ModelSpec, detect
from .tokenizer import Tokenizer
from .unet import UNet
from .vae import VAE
from .weights import Checkpoint, load_module, open_checkpoint

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
MAX_SIDE = 8192      # pixels; beyond this a latent alone is gigabytes
MAX_BATCH = 64
MAX_STEPS = 1000


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX: bf16 matrix products run at several times fp32 speed. Elsewhere bf16 is emulated."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdgenError("--device cuda was asked for, but this machine has no CUDA GPU that PyTorch can use")
    return device


def resolve_dtype(dtype, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(storage dtype, compute dtype). 'auto' stores fp16 on CUDA, bf16 on CPUs with native bf16, else fp32.

    The weights are kept in the storage dtype; the arithmetic runs in the compute dtype (layers.py casts one
    layer's weight at a time). On CUDA, and for bf16 on CPUs with native bf16, the two are the same. Other CPUs
    emulate bf16/fp16 arithmetic 50-300x slower than fp32, so half-precision storage computes in fp32 there:
    half the memory at full fp32 speed."""
    if isinstance(dtype, torch.dtype):
        storage = dtype
    elif dtype in (None, "auto"):
        if device.type == "cuda":
            storage = torch.float16
        else:
            storage = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    elif dtype in DTYPES:
        storage = DTYPES[dtype]
    else:
        raise SdgenError(f"unknown precision {dtype!r}: use one of float32, bfloat16, float16 (fp32, bf16, fp16)")
    if device.type != "cpu" or storage.itemsize >= 4 or (storage == torch.bfloat16 and cpu_has_native_bf16()):
        return storage, storage
    return storage, torch.float32


def load(model=None, device="cpu", dtype="float32", *, variant=None, log=None) -> "Pipeline":
    """Load an SD1 model from a single file, a diffusers folder or a Hugging Face repo id."""
    log = log or (lambda msg: None)
    device = resolve_device(device)
    dtype, compute = resolve_dtype(dtype, device)
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model, variant=variant)
    spec = detect(ckpt)
    where = str(ckpt.path)
    modules = {}
    for name, cls, config in (("text_encoder", CLIPTextModel, spec.text_encoder), ("unet", UNet, spec.unet),
                              ("vae", VAE, spec.vae)):
        modules[name] = load_module(cls, config, ckpt.tensors[name], dtype=dtype, device=device, where=where).eval()
        modules[name].compute_dtype = compute
    tokenizer = Tokenizer.from_folder(ckpt.tokenizer_dir) if ckpt.tokenizer_dir else Tokenizer.default()
    pipe = Pipeline(tokenizer=tokenizer, text_encoder=modules["text_encoder"], unet=modules["unet"], vae=modules["vae"],
                    spec=spec, scheduler=SchedulerConfig.from_diffusers(ckpt.scheduler_config),
                    checkpoint=ckpt, device=device, dtype=dtype)
    pipe.load_seconds = time.perf_counter() - t0
    log(f"loaded {ckpt.path.name} ({ckpt.format}, {spec.family}{' inpainting' if spec.inpainting else ''}) as "
        f"{str(dtype).removeprefix('torch.')}{_computed_in(dtype, compute)} on {device} in {pipe.load_seconds:.1f} s")
    return pipe


def _computed_in(storage, compute) -> str:
    return "" if compute == storage else f" (computed in {str(compute).removeprefix('torch.')})"


@dataclass
class Pipeline:
    tokenizer: Tokenizer
    text_encoder: CLIPTextModel
    unet: UNet               # pipe.unet(latents, timesteps, context) -> noise prediction
    vae: VAE
    spec: ModelSpec
    scheduler: SchedulerConfig
    checkpoint: Checkpoint
    device: torch.device
    dtype: torch.dtype
    timings: dict = field(default_factory=dict)   # seconds per stage of the last generate
    load_seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.checkpoint.path.stem if self.checkpoint.path.is_file() else self.checkpoint.path.name

    # ---- the building blocks (also a public API) -------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77) ids: BOS, BPE ids, EOS, padding; truncated to 77 as CLIPTokenizer does."""
        return self.tokenizer(list(prompts))

    @torch.inference_mode()
    def encode_prompt(self, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
        """(B, 77, 768): the text encoder's last hidden state after the final layer norm."""
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(ids, clip_skip=clip_skip).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1] (not clamped)."""
        return self.vae.decode(latents.to(self.device)).float()

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> posterior mean times the scaling factor, (B, 4, H/8, W/8)."""
        return self.vae.encode(images.to(self.device)).float()

    def _encode_sample(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A posterior sample of one image (1, 3, H, W), drawing from `generator` as diffusers does."""
        mean, logvar = self.vae.encode_moments(image.to(self.device))
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(self.device)
        return (mean.float() + torch.exp(0.5 * logvar.float()) * eps) * self.spec.vae.scaling_factor

    # ---- generation ----------------------------------------------------------------------------------
    def generate(self, prompt, negative_prompt="", *, steps=20, guidance_scale=7.5, sampler="euler",
                 schedule="normal", seed=None, width=None, height=None, batch_size=1, init_image=None,
                 strength=0.8, mask_image=None, output_type="pil", clip_skip=1, progress=None):
        """Images for `prompt` (a string or a list); image i of the batch uses seed + i.

        init_image alone: img2img with `strength`; with mask_image (white = repaint): inpainting.
        output_type "latent" returns the final latents (B, 4, H/8, W/8) instead of PIL images.
        progress: a callable (step, total) -> None called after every denoising step.
        """
        x = None
        for x, i, n in self.denoise(prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale,
                                    sampler=sampler, schedule=schedule, seed=seed, width=width, height=height,
                                    batch_size=batch_size, init_image=init_image, strength=strength,
                                    mask_image=mask_image, clip_skip=clip_skip):
            if progress:
                progress(i + 1, n)
        if output_type == "latent":
            return x
        t0 = time.perf_counter()
        pixels = self.decode(x)
        self.timings["decode"] = time.perf_counter() - t0
        return images.to_pil(pixels)

    @torch.inference_mode()
    def denoise(self, prompt, negative_prompt="", *, steps=20, guidance_scale=7.5, sampler="euler",
                schedule="normal", seed=None, width=None, height=None, batch_size=1, init_image=None,
                strength=0.8, mask_image=None, clip_skip=1):
        """The denoising loop as a generator: yields (latents, step, total) after every step."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        init = _as_image(init_image, "init image")
        mask = _as_image(mask_image, "mask")
        width, height = _size(width, height, init)
        check_size(width, height)
        check_arguments(prompts, negatives, steps, guidance_scale, sampler, schedule, seed, batch_size, strength,
                        init, mask, self.spec.inpainting)
        if seed is None:
            seed = torch.seed() % 2**32
        self.timings = {}
        n = len(prompts) * batch_size
        # image i of the batch is prompt i // batch_size, as diffusers' num_images_per_prompt orders them
        negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
        prompts, negatives = ([q for q in qs for _ in range(batch_size)] for qs in (prompts, negatives))
        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]

        def noise(like):  # (B, C, h, w) standard normal, one CPU generator per image: same on any device
            return torch.cat([torch.randn((1, *like.shape[1:]), generator=g) for g in generators]).to(like.device)

        t0 = time.perf_counter()
        self._warn_if_truncated(prompts + negatives)
        cond = self.encode_prompt(prompts, clip_skip=clip_skip)
        uncond = self.encode_prompt(negatives, clip_skip=clip_skip) if guidance_scale > 1 else None
        self.timings["text"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        inpaint, inpaint_model = mask is not None, self.spec.inpainting
        full = init is None or (inpaint and strength == 1)      # start from pure noise
        p = make_plan(sampler, steps, self.scheduler, schedule=schedule, strength=1.0 if init is None else strength)
        latent_shape = (n, 4, height // 8, width // 8)
        image = images.to_tensor(init, width, height) if init is not None else None
        # posterior samples draw from the generators where diffusers draws them: img2img repeats the image over
        # the batch (one draw per generator); inpainting encodes the single image with the first generator only
        image_latents = None
        if init is not None and not inpaint:
            image_latents = torch.cat([self._encode_sample(image, g) for g in generators])
        elif inpaint and (not inpaint_model or not full):
            image_latents = self._encode_sample(image, generators[0]).expand(n, -1, -1, -1)
        noise0 = noise(torch.empty(latent_shape, device=self.device))
        x = p.start(noise0, None if full else image_latents)
        unet = self.unet  # fp32 latents in, fp32 out, whatever the weights' dtype
        if inpaint:
            m = images.mask_to_tensor(mask, width, height)
            masked = self._encode_sample(image * (m < 0.5), generators[0]).expand(n, -1, -1, -1)
            m_lat = torch.nn.functional.interpolate(m, size=latent_shape[2:]).to(self.device).expand(n, -1, -1, -1)
            if inpaint_model:
                unet = _inpaint_unet(unet, m_lat, masked)
        denoiser = guidance.model_denoiser(guidance.cfg(unet, cond, uncond, guidance_scale), self.scheduler)
        self.timings["prepare"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        total = p.steps
        for i, x in enumerate(p.run(denoiser, x, noise)):
            if inpaint and not inpaint_model:
                # ordinary checkpoints: keep the unmasked area on the init image's noise trajectory
                x.copy_((1 - m_lat) * p.noised(image_latents, noise0, i) + m_lat * x)
            yield x, i, total
        self.timings["denoise"] = time.perf_counter() - t0

    def _warn_if_truncated(self, prompts):
        limit = self.tokenizer.max_length - 2
        for text in dict.fromkeys(prompts):
            count = len(self.tokenizer.encode(text))
            if count > limit:
                warnings.warn(f"prompt is {count} tokens long; CLIP reads the first {limit}, the rest is ignored",
                              stacklevel=3)


def _inpaint_unet(unet, mask, masked_latents):
    """9-channel inpainting UNets see [latents, mask, masked-image latents] along channels."""
    def call(x, t, context):
        reps = x.shape[0] // mask.shape[0]   # CFG doubles the batch
        return unet(torch.cat([x, mask.repeat(reps, 1, 1, 1), masked_latents.repeat(reps, 1, 1, 1)], 1), t, context)
    return call


def _as_image(image, what):
    if image is None:
        return None
    if isinstance(image, images.Image.Image):
        return image
    return images.open_image(image, what)


def _size(width, height, init):
    if init is not None:
        w0, h0 = init.size
        width = width or (w0 // 8) * 8
        height = height or (h0 // 8) * 8
    return width or 512, height or 512


def check_arguments(prompts, negatives, steps, guidance_scale, sampler, schedule_name, seed, batch_size, strength,
                    init, mask, inpainting_model):
    """Every argument a user can get wrong, checked before any work, each with one clear line."""
    def bad(msg):
        raise SdgenError(msg)

    if not all(isinstance(p, str) for p in prompts + negatives):
        bad("prompts must be strings")
    if len(negatives) not in (1, len(prompts)):
        bad(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        bad(f"steps must be a whole number from 1 to {MAX_STEPS}, not {steps!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or not 0 <= guidance_scale <= 100:
        bad(f"guidance scale must be a number from 0 to 100, not {guidance_scale!r}")
    if sampler not in SAMPLERS:
        bad(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if schedule_name not in ("normal", "karras"):
        bad(f"unknown schedule {schedule_name!r}: choose normal or karras")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        bad(f"seed must be a whole number from 0 to 2**63-1, not {seed!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= MAX_BATCH:
        bad(f"batch size must be a whole number from 1 to {MAX_BATCH}, not {batch_size!r}")
    if not isinstance(strength, (int, float)) or not math.isfinite(strength) or not 0 <= strength <= 1:
        bad(f"strength must be a number from 0 to 1, not {strength!r}")
    if mask is not None and init is None:
        bad("a mask needs an init image to inpaint")
    if inpainting_model and init is None:
        bad("this is an inpainting model: give an init image and a mask")
    if mask is not None and init is not None and mask.size != init.size:
        bad(f"the mask is {mask.size[0]}x{mask.size[1]} but the init image is {init.size[0]}x{init.size[1]}; they must match")


def check_size(width, height):
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 8 or v > MAX_SIDE or v % 8:
            raise SdgenError(f"{name} must be a multiple of 8 from 8 to {MAX_SIDE}, not {v!r}")
