"""load() and generate(): text -> embeddings -> sigmas -> starting latent -> denoiser -> sampler -> VAE -> images.

    pipe = load("model.safetensors", device="cpu", dtype="float32")
    result = pipe.generate(GenerationRequest("a cat", seed=1))     # or pipe.generate("a cat", seed=1)
    result.images[0].save("cat.png"); result.seeds; result.timings

Each mode (txt2img, img2img, inpainting) prepares its start: the first latent, the model it denoises with and a
hook run after every step. One loop then runs the sampler over it.
"""

from __future__ import annotations

import ctypes
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch
from torch import Tensor

from . import SdgenError, images
from . import prompts as prompts_
from .embeddings import ENCODER_KEYS, SINGLE, EmbeddingFolders, ExtraTokens
from .embeddings import check as check_embedding
from .families import Checkpoint, open_checkpoint
from .lora import LoraLibrary, Patcher
from .nets.clip import CLIPTextModel
from .nets.layers import release_scratch
from .nets.tokenizer import Tokenizer
from .nets.unet import UNet
from .nets.taesd import load_taesd
from .nets.vae import VAE
from .precision import Precision, resolve_device, resolve_precision
from .request import GenerationRequest
from .sampling import guidance
from .sampling.schedule import Plan, plan as make_plan

def load(model=None, device="cpu", dtype="float32", *, variant=None, log=None, lora_dirs=(), embedding_dirs=(),
         refiner=None, vae_tiling="auto", taesd=None, compile=False) -> Pipeline:
    """Load a model from a single file, a diffusers folder, a Hugging Face repo id or "demo". No model: SD1.5
    from the local cache or the hub, else the built-in demo model (see families.open_checkpoint).
    lora_dirs: folders where `<lora:NAME:...>` finds NAME.safetensors; embedding_dirs: textual-inversion files,
    called in a prompt by their file names. refiner: an SDXL refiner model (any form `model` takes), run as a
    second stage by requests with `refiner_start`. vae_tiling: "auto" (tile the VAE when one image would not fit
    the memory budget), "on", "off". taesd: a TAESD decoder (file, AutoencoderTiny folder or repo id) that decodes
    instead of the VAE. compile: torch.compile the UNet, its compiled code cached on disk (see compile_unet)."""
    device = resolve_device(device)
    precision = resolve_precision(dtype, device)
    t0 = time.perf_counter()
    ckpt = model if isinstance(model, Checkpoint) else open_checkpoint(model, variant=variant,
                                                                         log=log or _stderr)
    tokenizer = Tokenizer.from_folder(ckpt.tokenizer_dir) if ckpt.tokenizer_dir else _default_tokenizer(ckpt)
    texts = {name: ckpt.configs[name] for name in ckpt.family.text_components}
    for text in texts.values():
        if max(tokenizer.vocab.values()) >= text.vocab_size or tokenizer.max_length > text.max_positions:
            raise SdgenError(f"{ckpt.path.name}: the tokenizer (ids up to {max(tokenizer.vocab.values())}, "
                             f"{tokenizer.max_length} tokens) does not fit the text encoder ({text.vocab_size} ids, "
                             f"{text.max_positions} positions)")
    widths = {name: text.hidden_size for name, text in texts.items()}
    loras = LoraLibrary(lora_dirs, ckpt)   # folders checked before the (slow) weights load
    embeddings = EmbeddingFolders(list(embedding_dirs or ()), tokenizer.encode,
                                  lambda emb: check_embedding(emb, ckpt.family.name, widths))
    second = None
    if refiner is not None:   # opened (and checked) before any weight is read
        second = refiner if isinstance(refiner, (Checkpoint, Pipeline)) else open_checkpoint(refiner, variant=variant)
        if not isinstance(second, Pipeline) and (ckpt.family.added is None or second.family.added is None):
            raise SdgenError(f"{second.path.name}: a refiner stage needs SDXL models (base {ckpt.family.label}, "
                             f"refiner {second.family.label})")
    if vae_tiling not in VAE_TILING:
        raise SdgenError(f"vae tiling must be one of {', '.join(VAE_TILING)}, not {vae_tiling!r}")
    fast = None
    if taesd is not None:  # a few MB: loaded (and checked against the UNet's latents) before the big weights
        fast = load_taesd(taesd, "decoder", device, precision.compute)
        want = ckpt.configs["unet"].out_channels
        if fast.latent_channels != want or fast.factor != 8:
            raise SdgenError(f"{taesd}: a TAESD decoder for {fast.latent_channels}-channel latents at 1/{fast.factor} "
                             f"scale, but this model's latents have {want} channels at 1/8")
    nets = ckpt.load(precision, device)
    pipe = Pipeline(tokenizer=tokenizer, text_encoder=nets.get("text_encoder"), unet=nets["unet"], vae=nets["vae"],
                    checkpoint=ckpt, device=device, precision=precision, load_seconds=time.perf_counter() - t0,
                    loras=loras, embeddings=embeddings, text_encoder_2=nets.get("text_encoder_2"),
                    vae_tiling=vae_tiling, taesd=fast)
    if compile:
        compile_unet(pipe.unet)
    if second is not None:
        pipe.refiner = second if isinstance(second, Pipeline) else load(second, device, dtype, log=log)
    (log or (lambda msg: None))(f"loaded {ckpt.path.name} ({ckpt.format}, {ckpt.family.name}{' inpainting' if ckpt.inpainting else ''}) "
        f"as {precision} on {device} in {pipe.load_seconds:.1f} s")
    return pipe


def compile_unet(unet: torch.nn.Module) -> None:
    """torch.compile the UNet in place (static shapes: one compile per image size and batch). Inductor's compiled
    code goes to ~/.cache/sdgen/inductor (unless TORCHINDUCTOR_CACHE_DIR says otherwise), not /tmp, so a later
    process loads it instead of compiling again. The first call at a new size pays the compile."""
    import os
    from pathlib import Path

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "sdgen" / "inductor"))
    unet.compile(dynamic=False)


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def _default_tokenizer(ckpt: Checkpoint) -> Tokenizer:
    """The built-in CLIP vocabulary, padding as the family's own tokenizer does (SD2's pads with "!", id 0)."""
    tok = Tokenizer.default()
    return tok if ckpt.family.pad_token == "<|endoftext|>" else Tokenizer(tok.vocab, list(tok.ranks),
                                                                         pad=ckpt.family.pad_token)


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
    unet: Callable[[Tensor, Tensor, object], Tensor]      # unet(x, t, cond) -> eps (see Pipeline.eps)
    after_step: Callable[[Tensor, int], None] | None = None   # modifies x in place after step i


@dataclass
class Pipeline:
    tokenizer: Tokenizer
    text_encoder: CLIPTextModel | None   # SD2: the OpenCLIP encoder (nets/openclip.py); None in the SDXL refiner
    unet: UNet               # pipe.unet(latents, timesteps, context) -> noise prediction
    vae: VAE
    checkpoint: Checkpoint
    device: torch.device
    precision: Precision
    load_seconds: float = 0.0
    loras: LoraLibrary | None = None             # LoRA folders, files opened and checked against the model
    embeddings: EmbeddingFolders | None = None   # textual-inversion folders
    patcher: Patcher = field(default_factory=Patcher)   # the LoRAs merged into the weights now
    text_encoder_2: torch.nn.Module | None = None   # SDXL's OpenCLIP bigG (the refiner's only text encoder)
    refiner: Pipeline | None = None                 # SDXL: the second stage of requests with refiner_start
    vae_tiling: str = "auto"   # VAE_TILING: decode/encode in blended tiles (auto: when the whole would not fit)
    taesd: torch.nn.Module | None = None   # decode with this TAESD decoder instead of the VAE (--vae-decoder taesd)

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
        """(B, 77*k, 768): the text encoder's last hidden state after the final layer norm, for A1111 prompt
        syntax (see prompts.py): emphasis weights, BREAK, prompts longer than 75 tokens in chunks of 75,
        textual-inversion names from the embedding folders. The prompts' `<lora:...>` tags are applied: the
        networks then hold exactly those LoRAs (until a request asks for others). Without syntax and within 75
        tokens: (B, 77, 768), the plain encoding."""
        texts, tags = zip(*(prompts_.extract_networks(p) for p in prompts)) if prompts else ((), ())
        self.patcher.set(self.networks(), self._open_loras([(t.name, t.te, t.unet) for ts in tags for t in ts]))
        return self._encode(list(texts), clip_skip)[0]

    def networks(self) -> dict[str, torch.nn.Module]:
        """The networks a LoRA may patch, by component name."""
        nets = {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {k: v for k, v in nets.items() if v is not None}

    def text_networks(self) -> dict[str, torch.nn.Module]:
        return {k: v for k, v in self.networks().items() if k != "unet"}

    @property
    def vocab_size(self) -> int:
        return next(iter(self.text_networks().values())).config.vocab_size

    def eps(self, x: Tensor, t, cond) -> Tensor:
        """The UNet on conditioning `cond`: the text context (B, M, D), or (context, y) for SDXL's added y."""
        return self.unet(x, t, *cond) if isinstance(cond, tuple) else self.unet(x, t, cond)

    @torch.inference_mode()
    def encode_text(self, prompts: list[str], clip_skip: int = 1, negative: bool = False, width: int | None = None,
                    height: int | None = None):
        """The UNet's conditioning for prompts: (B, 77*k, D), or for SDXL (context, y (B, adm)) with y from the pooled
        text and the time ids of a width x height image (the native size when not given). negative: the
        negative side (the refiner's lower aesthetic score; an empty prompt is zeros where the model asks so)."""
        texts = [prompts_.extract_networks(p)[0] for p in prompts]
        context, _, pooled = self._encode(texts, clip_skip)
        return self._conditioning(context, pooled, texts, negative, width, height)

    def _conditioning(self, context, pooled, texts, negative, width, height):
        family = self.checkpoint.family
        if negative and self.checkpoint.zero_negative:   # diffusers' force_zeros_for_empty_prompt
            empty = torch.tensor([t == "" for t in texts], device=context.device)
            context = context.masked_fill(empty[:, None, None], 0)
            pooled = None if pooled is None else pooled.masked_fill(empty[:, None], 0)
        if family.added is None:
            return context
        w, h = width or self.checkpoint.native_size[0], height or self.checkpoint.native_size[1]
        return context, family.added(pooled, w, h, negative, self.unet.config)

    def _chunks(self, texts: list[str], table: ExtraTokens) -> list[list[prompts_.Chunk]]:
        match = self.embeddings.matcher(table) if self.embeddings is not None else None
        comma = self.tokenizer.vocab.get(",</w>")
        return [prompts_.chunk_prompt(t, self.tokenizer.encode, comma, match) for t in texts]

    def _encode(self, texts: list[str], clip_skip: int, min_chunks: int = 1) -> tuple[Tensor, ExtraTokens, Tensor | None]:
        """(B, 77*k, D) conditioning of tag-free texts, the textual-inversion vectors they used, and the first
        chunk's pooled text (B, P) (SDXL; None for SD1/SD2)."""
        table = ExtraTokens(self.vocab_size)
        batch = self._chunks(texts, table)
        keys = ENCODER_KEYS.get(self.checkpoint.family.name, {})
        extras = {}
        for name in self.text_networks():
            rows = table.rows(keys.get(name, SINGLE))
            extras[name] = rows.to(self.device) if rows is not None else None
        special = prompts_.SpecialIds(self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id)
        nets, family = self.text_networks(), self.checkpoint.family

        def encode_chunk(ids):  # (B, 77) -> (B, 77, D), pooled (B, P) or None
            return family.encode_chunk(nets, ids, clip_skip, extras)

        cond, pooled = prompts_.encode_chunks(batch, encode_chunk, special, self.device, min_chunks)
        return cond, table, None if pooled is None else pooled.float()

    def _open_loras(self, wanted: list[tuple[str, float, float]]) -> list:
        """[(file, patches, te, unet)] for [(path or name, te, unet)]: opened and checked against the model."""
        if not wanted:
            return []
        library = self.loras if self.loras is not None else LoraLibrary((), self.checkpoint)
        return [(*library.open(source), te, unet) for source, te, unet in wanted]

    def _request_loras(self, req: GenerationRequest) -> list:
        return self._open_loras(wanted_loras(req))

    def _extra_params(self, req: GenerationRequest) -> tuple:
        """A1111's `Lora hashes` and `TI hashes` for the request (opening every LoRA and embedding it names: a bad
        one is refused here, before any denoising)."""
        loras = self._request_loras(req)
        table = ExtraTokens(self.vocab_size)
        self._chunks([prompts_.extract_networks(t)[0] for t in dict.fromkeys(req.prompts + req.negative_prompts)], table)
        clean = lambda name: name.replace(":", "").replace(",", "")
        out = []
        if loras:
            out.append(("Lora hashes", ", ".join(dict.fromkeys(f"{clean(lora.name)}: {lora.shorthash}"
                                                               for lora, *_ in loras))))
        if table.used:
            out.append(("TI hashes", ", ".join(f"{clean(e.name)}: {e.shorthash}" for e in table.used.values())))
        return tuple(out)

    @torch.inference_mode()
    def decode(self, latents: Tensor, tiling: str | None = None) -> Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), nominally in [-1, 1] (not clamped). With a TAESD
        decoder (load(taesd=...)) that decodes; else the VAE, tiled per `tiling` (default: the pipeline's)."""
        latents = latents.to(self.device)
        if self.taesd is not None:
            return self.taesd(latents)
        tile = self._vae_tile(tiling, self.vae.decode_tile(*latents.shape[2:], decode_budget(self.device)), 32)
        return self.vae.decode(latents, tile).float()

    @torch.inference_mode()
    def encode(self, images: Tensor, tiling: str | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> posterior mean times the scaling factor, (B, 4, H/8, W/8)."""
        return self.vae.encode(images.to(self.device), self._encode_tile(images, tiling)).float()

    def _vae_tile(self, tiling: str | None, needed: int | None, default: int) -> int | None:
        """The tile size for `tiling` (auto|on|off): auto tiles only when the whole would not fit the budget."""
        tiling = tiling or self.vae_tiling
        if tiling not in VAE_TILING:
            raise SdgenError(f"vae tiling must be one of {', '.join(VAE_TILING)}, not {tiling!r}")
        return None if tiling == "off" else needed if tiling == "auto" else (needed or default)

    def _encode_tile(self, images: Tensor, tiling: str | None = None) -> int | None:
        return self._vae_tile(tiling, self.vae.encode_tile(*images.shape[2:], decode_budget(self.device)), 256)

    def _encode_sample(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """A posterior sample of one image (1, 3, H, W), drawing from `generator` as diffusers does."""
        mean, logvar = self.vae.encode_moments(image.to(self.device), self._encode_tile(image))
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
        request = request.resolve(self.checkpoint)
        return replace(request, extra_params=self._extra_params(request))

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
            pil = (self.refiner if req.refiner_start is not None else self).to_images(x)  # the last stage's VAE
            timings["decode"] = time.perf_counter() - t0
        return Result(pil, x, req.seeds, timings, req)

    def to_images(self, latents: Tensor) -> list:
        """Latents (B, 4, h, w) as the sampler leaves them -> B PIL images: generate()'s own decode, shared with
        the server (which runs the denoise generator itself, to preview and stop it), so both give the same pixels."""
        give_back_freed_memory()  # what the denoising loop freed, before the decode's large activations
        pixels = torch.cat([self.decode(latents[i : i + 1]) for i in range(len(latents))])  # one at a time: less memory
        give_back_freed_memory()
        return images.to_pil(pixels)

    def denoise(self, request=None, /, *args, **kwargs) -> Iterator[tuple[Tensor, int, int]]:
        """The denoising loop as a generator: yields (latents, step, total) after every step."""
        return self._denoise(self.request(request, *args, **kwargs), {})

    @torch.inference_mode()
    def _denoise(self, req: GenerationRequest, timings: dict) -> Iterator[tuple[Tensor, int, int]]:
        generators = [torch.Generator("cpu").manual_seed(s) for s in req.seeds]

        def noise(like):  # (B, C, h, w) standard normal, one CPU generator per image: same on any device
            return torch.cat([torch.randn((1, *like.shape[1:]), generator=g) for g in generators]).to(like.device)

        t0 = time.perf_counter()
        loras = self._request_loras(req)
        if loras or self.patcher.active:
            self.patcher.set(self.networks(), loras)   # merged, or restored exactly
            timings["lora"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cond, uncond = self._text(req)
        timings["text"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        p = make_plan(req.sampler, req.steps, self.scheduler, schedule=req.schedule,
                      strength=1.0 if req.mode == "txt2img" else req.strength)
        start = MODES[req.mode](self, req, p, generators, noise)
        denoiser = guidance.model_denoiser(guidance.cfg(start.unet, cond, uncond, req.guidance_scale), self.scheduler)
        timings["prepare"] = time.perf_counter() - t0

        stop = p.steps
        if req.refiner_start is not None:   # diffusers' denoising_end: the steps at timesteps >= the cut-off
            if self.refiner is None:
                raise SdgenError("refiner_start needs a pipeline loaded with a refiner (load(..., refiner=MODEL), "
                                 "--refiner MODEL)")
            stop = int((p.timesteps >= _cutoff(req.refiner_start, p)).sum())
        t0 = time.perf_counter()
        x = start.x
        for i, x in enumerate(p.run(denoiser, start.x, noise)):
            if start.after_step is not None:
                start.after_step(x, i)
            yield x, i, p.steps
            if i + 1 == stop:
                break
        timings["denoise"] = time.perf_counter() - t0
        if stop < p.steps:
            yield from self.refiner._refine(req, x, stop, p.steps, timings)

    def _text(self, req: GenerationRequest):
        """(cond, uncond or None): the conditioning of the prompts and, with guidance, of the negative prompts;
        prompt and negative prompt with different chunk counts are evened with the empty prompt's chunk."""
        untagged = lambda texts: [prompts_.extract_networks(t)[0] for t in texts]
        texts = untagged(req.prompts)
        context, _, pooled = self._encode(texts, req.clip_skip)
        if req.guidance_scale <= 1:
            return self._conditioning(context, pooled, texts, False, req.width, req.height), None
        negatives = untagged(req.negative_prompts)
        ucontext, _, upooled = self._encode(negatives, req.clip_skip)
        if context.shape[1] != ucontext.shape[1]:
            context, ucontext = prompts_.even(context, ucontext, self._encode([""], req.clip_skip)[0])
        return (self._conditioning(context, pooled, texts, False, req.width, req.height),
                self._conditioning(ucontext, upooled, negatives, True, req.width, req.height))

    @torch.inference_mode()
    def _refine(self, req: GenerationRequest, x: Tensor, done: int, total: int, timings: dict):
        """The refiner's stage (this pipeline is the refiner): diffusers' denoising_start, from the base's latents
        x at the cut-off, with its own text encoder and scheduler; its noise (ancestral samplers) comes from fresh
        generators seeded with the images' seeds. Yields (latents, step, total) with steps counted on from `done`."""
        generators = [torch.Generator("cpu").manual_seed(s) for s in req.seeds]

        def noise(like):
            return torch.cat([torch.randn((1, *like.shape[1:]), generator=g) for g in generators]).to(like.device)

        t0 = time.perf_counter()
        self.patcher.set(self.networks(), [])
        cond, uncond = self._text(req)
        full = make_plan(req.sampler, req.steps, self.scheduler, schedule=req.schedule)
        p = full.tail(int((full.timesteps >= _cutoff(req.refiner_start, full)).sum()))
        denoiser = guidance.model_denoiser(guidance.cfg(self.eps, cond, uncond, req.guidance_scale), self.scheduler)
        timings["refiner text"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i, x in enumerate(p.run(denoiser, x.to(self.device), noise)):
            yield x, done + i, max(total, done + p.steps)
        timings["refiner"] = time.perf_counter() - t0

    def _latent_shape(self, req: GenerationRequest) -> tuple[int, int, int, int]:
        return req.count, self.unet.config.out_channels, req.height // 8, req.width // 8



def wanted_loras(req: GenerationRequest) -> list[tuple[str, float, float]]:
    """[(path or name, te, unet)] a request asks for: its `loras`, then its prompts' `<lora:...>` tags (each
    distinct tag once)."""
    from .request import lora_weights

    tags = dict.fromkeys(t for text in dict.fromkeys(req.prompts + req.negative_prompts)
                         for t in prompts_.extract_networks(text)[1])
    for tag in tags:
        if tag.kind != "lora":
            raise SdgenError(f"prompt: <{tag.kind}:{tag.name}:...>: sdgen applies LoRAs (<lora:...>), not {tag.kind}")
    return lora_weights(req.loras) + [(t.name, t.te, t.unet) for t in tags]


def check_loras(req: GenerationRequest, ckpt: Checkpoint, lora_dirs=()) -> None:
    """Open every LoRA a request names and check it against an opened (not loaded) checkpoint: an unknown name, a
    LoRA for another family or one whose shapes do not fit is one line before any weight loads."""
    library = LoraLibrary(lora_dirs, ckpt)
    for source, _, _ in wanted_loras(req):
        library.open(source)


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


VAE_TILING = ("auto", "on", "off")
# bytes of VAE activations before auto tiling: a 512x512 SD1 decode (0.5 GiB in bf16, 1.0 GiB computed in fp32) is
# never tiled (a 2x2-tiled one costs 3.5x the time: the halos and the statistics pass), 1024x1024 and up always are
DECODE_BUDGET = 2**30


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # the process's own C library: glibc's has it
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl), or Windows
        return None


_TRIM = _malloc_trim()


def give_back_freed_memory() -> None:
    """Return the C heap's free pages to the system (glibc). The UNet's freed activations stay in the allocator's
    pools otherwise, and the VAE decode's peak lands on top of them: 0.2-0.4 GiB more peak RSS for a 512x512
    SD1 image computed in fp32. Takes milliseconds; called between stages, never inside a loop. The weight-cast
    buffer (nets/layers.py) goes too."""
    release_scratch()
    if _TRIM is not None:
        _TRIM(0)


def decode_budget(device: torch.device) -> int:
    """Bytes the VAE may use for one image's activations: DECODE_BUDGET, or half of what is free if that is less."""
    have = available_memory(device)
    return int(DECODE_BUDGET if have is None else min(DECODE_BUDGET, have / 2))


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
    decode_bytes = min(req.width * req.height * widest_full_res * act * 3, DECODE_BUDGET)  # larger ones are tiled
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


def _cutoff(fraction: float, p: Plan) -> int:
    """diffusers' discrete_timestep_cutoff for denoising_end / denoising_start = fraction."""
    n = p.config.num_train_timesteps
    return int(round(n - fraction * n))


def txt2img(pipe: Pipeline, req: GenerationRequest, p: Plan, generators, noise) -> Start:
    x = noise(torch.empty(pipe._latent_shape(req), device=pipe.device))
    return Start(p.start(x), pipe.eps)


def img2img(pipe: Pipeline, req: GenerationRequest, p: Plan, generators, noise) -> Start:
    """The init image's latents noised to the first sigma of the shortened schedule."""
    image = images.to_tensor(req.init_image, req.width, req.height)
    latents = torch.cat([pipe._encode_sample(image, g) for g in generators])  # the image repeated over the batch
    x = noise(latents)
    return Start(p.start(x, latents), pipe.eps)


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
            return pipe.eps(torch.cat([x, m_lat.repeat(reps, 1, 1, 1), masked.repeat(reps, 1, 1, 1)], 1), t, context)
        return Start(x, unet)

    def blend(x, i):
        x.copy_((1 - m_lat) * p.noised(latents, noise0, i) + m_lat * x)
    return Start(x, pipe.eps, blend)


MODES: dict[str, Callable[..., Start]] = {"txt2img": txt2img, "img2img": img2img, "inpaint": inpaint}
