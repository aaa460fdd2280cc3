"""The HTTP server: AUTOMATIC1111's web API, OpenAI's images endpoint and a small web page, over one Worker.

    app = create_app(Settings(model="demo"))      # loads the model, starts the worker
    uvicorn.run(app, host="127.0.0.1", port=7860)  # what `sdgen serve` does

Every route is a thin adapter: JSON -> GenerationRequest (schemas) -> a queued Job (worker) -> JSON. Errors are
one line in a JSON `detail`: 422 for a bad request (naming the field), 401 without credentials when --api-auth is
set, 503 when the queue is full, 500 (never with a traceback) for a job that crashed; the server stays up.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.concurrency import run_in_threadpool

from .. import SdgenError, __version__
from ..formats.tensors import one_line
from ..request import SCHEDULES, GenerationRequest
from ..sampling.samplers import SAMPLERS
from . import schemas
from .library import Library
from .preview import LatentPreview, TaesdPreview
from .schemas import FieldError, Img2Img, Limits, OpenAIImages, Options, PngInfo, Txt2Img
from .worker import Job, QueueFull, Worker


@dataclass(frozen=True)
class Settings:
    """Everything `sdgen serve` is told on its command line."""

    model: str | None = None
    models_dir: str | None = None
    lora_dir: str | None = None
    embeddings_dir: str | None = None
    api_auth: str | None = None              # "user:pass[,user2:pass2]"
    queue_size: int = 8
    outputs: str | None = None               # where save_images=true writes PNGs; None: nowhere
    device: str = "auto"
    precision: str = "auto"
    preview_decoder: str | None = None       # a TAESD decoder file; None: the latent -> RGB projection
    limits: Limits = field(default_factory=Limits)


def parse_auth(text: str | None) -> list[tuple[str, str]]:
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise SdgenError(f"--api-auth: give user:password pairs separated by commas, not {item.strip()!r}")
        pairs.append((user, password))
    return pairs


# ------------------------------------------------------------------------------------------- middleware


class Guard:
    """Pure ASGI, around every route (docs and page included): HTTP Basic auth when configured, the body size
    limit, and a last-resort catch so a bug answers one line with 500 instead of a traceback."""

    def __init__(self, app, auth: list[tuple[str, str]], max_body: int, log):
        self.app, self.auth, self.max_body, self.log = app, auth, max_body, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.auth and not self._authorized(headers.get("authorization", "")):
            return await _send_json(send, 401, {"detail": "authentication required (HTTP Basic, see --api-auth)"},
                                    [(b"www-authenticate", b'Basic realm="sdgen"')])
        too_big = {"detail": f"body: the request body is larger than {self.max_body // 2**20} MiB"}
        try:
            if int(headers.get("content-length") or 0) > self.max_body:
                return await _send_json(send, 422, too_big)
        except ValueError:
            return await _send_json(send, 422, {"detail": "content-length: not a number"})
        chunks, size = [], 0
        while True:   # read the body here, counted, so that no route ever sees more than max_body bytes
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await _send_json(send, 422, too_big)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()   # after the body: http.disconnect when the client goes away

        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, watch)
        except Exception as e:  # noqa: BLE001 - a bug of ours: one line, the server goes on
            what = f"{type(e).__name__}: {one_line(str(e))[:300]}"
            self.log(f"sdgen serve: internal error on {scope.get('path')}: {what}")
            if not started:
                await _send_json(send, 500, {"detail": f"internal error ({what})"})

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return False
        ok = False
        for u, p in self.auth:   # compare with every pair, in constant time: no early exit that times the names
            same_user = secrets.compare_digest(u.encode(), user.encode())
            ok |= same_user & secrets.compare_digest(p.encode(), password.encode())
        return ok


async def _send_json(send, status: int, body: dict, headers=()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def _error(status: int, message: str, field: str | None = None, headers=None) -> JSONResponse:
    body = {"detail": message, "error": {"message": message, "type": "invalid_request_error" if status == 422
                                         else "server_error", "param": field}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "body: invalid request", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path")]
    if e.get("type") == "json_invalid":
        return "body: malformed JSON (" + one_line(str((e.get("ctx") or {}).get("error", "")))[:200] + ")", None
    name = ".".join(loc) or "body"
    if name == "body" and e.get("type") in ("model_attributes_type", "dict_type"):
        return "body: not a JSON object (send JSON with Content-Type: application/json)", name
    return f"{name}: {one_line(str(e.get('msg', 'invalid')))[:300]}", name


# ------------------------------------------------------------------------------------------------- app


def create_app(settings: Settings, load=None, log=None) -> FastAPI:
    """The FastAPI app with its worker started (the first model loaded). `load(model)` -> Pipeline overrides
    how models are loaded (tests pass a cache)."""
    from ..pipeline import load as load_pipeline

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    auth = parse_auth(settings.api_auth)
    limits = settings.limits
    library = Library(settings.model, settings.models_dir, settings.lora_dir, settings.embeddings_dir)
    outputs = Path(settings.outputs) if settings.outputs else None
    if outputs is not None:
        from ..images import check_output

        check_output(outputs / "x.png")
    if load is None:
        def load(model):
            return load_pipeline(model.source, device=settings.device, dtype=settings.precision, log=log,
                                 lora_dirs=[library.lora_dir] if library.lora_dir else (),
                                 embedding_dirs=[library.embeddings_dir] if library.embeddings_dir else ())
    preview = TaesdPreview(settings.preview_decoder) if settings.preview_decoder else LatentPreview()
    worker = Worker(load, preview=preview, queue_size=settings.queue_size, log=log)
    first = library.models()[0]
    worker.start(first)
    if settings.model is None:   # load() chose (SD1.5 or the demo): name the entry after it
        library.start_name = worker.pipe.name
        first = library.models()[0]
        worker.model = first
    options = {"sd_model_checkpoint": first.title, "CLIP_stop_at_last_layers": 1, "samples_format": "png",
               "sd_checkpoint_hash": None, "sd_vae": "Automatic", "live_previews_enable": True,
               "show_progress_every_n_steps": 1, "live_preview_content": "Prompt",
               "outdir_samples": str(outputs or "")}

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(worker.close)

    app = FastAPI(title="sdgen", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion on your own machine: AUTOMATIC1111's web API (/sdapi/v1/...), "
                              "OpenAI's /v1/images/generations, and a web page at /.")
    app.state.worker, app.state.library, app.state.options, app.state.settings = worker, library, options, settings
    app.add_middleware(Guard, auth=auth, max_body=limits.max_body, log=log)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc):
        message, name = _validation_message(exc)
        return _error(422, message, name)

    @app.exception_handler(SdgenError)
    async def refused(request, exc):
        exc = schemas.as_field_error(exc)
        return _error(422, one_line(str(exc)), getattr(exc, "field", None))

    async def run(job: Job, request: Request) -> Job | None:
        """Queue the job and wait for it; a client that goes away has its job dropped (None)."""
        try:
            worker.submit(job)
        except QueueFull as e:
            return _error(503, str(e), headers={"Retry-After": "5"})
        event, loop = asyncio.Event(), asyncio.get_running_loop()
        job.add_waiter(loop, event)
        try:
            while not job.done:
                try:
                    await asyncio.wait_for(event.wait(), 0.2)
                except asyncio.TimeoutError:
                    pass
                if not job.done and await request.is_disconnected():
                    worker.cancel(job)
                    return None
        except asyncio.CancelledError:
            worker.cancel(job)
            raise
        if job.state == "dropped":
            return _error(503, "the server is shutting down: the job was not run")
        if job.error is not None:
            if isinstance(job.error, SdgenError):
                err = schemas.as_field_error(job.error)
                return _error(422, one_line(str(err)), getattr(err, "field", None))
            return _error(500, f"the job failed ({type(job.error).__name__}: {one_line(str(job.error))[:300]}); "
                               "the server is still running")
        return job

    def save(job: Job) -> None:
        from ..images import save_png

        for image, (req, j) in zip(job.images, job.infos):
            save_png(image, outputs / f"{req.seeds[j]}.png", req.parameters(job.model_name, j))

    def a1111_answer(job: Job, body: Txt2Img) -> dict:
        texts = [req.parameters(job.model_name, j) for req, j in job.infos]
        if body.save_images and outputs is not None:
            save(job)
        reqs = [req for req, _ in job.infos]
        first = reqs[0] if reqs else None
        seeds = [req.seeds[j] for req, j in job.infos]
        info = {
            "prompt": first.prompts[0] if first else body.prompt,
            "all_prompts": [req.prompts[j] for req, j in job.infos],
            "negative_prompt": first.negative_prompts[0] if first else body.negative_prompt,
            "all_negative_prompts": [req.negative_prompts[j] for req, j in job.infos],
            "seed": seeds[0] if seeds else None, "all_seeds": seeds,
            "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
            "width": first.width if first else None, "height": first.height if first else None,
            "sampler_name": SAMPLERS[first.sampler].label if first else None,
            "scheduler": SCHEDULES[first.schedule] if first else None,
            "cfg_scale": first.guidance_scale if first else None, "steps": first.steps if first else None,
            "batch_size": first.batch_size if first else body.batch_size, "n_iter": body.n_iter,
            "restore_faces": False, "face_restoration_model": None,
            "sd_model_name": job.model_name, "sd_model_hash": None, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": first.strength if first is not None and first.init_image is not None else 0,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started)),
            "clip_skip": first.clip_skip if first else None,
            "is_using_inpainting_conditioning": bool(first is not None and first.mask_image is not None),
            "interrupted": job.stop == "interrupt", "version": f"sdgen {__version__}",
        }
        parameters = body.model_dump()
        for key in ("init_images", "mask"):   # echoing megabytes of base64 back helps nobody
            if key in parameters:
                parameters[key] = None
        images = [schemas.encode_png(im, t) for im, t in zip(job.images, texts)] if body.send_images else []
        return {"images": images, "parameters": parameters, "info": json.dumps(info)}

    # ---- generation ------------------------------------------------------------------------------------
    @app.post("/sdapi/v1/txt2img", tags=["A1111"])
    async def txt2img(body: Txt2Img, request: Request):
        req, n_iter, model = schemas.a1111_request(body, limits, options, library)
        done = await run(Job(req, model, n_iter, "txt2img"), request)
        return a1111_answer(done, body) if isinstance(done, Job) else done or Response(status_code=499)

    @app.post("/sdapi/v1/img2img", tags=["A1111"])
    async def img2img(body: Img2Img, request: Request):
        init, mask = await run_in_threadpool(schemas.img2img_images, body)
        req, n_iter, model = schemas.a1111_request(body, limits, options, library, init, mask)
        done = await run(Job(req, model, n_iter, "img2img"), request)
        return a1111_answer(done, body) if isinstance(done, Job) else done or Response(status_code=499)

    @app.post("/v1/images/generations", tags=["OpenAI"])
    async def openai_images(body: OpenAIImages, request: Request):
        req = schemas.openai_request(body, limits, library)
        req = replace(req, clip_skip=options["CLIP_stop_at_last_layers"])
        model = library.find(options["sd_model_checkpoint"])
        if body.model:   # a title from /v1/models picks that checkpoint; OpenAI's own names ("dall-e-3") do not
            try:
                model = library.find(body.model)
            except SdgenError:
                pass
        done = await run(Job(req, model), request)
        if not isinstance(done, Job):
            return done or Response(status_code=499)
        data = []
        for image, (r, j) in zip(done.images, done.infos):
            png = schemas.encode_png(image, r.parameters(done.model_name, j))
            data.append({"b64_json": png} if body.response_format == "b64_json" else
                        {"url": "data:image/png;base64," + png})
            data[-1]["revised_prompt"] = r.prompts[j]
        return {"created": int(time.time()), "data": data}

    # ---- the running job -------------------------------------------------------------------------------
    @app.get("/sdapi/v1/progress", tags=["A1111"])
    async def progress(skip_current_image: bool = False):
        return await run_in_threadpool(worker.progress, not skip_current_image)

    @app.post("/sdapi/v1/interrupt", tags=["A1111"])
    async def interrupt():
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip", tags=["A1111"])
    async def skip():
        worker.skip()
        return {}

    # ---- settings and listings -------------------------------------------------------------------------
    @app.get("/sdapi/v1/options", tags=["A1111"])
    async def get_options():
        return options

    @app.post("/sdapi/v1/options", tags=["A1111"])
    async def set_options(body: Options):
        if body.sd_model_checkpoint is not None:
            try:
                model = library.find(body.sd_model_checkpoint)
                if model != worker.model:   # a model we may load: opened (headers only) before it is accepted
                    from ..families import open_checkpoint

                    await run_in_threadpool(open_checkpoint, model.source, log=log)
            except SdgenError as e:
                raise FieldError("sd_model_checkpoint", str(e)) from None
            options["sd_model_checkpoint"] = model.title
        if body.CLIP_stop_at_last_layers is not None:
            schemas.check(GenerationRequest("", clip_skip=body.CLIP_stop_at_last_layers))
            options["CLIP_stop_at_last_layers"] = body.CLIP_stop_at_last_layers
        return None

    @app.get("/sdapi/v1/sd-models", tags=["A1111"])
    async def sd_models():
        return [{"title": m.title, "model_name": m.model_name, "hash": None, "sha256": None,
                 "filename": m.source or m.title, "config": None} for m in library.models()]

    @app.get("/sdapi/v1/samplers", tags=["A1111"])
    async def samplers():
        return schemas.samplers()

    @app.get("/sdapi/v1/schedulers", tags=["A1111"])
    async def schedulers():
        return schemas.schedulers()

    @app.get("/sdapi/v1/loras", tags=["A1111"])
    async def loras():
        return library.loras()

    @app.get("/sdapi/v1/embeddings", tags=["A1111"])
    async def embeddings():
        return library.embeddings()

    for path in ("upscalers", "latent-upscale-modes", "sd-vae", "face-restorers", "prompt-styles", "hypernetworks"):
        app.add_api_route(f"/sdapi/v1/{path}", lambda: [], methods=["GET"], tags=["A1111"],
                          summary=f"{path}: sdgen has none")
    for path in ("refresh-checkpoints", "refresh-loras", "refresh-embeddings", "refresh-vae"):
        app.add_api_route(f"/sdapi/v1/{path}", lambda: None, methods=["POST"], tags=["A1111"],
                          summary="folders are read on every listing: nothing to refresh")

    @app.post("/sdapi/v1/png-info", tags=["A1111"])
    async def png_info(body: PngInfo):
        image = await run_in_threadpool(schemas.decode_image, body.image, "image")
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        text = items.pop("parameters", "")
        parameters = {}
        if text:
            try:
                req, rest = GenerationRequest.from_parameters(text)
                parameters = {"Prompt": req.prompt, "Negative prompt": req.negative_prompt, "Steps": req.steps,
                              "Sampler": SAMPLERS[req.sampler].label, "Schedule type": SCHEDULES[req.schedule],
                              "CFG scale": req.guidance_scale, "Seed": req.seed, "Size-1": req.width,
                              "Size-2": req.height, "Clip skip": req.clip_skip, **rest}
            except SdgenError:
                parameters = {}
        return {"info": text, "items": items, "parameters": parameters}

    @app.get("/v1/models", tags=["OpenAI"])
    async def openai_models():
        return {"object": "list", "data": [{"id": m.title, "object": "model", "owned_by": "sdgen"}
                                           for m in library.models()]}

    @app.get("/internal/ping", include_in_schema=False)
    async def ping():
        return {}

    # ---- the page --------------------------------------------------------------------------------------
    page = resources.files("sdgen.serve") / "page"

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page.joinpath("index.html").read_text(encoding="utf-8"))

    @app.get("/page.js", include_in_schema=False)
    async def script():
        return Response(page.joinpath("page.js").read_text(encoding="utf-8"), media_type="text/javascript")

    return app
