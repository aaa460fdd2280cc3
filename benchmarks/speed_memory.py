"""Issue 14's numbers: how close to the CPU's limit sdgen runs, and what memory each stage and size needs.

Every measurement runs in its own fresh process (so each peak RSS is that job's alone) on the SD1.5-size random
model that benchmarks/bench.py builds (`--model DIR`, default /tmp/sd15-random; built there if missing):

- the machine: CPU model and flags (AVX2, AVX-512, AVX512_BF16, AMX), load average before and after;
- peak: a large matmul and a 3x3 conv (SD-like shapes) in fp32 and bf16, GFLOP/s (median of --repeats);
- UNet step (CFG batch 2, 64x64 latents) and VAE decode (512x512) with sdgen at --precision, their FLOPs counted
  by torch's FlopCounterMode and the achieved GFLOP/s next to the peak; diffusers' same calls in the same run
  (fp32, and bf16 on CPUs with native bf16), and the sdgen/diffusers ratios;
- TAESD decode at 512x512 (random weights of the real architecture) against the full decode;
- a whole image (--image-steps euler steps, default 4; per-step time reported) with peak RSS per stage;
- tiled decodes at --decode-sizes (default 1024): peak RSS of the whole process, the pipeline loaded;
- --batches 1,2,4: images per minute of --image-steps-step images at --batch-size, sdgen and diffusers.

    python benchmarks/speed_memory.py                                   # everything, about 30 min on 2 busy cores
    python benchmarks/speed_memory.py --only peak,stages --repeats 3
    python benchmarks/speed_memory.py --only decode --decode-sizes 1024,2048
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402  machine_info, build_model

SECTIONS = ("peak", "stages", "taesd", "image", "decode", "batch")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# ---------------------------------------------------------------------------------------------- in the worker

class PeakRSS:
    """Highest RSS while the block runs (a 2 ms poll), and at its start: a stage's own peak, unlike VmHWM."""

    def __enter__(self):
        self.start = self.peak = bench.status_bytes("VmRSS")
        self._on = True
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while self._on:
            self.peak = max(self.peak, bench.status_bytes("VmRSS"))
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._on = False
        self._t.join()
        self.peak = max(self.peak, bench.status_bytes("VmRSS"))


def timed_median(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def flops_of(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def job_peak(job):
    """GFLOP/s of a large matmul and of SD-like 3x3 convs (UNet 64x64x320, VAE 512x512x128) in fp32 and bf16."""
    import torch

    out = {}
    g = torch.Generator().manual_seed(0)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, generator=g).to(dtype), torch.randn(2048, 2048, generator=g).to(dtype)
        t, _ = timed_median(lambda: a @ b, job["repeats"] + 1)
        out[f"matmul_{name}_gflops"] = 2 * 2048**3 / t / 1e9
        for label, (c, hw, batch) in (("unet", (320, 64, 2)), ("vae", (128, 256, 1))):
            x = torch.randn(batch, c, hw, hw, generator=g).to(dtype)
            w = torch.randn(c, c, 3, 3, generator=g).to(dtype)
            layouts = {"nchw": (x, w), "cl": (x.contiguous(memory_format=torch.channels_last),
                                              w.contiguous(memory_format=torch.channels_last))}
            for lay, (xx, ww) in layouts.items():
                torch.nn.functional.conv2d(xx, ww, padding=1)
                t, _ = timed_median(lambda: torch.nn.functional.conv2d(xx, ww, padding=1), job["repeats"])
                out[f"conv_{label}_{lay}_{name}_gflops"] = 2 * batch * c * c * 9 * hw * hw / t / 1e9
    return out


def load_engine(job):
    import torch

    if job["engine"] == "sdgen":
        import sdgen

        pipe = sdgen.load(job["model"], dtype=job["precision"], vae_tiling=job.get("tiling", "auto"))
        return pipe, {"compute": str(pipe.precision.compute).removeprefix("torch.")}
    import diffusers
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    diffusers.utils.logging.set_verbosity_error()
    dtype = getattr(torch, DTYPES[job["precision"]] if job["precision"] in DTYPES else "float32")
    pipe = StableDiffusionPipeline.from_pretrained(job["model"], torch_dtype=dtype)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"compute": str(dtype).removeprefix("torch.")}


def job_stages(job):
    """UNet step and VAE decode: seconds (median), FLOPs, GFLOP/s, peak RSS of each."""
    import torch

    pipe, out = load_engine(job)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g)
    z = torch.randn(1, 4, 64, 64, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    if job["engine"] == "sdgen":
        unet = lambda: pipe.unet(x, torch.tensor(500.0), ctx)
        decode = lambda: pipe.decode(z)
    else:
        dt = pipe.unet.dtype
        unet = lambda: pipe.unet(x.to(dt), torch.tensor(500), encoder_hidden_states=ctx.to(dt)).sample
        decode = lambda: pipe.vae.decode(z.to(dt) / pipe.vae.config.scaling_factor).sample
    with torch.inference_mode():
        for name, fn in (("unet", unet), ("decode", decode)):
            out[name + "_flops"] = flops_of(fn)  # also the warm-up call
            with PeakRSS() as p:
                out[name], out[name + "_all"] = timed_median(fn, job["repeats"])
            out[name + "_gflops"] = out[name + "_flops"] / out[name] / 1e9
            out[name + "_peak_rss"] = p.peak
    return out


def job_taesd(job):
    """TAESD (random weights, the real 64-channel architecture) against the full VAE decode at 512x512."""
    import torch
    from diffusers import AutoencoderTiny

    import sdgen
    from sdgen.nets.taesd import load_taesd

    folder = Path(tempfile.mkdtemp(prefix="taesd-"))
    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(folder)
    pipe = sdgen.load(job["model"], dtype=job["precision"])
    dec = load_taesd(folder, dtype=pipe.precision.compute)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.inference_mode():
        out["taesd_flops"] = flops_of(lambda: dec(z))
        with PeakRSS() as p:
            out["taesd"], out["taesd_all"] = timed_median(lambda: dec(z), job["repeats"])
        out["taesd_extra_rss"] = p.peak - p.start
        pipe.decode(z)
        out["full"], out["full_all"] = timed_median(lambda: pipe.decode(z), max(1, job["repeats"] // 2))
    out["taesd_gflops"] = out["taesd_flops"] / out["taesd"] / 1e9
    return out


def job_image(job):
    """A whole image: load, text, denoise (per step), decode; peak RSS of each stage and of the process."""
    import torch

    size, steps, batch = job["size"], job["steps"], job.get("batch", 1)
    out = {"rss_start": bench.status_bytes("VmRSS")}
    with PeakRSS() as p:
        t0 = time.perf_counter()
        pipe, info = load_engine(job)
        out["load"] = time.perf_counter() - t0
    out.update(info, load_peak_rss=p.peak, rss_after_load=bench.status_bytes("VmRSS"))
    prompt, negative = bench.PROMPT, bench.NEGATIVE
    with torch.inference_mode(), PeakRSS() as p:
        t0 = time.perf_counter()
        if job["engine"] == "sdgen":
            result = pipe.generate(prompt, negative, steps=steps, guidance_scale=7.5, sampler="euler", seed=1,
                                   width=size, height=size, batch_size=batch)
            out["parts"] = dict(result.timings)
        else:
            pipe([prompt] * batch, negative_prompt=[negative] * batch, num_inference_steps=steps, guidance_scale=7.5,
                 height=size, width=size, generator=torch.Generator().manual_seed(1))
        out["image"] = time.perf_counter() - t0
    out["generate_peak_rss"] = p.peak
    out["peak_rss"] = bench.status_bytes("VmHWM")
    return out


def job_decode(job):
    """A tiled (auto) decode at job['size'] with the whole pipeline loaded: the process's peak RSS."""
    import torch

    import sdgen

    pipe = sdgen.load(job["model"], dtype=job["precision"], vae_tiling=job.get("tiling", "auto"))
    h = job["size"] // 8
    z = torch.randn(1, 4, h, h, generator=torch.Generator().manual_seed(0))
    from sdgen import pipeline

    tile = pipe.vae.decode_tile(h, h, pipeline.decode_budget(pipe.device))
    with PeakRSS() as p:
        t0 = time.perf_counter()
        img = pipe.decode(z)
        t = time.perf_counter() - t0
    assert torch.isfinite(img).all()
    return {"decode": t, "tile": tile, "rss_before": p.start, "decode_peak_rss": p.peak,
            "peak_rss": bench.status_bytes("VmHWM"), "compute": str(pipe.precision.compute).removeprefix("torch.")}


JOBS = {"peak": job_peak, "stages": job_stages, "taesd": job_taesd, "image": job_image, "decode": job_decode}


# ---------------------------------------------------------------------------------------------- the parent

def run(job, log):
    what = " ".join(f"{k}={v}" for k, v in job.items() if k not in ("model",))
    log(f"  {what} ...")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                       cwd=ROOT)
    if p.returncode:
        log(f"  FAILED: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    out = json.loads(p.stdout.strip().splitlines()[-1])
    log(f"  done in {time.perf_counter() - t0:.0f} s: {json.dumps(out)}")  # kept in the log if the run is cut short
    return out


def gib(v):
    return f"{v / 2**30:.2f} GiB" if v else "—"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/sd15-random", help="the SD1.5-size random folder (built if missing)")
    ap.add_argument("--precision", default="auto", help="sdgen's precision (default auto, what users get)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--decode-sizes", default="1024")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--json", help="write every raw result here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        job = json.loads(a.worker)
        print(json.dumps(JOBS[job["kind"]](job)))
        return

    log = lambda m: print(m, file=sys.stderr, flush=True)
    sections = a.only.split(",")
    info = bench.machine_info()
    info["loadavg_start"] = os.getloadavg()
    model = Path(a.model)
    if not (model / bench.MARKER).is_file():
        log(f"building the SD1.5-size random model in {model} ...")
        model.mkdir(parents=True, exist_ok=True)
        bench.build_model(model, False)
    native = info["native_bf16"]
    # diffusers in fp32 always; in bf16 where the CPU has it natively (elsewhere bf16 is emulated, 50-300x slower)
    diffusers_precisions = [] if a.skip_diffusers else ["fp32"] + (["bf16"] if native else [])
    res = {"machine": info, "args": vars(a)}
    base = {"model": str(model), "repeats": a.repeats}

    if "peak" in sections:
        log("peak matmul/conv")
        res["peak"] = run({**base, "kind": "peak"}, log)
    if "stages" in sections:
        log("stages")
        res["stages"] = {"sdgen": run({**base, "kind": "stages", "engine": "sdgen", "precision": a.precision}, log)}
        for p in diffusers_precisions:
            res["stages"][f"diffusers-{p}"] = run({**base, "kind": "stages", "engine": "diffusers", "precision": p}, log)
    if "taesd" in sections:
        log("taesd")
        res["taesd"] = run({**base, "kind": "taesd", "precision": a.precision}, log)
    if "image" in sections:
        log("whole image")
        res["image"] = {"sdgen": run({**base, "kind": "image", "engine": "sdgen", "precision": a.precision,
                                      "size": a.size, "steps": a.image_steps}, log)}
        for p in diffusers_precisions:
            res["image"][f"diffusers-{p}"] = run({**base, "kind": "image", "engine": "diffusers", "precision": p,
                                                  "size": a.size, "steps": a.image_steps}, log)
    if "decode" in sections:
        log("tiled decodes")
        res["decode"] = {s: run({**base, "kind": "decode", "precision": a.precision, "size": int(s)}, log)
                         for s in a.decode_sizes.split(",")}
    if "batch" in sections:
        log("batch throughput")
        res["batch"] = {}
        for n in a.batches.split(","):
            res["batch"][f"sdgen-{n}"] = run({**base, "kind": "image", "engine": "sdgen", "precision": a.precision,
                                              "size": a.size, "steps": a.image_steps, "batch": int(n)}, log)
            for p in diffusers_precisions[:1] if not native else diffusers_precisions[1:]:
                res["batch"][f"diffusers-{p}-{n}"] = run({**base, "kind": "image", "engine": "diffusers",
                                                          "precision": p, "size": a.size, "steps": a.image_steps,
                                                          "batch": int(n)}, log)
    info["loadavg_end"] = os.getloadavg()
    report(res, a)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))


def report(res, a):
    info = res["machine"]
    print(f"## sdgen speed and memory ({info['cpu']}, {info['usable_cpus']} usable CPUs)\n")
    print("- CPU flags: " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in info["flags"].items()))
    if info.get("isa_limits"):
        print("- PyTorch held below the CPU's instruction set by " + ", ".join(f"{k}={v}" for k, v in
              info["isa_limits"].items()) + f": native bf16 {'yes' if info['native_bf16'] else 'no'} for sdgen and here")
    la0, la1 = info["loadavg_start"], info["loadavg_end"]
    print(f"- load average (1/5/15 min) at start {la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f}, at end "
          f"{la1[0]:.2f}/{la1[1]:.2f}/{la1[2]:.2f}" + (": over the core count + 1, other work shared the CPUs" if
          max(la0[0], la1[0]) > info["usable_cpus"] + 1 else " (the benchmark itself keeps the cores busy)"))
    print(f"- torch {info['versions']['torch']}, diffusers {info['versions']['diffusers']}; sdgen --precision "
          f"{a.precision}\n")
    pk = res.get("peak", {})
    if pk and "error" not in pk:
        print("| peak (median) | fp32 GFLOP/s | bf16 GFLOP/s |\n|---|---:|---:|")
        print(f"| matmul 2048^3 | {pk['matmul_fp32_gflops']:.0f} | {pk['matmul_bf16_gflops']:.0f} |")
        for label in ("unet", "vae"):
            for lay in ("nchw", "cl"):
                print(f"| conv 3x3 {label}-like, {lay} | {pk[f'conv_{label}_{lay}_fp32_gflops']:.0f} | "
                      f"{pk[f'conv_{label}_{lay}_bf16_gflops']:.0f} |")
        print()
    st = res.get("stages")
    if st:
        ref = st.get("diffusers-bf16") if "bf16" in st["sdgen"].get("compute", "") else st.get("diffusers-fp32")
        print("| stage | engine (compute) | median s | GFLOP | GFLOP/s | peak RSS | sdgen/this |\n|---|---|---:|---:|---:|---:|---:|")
        for name in ("unet", "decode"):
            for eng, r in st.items():
                if "error" in r or name not in r:
                    continue
                ratio = f"{st['sdgen'][name] / r[name]:.2f}" if eng != "sdgen" and name in st["sdgen"] else ""
                print(f"| {'UNet step, CFG batch 2, 64x64' if name == 'unet' else 'VAE decode 512x512'} | {eng} "
                      f"({r['compute']}) | {r[name]:.2f} | {r[name + '_flops'] / 1e9:.0f} | {r[name + '_gflops']:.0f} | "
                      f"{gib(r[name + '_peak_rss'])} | {ratio} |")
        print()
    ta = res.get("taesd")
    if ta and "error" not in ta:
        print(f"TAESD decode 512x512: {ta['taesd']:.2f} s ({ta['taesd_flops'] / 1e9:.0f} GFLOP, "
              f"{ta['taesd_gflops']:.0f} GFLOP/s, +{gib(ta['taesd_extra_rss'])}) against the full VAE decode "
              f"{ta['full']:.2f} s: {ta['full'] / ta['taesd']:.0f}x faster\n")
    im = res.get("image")
    if im:
        print(f"| whole image {a.size}x{a.size}, {a.image_steps} euler steps | compute | load | generate | per step | "
              "RSS after load | peak RSS (process) | time/this |\n|---|---|---:|---:|---:|---:|---:|---:|")
        for eng, r in im.items():
            if "error" in r:
                print(f"| {eng} | failed: {r['error'][:80]} |")
                continue
            per_step = r["parts"]["denoise"] / a.image_steps if "parts" in r else None
            ratio = f"{im['sdgen']['image'] / r['image']:.2f}" if eng != "sdgen" and "image" in im["sdgen"] else ""
            print(f"| {eng} | {r['compute']} | {r['load']:.1f} s | {r['image']:.1f} s | "
                  f"{f'{per_step:.2f} s' if per_step else '—'} | {gib(r['rss_after_load'])} | {gib(r['peak_rss'])} | "
                  f"{ratio} |")
        if "parts" in im.get("sdgen", {}):
            print("sdgen stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in im["sdgen"]["parts"].items()))
        print()
    de = res.get("decode")
    if de:
        print("| tiled decode (auto), pipeline loaded | tile (latent px) | time | RSS before | decode peak | process peak |"
              "\n|---|---:|---:|---:|---:|---:|")
        for s, r in de.items():
            if "error" in r:
                print(f"| {s}x{s} | failed: {r['error'][:80]} |")
                continue
            print(f"| {s}x{s} ({r['compute']}) | {r['tile'] or 'untiled'} | {r['decode']:.0f} s | {gib(r['rss_before'])} | "
                  f"{gib(r['decode_peak_rss'])} | {gib(r['peak_rss'])} |")
        print()
    ba = res.get("batch")
    if ba:
        print(f"| batch, {a.size}x{a.size}, {a.image_steps} steps | images/min | peak RSS |\n|---|---:|---:|")
        for k, r in ba.items():
            if "error" in r:
                continue
            n = int(k.rsplit("-", 1)[1])
            print(f"| {k} | {60 * n / r['image']:.2f} | {gib(r['peak_rss'])} |")
        print()
    print(f"command: `python benchmarks/speed_memory.py {' '.join(sys.argv[1:])}`")


if __name__ == "__main__":
    main()
