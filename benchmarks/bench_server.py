"""Load test for `sdgen serve`: N requests from C concurrent clients against a real server process on 127.0.0.1.

    python benchmarks/bench_server.py                      # 50 requests, 8 clients, the demo model, 20 steps
    python benchmarks/bench_server.py --requests 200 --clients 16 --model path/to/model.safetensors --size 512

Reports: every request's outcome (all must be answered: 200, or 503 when the queue was full), throughput, p50/p95
latency (client side, queueing included), one request alone for comparison, and the server's anonymous RSS after a
warm-up and after each round of the same load (memory must not grow with the number of requests).
"""

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx


def rss_mib(pid: int) -> float:
    """The server's anonymous resident memory (RssAnon: heap, tensors), MiB. VmRSS also counts file pages (the
    mmapped weights, libraries) that the kernel drops and re-reads under memory pressure, so it jumps both ways on a
    busy machine; a leak shows in RssAnon."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--queue-size", type=int, default=8)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--rounds", type=int, default=2, help="the load repeated; the last round is reported")
    a = ap.parse_args(argv)

    server = subprocess.Popen([sys.executable, "-m", "sdgen.cli", "serve", "--model", a.model, "--port", "0",
                               "--queue-size", str(a.queue_size), "--precision", a.precision],
                              stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "sdgen serve: http://" not in line:
            line = server.stderr.readline()
            if not line and server.poll() is not None:
                sys.exit("the server did not start")
        url = line.split()[2].rstrip("/")
        body = {"prompt": "a red circle on a blue background", "steps": a.steps, "width": a.size, "height": a.size,
                "sampler_name": "Euler a"}
        with httpx.Client(base_url=url, timeout=600) as c:
            for i in range(3):   # warm-up: first-call allocations, caches
                c.post("/sdapi/v1/txt2img", json={**body, "seed": i}).raise_for_status()
            t0 = time.perf_counter()
            c.post("/sdapi/v1/txt2img", json={**body, "seed": 99}).raise_for_status()
            alone = time.perf_counter() - t0
        rss_before = rss_mib(server.pid)

        def one(i):
            with httpx.Client(base_url=url, timeout=600) as c:
                t = time.perf_counter()
                r = c.post("/sdapi/v1/txt2img", json={**body, "seed": 1000 + i})
                ok = r.status_code == 200 and len(r.json()["images"]) == 1
                return r.status_code, ok or r.status_code == 503, time.perf_counter() - t

        rss_rounds = []
        for round_ in range(a.rounds):   # the same load again: the RSS after each round must not keep growing
            t0 = time.perf_counter()
            with ThreadPoolExecutor(a.clients) as pool:
                results = list(pool.map(one, range(round_ * a.requests, (round_ + 1) * a.requests)))
            wall = time.perf_counter() - t0
            rss_rounds.append(rss_mib(server.pid))
        rss_after = rss_rounds[-1]
    finally:
        server.terminate()
        server.wait(30)

    codes = {}
    for code, _, _ in results:
        codes[code] = codes.get(code, 0) + 1
    done = [t for code, _, t in results if code == 200]
    answered = all(ok for _, ok, _ in results)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"sdgen serve load test: {a.requests} requests (x{a.rounds} rounds, the last shown), "
          f"{a.clients} concurrent clients, model {a.model}, "
          f"{a.size}x{a.size}, {a.steps} steps, queue {a.queue_size}")
    print(f"machine: {cpu}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"answers: {dict(sorted(codes.items()))}; every request answered: {'yes' if answered else 'NO'}")
    print(f"one request alone: {alone:.2f} s")
    print(f"throughput: {len(done) / wall:.2f} images/s ({len(done)} images in {wall:.1f} s)")
    if done:
        print(f"latency: p50 {percentile(done, 50):.2f} s, p95 {percentile(done, 95):.2f} s, max {max(done):.2f} s")
    print(f"server RssAnon: {rss_before:.0f} MiB after warm-up, then after each round of {a.requests}: "
          + ", ".join(f"{r:.0f}" for r in rss_rounds) + f" MiB ({rss_after - rss_before:+.0f} MiB in all, "
          f"{rss_rounds[-1] - rss_rounds[0]:+.0f} MiB after the first round)")
    return 0 if answered else 1


if __name__ == "__main__":
    sys.exit(main())
