"""Trains the built-in demo model from nothing on this machine's CPU: `python -m sdgen.demo.train --out DIR`.

The three SD1 parts are sdgen's own modules at small sizes, trained on the procedural shapes of data.py:
  1. VAE         reconstruction (L1 + L2, the object's pixels weighted up: see recon_loss) with a small KL term,
                 and latent channels 0-2 tied to the 8x8-averaged RGB (latent_rgb_loss: the eight colours lie far
                 apart in the latent space, so the UNet does not confuse them), on 64x64 crops around the shape,
                 then whole 128x128 pictures. Then its latent space is re-parametrised (exactly: quant_conv and
                 post_quant_conv absorb a per-channel affine map) so that latents times SD1's fixed 0.18215 have
                 zero mean and unit std per channel, as sdgen reads single files with that constant.
  2. latents     IMAGES fixed pictures encoded once (posterior means); captions are redrawn at every step.
  3. UNet + CLIP jointly, on SD1's schedule (scaled_linear 0.00085..0.012, 1000 steps, epsilon prediction), so
                 every sdgen sampler applies. AdamW with warmup and cosine decay, 10% empty captions for classifier-
                 free guidance, min-SNR-5 loss weights (faster convergence), offset noise (lets the model choose a
                 background colour against the small mean-colour leak SD1's schedule keeps at t = 999), EMA of
                 both networks (the text encoder changes jointly with the UNet: their averages must match).
                 Every third step also trains the VAE decoder alone (the encoder, so the latents, stay fixed):
                 colours are what a small SD1 VAE learns slowest (see FULL).
  4. export      DIR/demo.safetensors: an SD1 single file, original CompVis keys, fp16.

Every step draws its data from generators seeded by (seed, phase, step), and checkpoints hold all model and
optimiser state, so an interrupted run resumes at its last checkpoint (rerun the same command) and ends with the
same weights as an uninterrupted one. A resumed run may be given another --minutes: the step counts, hence what
is left of the learning-rate schedule, change; the networks may not. `--minutes` scales the step counts (60: the
shipped recipe, 68.9 minutes on 2 idle cores of an AMD EPYC: VAE 16.8, encode 5.8, UNet 46.4); the same
arguments give the same model.
"""

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..nets.clip import CLIPConfig, CLIPTextModel
from ..nets.tokenizer import Tokenizer
from ..nets.unet import UNet, UNetConfig
from ..nets.vae import SD1_SCALING_FACTOR, VAE, VAEConfig
from . import data

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "clip": "cond_stage_model.transformer."}
METADATA = {"modelspec.resolution": f"{data.SIDE}x{data.SIDE}", "modelspec.title": "sdgen demo"}
PHASES = ("vae", "encode", "unet", "done")
MAX_THREADS = torch.get_num_threads()  # before ThreadChooser changes it


@dataclass(frozen=True)
class Recipe:
    vae: VAEConfig
    clip: CLIPConfig
    unet: UNetConfig
    vae_steps: int = 2000
    vae_batch: int = 8
    vae_crop: int = 64          # crops for the first 80% of the VAE steps; then whole pictures, a quarter as many
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5     # per latent element, against the per-pixel L1
    object_weight: float = 0.0  # extra reconstruction weight of the object's pixels (see recon_loss)
    latent_rgb: float = 0.0     # weight of "latent channels 0-2 are the 8x8-averaged RGB" (see latent_rgb_loss)
    images: int = 6_000         # pictures encoded for the diffusion phase
    unet_steps: int = 1300
    unet_batch: int = 32
    unet_lr: float = 6e-4
    warmup: int = 100
    ema_decay: float = 0.998
    cfg_dropout: float = 0.1
    noise_offset: float = 0.1
    min_snr: float = 5.0
    eval_every: int = 250       # UNet steps between prompt-following checks in the log (0: none)
    decoder_every: int = 3      # during the UNet phase, a VAE decoder step every this many steps (0: none)
    decoder_lr: float = 2e-4

    def scaled(self, minutes: float) -> "Recipe":
        f = minutes / 60
        return replace(self, vae_steps=max(2, round(self.vae_steps * f)), unet_steps=max(2, round(self.unet_steps * f)))


FULL = Recipe(
    # 4 levels: 128x128 -> 16x16x4 latents. GroupNorm (32 groups, SD1's) normalises each group over the picture, so
    # on a flat background only the pattern within a group tells one colour from another: 2 channels per group
    # keep only which of the two is larger. The decoder's last norm has 64 channels (2 per group); the 16x16 level,
    # where the encoder's last norm and both mid blocks sit, has 128 (4 per group), cheap at 16x16 (with 96, 3 per
    # group, the VAE alone read back 79% of backgrounds after 600 steps; with 128, all of them)
    vae=VAEConfig(ch=32, ch_mult=(2, 1, 1, 4), num_res_blocks=1),
    vae_steps=1500,
    object_weight=1.0,
    latent_rgb=1.0,
    # the real 49408-token vocabulary dominates: 60 wide (12 heads of 5: single files do not record the head
    # count, so loaders assume CLIP-L's 12) keeps it at 3.1M parameters
    clip=CLIPConfig(hidden_size=60, intermediate_size=240, num_layers=3),
    # 16x16 -> 8x8 -> 4x4 latents; cross attention at 8x8 and 4x4 (where it is cheap)
    unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                    context_dim=60),
    unet_steps=2400,
    unet_lr=8e-4,
)
TINY = Recipe(  # seconds: for tests of the machinery, not a usable model
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
    clip=CLIPConfig(hidden_size=24, intermediate_size=48, num_layers=1),
    unet=UNetConfig(model_channels=32, channel_mult=(1, 1), num_res_blocks=1, attention_levels=(1,), context_dim=24),
    vae_steps=4, vae_batch=2, vae_crop=32, images=8, unet_steps=6, unet_batch=4, warmup=2, eval_every=0,
    object_weight=1.0, latent_rgb=1.0,
)


# ---------------------------------------------------------------------------------------------- helpers


def step_rng(seed: int, phase: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The generators of one step: the same step draws the same data whether or not the run was resumed."""
    key = [seed, PHASES.index(phase), step]
    g = torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))
    return np.random.default_rng(key), g


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def init_clip(clip: CLIPTextModel):
    """OpenAI CLIP's embedding initialisation (PyTorch's N(0, 1) default is far larger)."""
    torch.nn.init.normal_(clip.text_model.embeddings.token_embedding.weight, std=0.02)
    torch.nn.init.normal_(clip.text_model.embeddings.position_embedding.weight, std=0.01)


def build(recipe: Recipe, seed: int):
    torch.manual_seed(seed)
    vae, clip, unet = VAE(recipe.vae), CLIPTextModel(recipe.clip), UNet(recipe.unet)
    init_clip(clip)
    return vae, clip, unet


def normalise_latents(vae: VAE, mean: torch.Tensor, std: torch.Tensor):
    """Re-parametrise the latent space in place so that old latent u becomes (u - mean) / (std * 0.18215):
    the scaled latents the UNet sees then have zero mean and unit std per channel. Exact: the encoder's
    quant_conv (mean and logvar rows) and the decoder's post_quant_conv absorb the affine map. mean, std: (4,)."""
    k = std * SD1_SCALING_FACTOR  # old u = k * new u + mean
    z = mean.numel()
    with torch.no_grad():
        q = vae.quant_conv
        q.weight[:z] /= k[:, None, None, None]
        q.bias[:z] = (q.bias[:z] - mean) / k
        q.bias[z:] -= 2 * torch.log(k)  # logvar of u / k
        p = vae.post_quant_conv
        p.bias += (p.weight[:, :, 0, 0] @ mean)
        p.weight *= k[None, :, None, None]


def pictures(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """The scenes' pictures (n, 3, 128, 128) in [-1, 1] and their objects' coverage (n, 1, 128, 128) in [0, 1]."""
    x = data.to_tensor_batch(np.stack([data.render(s) for s in scenes]))
    mask = np.stack([data.shape_mask(s.shape, s.cx, s.cy, s.half) for s in scenes])
    return x, torch.from_numpy(mask).float()[:, None]


def recon_loss(y: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, object_weight: float) -> torch.Tensor:
    """L1 + L2 per pixel (the squares weigh wrong colours, large errors, more) over the whole picture, plus
    object_weight times the same over the object's pixels alone: a small shape is a few percent of the pixels,
    yet its colour is half of what a caption says."""
    err = ((y - x).abs() + (y - x).pow(2)).mean(1, keepdim=True)
    return err.mean() + object_weight * (err * mask).sum() / mask.sum().clamp(min=1.0)


def latent_rgb_loss(mean: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Latent channels 0-2 against the picture's RGB averaged over each latent pixel's 8x8 patch (both about
    [-1, 1]). Reconstruction alone lets the encoder put every flat colour on one line of the latent space, so the
    eight backgrounds end up a fraction of a standard deviation apart and the UNet confuses them (green and black
    were 0.08 apart in a 2600-step run); tying three channels to RGB spreads them as far apart as their pixels."""
    return F.mse_loss(mean[:, :3], F.avg_pool2d(x, 8))


def export(vae: VAE, clip: CLIPTextModel, unet: UNet, path: Path):
    """An SD1 single file: module paths are the CompVis keys, so the state dicts only need their prefixes."""
    from safetensors.torch import save_file

    tensors = {}
    for name, module in (("unet", unet), ("vae", vae), ("clip", clip)):
        for key, t in module.state_dict().items():
            tensors[PREFIXES[name] + key] = t.detach().to(torch.float16).contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=METADATA)
    os.replace(tmp, path)


def sd1_alphas_cumprod() -> torch.Tensor:
    """(1000,) SD1's training schedule: scaled_linear betas from 0.00085 to 0.012 (as diffusers computes them)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, 0)


@torch.inference_mode()
def sample(vae, clip, unet, tokenizer, prompts, seeds, *, steps=20, scale=7.5):
    """Pictures (uint8, (B, 128, 128, 3)) from in-memory networks: Euler with classifier-free guidance on
    diffusers' EulerDiscreteScheduler timesteps (linspace from 999 to 0). For the log's checks during training;
    the tests go through sdgen.load()."""
    ac = sd1_alphas_cumprod().double()
    train_sigmas = ((1 - ac) / ac).sqrt()
    ts = torch.linspace(999, 0, steps, dtype=torch.float64)
    lo = ts.floor().long().clamp(max=998)
    sigmas = train_sigmas[lo] + (ts - lo) * (train_sigmas[lo + 1] - train_sigmas[lo])
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()
    context = torch.cat([clip(tokenizer([""] * len(prompts))), clip(tokenizer(list(prompts)))])
    side = data.SIDE // 8
    x = torch.cat([torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = x * sigmas[0]
    for i, t in enumerate(ts.float()):
        s, s_next = sigmas[i], sigmas[i + 1]
        uncond, cond = unet(torch.cat([x, x]) / (s * s + 1).sqrt(), t, context).chunk(2)
        eps = uncond + scale * (cond - uncond)
        x = x + (s_next - s) * eps  # Euler on dx/dsigma = eps
    pixels = vae.decode(x).clamp(-1, 1)
    return ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def eval_prompts(n: int = 24):
    """(prompts, expected (colour, shape, background)) over the held-out triples, plain captions."""
    triples = list(data.HELD_OUT)[:n]
    return [data.caption(c, s, b) for c, s, b in triples], triples


# ---------------------------------------------------------------------------------------------- training


class ThreadChooser:
    """Picks the faster of 1 and all threads by timing steps, again every `every` steps. The CPU may be shared:
    when other processes are busy, OpenMP threads wait on each other and 2 threads run 2-3x slower than 1."""

    def __init__(self, every: int = 100, probe: int = 4):
        self.options = sorted({1, MAX_THREADS})
        self.every, self.probe = every, probe
        self.times = {n: [] for n in self.options}
        self.last = None  # (threads, start time) of the step being timed

    def tick(self, step: int):
        """Call at the start of every step."""
        now = time.perf_counter()
        if self.last is not None:
            self.times[self.last[0]].append(now - self.last[1])
            self.last = None
        if len(self.options) == 1:
            return
        pos = step % self.every
        trial = pos // self.probe
        if trial < len(self.options):  # probing: time `probe` steps with each option (the first one warms up)
            if pos % self.probe == 0:
                self.times[self.options[trial]] = []
            torch.set_num_threads(self.options[trial])
            if pos % self.probe:
                self.last = (self.options[trial], now)
        elif trial == len(self.options) and pos % self.probe == 0:
            best = min(self.options, key=lambda n: np.median(self.times[n]) if self.times[n] else np.inf)
            torch.set_num_threads(best)



class Trainer:
    def __init__(self, out: Path, recipe: Recipe, seed: int, checkpoint_minutes: float, stop_after: int | None,
                 log):
        self.out, self.recipe, self.seed, self.log = out, recipe, seed, log
        self.checkpoint_seconds = checkpoint_minutes * 60
        self.stop_after = stop_after  # optimiser steps this run may take before it checkpoints and stops (tests)
        self.steps_this_run = 0
        self.vae, self.clip, self.unet = build(recipe, seed)
        self.ema_clip, self.ema_unet = build(recipe, seed)[1:]
        self.ema_clip.load_state_dict(self.clip.state_dict())
        self.ema_unet.load_state_dict(self.unet.state_dict())
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
        self.opt = torch.optim.AdamW([*self.clip.parameters(), *self.unet.parameters()], lr=recipe.unet_lr,
                                     betas=(0.9, 0.99), weight_decay=0.01)
        self.phase, self.step = "vae", 0
        self.latents = self.scenes = None
        self.tokenizer = Tokenizer.default()
        self.last_save = time.monotonic()

    # ---- checkpoints
    @property
    def ckpt_path(self):
        return self.out / "checkpoint.pt"

    def save(self):
        state = {"phase": self.phase, "step": self.step, "recipe": asdict(self.recipe), "seed": self.seed,
                 "vae": self.vae.state_dict(), "clip": self.clip.state_dict(), "unet": self.unet.state_dict(),
                 "ema_clip": self.ema_clip.state_dict(), "ema_unet": self.ema_unet.state_dict(),
                 "vae_opt": self.vae_opt.state_dict(), "opt": self.opt.state_dict()}
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)
        self.last_save = time.monotonic()
        self.log(f"checkpoint: {self.phase} step {self.step}")

    def load(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        state = torch.load(self.ckpt_path, weights_only=True)
        # the networks and seed must match; step counts may differ (another --minutes stretches what is left)
        same = all(state["recipe"][k] == v for k, v in asdict(self.recipe).items() if k in ("vae", "clip", "unet"))
        if not same or state["seed"] != self.seed:
            raise SystemExit(f"{self.ckpt_path} was made with other settings; use another --out or delete it")
        for name in ("vae", "clip", "unet", "ema_clip", "ema_unet", "vae_opt", "opt"):
            getattr(self, name).load_state_dict(state[name])
        self.phase, self.step = state["phase"], state["step"]
        if self.phase in ("unet", "done"):
            self.latents, self.scenes = self._load_latents()
        self.log(f"resuming at {self.phase} step {self.step}")
        return True

    def maybe_save(self) -> bool:
        """Checkpoint every few minutes; True when this run must stop (--stop-after reached)."""
        self.steps_this_run += 1
        stop = self.stop_after is not None and self.steps_this_run >= self.stop_after
        if stop or time.monotonic() - self.last_save > self.checkpoint_seconds:
            self.save()
        return stop

    # ---- phases
    def run(self) -> Path | None:
        # Adam's second moments and late-training gradients reach denormal floats, 10x slower on x86 CPUs
        torch.set_flush_denormal(True)
        self.load()
        t0 = time.monotonic()
        if self.phase == "vae" and self.train_vae():
            return None
        if self.phase == "encode":
            self.encode()
        if self.phase == "unet" and self.train_unet():
            return None
        path = self.out / "demo.safetensors"
        export(self.vae, self.ema_clip, self.ema_unet, path)
        self.log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) after {(time.monotonic() - t0) / 60:.1f} min")
        return path

    def train_vae(self) -> bool:
        r, vae = self.recipe, self.vae
        bar = _bar(r.vae_steps, self.step, "vae")
        threads = ThreadChooser()
        while self.step < r.vae_steps:
            threads.tick(self.step)
            rng, g = step_rng(self.seed, "vae", self.step)
            whole = self.step >= 0.8 * r.vae_steps
            n = max(1, r.vae_batch // 4) if whole else r.vae_batch
            scenes = [data.Scene.random(rng) for _ in range(n)]
            x, mask = pictures(scenes)  # (n, 3, 128, 128), (n, 1, 128, 128)
            if not whole:  # crops around the shape: a crop of background alone has no colour to tell (see Recipe)
                c = r.vae_crop
                corner = lambda centre: int(np.clip(centre - c / 2 + rng.uniform(-c / 4, c / 4), 0, data.SIDE - c))
                corners = [(corner(s.cy), corner(s.cx)) for s in scenes]
                x, mask = (torch.stack([img[:, y:y + c, x_:x_ + c] for img, (y, x_) in zip(t, corners)])
                           for t in (x, mask))
            for group in self.vae_opt.param_groups:
                group["lr"] = lr_at(self.step, r.vae_steps, r.vae_lr, 50)
            mean, logvar = vae.encode_moments(x)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
            y = vae.decoder(vae.post_quant_conv(z))
            rec = (y - x).abs().mean()
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
            loss = recon_loss(y, x, mask, r.object_weight) + r.kl_weight * kl
            if r.latent_rgb:
                loss = loss + r.latent_rgb * latent_rgb_loss(mean, x)
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.vae_opt.step()
            self.step += 1
            bar.set_postfix(l1=f"{rec.item():.4f}", kl=f"{kl.item():.1f}")
            bar.update()
            if self.step % 100 == 0:
                self.log(f"vae step {self.step}/{r.vae_steps} l1 {rec.item():.4f} kl {kl.item():.2f} "
                         f"threads {torch.get_num_threads()}")
            if self.maybe_save():
                bar.close()
                return True
        bar.close()
        self.phase, self.step = "encode", 0
        self.save()
        return False

    @torch.no_grad()
    def encode(self):
        """Encode the fixed pictures once; then fit the latent space to SD1's scaling factor."""
        r, vae = self.recipe, self.vae
        rng = np.random.default_rng([self.seed, PHASES.index("encode")])
        scenes = [data.Scene.random(rng) for _ in range(r.images)]
        means = []
        for i in _bar(r.images, 0, "encode", chunks=64):
            x = data.to_tensor_batch(np.stack([data.render(s) for s in scenes[i:i + 64]]))
            means.append(vae.encode_moments(x)[0])
        u = torch.cat(means)  # (N, 4, 16, 16) unscaled posterior means
        mean, std = u.mean((0, 2, 3)), u.std((0, 2, 3))
        self.log(f"raw latents: mean {mean.tolist()} std {std.tolist()}")
        normalise_latents(vae, mean, std)
        latents = (u - mean[None, :, None, None]) / std[None, :, None, None]  # = vae.encode(x), scaled
        torch.save({"latents": latents, "scenes": [asdict(s) for s in scenes]}, self.out / "latents.pt")
        self.latents, self.scenes = latents, scenes
        self.log(f"scaled latents: std {latents.std().item():.3f} (x {SD1_SCALING_FACTOR})")
        self.phase, self.step = "unet", 0
        self.save()

    def _load_latents(self):
        saved = torch.load(self.out / "latents.pt", weights_only=False)
        return saved["latents"], [data.Scene(**s) for s in saved["scenes"]]

    def train_unet(self) -> bool:
        r = self.recipe
        ac = sd1_alphas_cumprod()
        snr = ac / (1 - ac)
        weight = snr.clamp(max=r.min_snr) / snr  # min-SNR-gamma for epsilon prediction
        bar = _bar(r.unet_steps, self.step, "unet")
        threads = ThreadChooser()
        params = [*self.clip.parameters(), *self.unet.parameters()]
        ema_params = [*self.ema_clip.parameters(), *self.ema_unet.parameters()]
        while self.step < r.unet_steps:
            threads.tick(self.step)
            rng, g = step_rng(self.seed, "unet", self.step)
            idx = rng.integers(len(self.scenes), size=r.unet_batch)
            captions = [self.scenes[i].caption(rng) if rng.random() >= r.cfg_dropout else "" for i in idx]
            x0 = self.latents[torch.from_numpy(idx)]                      # (B, 4, 16, 16)
            t = torch.randint(0, len(ac), (r.unet_batch,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            noise += r.noise_offset * torch.randn((*x0.shape[:2], 1, 1), generator=g)
            a = ac[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            for group in self.opt.param_groups:
                group["lr"] = lr_at(self.step, r.unet_steps, r.unet_lr, r.warmup)
            pred = self.unet(xt, t, self.clip(self.tokenizer(captions)))
            per_sample = F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))
            loss = (weight[t] * per_sample).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.opt.step()
            decay = min(r.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - decay)
            if r.decoder_every and self.step % r.decoder_every == 0:
                self.decoder_step(self.step)
            self.step += 1
            bar.set_postfix(loss=f"{per_sample.mean().item():.4f}")
            bar.update()
            if self.step % 100 == 0:
                self.log(f"unet step {self.step}/{r.unet_steps} loss {per_sample.mean().item():.4f} "
                         f"threads {torch.get_num_threads()}")
            if r.eval_every and (self.step % r.eval_every == 0 or self.step == r.unet_steps):
                self.evaluate()
            if self.maybe_save():
                bar.close()
                return True
        bar.close()
        self.phase = "done"
        self.save()
        return False

    def decoder_step(self, step: int):
        """One step of the VAE decoder alone on whole pictures. The encoder, hence the latents the UNet learns,
        stays fixed: the decoder keeps improving (its colours converge slowest) at no cost to the UNet."""
        rng, g = step_rng(self.seed, "done", step)
        scenes = [data.Scene.random(rng) for _ in range(max(1, self.recipe.vae_batch // 4))]
        x, mask = pictures(scenes)
        vae = self.vae
        with torch.no_grad():
            mean, logvar = vae.encode_moments(x)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        y = vae.decoder(vae.post_quant_conv(z))
        loss = recon_loss(y, x, mask, self.recipe.object_weight)
        for group in self.vae_opt.param_groups:
            group["lr"] = self.recipe.decoder_lr
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.vae_opt.step()  # parameters without a gradient (the encoder's) are left alone

    def evaluate(self):
        """Prompt following of the EMA networks on held-out triples, logged (a few seconds)."""
        from .classify import classify, score

        prompts, expected = eval_prompts()
        pics = sample(self.vae, self.ema_clip, self.ema_unet, self.tokenizer, prompts, range(len(prompts)))
        s = score([classify(p) for p in pics], expected)
        self.log(f"eval at unet step {self.step}: " + " ".join(f"{k} {v:.2f}" for k, v in s.items()))


def _bar(total, start, desc, chunks=1):
    from tqdm import tqdm

    if chunks > 1:
        return tqdm(range(0, total, chunks), desc=desc, unit="chunk", dynamic_ncols=True)
    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sdgen.demo.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for checkpoints, the log and demo.safetensors")
    ap.add_argument("--minutes", type=float, default=60.0,
                    help="scales the step counts; 60 (default) is the shipped model, about an hour on 2 CPU cores")
    ap.add_argument("--tiny", action="store_true", help="tiny networks and a few steps: checks the machinery")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-minutes", type=float, default=3.0)
    ap.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a stop
    args = ap.parse_args(argv)
    recipe = TINY if args.tiny else FULL.scaled(args.minutes) if args.minutes != 60 else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    logfile = args.out / "train.log"

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        with open(logfile, "a") as f:
            f.write(line + "\n")
        from tqdm import tqdm

        tqdm.write(line)

    log(f"recipe {json.dumps(asdict(recipe))}")
    return Trainer(args.out, recipe, args.seed, args.checkpoint_minutes, args.stop_after, log).run()


if __name__ == "__main__":
    main()
