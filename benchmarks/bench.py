"""Speed and memory of sdgen against diffusers on the same full-size SD1.5 model with random weights.

Builds an SD1.5-size model (UNet 860M, VAE 84M, CLIP-L text encoder 123M parameters) with diffusers' and
transformers' default random init, saves it once as a diffusers folder (fp32 safetensors, about 4.3 GB), then
measures each engine in its own fresh subprocess, interleaved (sdgen, diffusers, sdgen, diffusers, ...), so
that each peak RSS is that engine's alone and slow drifts of a shared machine hit both alike. Each worker times
the imports, the load, then (run < --image-runs) one whole image right after the load (what `sdgen generate`
sees, warm-up included), then (run < --runs) each stage: one warm-up call, reported as "first call", and one
timed call, then (with --warm-image) the image again, now warm. Tables show medians over the workers.

    python benchmarks/bench.py --tiny                      # 30-second smoke test of this script
    python benchmarks/bench.py --runs 1 --image-runs 1     # full size, fp32 (tens of minutes on 2 cores)
    python benchmarks/bench.py --precision bf16 --diffusers-size 256 --psnr --keep /tmp/sd15-random
    sdgen bench [same arguments]
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 35mm"
NEGATIVE = "blurry, low quality"
SEED = 1234
GUIDANCE = 7.5
TIMESTEP = 500  # any mid-schedule timestep: the UNet's cost does not depend on it
SD15_SCHEDULER = {  # the real SD1.5 scheduler_config.json: no timestep_spacing, so each sampler uses its default
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
MARKER = "sdgen_bench_model.json"
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}


def parse_args(argv):
    argv = argv[1:] if argv[:1] == ["--"] else argv  # `sdgen bench -- --tiny`
    ap = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    ap.add_argument("--size", type=int, help="image side in pixels (default 512; 64 with --tiny)")
    ap.add_argument("--diffusers-size", type=int,
                    help="measure diffusers at this side instead (emulated bf16 is 50-300x slower); no ratios then")
    ap.add_argument("--steps", type=int, default=20, help="euler steps of the whole image")
    ap.add_argument("--runs", type=int, help="workers per engine that time the stages (default 3; 1 with --tiny)")
    ap.add_argument("--image-runs", type=int, default=1, help="workers per engine that time a whole image")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in the workers (default: torch's choice)")
    ap.add_argument("--skip-diffusers", action="store_true")
    ap.add_argument("--skip-image", action="store_true")
    ap.add_argument("--warm-image", action="store_true",
                    help="image workers also time a second image after the stages (steady state; doubles image time)")
    ap.add_argument("--psnr", action="store_true",
                    help="also make one sdgen image in the other precision; PSNR of bf16 against fp32")
    ap.add_argument("--tiny", action="store_true", help="tiny random model: a smoke test of this script")
    ap.add_argument("--keep", metavar="DIR", help="build the model in DIR once and reuse it (not deleted)")
    ap.add_argument("--tmp", metavar="DIR", help="where the temporary model folder goes (default: system temp)")
    ap.add_argument("--json", metavar="FILE", help="write all results, raw and medians, as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON job for a subprocess
    a = ap.parse_args(argv)
    a.size = a.size or (64 if a.tiny else 512)
    a.runs = a.runs if a.runs is not None else (1 if a.tiny else 3)
    for name in ("size", "diffusers_size"):
        v = getattr(a, name)
        if v is not None and (v < 64 or v % 64):  # 64: every UNet level halves the latent, and keeps it even
            ap.error(f"--{name.replace('_', '-')} must be a multiple of 64, not {v}")
    if a.steps < 1 or a.runs < 0 or a.image_runs < 0:
        ap.error("--steps must be at least 1, --runs and --image-runs at least 0")
    return a


# ---------------------------------------------------------------------------------------------- the machine

def status_bytes(field):
    """A /proc/self/status field (VmRSS, VmHWM) in bytes: this process's own, unlike ru_maxrss after fork."""
    try:
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith(field + ":")).split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def machine_info():
    info = {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version()}
    flags = set()
    try:
        text = open("/proc/cpuinfo").read()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["cpu"] = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    info["flags"] = {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")}
    from sdgen.precision import cpu_has_native_bf16

    info["native_bf16"] = cpu_has_native_bf16()  # the flags, unless PyTorch is held below them (next line)
    info["isa_limits"] = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    try:
        info["mem_total_gib"] = round(int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1])
                                      / 2**20, 1)
    except (OSError, StopIteration):
        pass
    versions = {}
    for mod in ("torch", "diffusers", "transformers", "sdgen"):
        try:
            versions[mod] = __import__("importlib.metadata").metadata.version(mod)
        except Exception:
            versions[mod] = None
    info["versions"] = versions
    return info


def loadavg():
    try:
        return os.getloadavg()
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- the model

def build_model(folder: Path, tiny: bool):
    """An SD1.5-size (or tiny) random diffusers folder; runs in its own process so the parent stays small."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "tests"))
    import reference

    torch.manual_seed(0)
    if tiny:
        unet, vae, text = reference.tiny_unet(0), reference.tiny_vae(1), reference.tiny_text_encoder(2)
    else:
        from transformers import CLIPTextConfig, CLIPTextModel

        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            latent_channels=4, sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    tokenizer = reference.clip_tokenizer(folder / "_tokenizer_src")
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), unet=unet.eval(), tokenizer=tokenizer,
                                   scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_tokenizer_src")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in (("unet", unet), ("vae", vae), ("text_encoder", text))}
    (folder / MARKER).write_text(json.dumps({"tiny": tiny, "params": params}))
    return params


def folder_bytes(folder: Path):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- a worker

def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def worker(job):
    """One engine in this (fresh) process: imports, load, [whole image], [stages]; returns a JSON-able dict."""
    out = {"engine": job["engine"], "precision": job["precision"], "size": job["size"], "rss_start": status_bytes("VmRSS")}
    t0 = time.perf_counter()
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    out["threads"] = torch.get_num_threads()
    dtype = getattr(torch, PRECISIONS[job["precision"]])
    engine, model, h = job["engine"], job["model"], job["size"] // 8
    steps, size = job["steps"], job["size"]

    if engine == "sdgen":
        import sdgen
        out["import"] = time.perf_counter() - t0
        out["load"], pipe = timed(lambda: sdgen.load(model, dtype=PRECISIONS[job["precision"]]))
        scale = pipe.vae.config.scaling_factor
        out["compute_dtype"] = str(pipe.precision.compute).removeprefix("torch.")  # may differ from the storage

        def text():
            return pipe.encode_prompt([PROMPT]), pipe.encode_prompt([NEGATIVE])

        def unet(x, ctx):  # fp32 in and out, as the pipeline's denoiser calls it; the UNet casts as it needs
            return pipe.unet(x, torch.tensor(float(TIMESTEP)), ctx)

        def decode(z):
            return pipe.decode(z)

        def image():
            result = pipe.generate(PROMPT, NEGATIVE, steps=steps, guidance_scale=GUIDANCE, sampler="euler",
                                   seed=SEED, width=size, height=size, output_type="pil")
            out["image_parts"] = dict(result.timings)
            return result.images[0]
    else:
        import diffusers
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
        out["import"] = time.perf_counter() - t0
        diffusers.utils.logging.set_verbosity_error()

        def load():
            p = StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
            p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config)
            p.set_progress_bar_config(disable=True)
            return p

        out["load"], pipe = timed(load)
        scale = pipe.vae.config.scaling_factor

        def text():
            return pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True, NEGATIVE)

        def unet(x, ctx):
            return pipe.unet(x.to(dtype), torch.tensor(TIMESTEP), encoder_hidden_states=ctx.to(dtype)).sample

        def decode(z):
            return pipe.vae.decode(z.to(dtype) / scale).sample.float()

        def image():
            g = torch.Generator("cpu").manual_seed(SEED)
            return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
                        height=size, width=size, generator=g, output_type="pil").images[0]
    out["rss_after_load"] = status_bytes("VmRSS")

    with torch.inference_mode():
        if job["image"]:
            cpu0 = time.process_time()
            out["image"], img = timed(image)  # first thing after the load: includes any warm-up
            out["image_cores"] = (time.process_time() - cpu0) / out["image"]  # below `threads`: CPUs were busy
            if job.get("save_image"):
                img.save(job["save_image"])
        if job["stages"]:
            g = torch.Generator().manual_seed(0)
            x = torch.randn((2, 4, h, h), generator=g)
            z = torch.randn((1, 4, h, h), generator=g) * (1 / 0.18215) * scale  # a unit-variance latent, scaled
            cond, uncond = text()
            ctx = torch.cat([uncond, cond]).float()  # (2, 77, D): CFG's batch
            for name, fn in (("text", text), ("unet", lambda: unet(x, ctx)), ("decode", lambda: decode(z))):
                out[name + "_first"], _ = timed(fn)
                out[name], _ = timed(fn)
        if job["image"] and job.get("warm_image"):
            out["image_warm"], _ = timed(image)
    out["rss_end"] = status_bytes("VmRSS")
    out["peak_rss"] = status_bytes("VmHWM")
    return out


def run_worker(job, log):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    what = f"{job['engine']} {job['precision']} {job['size']}px" + (" image" if job["image"] else "") + (
        " stages" if job["stages"] else "")
    log(f"  worker: {what} ...")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        tail = "\n".join(p.stderr.strip().splitlines()[-8:])
        log(f"  worker {what} FAILED (exit {p.returncode}):\n{tail}")
        return {"engine": job["engine"], "error": tail.splitlines()[-1] if tail else f"exit {p.returncode}"}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    log(f"  worker: {what} done in {time.perf_counter() - t0:.1f} s")
    return r


# ---------------------------------------------------------------------------------------------- report

def psnr(path_a, path_b):
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path_a).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(path_b).convert("RGB"), dtype=np.float64)
    if a.shape != b.shape:
        return None
    mse = ((a - b) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def medians(results, keys):
    out = {}
    for k in keys:
        vals = [r[k] for r in results if r.get(k) is not None]
        if vals:
            out[k] = statistics.median(vals)
            out[k + "_n"] = len(vals)
    return out


KEYS = ["import", "load", "text_first", "text", "unet_first", "unet", "decode_first", "decode", "image", "image_warm", "image_cores",
        "rss_after_load", "peak_rss"]


def fmt_seconds(v):
    return "—" if v is None else (f"{v:.2f} s" if v < 100 else f"{v:.0f} s")


def table(args, med, sizes):
    engines = ["sdgen"] + ([] if args.skip_diffusers else ["diffusers"])
    same_size = len(set(sizes[e] for e in engines)) == 1
    lat = {e: sizes[e] // 8 for e in engines}

    def size_note(e):
        return "" if same_size else f" @{sizes[e]}px"

    rows = [("import", "import", False), ("load", "load", False),
            ("text encoding (prompt + negative)", "text", True),
            ("UNet step, CFG batch 2 at {h}x{h} latents", "unet", True),
            ("VAE decode 1x4x{h}x{h}", "decode", True)]
    if not args.skip_image:
        rows.append((f"whole image {{px}}x{{px}}, {args.steps} euler steps, CFG {GUIDANCE} (first after load)", "image",
                     False))
        if args.warm_image:
            rows.append(("whole image, again after the stages (warm)", "image_warm", False))
    h, px = lat["sdgen"], sizes["sdgen"]
    lines = ["| stage | sdgen | diffusers | sdgen/diffusers |", "|---|---:|---:|---:|"]
    for label, key, first in rows:
        cells = []
        for e in ("sdgen", "diffusers"):
            m = med.get(e, {})
            if key not in m:
                cells.append("—")
                continue
            c = fmt_seconds(m[key]) + size_note(e)
            if first and key + "_first" in m:
                c += f" (first {fmt_seconds(m[key + '_first'])})"
            cells.append(c)
        ratio = "—"
        if same_size and key in med.get("sdgen", {}) and key in med.get("diffusers", {}):
            ratio = f"{med['sdgen'][key] / med['diffusers'][key]:.2f}"
        lines.append(f"| {label.format(h=h, px=px)} | {cells[0]} | {cells[1]} | {ratio} |")
    for label, key in (("RSS after load", "rss_after_load"), ("peak RSS", "peak_rss")):
        cells = [f"{med[e][key] / 2**30:.2f} GiB" if key in med.get(e, {}) else "—" for e in ("sdgen", "diffusers")]
        ratio = (f"{med['sdgen'][key] / med['diffusers'][key]:.2f}"
                 if key in med.get("sdgen", {}) and key in med.get("diffusers", {}) else "—")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from sdgen import SdgenError

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    command = "python benchmarks/bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    info = machine_info()
    info["loadavg_start"] = loadavg()
    have_diffusers = all(importlib.util.find_spec(m) for m in ("diffusers", "transformers"))
    if not have_diffusers and not args.skip_diffusers:
        log("note: diffusers/transformers are not importable: measuring sdgen only")
        args.skip_diffusers = True
    if args.precision == "bf16" and not info["native_bf16"]:
        log("note: this CPU has neither AVX512_BF16 nor AMX, so PyTorch emulates bf16 matrix products: expect both "
            "engines to be far slower than fp32 (diffusers 50-300x); --diffusers-size 256 measures diffusers smaller")

    # ---- the model folder
    if args.keep:
        folder, temp = Path(args.keep).resolve(), None
    else:
        temp = tempfile.mkdtemp(prefix="sdgen-bench-", dir=args.tmp)
        folder = Path(temp) / "model"
    try:
        marker = folder / MARKER
        if marker.is_file() and json.loads(marker.read_text()).get("tiny") == args.tiny:
            log(f"model: reusing {folder}")
            built = json.loads(marker.read_text())
        else:
            if not have_diffusers:
                raise SdgenError("building the random model needs diffusers and transformers (pip install diffusers "
                                 "transformers), or --keep DIR naming a model this script built before")
            if folder.exists() and any(folder.iterdir()):
                raise SdgenError(f"{folder} is not empty and holds no model built by this script; give a new folder")
            log(f"model: building a {'tiny' if args.tiny else 'full-size SD1.5'} random model in {folder} ...")
            t0 = time.perf_counter()
            folder.mkdir(parents=True, exist_ok=True)
            code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench; "
                    f"bench.build_model(bench.Path({str(folder)!r}), {args.tiny})")
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if p.returncode:
                raise SdgenError("building the model failed: " + (p.stderr.strip().splitlines() or ["?"])[-1])
            built = json.loads(marker.read_text())
            log(f"model: built in {time.perf_counter() - t0:.0f} s")
        info["model"] = {"folder": str(folder), "bytes": folder_bytes(folder), "params": built["params"],
                         "tiny": args.tiny, "kept": bool(args.keep)}

        # ---- the workers, interleaved
        sizes = {"sdgen": args.size, "diffusers": args.diffusers_size or args.size}
        engines = ["sdgen"] + ([] if args.skip_diffusers else ["diffusers"])
        image_runs = 0 if args.skip_image else args.image_runs
        images_dir = Path(tempfile.mkdtemp(prefix="sdgen-bench-images-", dir=args.tmp))
        results = {e: [] for e in engines}
        n = max(args.runs, image_runs)
        for run in range(n):
            log(f"run {run + 1}/{n}")
            for e in engines:
                job = {"engine": e, "model": str(folder), "precision": args.precision, "size": sizes[e],
                       "steps": args.steps, "threads": args.threads, "image": run < image_runs, "warm_image": args.warm_image,
                       "stages": run < args.runs, "save_image": str(images_dir / f"{e}-{args.precision}-{run}.png")}
                results[e].append(run_worker(job, log))
        extra = {}
        other = "bf16" if args.precision == "fp32" else "fp32"
        if args.psnr and image_runs:
            log(f"psnr: one more sdgen image in {other}")
            job = {"engine": "sdgen", "model": str(folder), "precision": other, "size": args.size, "steps": args.steps,
                   "threads": args.threads, "image": True, "stages": False,
                   "save_image": str(images_dir / f"sdgen-{other}-0.png")}
            extra["sdgen_" + other] = run_worker(job, log)

        # ---- report
        med = {e: medians([r for r in results[e] if "error" not in r], KEYS) for e in engines}
        quality = {}
        img = {f"{e}-{p}": images_dir / f"{e}-{p}-0.png" for e in engines for p in ("fp32", "bf16")}
        if img["sdgen-fp32"].is_file() and img["sdgen-bf16"].is_file():
            quality["psnr_sdgen_bf16_vs_fp32_db"] = psnr(img["sdgen-bf16"], img["sdgen-fp32"])
        key = f"-{args.precision}"
        if img["sdgen" + key].is_file() and ("diffusers" + key) in img and img["diffusers" + key].is_file():
            quality[f"psnr_sdgen_vs_diffusers_{args.precision}_db"] = psnr(img["sdgen" + key], img["diffusers" + key])
        info["loadavg_end"] = loadavg()
        threads = sorted({r.get("threads") for rs in results.values() for r in rs if r.get("threads")})
        errors = [f"{r['engine']}: {r['error']}" for rs in results.values() for r in rs if "error" in r]

        fl = info["flags"]
        print(f"## sdgen vs diffusers, {'TINY model (smoke test)' if args.tiny else 'SD1.5 size, random weights'}, "
              f"{args.precision}\n")
        print(table(args, med, sizes))
        print()
        for e in engines:
            cd = {r.get("compute_dtype") for r in results[e] if r.get("compute_dtype")}
            if cd and cd != {PRECISIONS[args.precision]}:
                print(f"{e}: weights stored in {PRECISIONS[args.precision]}, arithmetic in {', '.join(sorted(cd))}.")
        print(f"Medians over {args.runs} stage run(s) and {image_runs} image run(s) per engine, each in a fresh process, "
              f"interleaved. Stage cells: one timed call after a warm-up call (the warm-up in brackets).")
        cores = {e: med[e]["image_cores"] for e in engines if "image_cores" in med.get(e, {})}
        if cores:
            print("CPU cores busy on average during the image (a shared machine shows fewer than the threads): "
                  + ", ".join(f"{e} {c:.2f}" for e, c in cores.items()) + ".")
        if sizes["sdgen"] != sizes["diffusers"] and not args.skip_diffusers:
            print(f"diffusers measured at {sizes['diffusers']}x{sizes['diffusers']}, sdgen at {args.size}x{args.size}: "
                  f"no ratios for timings.")
        for k, v in quality.items():
            print(f"{k.replace('_db', '').replace('_', ' ')}: {v:.2f} dB" if v is not None else f"{k}: n/a")
        if "psnr_sdgen_bf16_vs_fp32_db" in quality:
            print("(random weights give noise-like images: the PSNR compares numerics, not picture quality)")
        if errors:
            print("errors: " + "; ".join(errors))
        print()
        print(f"- machine: {info['cpu']}, {info['logical_cpus']} logical CPUs ({info['usable_cpus']} usable), "
              f"{info.get('mem_total_gib', '?')} GiB RAM")
        print("- CPU flags: " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in fl.items())
              + (" (bf16 is emulated here)" if not info["native_bf16"] else ""))
        v = info["versions"]
        print(f"- torch {v['torch']}, {', '.join(map(str, threads)) or '?'} thread(s); diffusers {v['diffusers']}, "
              f"transformers {v['transformers']}, sdgen {v['sdgen']}, Python {info['python']}")
        la0, la1 = info["loadavg_start"], info["loadavg_end"]
        if la0 and la1:
            print(f"- load average at start {la0[0]:.2f}, at end {la1[0]:.2f} (1 min)")
        print(f"- model: {folder} ({info['model']['bytes'] / 1e9:.2f} GB fp32, "
              f"{sum(built['params'].values()) / 1e6:.0f}M parameters)"
              + ("" if args.keep else ", deleted at the end"))
        print(f"- command: `{command}`")

        if args.json:
            Path(args.json).write_text(json.dumps({"command": command, "args": vars(args), "machine": info,
                                                   "sizes": sizes, "medians": med, "quality": quality,
                                                   "runs": results, "extra": extra}, indent=2, default=str))
            log(f"wrote {args.json}")
        shutil.rmtree(images_dir, ignore_errors=True)
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
