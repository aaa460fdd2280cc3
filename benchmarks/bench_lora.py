"""What a LoRA costs: applying a rank-32 LoRA to SD1.5-size weights, restoring them, and the per-step overhead.

    python benchmarks/bench_lora.py [--rank 32] [--size 256] [--steps 3] [--threads N]

Random SD1.5-size UNet (859.5M parameters) and CLIP-L text encoder in fp32; a kohya-layout LoRA over every
attention projection, proj_in/out and feed-forward of the UNet and every text-encoder linear (the common kohya
target set). Two ways to apply it are timed:
  merge (what sdgen does): the touched weights get a merged copy, their originals are kept and put back after;
  no per-step cost, memory = the touched weights once more.
  forward delta (the alternative): every patched layer adds up(down(x)) * scale at run time; no weight copy, but
  two extra matmuls per patched layer at every UNet call.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sdgen.lora import Patcher, bind, read_lora  # noqa: E402
from sdgen.nets import clip, unet  # noqa: E402

KOHYA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def make_lora(path, unet_renames, unet_shapes, te_shapes, rank):
    """Kohya keys with diffusers module names (as most files in the wild), random up/down, alpha = rank / 2."""
    inverse = {ours: theirs for theirs, ours in unet_renames.items()}
    tensors = {}
    for prefix, shapes, names, targets in (("lora_unet_", unet_shapes, inverse, KOHYA_TARGETS),
                                           ("lora_te_", te_shapes, None, TE_TARGETS)):
        for key, shape in shapes.items():
            module = key[: -len(".weight")]
            if not key.endswith(".weight") or not module.endswith(targets) or len(shape) not in (2, 4):
                continue
            theirs = (names[key] if names else key)[: -len(".weight")]
            name = prefix + theirs.replace(".", "_")
            tensors[name + ".lora_down.weight"] = torch.randn(rank, shape[1], *shape[2:]) * 0.01
            tensors[name + ".lora_up.weight"] = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else [])) * 0.01
            tensors[name + ".alpha"] = torch.tensor(rank / 2)
    save_file(tensors, path)
    return sum(t.numel() for t in tensors.values())


def step_time(net, x, t, ctx, steps):
    with torch.inference_mode():
        net(x, t, ctx)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            net(x, t, ctx)
    return (time.perf_counter() - t0) / steps


def forward_delta_hooks(nets, patches):
    """The alternative: y += up(down(x)) * scale per patched layer, as a forward hook."""
    handles = []
    for p in patches:
        layer = nets[p.component].get_submodule(p.key[: -len(".weight")])
        down = p.module.parts["down"].load(torch.float32)
        up = p.module.parts["up"].load(torch.float32)
        scale = p.module.alpha / down.shape[0]
        if down.ndim == 4:
            def hook(mod, args, out, down=down, up=up, scale=scale):
                return out + torch.nn.functional.conv2d(torch.nn.functional.conv2d(args[0], down), up) * scale
        else:
            def hook(mod, args, out, down=down, up=up, scale=scale):
                return out + (args[0] @ down.T @ up.T) * scale
        handles.append(layer.register_forward_hook(hook))
    return handles


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels for the per-step timing")
    ap.add_argument("--steps", type=int, default=3, help="UNet calls timed per variant (CFG batch of 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    u_cfg, t_cfg = unet.UNetConfig(), clip.CLIPConfig()
    nets = {"unet": unet.UNet(u_cfg).eval(), "text_encoder": clip.CLIPTextModel(t_cfg).eval()}
    print(f"built SD1.5-size UNet ({sum(p.numel() for p in nets['unet'].parameters()) / 1e6:.1f}M) and text encoder "
          f"in {time.perf_counter() - t0:.1f} s, {a.threads} threads")
    shapes = {k: {n: tuple(p.shape) for n, p in net.state_dict().items()} for k, net in nets.items()}
    components = {"unet": (unet.diffusers_renames(u_cfg), shapes["unet"]),
                  "text_encoder": (clip.diffusers_renames(t_cfg), shapes["text_encoder"])}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rank.safetensors"
        n = make_lora(path, components["unet"][0], shapes["unet"], shapes["text_encoder"], a.rank)
        t0 = time.perf_counter()
        lora = read_lora(path)
        patches = bind(lora, "sd1", "Stable Diffusion 1.x", components)
        t_open = time.perf_counter() - t0
        touched = sum(nets[p.component].get_parameter(p.key).numel() for p in patches)
        print(f"LoRA rank {a.rank}: {len(patches)} modules, {n / 1e6:.1f}M parameters ({path.stat().st_size / 2**20:.0f} MB); "
              f"touches {touched / 1e6:.1f}M weights ({touched * 4 / 2**30:.2f} GiB fp32)")
        print(f"open + check against the model: {t_open * 1000:.0f} ms")
        patcher = Patcher()
        t0 = time.perf_counter()
        patcher.set(nets, [(lora, patches, 1.0, 1.0)])
        t_apply = time.perf_counter() - t0
        t0 = time.perf_counter()
        patcher.restore(nets)
        t_restore = time.perf_counter() - t0
        print(f"merge: apply {t_apply:.2f} s, restore {t_restore * 1000:.1f} ms (exact: the original tensors)")

        side = a.size // 8
        x = torch.randn(2, 4, side, side)
        ctx = torch.randn(2, 77, 768)
        t = torch.tensor(500.0)
        base = step_time(nets["unet"], x, t, ctx, a.steps)
        patcher.set(nets, [(lora, patches, 1.0, 1.0)])
        merged = step_time(nets["unet"], x, t, ctx, a.steps)
        patcher.restore(nets)
        handles = forward_delta_hooks(nets, [p for p in patches if p.component == "unet"])
        hooked = step_time(nets["unet"], x, t, ctx, a.steps)
        for h in handles:
            h.remove()
        print(f"UNet call at {a.size}x{a.size}, CFG batch 2: base {base:.2f} s, merged {merged:.2f} s "
              f"({(merged / base - 1) * 100:+.1f}%), forward delta {hooked:.2f} s ({(hooked / base - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
