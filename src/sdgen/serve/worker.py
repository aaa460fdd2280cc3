"""One model, one worker thread, a bounded FIFO queue of jobs.

    worker = Worker(load=lambda m: sdgen.load(m.source), preview=LatentPreview(), queue_size=8)
    worker.start(first_model)                # loads it before anything is served
    job = worker.submit(Job(request, n_iter=2, model=m))   # QueueFull when `queue_size` jobs already wait
    job.wait() ... job.images, job.infos, job.error
    worker.interrupt() / worker.skip()       # the running job stops at its next step, keeping what it has
    worker.cancel(job)                       # its client went away: dropped from the queue (or stopped)

The worker runs the pipeline's own denoising generator, so progress, previews and stopping need no callbacks in
the pipeline: after each step it records where it is and checks the job's stop flag; then it decodes with the
very code generate() uses (Pipeline.to_images), so a request gives exactly the CLI's pixels.
"""

from __future__ import annotations

import base64
import gc
import io
import itertools
import os
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from .. import SdgenError
from ..formats.tensors import one_line
from ..pipeline import _out_of_memory_as_error, check_memory
from ..request import GenerationRequest
from .library import Model
from .preview import LatentPreview


class QueueFull(SdgenError):
    pass


_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    request: GenerationRequest          # as the client asked: seed may be None (random), size may be unset
    model: Model                        # the checkpoint it runs on
    n_iter: int = 1                     # A1111's batch count: n_iter batches, seeds continuing
    kind: str = "txt2img"
    id: int = field(default_factory=lambda: next(_ids))
    # filled while it runs
    state: str = "queued"               # queued -> running -> done | failed | dropped
    stop: str | None = None             # "interrupt" | "skip" | "dropped": checked after every step
    iteration: int = 0
    step: int = 0
    steps: int = 0
    text: str = "Waiting..."
    started: float = 0.0
    model_name: str = ""                            # the loaded checkpoint's name, as the CLI writes it in PNGs
    images: list = field(default_factory=list)      # PIL images, in seed order
    infos: list = field(default_factory=list)       # (resolved request, index in its batch) per image
    error: Exception | None = None
    _done: threading.Event = field(default_factory=threading.Event)
    _waiters: list = field(default_factory=list)    # (event loop, asyncio.Event) woken when the job ends

    def wait(self, timeout=None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def add_waiter(self, loop, event) -> None:
        self._waiters.append((loop, event))
        if self.done:
            loop.call_soon_threadsafe(event.set)

    def _finish(self, state: str) -> None:
        self.state = state
        self._done.set()
        for loop, event in self._waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:   # that loop is closed: nobody waits any more
                pass


class Worker:
    def __init__(self, load, preview=None, queue_size: int = 8, log=None):
        if not isinstance(queue_size, int) or queue_size < 0:
            raise SdgenError(f"the queue size must be a whole number from 0, not {queue_size!r}")
        self._load = load                    # Model -> Pipeline
        self.preview = preview               # latents (1, 4, h, w) -> PIL, or None
        self.queue_size = queue_size         # jobs that may wait behind the running one
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.current: Job | None = None
        self.pipe = None
        self.model: Model | None = None
        self.finished: deque[tuple[int, str]] = deque(maxlen=1000)   # (job id, final state), newest last
        self._latest = None                  # (key, latents (1, 4, h, w)) of the running job's last step
        self._preview_cache = (None, None)   # (key, base64 PNG)

    # ---- life --------------------------------------------------------------------------------------------
    def start(self, model: Model) -> None:
        """Load the first model here (errors surface before the server listens), then start the thread."""
        self._pipeline(model)
        self._thread = threading.Thread(target=self._loop, name="sdgen-worker", daemon=True)
        self._thread.start()

    def close(self, timeout=30.0) -> None:
        with self._cond:
            self._closing = True
            for job in self._queue:   # nobody will run them: their requests are answered now
                job.stop = "dropped"
                job._finish("dropped")
            self._queue.clear()
            if self.current is not None:
                self.current.stop = "dropped"
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- what the routes call --------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.queue_size and (self.current is not None or self._queue):
                raise QueueFull(f"the queue is full ({len(self._queue)} waiting behind the running job): "
                                "try again later")
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: a queued job is dropped, a running one stops at its next step."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self.finished.append((job.id, "dropped"))
                job._finish("dropped")
            elif job is self.current:
                job.stop = "dropped"

    def interrupt(self) -> None:
        job = self.current
        if job is not None:
            job.stop = "interrupt"

    def skip(self) -> None:
        job = self.current
        if job is not None and job.stop is None:
            job.stop = "skip"

    @property
    def queued(self) -> int:
        return len(self._queue)

    def progress(self, with_image: bool = True) -> dict:
        """A1111's /sdapi/v1/progress: the running job's fraction done, its ETA and its latest preview."""
        job = self.current
        queued = len(self._queue)
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                              "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                              "sampling_steps": 0, "queued": queued}}
        steps = max(job.steps, 1)
        done = min(1.0, (job.iteration + min(job.step, steps) / steps) / max(job.n_iter, 1))
        elapsed = time.time() - job.started if job.started else 0.0
        eta = elapsed / done - elapsed if done > 0 else 0.0
        return {"progress": round(done, 4), "eta_relative": round(eta, 3),
                "current_image": self.preview_png() if with_image else None,
                "textinfo": job.text,
                "state": {"skipped": job.stop == "skip", "interrupted": job.stop == "interrupt",
                          "stopping_generation": False, "job": job.kind, "job_count": job.n_iter,
                          "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or time.time())),
                          "job_no": job.iteration, "sampling_step": job.step, "sampling_steps": job.steps,
                          "queued": queued}}

    def preview_png(self) -> str | None:
        """The running job's latest step as a base64 PNG (made on demand, once per step)."""
        latest = self._latest
        if latest is None or self.preview is None:
            return None
        key, latents = latest
        cached_key, cached = self._preview_cache
        if cached_key == key:
            return cached
        with torch.inference_mode():
            image = self.preview(latents)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        png = base64.b64encode(buf.getvalue()).decode()
        self._preview_cache = (key, png)
        return png

    # ---- the thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = self._queue.popleft()
                self.current = job
            job.state, job.started = "running", time.time()
            state = "done"
            try:
                self._run(job)
                state = "dropped" if job.stop == "dropped" else "done"
            except SdgenError as e:
                job.error, state = e, "failed"
            except Exception as e:  # noqa: BLE001 - a bug or a broken model: this job fails, the server stays up
                job.error, state = e, "failed"
                self.log(f"sdgen serve: job {job.id} failed: {type(e).__name__}: {one_line(str(e))[:300]}")
                if os.environ.get("SDGEN_DEBUG"):
                    traceback.print_exc()
            finally:
                with self._cond:
                    self.current = None
                    self._latest = None
                    self.finished.append((job.id, state))
                job._finish(state)

    def _pipeline(self, model: Model):
        if self.model != model:
            self.pipe, self.model = None, None     # free the old weights before reading the new ones
            gc.collect()
            self.pipe = self._load(model)
            self.model = model
            if isinstance(self.preview, LatentPreview):   # the projection fitted to this model's VAE
                self.preview = LatentPreview.fitted(self.pipe)
        return self.pipe

    def _run(self, job: Job) -> None:
        if job.stop == "dropped":
            return
        if self.model != job.model:
            job.text = f"Loading {job.model.title}"
        pipe = self._pipeline(job.model)
        job.model_name = pipe.name
        base = pipe.request(job.request)       # defaults filled from the model, a random seed picked, checked
        for k in range(job.n_iter):
            req = base if k == 0 else pipe.request(replace(base, seed=base.seed + k * base.count))
            check_memory(req, pipe.checkpoint, pipe.precision, pipe.device, loaded=True)
            job.iteration, job.step, job.steps = k, 0, req.steps
            job.text = "Encoding the prompt"
            x = None
            with _out_of_memory_as_error(req):
                loop = pipe.denoise(req)
                try:
                    for x, i, n in loop:
                        job.step, job.steps = i + 1, n
                        batch = f", batch {k + 1}/{job.n_iter}" if job.n_iter > 1 else ""
                        job.text = f"Sampling step {i + 1}/{n}{batch}"
                        self._latest = ((job.id, k, i), x[:1].clone())
                        if job.stop is not None:
                            break
                finally:
                    loop.close()
                if job.stop == "dropped":
                    return
                job.text = "Decoding"
                job.images += pipe.to_images(x)   # generate()'s decode (API requests never ask for a refiner)
            job.infos += [(req, j) for j in range(req.count)]
            if job.stop == "interrupt":
                break
            if job.stop == "skip":
                job.stop = None
