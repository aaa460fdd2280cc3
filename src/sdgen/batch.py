"""`sdgen batch`: many requests from a file, each rendered exactly once, resumably, on one machine or on Ray.

    lines = read_lines("prompts.jsonl")            # a JSON object per line (A1111 txt2img fields), or plain text
    jobs, refused = plan(lines, checkpoint)        # every line checked against the model before anything loads
    store = Store("out/")                          # <id>.png files, failures.jsonl
    todo = [j for j in jobs if not store.done(j)]  # a rerun skips what is done
    run(todo, store, render_local(todo, Renderer("demo")))   # or sdgen.serve.ray.render_on_ray(todo, ...)

Data flow: the driver (this process) reads and checks the lines and owns every file; a renderer (in-process, or
one Ray actor per model copy) turns a job into PNG bytes and never touches the output folder. So a killed run
leaves no partial file (each PNG is written to a temporary name, synced, then renamed), the same code serves
both paths, and a cluster needs no shared filesystem. One request per line, never several lines in one UNet
batch: batching changes the float rounding, and the same line and seed must give exactly the CLI's image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

from . import SdgenError
from .formats.tensors import one_line

ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")   # no dots: `<id>.<k>.png` names image k of a line
FAILURES = "failures.jsonl"


@dataclass(frozen=True)
class Line:
    """One non-blank line of the input: its number (1-based), its id, and its request as the HTTP API reads the
    same fields (seed filled from the id when the line gives none), or why it cannot be read."""

    number: int
    id: str
    request: object = None    # GenerationRequest, not yet resolved against the model
    n_iter: int = 1           # A1111's batch count: n_iter requests, seeds continuing
    ignored: tuple = ()       # field names the line gives that sdgen does not use
    error: str = ""


@dataclass(frozen=True)
class Job:
    """A line checked against the model: its resolved requests (defaults and seeds filled) as JSON, which is what
    travels to a renderer, and the names its images get."""

    number: int
    id: str
    requests: str         # JSON list of the resolved GenerationRequests' fields, one per A1111 iteration
    count: int            # images

    @property
    def names(self) -> list[str]:
        return [f"{self.id}.png"] if self.count == 1 else [f"{self.id}.{k}.png" for k in range(self.count)]


# ------------------------------------------------------------------------------------------------ reading


def read_lines(path, defaults: dict | None = None) -> list[Line]:
    """The lines of a `.jsonl` file (one JSON object each: the HTTP API's txt2img fields, and an optional `id`)
    or of any other text file (one prompt each). Blank lines are skipped; a line that cannot be read becomes a
    Line with an error (recorded as a failure; it does not stop the batch). `defaults`: txt2img fields for what a
    line leaves out (the command line's --steps ...); they do not change a line's id."""
    path = Path(path)
    if not path.is_file():
        raise SdgenError(f"{path}: {'is a folder, not a file' if path.is_dir() else 'not found'}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SdgenError(f"{path}: not UTF-8 text (byte {e.start}); give a JSONL or plain-text file") from None
    except OSError as e:
        raise SdgenError(f"{path}: cannot read ({e.strerror})") from None
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    lines, ids, seen = [], {}, {}
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        obj = _object(raw, jsonl)
        line_id = _line_id(number, obj)
        if not isinstance(line_id, Line) and "id" not in obj:   # the k-th repeat of the same content: <hash>-<k>
            seen[line_id] = seen.get(line_id, 0) + 1
            line_id = line_id if seen[line_id] == 1 else f"{line_id}-{seen[line_id]}"
        if isinstance(line_id, Line):
            line = line_id
        elif line_id in ids:
            line = Line(number, f"line-{number}", error=f"id {line_id!r} is already used by line {ids[line_id]}")
        else:
            ids[line_id] = number
            line = _parse(number, line_id, obj, defaults or {})
        lines.append(line)
    if not lines:
        raise SdgenError(f"{path}: no lines to render (the file is empty)")
    return lines


def _object(raw: str, jsonl: bool):
    if not jsonl:
        return {"prompt": raw.strip()}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        return e


def _line_id(number: int, obj) -> str | Line:
    """The line's own `id`, else a hash of its content (stable when lines are added, removed or reordered); a
    Line with the error when there is none to give."""
    if isinstance(obj, json.JSONDecodeError):
        return Line(number, f"line-{number}", error=f"not JSON ({obj.msg} at column {obj.colno})")
    if not isinstance(obj, dict):
        return Line(number, f"line-{number}", error=f"a line must be a JSON object, not {type(obj).__name__}")
    if "id" in obj:
        own = obj["id"]
        if not isinstance(own, str) or not ID.fullmatch(own):
            return Line(number, f"line-{number}", error=f"id {one_line(repr(own))[:120]} is not a name: 1-100 "
                                                        "letters, digits, '_' or '-', starting with a letter or digit")
        return own
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


# What a batch line may ask for: the request's own limits, not a shared server's (it is the user's machine).
def _limits():
    from .request import MAX_IMAGES, MAX_SIDE, MAX_STEPS
    from .serve.schemas import Limits

    return Limits(max_side=MAX_SIDE, max_steps=MAX_STEPS, max_images=MAX_IMAGES)


def _one_model():
    """What a line is checked against, as the server's model and file listing (sdgen.serve.library): a batch runs
    the one --model (no per-line sd_model_checkpoint), and has no LoRA or embedding folders."""
    from .serve.library import Library

    class OneModel(Library):
        def find(self, name):
            return _only_model(name)

    return OneModel(None)


def _only_model(name):
    if name != "--model":
        raise SdgenError(f"a batch renders every line with its --model; {one_line(str(name))[:100]!r} "
                         "cannot be switched to")
    return None


def _parse(number: int, line_id: str, obj: dict, defaults: dict) -> Line:
    """The line's fields read exactly as `POST /sdapi/v1/txt2img` reads them (sdgen.serve.schemas), so a line
    and an API call with the same fields make the same image."""
    from pydantic import ValidationError

    from .serve.schemas import Txt2Img, a1111_request

    content = {**defaults, **{k: v for k, v in obj.items() if k != "id"}}
    try:
        if "prompt" not in obj:
            raise SdgenError("no prompt")
        body = Txt2Img.model_validate(content)
        if body.seed is None or body.seed == -1:   # A1111's "random": a seed of the line's own, the same every run
            body = body.model_copy(update={"seed": line_seed(line_id)})
        request, n_iter, _ = a1111_request(body, _limits(), {"CLIP_stop_at_last_layers": 1,
                                                               "sd_model_checkpoint": "--model"}, _one_model())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "line"
        return Line(number, line_id, error=f"{where}: {first.get('msg', 'invalid')}")
    except SdgenError as e:
        return Line(number, line_id, error=str(e))
    ignored = tuple(k for k in obj if k not in Txt2Img.model_fields and k != "id")
    return Line(number, line_id, request, n_iter, ignored)


def plan(lines: Iterable[Line], model=None) -> tuple[list[Job], list[tuple[Line, str]]]:
    """Jobs for the lines whose requests check out against `model` (an opened checkpoint: its scheduler, size and
    text encoder), and (line, error) for the others. Cheap: nothing is loaded. An A1111 batch count (n_iter)
    becomes n_iter requests with the seeds continuing, as the HTTP API runs it."""
    jobs, refused = [], []
    for line in lines:
        if line.error:
            refused.append((line, line.error))
            continue
        try:
            base = line.request.resolve(model)
            reqs = [base] + [replace(base, seed=base.seed + k * base.count).resolve(model)
                             for k in range(1, line.n_iter)]
        except SdgenError as e:
            refused.append((line, str(e)))
            continue
        jobs.append(Job(line.number, line.id, json.dumps([request_fields(r) for r in reqs]),
                        sum(r.count for r in reqs)))
    return jobs, refused


def line_seed(line_id: str) -> int:
    """The seed of a line that gives none: from its id, so every run (and every worker) draws the same one."""
    return int.from_bytes(hashlib.sha256(f"seed:{line_id}".encode()).digest()[:4], "little")


def request_fields(req) -> dict:
    """A resolved txt2img request as JSON-ready fields (floats survive the round trip exactly)."""
    from .request import REQUEST_FIELDS

    if req.init_image is not None or req.mask_image is not None:
        raise SdgenError("batch lines are txt2img requests: init images are not supported")
    return {k: getattr(req, k) for k in REQUEST_FIELDS if k not in ("init_image", "mask_image")}


# ------------------------------------------------------------------------------------------------ rendering


class Renderer:
    """One loaded model turning jobs into PNG bytes. A callable class so that Ray Data can run one per actor:
    renderer(batch) maps a batch {"id": [...], "line": [...], "request": [...]} to {"id", "line", "pngs",
    "error", "seconds"}, one row per job; a job that fails has its error and no PNG (it never stops the batch)."""

    def __init__(self, model, device="auto", precision="auto", threads: int | None = None, log=None):
        import torch

        from . import pipeline

        if threads:
            torch.set_num_threads(threads)
        self.pipe = pipeline.load(model, device=device, dtype=precision, log=log or (lambda msg: None))

    def render(self, requests: str) -> list[bytes]:
        """PNG bytes of every image of one job (a JSON list of requests), each with the A1111 parameters chunk
        the CLI writes."""
        from PIL import PngImagePlugin

        from .request import GenerationRequest

        out = []
        for fields in json.loads(requests):
            result = self.pipe.generate(GenerationRequest(**fields))
            for k, image in enumerate(result.images):
                info = PngImagePlugin.PngInfo()
                info.add_text("parameters", result.request.parameters(self.pipe.name, k))
                buf = io.BytesIO()
                image.save(buf, format="PNG", pnginfo=info)
                out.append(buf.getvalue())
        return out

    def __call__(self, batch: dict) -> dict:
        rows = {"id": [], "line": [], "pngs": [], "error": [], "seconds": []}
        for job_id, number, request in zip(batch["id"], batch["line"], batch["request"]):
            t0 = time.perf_counter()
            try:
                pngs, error = self.render(str(request)), ""
            except SdgenError as e:
                pngs, error = [], str(e)
            except Exception as e:  # noqa: BLE001 - one bad line must not stop the batch; the error is recorded
                pngs, error = [], f"{type(e).__name__}: {e}"
            for key, value in (("id", str(job_id)), ("line", int(number)), ("pngs", pngs), ("error", error),
                               ("seconds", time.perf_counter() - t0)):
                rows[key].append(value)
        return rows


def job_rows(jobs: list[Job]) -> list[dict]:
    """The jobs as the rows a renderer reads."""
    return [{"id": j.id, "line": j.number, "request": j.requests} for j in jobs]


def render_local(jobs: list[Job], renderer: Renderer) -> Iterator[dict]:
    """Single machine: one job at a time in this process, as result rows."""
    for row in job_rows(jobs):
        out = renderer({k: [v] for k, v in row.items()})
        yield {k: v[0] for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ files


class Store:
    """The output folder: `<id>.png` per image (`<id>.<k>.png` for image k of a batch), written atomically, and
    `failures.jsonl`: the lines whose last attempt failed, one JSON object each ({id, line, error}), rewritten
    atomically whenever it changes, so it always lists exactly the lines still failing."""

    def __init__(self, folder):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SdgenError(f"{self.folder}: cannot create the output folder ({e.strerror})") from None
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise SdgenError(f"{self.folder}: cannot write here (permission denied); give another --out")
        for stale in self.folder.glob(".*.part"):  # what a killed run was writing: never a finished file
            stale.unlink(missing_ok=True)
        self.failures: dict[str, dict] = {}
        path = self.folder / FAILURES
        if path.is_file():
            for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(raw)
                    self.failures[str(entry["id"])] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def done(self, job: Job) -> bool:
        return all((self.folder / name).is_file() for name in job.names)

    def write(self, job: Job, pngs: list[bytes]) -> list[Path]:
        if len(pngs) != job.count:
            raise SdgenError(f"line {job.number}: {len(pngs)} images for a request of {job.count}")
        paths = [self._atomic(self.folder / name, data) for name, data in zip(job.names, pngs)]
        if self.failures.pop(job.id, None) is not None:
            self._write_failures()
        return paths

    def fail(self, line_id: str, number: int, error: str) -> None:
        self.failures[line_id] = {"id": line_id, "line": number, "error": error}
        self._write_failures()

    def keep_only(self, ids: set[str]) -> None:
        """Forget failures of lines that are no longer in the input."""
        if set(self.failures) - ids:
            self.failures = {k: v for k, v in self.failures.items() if k in ids}
            self._write_failures()

    def _write_failures(self) -> None:
        text = "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in sorted(self.failures.values(),
                                                                               key=lambda v: v["line"]))
        path = self.folder / FAILURES
        if text:
            self._atomic(path, text.encode())
        else:
            path.unlink(missing_ok=True)

    def _atomic(self, path: Path, data: bytes) -> Path:
        """Write to `.<name>.<pid>.part` in the same folder, fsync, rename over `path`: a reader (or a rerun)
        sees the old file or the whole new one, never a part."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise SdgenError(f"{path}: could not write ({e.strerror or e})") from None
        return path


# ------------------------------------------------------------------------------------------------ driving


class Progress:
    """Counts and ETA, one line at most every `every` seconds (and at the end): fit for a terminal and a log."""

    def __init__(self, total: int, skipped: int, log=None, every: float = 1.0):
        self.total, self.skipped, self.every = total, skipped, every
        self.rendered = self.failed = 0
        self.images = 0
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.started = self.last = time.perf_counter()

    def update(self, ok: bool, images: int = 0) -> None:
        self.rendered += ok
        self.failed += not ok
        self.images += images
        now = time.perf_counter()
        if now - self.last >= self.every or self.finished == self.total:
            self.last = now
            self.log(self.line())

    @property
    def finished(self) -> int:
        return self.rendered + self.failed

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        left = self.total - self.finished
        eta = _clock(elapsed / self.finished * left) if self.finished else "?"
        rate = self.images / elapsed * 60 if elapsed > 0 else 0.0
        return (f"batch: {self.finished}/{self.total} lines ({self.rendered} rendered, {self.failed} failed"
                f"{f', {self.skipped} done before' if self.skipped else ''}), {rate:.1f} images/min, "
                f"elapsed {_clock(elapsed)}, ETA {eta}")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def run(jobs: list[Job], store: Store, results: Iterable[dict], progress: Progress | None = None) -> Progress:
    """Write each result row as it arrives (in any order) and record failures; returns the counts."""
    by_id = {j.id: j for j in jobs}
    progress = progress or Progress(len(jobs), 0)
    for row in results:
        job = by_id[str(row["id"])]
        error = str(row["error"])
        if not error:
            try:
                store.write(job, [bytes(b) for b in row["pngs"]])
            except SdgenError as e:
                error = str(e)
        if error:
            store.fail(job.id, job.number, one_line(error))
        progress.update(not error, job.count if not error else 0)
    return progress
