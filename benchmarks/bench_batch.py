"""Batch throughput (images/min) of `sdgen batch` on this machine: one process, then Ray Data with 1 and 2 actors.

Each run renders the same lines (distinct prompts and seeds) into a fresh folder through the very code the CLI
runs (sdgen.batch.run over the local renderer or sdgen.serve.ray.render_on_ray), on a local Ray instance with
every CPU of the machine (loopback only). Reported per run: the wall time from the start (model loads and Ray
actor start-up included) and the steady rate, from the first finished line to the last, which is what a long
batch sees; scaling = the steady rate of N actors over that of 1 actor.

    python benchmarks/bench_batch.py                            # demo model, 16 lines, 20 steps, 1 and 2 actors
    python benchmarks/bench_batch.py --lines 8 --steps 4        # a quick smoke run
    python benchmarks/bench_batch.py --model path/to/model.safetensors --size 512 --actors 1,2,4 --num-cpus 1
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sdgen import batch  # noqa: E402
from sdgen.families import open_checkpoint  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]
SHAPES = ["circle", "square", "triangle"]


def lines_file(folder: Path, n: int, steps: int, size: int) -> Path:
    path = folder / "prompts.jsonl"
    rows = [{"prompt": f"a {COLOURS[i % 8]} {SHAPES[i % 3]} on a {COLOURS[(i + 3) % 8]} background", "seed": i,
             "steps": steps, "width": size, "height": size} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def timed(jobs, results, out: Path) -> dict:
    """Drive one batch; (wall seconds, steady seconds from the first result to the last, images)."""
    t0 = time.perf_counter()
    stamps = []
    store = batch.Store(out)

    def stamped(rows):
        for row in rows:
            yield row
            stamps.append(time.perf_counter())

    progress = batch.run(jobs, store, stamped(results), batch.Progress(len(jobs), 0, log=lambda msg: None))
    wall = time.perf_counter() - t0
    assert progress.failed == 0 and progress.rendered == len(jobs), "a line failed: see failures.jsonl"
    steady = stamps[-1] - stamps[0] if len(stamps) > 1 else wall
    return {"wall": wall, "steady": steady, "images": progress.images, "steady_images": progress.images - 1}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--lines", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=None, help="width = height (default: the model's native size)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--actors", default="1,2", help="actor counts to measure, comma-separated")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs (and torch threads) per actor")
    p.add_argument("--no-local", action="store_true", help="skip the one-process run")
    a = p.parse_args(argv)

    ckpt = open_checkpoint(a.model)
    size = a.size or ckpt.native_size[0]
    work = Path(tempfile.mkdtemp(prefix="sdgen-bench-batch-"))
    jobs, refused = batch.plan(batch.read_lines(lines_file(work, a.lines, a.steps, size)), ckpt)
    assert not refused, refused
    cpus = os.cpu_count()
    print(f"sdgen batch: {a.lines} lines, {a.model} {size}x{size}, {a.steps} steps, {a.precision}, {cpus} CPUs "
          f"({_cpu_name()})")
    rows = []
    if not a.no_local:
        import torch

        renderer = batch.Renderer(a.model, "cpu", a.precision)
        r = timed(jobs, batch.render_local(jobs, renderer), work / "local")
        rows.append((f"one process, {torch.get_num_threads()} threads", r))
        del renderer

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # a single-node Ray on the loopback
    import ray

    from sdgen.serve.ray import render_on_ray

    for attempt in (1, 2):   # Ray gives its daemons 30 s to start: on a busy machine, try once more
        try:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        for n in [int(x) for x in a.actors.split(",")]:
            r = timed(jobs, render_on_ray(jobs, a.model, actors=n, num_cpus=a.num_cpus, precision=a.precision,
                                          device="cpu"), work / f"ray-{n}")
            rows.append((f"Ray Data, {n} actor(s) x {a.num_cpus:g} CPU", r))
    finally:
        ray.shutdown()

    base = next((r for name, r in rows if name.startswith("Ray Data, 1 ")), None)
    print(f"{'run':<34}{'wall s':>9}{'img/min (wall)':>16}{'img/min (steady)':>18}{'scaling':>9}")
    for name, r in rows:
        rate = r["steady_images"] / r["steady"] * 60
        scale = rate / (base["steady_images"] / base["steady"] * 60) if base and name.startswith("Ray") else None
        print(f"{name:<34}{r['wall']:>9.1f}{r['images'] / r['wall'] * 60:>16.1f}{rate:>18.1f}"
              f"{f'{scale:.2f}x' if scale else '':>9}")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
