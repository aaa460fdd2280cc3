"""What `--compile` (torch.compile of the UNet) costs and gains: first run, steady state, and a second process.

Three fresh processes on the same model and a fresh compile cache folder: eager (no compile), compiled with an
empty cache (the first image pays the compile), compiled again (the compiled code comes from the disk cache).
Each times the first image after load and the median of --runs more.

    python benchmarks/compile.py                         # the built-in demo model, 128x128: a few minutes
    python benchmarks/compile.py --model /tmp/sd15-random --size 512 --steps 2 --runs 1 --precision bf16
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def worker(job):
    import torch

    import sdgen

    t0 = time.perf_counter()
    pipe = sdgen.load(job["model"], dtype=job["precision"], compile=job["compile"])
    out = {"load": time.perf_counter() - t0}
    kw = dict(steps=job["steps"], seed=1, width=job["size"], height=job["size"], output_type="latent")
    times = []
    for i in range(job["runs"] + 1):
        t0 = time.perf_counter()
        latents = pipe.generate("a red circle on a blue background", **kw)
        times.append(time.perf_counter() - t0)
    out["first"], out["steady"], out["all"] = times[0], statistics.median(times[1:]), times
    out["latents_mean_abs"] = float(torch.as_tensor(latents.latents).abs().mean())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    cache = tempfile.mkdtemp(prefix="sdgen-inductor-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    rows = {}
    print(f"load average at start: {os.getloadavg()}", file=sys.stderr)
    try:
        for label, compiled in (("eager", False), ("compiled, empty cache", True), ("compiled, cache on disk", True)):
            job = {"model": a.model, "precision": a.precision, "size": a.size, "steps": a.steps, "runs": a.runs,
                   "compile": compiled}
            print(f"  {label} ...", file=sys.stderr, flush=True)
            p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                               text=True, env=env)
            if p.returncode:
                print(f"  failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
                continue
            rows[label] = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"| {a.model}, {a.size}x{a.size}, {a.steps} steps, --precision {a.precision} | load | first image | "
          f"steady (median of {a.runs}) |\n|---|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {r['load']:.1f} s | {r['first']:.2f} s | {r['steady']:.2f} s |")
    if "eager" in rows and "compiled, cache on disk" in rows:
        e, c = rows["eager"], rows["compiled, cache on disk"]
        print(f"\nsteady-state compiled/eager: {c['steady'] / e['steady']:.2f}; same latents (mean |x|): "
              f"{e['latents_mean_abs']:.6f} vs {c['latents_mean_abs']:.6f}")
    print(f"load average at end: {os.getloadavg()}; command: `python benchmarks/compile.py {' '.join(sys.argv[1:])}`")


if __name__ == "__main__":
    main()
