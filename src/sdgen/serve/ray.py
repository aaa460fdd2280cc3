"""sdgen on Ray: batch generation with Ray Data, the HTTP API with Ray Serve. Needs `pip install "sdgen[ray]"`.

Batch (`sdgen batch FILE --ray [ADDRESS]`): the driver reads and checks the lines and writes every file (see
sdgen.batch); Ray Data streams the jobs through `map_batches` over an actor pool, one loaded model per actor
(`num_cpus`/`num_gpus` each), and streams the PNG bytes back. Nothing on the workers touches the output folder,
so a cluster needs no shared filesystem, and a killed driver leaves nothing half-written.

Serving (`sdgen serve --ray`, `serve run sdgen.serve.ray:build ...`): an ingress deployment over model-replica
deployments, each replica the single server's own app; see the section "serving" below.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import signal
import sys
import threading
import time
import uuid
from typing import Iterator

from fastapi import Request   # module level: the routes' annotations are strings (postponed) resolved from here

from .. import SdgenError
from ..batch import Job, Renderer, job_rows


def require_ray():
    try:
        import ray
    except ImportError:
        raise SdgenError("--ray needs Ray: pip install \"sdgen[ray]\" (or pip install \"ray[data,serve]\")") from None
    return ray


def connect(address: str | None, log=None):
    """Join the cluster at `address` ("auto": the one this machine belongs to, "ray://host:10001": a remote one
    through Ray Client), or, with None, the one RAY_ADDRESS names, else start a local instance for this run."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address or None, log_to_driver=False)   # workers' logs stay in Ray's log folder
    except ConnectionError as e:
        raise SdgenError(f"cannot reach the Ray cluster at {address or os.environ.get('RAY_ADDRESS') or 'auto'}: "
                         f"{str(e).splitlines()[0]}") from None
    if log:
        res = ray.cluster_resources()
        log(f"ray: {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs")
    return ray


class BatchActor(Renderer):
    """The batch renderer as Ray Data calls it: pyarrow tables in and out (bytes stay bytes: numpy would turn a
    column of PNGs into fixed-width strings)."""

    def __call__(self, table):
        import pyarrow as pa

        rows = super().__call__({k: table.column(k).to_pylist() for k in ("id", "line", "request")})
        return pa.table({"id": pa.array(rows["id"], pa.string()), "line": pa.array(rows["line"], pa.int64()),
                         "pngs": pa.array(rows["pngs"], pa.list_(pa.binary())),
                         "error": pa.array(rows["error"], pa.string()),
                         "seconds": pa.array(rows["seconds"], pa.float64())})


def render_on_ray(jobs: list[Job], model: str, *, address: str | None = None, actors: int | tuple[int, int] = 1,
                  num_cpus: float = 1, num_gpus: float = 0, lines_per_batch: int = 1, device: str = "auto",
                  precision: str = "auto", log=None) -> Iterator[dict]:
    """Result rows (as sdgen.batch.run reads them) for `jobs`, rendered by an actor pool of `actors` (a size, or
    (min, max) to let Ray Data scale it), each actor one model copy with `num_cpus` CPUs and `num_gpus` GPUs,
    fed `lines_per_batch` lines per call. Rows arrive as they finish, in any order."""
    ray = connect(address, log)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False   # the driver prints its own counts and ETA
    ctx.print_on_execution_start = False
    # small blocks: an actor takes a whole block, so blocks much larger than a few lines would starve the others
    blocks = max(1, min(len(jobs), 4096))
    ds = ray.data.from_items(job_rows(jobs), override_num_blocks=blocks)
    size = {"size": actors} if isinstance(actors, int) else {"min_size": actors[0], "max_size": actors[1]}
    pool = ray.data.ActorPoolStrategy(**size, max_tasks_in_flight_per_actor=2)  # 2: the next batch waits, no more
    ds = ds.map_batches(BatchActor, batch_format="pyarrow", batch_size=lines_per_batch, compute=pool,
                        fn_constructor_kwargs={"model": model, "device": device, "precision": precision,
                                               "threads": max(1, int(num_cpus))},
                        num_cpus=num_cpus, num_gpus=num_gpus or None)
    yield from ds.iter_rows()


# ============================================================================================== serving
# `sdgen serve --ray`: the HTTP API of `sdgen serve` as a Ray Serve application of two deployments.
#
#   client -> Serve's HTTP proxy -> SdgenIngress (1 replica: auth, routing, progress by job id)
#                                      -> SdgenModel (N replicas, or autoscaled: each the whole `sdgen serve`
#                                         app of sdgen.serve.app, its model, its queue, its worker)
#
# A model replica runs the very app `sdgen serve` runs, called in-process with the HTTP request the ingress
# forwards, so every route, shape, limit and error is the single server's. What one replica cannot know alone is
# the state of a job that another replica runs: replicas publish their jobs' progress on a small named actor (the
# JobBoard) by job id (A1111's `force_task_id`, else one the ingress makes), and take interrupt/skip requests
# from it, so `GET /sdapi/v1/progress?id_task=ID` and `POST /sdapi/v1/interrupt?id_task=ID` reach the job
# wherever it runs. Without an id, progress shows the latest running job and interrupt/skip reach every running
# job, as A1111's single-job answers would.

_TASK = contextvars.ContextVar("sdgen_task", default="")   # the job id of the request a replica is handling
PUBLISH_EVERY = 0.25    # seconds between a replica's progress reports (and so the latency of an interrupt)
GENERATION = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")


class JobBoard:
    """Progress of every job by id, as the replicas report it, and the interrupt/skip requests waiting for them.
    A plain Ray actor, named after the application, created by the ingress."""

    KEEP = 600      # seconds a finished job's last state is kept

    def __init__(self):
        self.jobs: dict[str, dict] = {}     # id -> {"state", "run", "progress" (A1111 /progress answer), "started"}
        self.stops: dict[str, str] = {}     # id -> "interrupt" | "skip", until its replica takes it

    def sync(self, updates: dict) -> dict:
        """A replica's report {id: {...}}; returns the stop requests for those ids."""
        now = time.time()
        for tid, info in updates.items():
            was = self.jobs.get(tid)
            if was and was["run"] == info["run"] and was["state"] not in ("queued", "running"):
                continue   # an older report of this run that arrived after its end: an ended run stays ended
            self.jobs[tid] = {**info, "updated": now}
        for tid in [t for t, j in self.jobs.items() if j["state"] not in ("queued", "running")
                    and now - j["updated"] > self.KEEP]:
            del self.jobs[tid]
        return {tid: self.stops.pop(tid) for tid in list(self.stops) if tid in updates}

    def stop(self, tid: str, kind: str) -> int:
        """Ask the job `tid` (or, with "", every queued or running job) to stop; how many were asked."""
        live = [t for t, j in self.jobs.items() if j["state"] in ("queued", "running")]
        targets = [tid] if tid else live
        for t in targets:
            if t in live or t not in self.jobs:   # not reported yet: its replica takes it on its first report
                self.stops[t] = kind
        while len(self.stops) > 10_000:       # ids nobody ever ran
            self.stops.pop(next(iter(self.stops)))
        return sum(t in live for t in targets)

    def progress(self, tid: str) -> dict | None:
        """The A1111 progress of job `tid`, or with "" of the latest running one; None when there is none."""
        if tid:
            job = self.jobs.get(tid)
        else:
            running = [j for j in self.jobs.values() if j["state"] == "running"]
            job = max(running, key=lambda j: j["started"]) if running else None
        return None if job is None else job["progress"]


def _idle() -> dict:
    """The single server's answer to /sdapi/v1/progress when nothing runs (its shape, from its own code)."""
    from .worker import Worker

    return Worker(lambda model: None, queue_size=0).progress()


async def call_asgi(app, method: str, path: str, query: str, headers: list, body: bytes) -> tuple[int, list, bytes]:
    """One HTTP request through an ASGI app in this process: (status, headers, body). Cancelling the call is the
    client going away (the app sees http.disconnect, as behind a real server)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("sdgen-replica", 80)}
    sent, gone = False, asyncio.Event()
    status, out_headers, chunks = 500, [], []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status, out_headers
        if message["type"] == "http.response.start":
            status = message["status"]
            out_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    except asyncio.CancelledError:
        gone.set()
        raise
    return status, out_headers, b"".join(chunks)


class ModelReplica:
    """A Serve replica: the `sdgen serve` app with its own model and queue, jobs tagged with their ids and their
    progress published on the JobBoard."""

    def __init__(self, settings, board: str):
        from .app import create_app

        from ray import serve

        self.app = create_app(settings, log=_stderr)
        self.worker = self.app.state.worker
        self.name = serve.get_replica_context().replica_id.unique_id   # which replica answered: a response header
        self.board_name = board
        self.tasks: dict[str, object] = {}   # id -> the worker's Job, until its end is published
        submit = self.worker.submit

        def tagged(job):   # the app queues a job inside forward(): the id of that request names it
            submit(job)
            if _TASK.get():
                self.tasks[_TASK.get()] = job
            return job

        self.worker.submit = tagged
        self._lock = threading.Lock()        # the publisher thread and forward() both report
        self._closing = threading.Event()
        threading.Thread(target=self._publish, name="sdgen-publish", daemon=True).start()

    async def forward(self, task: str, method: str, path: str, query: str, headers: list, body: bytes):
        token = _TASK.set(task)
        try:
            status, out, answer = await call_asgi(self.app, method, path, query, headers, body)
        finally:
            _TASK.reset(token)
        if task in self.tasks:   # its end is on the board before the client has its answer (then asks /progress)
            await self._sync(self._report(only=task))
        return status, [*out, ("x-sdgen-replica", self.name)], answer

    async def _sync(self, updates: dict):
        import ray

        try:
            await ray.get_actor(self.board_name).sync.remote(updates)
        except Exception as e:  # noqa: BLE001 - the publisher reports it again while the job is listed
            _stderr(f"sdgen serve --ray: progress report failed ({type(e).__name__}: {str(e)[:200]})")
        else:
            self._forget(updates)

    def _forget(self, updates: dict):
        """Stop reporting the jobs whose end the board has now."""
        with self._lock:
            for tid, info in updates.items():
                if info["state"] not in ("queued", "running"):
                    self.tasks.pop(tid, None)

    def _report(self, only: str | None = None) -> dict:
        with self._lock:
            tasks = [(only, self.tasks[only])] if only in self.tasks else [] if only else list(self.tasks.items())
            return self._describe(tasks)

    def _describe(self, tasks) -> dict:
        idle = None
        updates = {}
        for tid, job in tasks:
            run = f"{self.name}/{job.id}"   # one run of the id (a client may reuse an id for its next job)
            if job.done:
                idle = idle or _idle()
                final = "interrupted" if job.stop == "interrupt" else job.state
                updates[tid] = {"state": final, "run": run, "started": job.started,
                                "progress": {**idle, "progress": 1.0, "textinfo": final.capitalize(),
                                             "state": {**idle["state"], "interrupted": final == "interrupted"}}}
            elif self.worker.current is job:
                updates[tid] = {"state": "running", "run": run, "started": job.started,
                                "progress": self.worker.progress(True)}
            else:
                idle = idle or _idle()
                updates[tid] = {"state": "queued", "run": run, "started": 0.0,
                                "progress": {**idle, "textinfo": "Waiting...",
                                             "state": {**idle["state"], "queued": self.worker.queued}}}
        return updates

    def _publish(self):
        import ray

        board = None
        while not self._closing.wait(PUBLISH_EVERY):
            if not self.tasks:
                continue
            try:
                updates = self._report()
                board = board or ray.get_actor(self.board_name)
                stops = ray.get(board.sync.remote(updates), timeout=10)
                self._forget(updates)
            except Exception as e:  # noqa: BLE001 - the board restarts with the ingress: report again next time
                if board is not None or not str(e).startswith("Failed to look up actor"):
                    _stderr(f"sdgen serve --ray: progress report failed ({type(e).__name__}: {str(e)[:200]})")
                board = None
                continue
            for tid, kind in stops.items():
                job = self.tasks.get(tid)
                if job is None:
                    continue
                if self.worker.current is job:
                    if kind == "interrupt" or job.stop is None:
                        job.stop = kind
                elif kind == "interrupt":
                    self.worker.cancel(job)   # still queued: it ends without images

    def __del__(self):
        self._closing.set()
        self.worker.close(5)


class Ingress:
    """The HTTP entry: the single server's auth and body limits (its Guard), then every request forwarded to a
    model replica that Serve picks (the least busy of two), except progress/interrupt/skip, answered from the
    JobBoard by job id, and the options, kept here so that every replica's jobs follow them."""

    def __init__(self, models, settings, board: str):
        import ray

        self.models = models            # DeploymentHandle of SdgenModel
        self.settings = settings
        self.board = ray.remote(JobBoard).options(name=board, get_if_exists=True, num_cpus=0).remote()
        self.options: dict = {}         # what POST /sdapi/v1/options set: applied to every generation request

    def __serve_build_asgi_app__(self):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, Response

        from .app import Guard, parse_auth

        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)   # /docs comes from a replica
        limits = self.settings.limits
        app.add_middleware(Guard, auth=parse_auth(self.settings.api_auth), max_body=limits.max_body, log=_stderr)

        async def task_id(request: Request) -> str:
            tid = request.query_params.get("id_task", "")
            if not tid and request.method == "POST":
                try:
                    tid = str((json.loads(await request.body() or b"{}") or {}).get("id_task") or "")
                except (ValueError, AttributeError):
                    tid = ""
            return tid

        @app.get("/sdapi/v1/progress")
        async def progress(request: Request, skip_current_image: bool = False):
            answer = await self.board.progress.remote(await task_id(request)) or _idle()
            return {**answer, "current_image": None} if skip_current_image else answer

        @app.post("/sdapi/v1/interrupt")
        async def interrupt(request: Request):
            await self.board.stop.remote(await task_id(request), "interrupt")
            return {}

        @app.post("/sdapi/v1/skip")
        async def skip(request: Request):
            await self.board.stop.remote(await task_id(request), "skip")
            return {}

        @app.get("/sdapi/v1/options")
        async def get_options(request: Request):
            status, headers, body = await self._forward(request)
            if status != 200:
                return Response(body, status_code=status, headers=_plain(headers))
            return {**json.loads(body), **self.options}

        @app.post("/sdapi/v1/options")
        async def set_options(request: Request):
            body = await request.body()
            status, headers, answer = await self._forward(request, body)   # a replica checks them (422 if bad)
            if status == 200:
                sent = json.loads(body or b"{}")
                self.options.update({k: sent[k] for k in ("sd_model_checkpoint", "CLIP_stop_at_last_layers")
                                     if sent.get(k) is not None})
            return Response(answer, status_code=status, headers=_plain(headers))

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
        async def anything(request: Request):
            body, task = await request.body(), ""
            if request.method == "POST" and request.url.path in GENERATION:
                try:
                    fields = json.loads(body)
                except ValueError:
                    fields = None   # the replica answers the 422
                if isinstance(fields, dict):
                    task = str(fields.get("force_task_id") or uuid.uuid4().hex)
                    if self.options:
                        given = fields.get("override_settings")
                        fields["override_settings"] = {**self.options, **(given if isinstance(given, dict) else {})}
                        body = json.dumps(fields).encode()
            try:
                status, headers, answer = await self._forward(request, body, task)
            except _Gone:
                return Response(status_code=499)
            except Exception as e:  # noqa: BLE001 - Serve's back-pressure or a lost replica: one line, 503
                from ray.serve.exceptions import BackPressureError

                busy = isinstance(e, BackPressureError)
                message = ("every model replica's queue is full: try again later" if busy else
                           f"no model replica could take the request ({type(e).__name__}); try again later")
                return JSONResponse({"detail": message}, status_code=503, headers={"Retry-After": "5"})
            headers = _plain(headers)
            if task:
                headers["x-sdgen-task"] = task
            return Response(answer, status_code=status, headers=headers)

        return app

    async def _forward(self, request, body: bytes | None = None, task: str = ""):
        """The request, as sent, to a model replica; a client that goes away cancels it there (its job dropped)."""
        body = await request.body() if body is None else body
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("content-length", "host")]
        headers.append(("content-length", str(len(body))))
        response = self.models.forward.remote(task, request.method, request.url.path, request.url.query,
                                              headers, body)
        pending = asyncio.ensure_future(_result(response))
        while True:
            done, _ = await asyncio.wait({pending}, timeout=0.25)
            if done:
                return pending.result()
            if await request.is_disconnected():
                response.cancel()
                pending.cancel()
                raise _Gone()


class _Gone(Exception):
    """The client went away."""


async def _result(response):
    return await response


def _plain(headers: list) -> dict:
    """A replica's response headers for the ingress's Response (which sets its own length)."""
    return {k: v for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")}


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


GRACE = 5   # seconds a stopping replica waits for its requests (Ctrl-C, scale-down), as the single server's uvicorn


def application(settings, *, replicas: int = 1, autoscale: tuple[int, int] | None = None, num_cpus: float = 1,
                num_gpus: float = 0, name: str = "sdgen"):
    """The Ray Serve application: SdgenIngress over `replicas` SdgenModel replicas (or between autoscale's MIN
    and MAX, scaled on ongoing requests), each with `num_cpus` CPUs and `num_gpus` GPUs and one model."""
    require_ray()
    from ray import serve

    board = f"sdgen-jobs-{name}"
    model_options = {"ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
                     # one job runs, queue_size wait in the replica's own queue, a few slots for quick routes;
                     # beyond, Serve keeps queue_size more per ingress, then answers 503
                     "max_ongoing_requests": settings.queue_size + 1 + 4,
                     "max_queued_requests": max(1, settings.queue_size),
                     "graceful_shutdown_timeout_s": GRACE}
    if autoscale:
        model_options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                               "initial_replicas": autoscale[0], "target_ongoing_requests": 1}
    else:
        model_options["num_replicas"] = replicas
    models = serve.deployment(ModelReplica, name="SdgenModel", **model_options).bind(settings, board)
    ingress = serve.deployment(serve.ingress()(Ingress), name="SdgenIngress",
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                               graceful_shutdown_timeout_s=GRACE)
    return ingress.bind(models, settings, board)


# what `serve run sdgen.serve.ray:build key=value ...` and a config file's `args:` may set
_ARGS = {"model": str, "models_dir": str, "lora_dir": str, "embeddings_dir": str, "api_auth": str,
         "queue_size": int, "device": str, "precision": str, "preview_decoder": str, "max_side": int,
         "max_steps": int, "max_images": int, "replicas": int, "autoscale": str, "num_cpus": float, "num_gpus": float}


def build(args: dict):
    """The application builder for `serve run sdgen.serve.ray:build model=/models/v1-5.safetensors replicas=2`
    and for Serve config files (`import_path: sdgen.serve.ray:build`, `args: {model: ..., num_gpus: 1}`)."""
    from .app import Settings
    from .schemas import Limits

    unknown = sorted(set(args) - set(_ARGS))
    if unknown:
        raise SdgenError(f"unknown argument {unknown[0]!r}: sdgen.serve.ray:build takes {', '.join(_ARGS)}")
    try:
        a = {k: _ARGS[k](v) for k, v in args.items() if v is not None}
    except (TypeError, ValueError) as e:
        raise SdgenError(f"sdgen.serve.ray:build: {e}") from None
    limits = Limits(**{k: a.pop(k) for k in ("max_side", "max_steps", "max_images") if k in a})
    shape = {k: a.pop(k) for k in ("replicas", "num_cpus", "num_gpus") if k in a}
    autoscale = parse_autoscale(a.pop("autoscale")) if "autoscale" in a else None
    return application(Settings(**a, limits=limits), autoscale=autoscale, **shape)


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        low, high = (int(p) for p in str(text).split(":"))
    except ValueError:
        low = high = 0
    if not 1 <= low <= high:
        raise SdgenError(f"--autoscale must be MIN:MAX with 1 <= MIN <= MAX, not {text!r}")
    return low, high


def serve_on_ray(settings, *, address: str | None, host: str, port: int, replicas: int = 1,
                 autoscale: tuple[int, int] | None = None, num_cpus: float = 1, num_gpus: float = 0, log=None) -> None:
    """`sdgen serve --ray`: deploy the application on the cluster (or a local Ray), serve until Ctrl-C, then take
    it down."""
    log = log or _stderr
    ray = connect(address, log)
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    app = application(settings, replicas=replicas, autoscale=autoscale, num_cpus=num_cpus, num_gpus=num_gpus)
    serve.run(app, name="sdgen", route_prefix="/")
    try:   # a cluster already running Serve keeps its own HTTP address: say the one that answers
        from ray.serve.context import _get_global_client

        config = _get_global_client().http_config
        if (config.host, config.port) != (host, port):
            log(f"warning: Serve was already running on this cluster; it listens on {config.host}:{config.port}")
            host, port = config.host, config.port
    except Exception:  # noqa: BLE001 - a private API of Serve: the message is a courtesy
        pass
    shown = f"[{host}]" if ":" in host else host
    size = f"{autoscale[0]}-{autoscale[1]} replicas (autoscaled)" if autoscale else f"{replicas} replica(s)"
    log(f"sdgen serve --ray: http://{shown}:{port}/ on Ray Serve, {size}; Ctrl-C stops")
    signal.signal(signal.SIGTERM, _stop)   # what service managers send; Ctrl-C is Python's KeyboardInterrupt
    try:
        while True:
            time.sleep(3600)
    finally:
        _take_down(serve, log)
        if not address:
            ray.shutdown()


def _stop(signum, frame):
    raise KeyboardInterrupt   # the same way out as Ctrl-C: the application is taken down


STOP_WAIT = 30   # seconds Ctrl-C waits for Serve to delete the application before the command exits anyway


def _take_down(serve, log):
    """Delete the application, waiting at most STOP_WAIT: a busy cluster's controller must not keep Ctrl-C
    from returning (a local Ray is shut down right after; on a cluster Serve finishes the deletion itself)."""
    done = threading.Event()

    def delete():
        try:
            serve.delete("sdgen")
        except Exception as e:  # noqa: BLE001 - said, then the command exits as asked
            log(f"sdgen serve --ray: deleting the application failed ({type(e).__name__}: {str(e)[:200]})")
        finally:
            done.set()

    threading.Thread(target=delete, name="sdgen-take-down", daemon=True).start()
    if not done.wait(STOP_WAIT):
        log(f"sdgen serve --ray: Serve did not delete the application within {STOP_WAIT} s; leaving it to the cluster")
