"""Peak memory of loading an SD1.5-size fp32 single file as bfloat16.

Writes a random fp32 `.safetensors` with the real SD1.5 key names and shapes (about 4.3 GB, one tensor at a
time so this script stays small), then in a fresh process opens it and loads UNet, VAE and text encoder as
bfloat16 with `load_module`, and compares peak RSS with the bf16 size of the weights. The file is deleted.

    python benchmarks/load_memory.py [--dir /tmp] [--keep]
"""

import argparse
import json
import math
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

EXPECTED = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.transformer."}


def clip_l_shapes(width=768, layers=12, vocab=49408, positions=77):
    """The OpenAI CLIP ViT-L/14 text encoder's keys, for when sdgen.clip is not importable."""
    s = {"text_model.embeddings.token_embedding.weight": (vocab, width),
         "text_model.embeddings.position_embedding.weight": (positions, width),
         "text_model.final_layer_norm.weight": (width,), "text_model.final_layer_norm.bias": (width,)}
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[p + f"self_attn.{proj}.weight"], s[p + f"self_attn.{proj}.bias"] = (width, width), (width,)
        for ln in ("layer_norm1", "layer_norm2"):
            s[p + f"{ln}.weight"], s[p + f"{ln}.bias"] = (width,), (width,)
        s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = (4 * width, width), (4 * width,)
        s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = (width, 4 * width), (width,)
    return s


def sd15_shapes():
    """{original key: shape} for SD1.5, from our networks' default configs built on the meta device."""
    from sdgen import unet, vae

    nets = {"unet": (unet.UNet, unet.UNetConfig()), "vae": (vae.VAE, vae.VAEConfig())}
    try:
        from sdgen import clip

        nets["text_encoder"] = (clip.CLIPTextModel, clip.CLIPConfig())
    except ImportError:
        pass
    shapes = {}
    for comp in ("unet", "vae", "text_encoder"):
        if comp in nets:
            cls, config = nets[comp]
            with torch.device("meta"):
                sd = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
        else:
            sd = clip_l_shapes()
        n = sum(math.prod(s) for s in sd.values())
        assert n == EXPECTED[comp], (comp, n, EXPECTED[comp])
        shapes.update({PREFIX[comp] + k: s for k, s in sd.items()})
    return shapes


def write_random_safetensors(path: Path, shapes: dict):
    header, offset = {}, 0
    for k, s in shapes.items():
        n = math.prod(s) * 4
        header[k] = {"dtype": "F32", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k, s in shapes.items():
            f.write((torch.randn(s, generator=g) * 0.02).numpy().tobytes())
    return offset


CHILD = r"""
import json, resource, sys, time, torch
from sdgen.families import open_checkpoint
from sdgen.precision import Precision
def status(field):  # this process's own numbers (ru_maxrss can carry the parent's peak over fork+exec)
    try:
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
    except (OSError, StopIteration):
        return None
rss0 = status("VmRSS:")
t0 = time.perf_counter()
ckpt = open_checkpoint(sys.argv[1])
mods = list(ckpt.load(Precision(torch.bfloat16, torch.bfloat16), "cpu").values())
secs = time.perf_counter() - t0
params = sum(p.numel() for m in mods for p in m.parameters())
assert all(p.dtype == torch.bfloat16 for m in mods for p in m.parameters())
print(json.dumps({"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "hwm": status("VmHWM:"),
                  "rss_after_import": rss0, "params": params, "seconds": secs}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to write the temporary 4.3 GB file")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "sd15-random-fp32.safetensors"
        t0 = time.perf_counter()
        shapes = sd15_shapes()
        nbytes = write_random_safetensors(path, shapes)
        print(f"wrote {path} ({nbytes / 1e9:.2f} GB fp32, {len(shapes)} tensors) in {time.perf_counter() - t0:.0f} s")
        out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        bf16 = r["params"] * 2
        print(f"loaded {r['params']:,} params as bfloat16 in {r['seconds']:.1f} s")
        print(f"bf16 weights        {bf16 / 2**30:6.2f} GiB")
        peak = r["hwm"] or r["ru_maxrss"]
        print(f"peak RSS            {peak / 2**30:6.2f} GiB  = {peak / bf16:.2f} x bf16 size "
              f"(fp32 file: {nbytes / 2**30:.2f} GiB; ru_maxrss {r['ru_maxrss'] / 2**30:.2f} GiB)")
        if r["rss_after_import"]:
            print(f"RSS after imports   {r['rss_after_import'] / 2**30:6.2f} GiB")
            print(f"peak - imports      {(peak - r['rss_after_import']) / 2**30:6.2f} GiB  = "
                  f"{(peak - r['rss_after_import']) / bf16:.2f} x bf16 size")
        if args.keep:
            kept = Path(tmp).parent / path.name
            path.rename(kept)
            print(f"kept {kept}")


if __name__ == "__main__":
    main()
