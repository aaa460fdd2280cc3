"""SDXL at full size with random weights: peak RSS of load + generate, and seconds per denoising step, sdgen
against diffusers, both with bfloat16 storage.

Writes a random SDXL base single file (original key names and shapes from sdgen's networks built on the meta
device, bf16, about 7 GB, one tensor at a time), then in fresh processes:
  sdgen     sdgen.load(file, dtype="bfloat16") and generate(steps, size) with CFG;
  diffusers the same UNet (UNet2DConditionModel, SDXL config, bf16, weights assigned from the same file) run for
            the same steps on the CFG batch (its text encoders and VAE are not run: the UNet is the cost).
Each prints its peak RSS (ru_maxrss) and time per step. The file is deleted unless --keep.

    python benchmarks/bench_sdxl.py [--size 1024] [--steps 2] [--dir /tmp] [--keep]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SDXL_UNET = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
             "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "layers_per_block": 2,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
             "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True}


def sdxl_shapes() -> dict:
    """{original key: shape} of SDXL base, from sdgen's networks at their real sizes, built on the meta device."""
    from sdgen.families import sdxl
    from sdgen.nets import clip, openclip, unet, vae

    configs = {"unet": unet.UNetConfig.from_diffusers(SDXL_UNET), "vae": vae.VAEConfig(scaling_factor=0.13025),
               "text_encoder": clip.CLIPConfig(),
               "text_encoder_2": openclip.OpenCLIPConfig(width=1280, layers=32, heads=20, mlp_width=5120,
                                                         projection_dim=1280)}
    shapes = {}
    for c in sdxl.COMPONENTS:
        with torch.device("meta"):
            net = c.network(configs[c.name])
        shapes.update({c.prefix + k: tuple(v.shape) for k, v in net.state_dict().items()})
    return shapes


def write_file(path: Path, shapes: dict):
    """A bf16 safetensors file written tensor by tensor (header first), so this process stays small."""
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod()) if shape else 2
        header[k] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for k, shape in shapes.items():
            scale = 1.0 if "norm" in k or "ln_" in k else 0.02
            t = (torch.randn(shape, generator=g) * scale + (1.0 if k.endswith("weight") and ("norm" in k or "ln_" in k)
                                                            else 0.0)).to(torch.bfloat16)
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes())


def run_sdgen(path: str, size: int, steps: int):
    import sdgen

    t0 = time.perf_counter()
    pipe = sdgen.load(path, dtype="bfloat16")
    load = time.perf_counter() - t0
    stamps = []
    pipe.generate("a photo of a cat", steps=steps, seed=1, width=size, height=size, output_type="latent",
                  progress=lambda i, n: stamps.append(time.perf_counter()))
    per_step = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {"load_s": load, "step_s": per_step}


def run_diffusers(path: str, size: int, steps: int):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from sdgen.nets.unet import UNetConfig, diffusers_renames

    t0 = time.perf_counter()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET).eval()
    table = diffusers_renames(UNetConfig.from_diffusers(SDXL_UNET))
    with safe_open(path, "pt") as f:
        state = {k: f.get_tensor("model.diffusion_model." + table[k]) for k in unet.state_dict()}
    unet.load_state_dict(state, assign=True, strict=True)
    load = time.perf_counter() - t0
    x = torch.randn(2, 4, size // 8, size // 8, dtype=torch.bfloat16)
    ctx = torch.randn(2, 77, 2048, dtype=torch.bfloat16)
    cond = {"text_embeds": torch.randn(2, 1280, dtype=torch.bfloat16),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.bfloat16)}
    stamps = []
    with torch.inference_mode():
        for i in range(steps):
            unet(x, 999 - i, ctx, added_cond_kwargs=cond)
            stamps.append(time.perf_counter())
    per_step = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {"load_s": load, "step_s": per_step}


def child(which: str, path: str, size: int, steps: int):
    out = (run_sdgen if which == "sdgen" else run_diffusers)(path, size, steps)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2, help="denoising steps (time per step from the second on)")
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.size, a.steps)
    path = Path(a.dir) / "sdxl-random-bf16.safetensors"
    if not path.is_file():
        t0 = time.perf_counter()
        write_file(path, sdxl_shapes())
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    try:
        for which in ("sdgen", "diffusers"):
            r = subprocess.run([sys.executable, __file__, "--child", which, str(path), "--size", str(a.size),
                                "--steps", str(a.steps)], capture_output=True, text=True)
            if r.returncode:
                print(f"{which}: failed\n{r.stderr[-2000:]}")
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{which:10s} {a.size}x{a.size}: peak RSS {res['peak_rss_gib']:.2f} GiB, load {res['load_s']:.1f} s, "
                  f"{res['step_s']:.2f} s/step (CFG batch 2, bf16 storage)")
    finally:
        if not a.keep:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
