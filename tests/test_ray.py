"""sdgen on Ray, on a local Ray instance (loopback only, 2 CPUs, one per test module): `sdgen batch --ray` with
Ray Data over 2 actors, killed midway and resumed, and `sdgen serve --ray` with 2 model replicas behind one
ingress answering concurrent A1111 requests."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

# Ray binds to the machine's network address even when told 127.0.0.1, unless multi-node clusters are off (read
# once, when ray is imported): then every Ray process, ours and the drivers these tests start (they inherit the
# environment), stays on the loopback
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray  # noqa: E402

import sdgen
import torch
from sdgen import batch
from sdgen.cli import main
from sdgen.families import open_checkpoint
from sdgen.request import GenerationRequest

FAST = ["--model", "demo", "--precision", "fp32", "--steps", "4"]


@pytest.fixture(scope="module")
def cluster():
    """A fresh local Ray instance on 127.0.0.1 with 2 CPUs; its address, for drivers in other processes."""
    for attempt in (1, 2):   # Ray gives its daemons 30 s to start: on a machine busy with other work, try again
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), address
    yield address
    ray.shutdown()


class _OneThread:
    """The demo pipeline computing with one thread, as each Ray worker does (num_cpus=1: Ray sets
    OMP_NUM_THREADS=1): float sums split over another thread count may differ in the last bit, so the reference
    image is made with the workers' thread count."""

    def __init__(self, pipe):
        self.pipe = pipe

    def generate(self, *args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.pipe.generate(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo():
    return _OneThread(sdgen.load("demo", dtype="float32"))


def test_batch_on_two_actors_killed_midway_then_resumed(cluster, demo, tmp_path):
    n = 20
    prompts = tmp_path / "prompts.jsonl"
    colours = ["red", "green", "blue", "yellow", "white", "black"]
    lines = [{"prompt": f"a {colours[i % 6]} circle on a {colours[(i + 1) % 6]} background", "seed": 100 + i}
             for i in range(n - 4)]
    lines += [{"prompt": "a red square on a white background", "id": f"square-{k}"} for k in range(4)]  # seeded by id
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sdgen.cli", "batch", str(prompts), "--out", str(out), "--ray", cluster,
           "--actors", "2", *FAST]

    # a driver in its own process, really killed (SIGKILL: no clean-up of any kind) once some lines are done
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list(out.glob("*.png"))) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    first = {p.name: p.stat().st_ino for p in out.glob("*.png")}
    assert 4 <= len(first) < n, f"the kill came too late to test a resume: {len(first)} of {n} done"

    # the rerun (this process as the driver, on the same cluster) renders only what is missing
    said = []
    import sdgen.cli as cli

    original = cli.log
    cli.log = said.append
    try:
        assert main(["batch", str(prompts), "--out", str(out), "--ray", cluster, "--actors", "2", *FAST]) == 0
    finally:
        cli.log = original
    assert f"batch: {n} lines: {len(first)} done before, 0 refused, {n - len(first)} to render on Ray" in said
    assert said[-1] == f"batch: all {n} lines rendered in {out}"
    jobs, refused = batch.plan(batch.read_lines(prompts, {"steps": 4}), open_checkpoint("demo"))
    assert not refused and len(jobs) == n
    # every line exactly once: no duplicate, no temporary file, no failure left; the first run's files untouched
    assert sorted(os.listdir(out)) == sorted(j.names[0] for j in jobs)
    assert {name: (out / name).stat().st_ino for name in first} == first

    # pixel-equal to the CLI and the Python API for the same line and seed, whichever actor rendered it
    for job in jobs:
        req, = [GenerationRequest(**fields) for fields in json.loads(job.requests)]
        assert np.array_equal(np.asarray(Image.open(out / job.names[0])), np.asarray(demo.generate(req).images[0]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers compute (see _OneThread)
    try:
        assert main(["generate", lines[0]["prompt"], "--seed", "100", "-o", str(tmp_path / "cli.png"), *FAST]) == 0
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli.png")), np.asarray(Image.open(out / jobs[0].names[0])))
    assert Image.open(tmp_path / "cli.png").text == Image.open(out / jobs[0].names[0]).text


# ---------------------------------------------------------------------------------------------- Ray Serve


def _post(url, body, timeout=300):
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read()), dict(r.headers)


def _get(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_two_replicas_answer_concurrent_a1111_requests(cluster, demo):
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "sdgen.cli", "serve", "--ray", cluster, "--model", "demo",
                             "--precision", "fp32", "--replicas", "2", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said = []
    threading.Thread(target=lambda: said.extend(proc.stderr), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not any(line.startswith("sdgen serve --ray: ") for line in said):   # every replica is up
            assert proc.poll() is None and time.monotonic() < deadline, "".join(said)
            time.sleep(0.2)
        assert f"http://127.0.0.1:{port}/ on Ray Serve, 2 replica(s)" in "".join(said)
        assert _get(url + "/sdapi/v1/sd-models")[0]["title"] == "demo"

        # concurrent A1111 requests (the fields Open WebUI and SillyTavern send), routed across both replicas
        bodies = [{"prompt": f"a {c} circle on a white background", "negative_prompt": "", "steps": 4,
                   "cfg_scale": 7, "sampler_name": "Euler a", "seed": 10 + i, "width": 128, "height": 128,
                   "batch_size": 1, "n_iter": 1, "override_settings": {"CLIP_stop_at_last_layers": 1}}
                  for i, c in enumerate(["red", "green", "blue", "yellow"])]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda b: _post(url + "/sdapi/v1/txt2img", b), bodies))
        assert len({headers["x-sdgen-replica"] for _, headers in answers}) == 2
        for body, (answer, headers) in zip(bodies, answers):
            info = json.loads(answer["info"])
            assert info["all_seeds"] == [body["seed"]] and info["sampler_name"] == "Euler a"
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))))
            want = demo.generate(GenerationRequest(body["prompt"], steps=4, guidance_scale=7, sampler="euler_a",
                                                   seed=body["seed"], width=128, height=128))
            assert np.array_equal(got, np.asarray(want.images[0])), body   # the CLI's pixels, from any replica

        # progress and interrupt by job id: a long job on one replica is interrupted while another one runs on
        long = dict(bodies[0], steps=150, width=256, height=256, force_task_id="long-job")   # the server's limit
        short = dict(bodies[1], steps=30, force_task_id="short-job")
        with ThreadPoolExecutor(2) as pool:
            jobs = [pool.submit(_post, url + "/sdapi/v1/txt2img", b) for b in (long, short)]
            deadline = time.monotonic() + 120
            while True:
                p = _get(url + "/sdapi/v1/progress?id_task=long-job")
                if p["state"]["sampling_step"] >= 2:
                    break
                assert time.monotonic() < deadline, p
                time.sleep(0.2)
            assert p["state"]["sampling_steps"] == 150 and 0 < p["progress"] < 1 and p["current_image"]
            _post(url + "/sdapi/v1/interrupt?id_task=long-job", {})
            (long_answer, _), (short_answer, _) = (j.result(timeout=300) for j in jobs)
        # Serve's router usually puts the short job on the idle replica, but its queue-length cache may send it
        # behind the long one: either way the interrupt by id stops only the long job
        assert json.loads(long_answer["info"])["interrupted"] and len(long_answer["images"]) == 1
        assert not json.loads(short_answer["info"])["interrupted"]   # the other job was not touched
        done = _get(url + "/sdapi/v1/progress?id_task=long-job")
        assert done["textinfo"] == "Interrupted" and done["state"]["interrupted"]
        assert _get(url + "/sdapi/v1/progress?id_task=short-job")["progress"] == 1.0
    finally:
        # SIGTERM, as a service manager stops it (a shell without job control starts background jobs with
        # Ctrl-C's SIGINT ignored, and their children inherit that: CI may run so)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        try:
            proc.wait(90)   # the command waits at most STOP_WAIT (30 s) for Serve to delete the application
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(f"SIGTERM to exit: {time.monotonic() - t0:.1f} s")
    assert proc.returncode in (0, 130, -signal.SIGINT), "".join(said)


def test_serve_application_builder_for_serve_run_and_config_files():
    from ray.serve.deployment import Application

    from sdgen import SdgenError
    from sdgen.serve.ray import build

    assert isinstance(build({"model": "demo", "replicas": "2", "num_cpus": "1", "max_steps": "50"}), Application)
    assert isinstance(build({"model": "demo", "autoscale": "1:4", "num_gpus": 1}), Application)
    with pytest.raises(SdgenError, match="unknown argument 'replica'"):
        build({"replica": 2})
    with pytest.raises(SdgenError, match="MIN:MAX"):
        build({"autoscale": "4:1"})


def test_job_board_keeps_an_ended_run_ended():
    """A replica's progress reports travel on two paths (its publisher thread, and the end of each request, sent
    before the answer): a report of a run that arrives after that run's end must not make it running again,
    while a new run under the same id (a client reusing its task id) is shown."""
    from sdgen.serve.ray import JobBoard

    board = JobBoard()
    running = lambda run, p: {"state": "running", "run": run, "started": 1.0, "progress": {"progress": p}}
    board.sync({"t": running("r/1", 0.5)})
    board.sync({"t": {"state": "done", "run": "r/1", "started": 1.0, "progress": {"progress": 1.0}}})
    board.sync({"t": running("r/1", 0.9)})               # the publisher's older snapshot, arriving late
    assert board.progress("t") == {"progress": 1.0}
    assert board.stop("t", "interrupt") == 0             # nothing left to stop
    board.sync({"t": running("r/2", 0.1)})               # the next job under the same id
    assert board.progress("t") == {"progress": 0.1} and board.progress("") == {"progress": 0.1}
