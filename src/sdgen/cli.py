"""`sdgen generate`, `sdgen info`, `sdgen bench`: argument parsing, progress and files; the work is in the API."""

import argparse
import os
import sys
import time
from pathlib import Path

from . import SdgenError, __version__

from .formats.tensors import one_line
from .precision import DEVICES, PRECISIONS
from .request import SCHEDULES, GenerationRequest
from .sampling.samplers import SAMPLERS

MODEL_HELP = ("a .safetensors/.ckpt file, a diffusers folder, a Hugging Face repo id, or 'demo' (the built-in demo "
              "model); default: SD1.5 from the local Hugging Face cache or the hub, else the demo model")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise SdgenError(f"{message} (see '{self.prog} --help')")


def number(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def build_parser():
    parser = Parser(prog="sdgen", description="Stable Diffusion (1.x, 2.x, XL) image generation on your own machine.")
    parser.add_argument("--version", action="version", version=f"sdgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    d = GenerationRequest  # the request's own defaults, shown in the help; unset options stay None

    g = sub.add_parser("generate", help="turn a prompt into PNG images")
    g.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (or use --prompt)")
    g.add_argument("--prompt", help="the prompt")
    g.add_argument("-n", "--negative-prompt", help="what to steer away from")
    g.add_argument("-m", "--model", help=MODEL_HELP)
    g.add_argument("--steps", type=int, help=f"denoising steps (default {d.steps})")
    g.add_argument("--guidance", "--cfg", type=number, help=f"classifier-free guidance scale (default {d.guidance_scale})")
    g.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)} or its A1111 name (default {d.sampler})")
    g.add_argument("--schedule", help=f"{' or '.join(SCHEDULES)} (default {d.schedule}); karras works with "
                                      f"{', '.join(s.name for s in SAMPLERS.values() if s.karras)}")
    g.add_argument("--seed", type=int, help="random when omitted (printed); image i of a batch uses seed + i")
    g.add_argument("-W", "--width", type=int, help="multiple of 8 (default: the init image's width, else the model's)")
    g.add_argument("-H", "--height", type=int, help="multiple of 8 (default: the init image's height, else the model's)")
    g.add_argument("-b", "--batch-size", type=int, help=f"images (default {d.batch_size})")
    g.add_argument("--init-image", help="img2img: the starting image")
    g.add_argument("--strength", type=number, help=f"img2img/inpainting: how much to change, 0..1 (default {d.strength})")
    g.add_argument("--mask", help="inpainting: white = repaint, black = keep (same size as the init image)")
    g.add_argument("--clip-skip", type=int, help="1 = last CLIP layer (default), 2 = penultimate, ...")
    g.add_argument("--refiner", metavar="MODEL", help="SDXL: a refiner model (any form --model takes) that finishes "
                                                     "the denoising (diffusers' ensemble of experts)")
    g.add_argument("--refiner-start", type=number, metavar="F",
                   help="with --refiner: the fraction of the noise schedule the base denoises (default 0.8)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="apply a LoRA file (or a name in --lora-dir) with a weight (default 1); repeatable. In the "
                        "prompt: <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
    g.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="where <lora:NAME:...> finds NAME.safetensors; repeatable")
    g.add_argument("--embeddings-dir", action="append", default=[], metavar="DIR",
                   help="textual-inversion embeddings, used by writing a file's name in the prompt; repeatable")
    g.add_argument("--from-png", metavar="PNG", help="start from the generation parameters stored in a PNG "
                                                     "(A1111 'parameters' text); options given here override them")
    g.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="auto: fp16 on CUDA, bf16 on CPUs (computed in fp32 where the CPU has no native bf16)")
    g.add_argument("--device", default="auto", choices=list(DEVICES))
    g.add_argument("--vae-tiling", choices=["auto", "on", "off"], default="auto",
                   help="decode/encode in blended tiles: auto (default) when the whole image would not fit the memory "
                        "budget, on, off")
    g.add_argument("--vae-decoder", choices=["full", "taesd"], default="full",
                   help="full: the model's VAE (default); taesd: the tiny TAESD decoder, much faster, a little softer")
    g.add_argument("--taesd", metavar="FILE", default="madebyollin/taesd",
                   help="with --vae-decoder taesd: a taesd_decoder .safetensors/.pth, or a diffusers AutoencoderTiny "
                        "folder or repo id (default: madebyollin/taesd from the Hugging Face cache or hub)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (slow first run; the compiled code is cached on disk for the next)")
    g.add_argument("-o", "--output", default="outputs/sdgen.png",
                   help="PNG path; an existing file is never overwritten: the next free name is used")

    i = sub.add_parser("info", help="what a checkpoint holds")
    i.add_argument("model", nargs="?", help=MODEL_HELP)
    i.add_argument("--precision", choices=list(PRECISIONS), default="auto")
    i.add_argument("--device", default="auto", choices=list(DEVICES))

    add_batch_parser(sub)

    s = sub.add_parser("serve", help="keep a model loaded behind AUTOMATIC1111's web API, OpenAI's images endpoint "
                                     "and a web page (http://127.0.0.1:7860/)")
    s.add_argument("-m", "--model", help=MODEL_HELP)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860, help="default 7860, as AUTOMATIC1111")
    s.add_argument("--models-dir", help="checkpoints clients may switch to (sd_model_checkpoint); nothing outside it")
    s.add_argument("--lora-dir", help="LoRA files, listed by /sdapi/v1/loras")
    s.add_argument("--embeddings-dir", help="textual-inversion embeddings, listed by /sdapi/v1/embeddings")
    s.add_argument("--api-auth", metavar="USER:PASS[,USER2:PASS2]", help="require HTTP Basic credentials on every route")
    s.add_argument("--queue-size", type=int, default=8, help="jobs that may wait behind the running one; beyond: 503")
    s.add_argument("--outputs", metavar="DIR", help="where requests with save_images=true write their PNGs")
    s.add_argument("--preview-decoder", metavar="FILE", help="a TAESD decoder (taesd_decoder.safetensors) for live "
                                                            "previews; default: a latent -> RGB projection")
    s.add_argument("--max-side", type=int, default=2048, help="largest width/height a request may ask (default 2048)")
    s.add_argument("--max-steps", type=int, default=150, help="most steps a request may ask (default 150)")
    s.add_argument("--max-images", type=int, default=16, help="most images per request, batch_size x n_iter (default 16)")
    s.add_argument("--precision", choices=list(PRECISIONS), default="auto")
    s.add_argument("--device", default="auto", choices=list(DEVICES))
    r = s.add_argument_group("Ray Serve (pip install \"sdgen[ray]\")")
    r.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="serve the same API as a Ray Serve "
                   "application on the cluster at ADDRESS ('auto', 'HOST:6379'); without ADDRESS: RAY_ADDRESS's, "
                   "else a local one")
    scale = r.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="model replicas, one model each (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="let Serve scale the model replicas on load")
    r.add_argument("--num-cpus", type=number, default=1, help="CPUs per model replica (default 1)")
    r.add_argument("--num-gpus", type=number, default=0, help="GPUs per model replica (default 0)")

    sub.add_parser("train-demo", help="train the built-in demo model (python -m sdgen.demo.train; its options "
                                      "follow: sdgen train-demo --help)", add_help=False)
    sub.add_parser("bench", help="time sdgen against diffusers on an SD1.5-size random model (benchmarks/bench.py; "
                                 "its options follow: sdgen bench --help)", add_help=False)
    return parser


# batch option -> the txt2img field it fills in for the lines that leave it out, and its type
_BATCH_DEFAULTS = {"negative_prompt": ("negative_prompt", str), "steps": ("steps", int),
                   "guidance": ("cfg_scale", number), "sampler": ("sampler_name", str),
                   "schedule": ("scheduler", str), "width": ("width", int), "height": ("height", int)}


def add_batch_parser(sub):
    d = GenerationRequest
    b = sub.add_parser("batch", help="render every line of a JSONL or text file, resumably (one machine, or Ray)")
    b.add_argument("prompts", metavar="FILE", help="a .jsonl file (one JSON object per line with A1111 txt2img "
                   "fields: prompt, negative_prompt, steps, cfg_scale, sampler_name, scheduler, seed, width, "
                   "height, batch_size, n_iter, and an optional id naming the output) or a text file (a prompt per line)")
    b.add_argument("-m", "--model", help=MODEL_HELP)
    b.add_argument("--out", required=True, metavar="DIR", help="output folder: <id>.png per line, failures.jsonl; a "
                   "rerun renders only what is missing")
    for opt, (field, kind) in _BATCH_DEFAULTS.items():
        b.add_argument("--" + opt.replace("_", "-"), type=kind, help=f"{field} of the lines that do not give it"
                       + (f" (default {d.steps})" if opt == "steps" else ""))
    b.add_argument("--precision", choices=list(PRECISIONS), default="auto")
    b.add_argument("--device", default="auto", choices=list(DEVICES))
    r = b.add_argument_group("Ray (pip install \"sdgen[ray]\")")
    r.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="render with Ray Data on the cluster at "
                   "ADDRESS ('auto', 'HOST:6379', 'ray://HOST:10001'); without ADDRESS: RAY_ADDRESS's, else a local one")
    r.add_argument("--actors", default="1", metavar="N|MIN:MAX", help="model copies (Ray actors); MIN:MAX lets "
                   "Ray Data scale the pool (default 1)")
    r.add_argument("--num-cpus", type=number, default=1, help="CPUs per actor (default 1)")
    r.add_argument("--num-gpus", type=number, default=0, help="GPUs per actor (default 0; 1 = one GPU each)")
    r.add_argument("--lines-per-batch", type=int, default=1, metavar="N", help="lines an actor takes per call (default 1)")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# CLI option -> request field
_FIELDS = {"negative_prompt": "negative_prompt", "steps": "steps", "guidance": "guidance_scale", "sampler": "sampler",
           "schedule": "schedule", "seed": "seed", "width": "width", "height": "height", "batch_size": "batch_size",
           "strength": "strength", "clip_skip": "clip_skip"}


def build_request(a) -> GenerationRequest:
    """The request the command line describes: --from-png's parameters, overridden by the options given."""
    from .images import open_image, read_parameters
    from .sampling.samplers import by_label

    if a.prompt is not None and a.prompt_pos is not None:
        raise SdgenError("give the prompt once: either as an argument or with --prompt")
    fields = {}
    if a.from_png:
        base, _ = GenerationRequest.from_parameters(read_parameters(a.from_png))
        fields = {k: getattr(base, k) for k in ("prompt", *_FIELDS.values())}
    prompt = a.prompt if a.prompt is not None else a.prompt_pos
    if prompt is not None:
        fields["prompt"] = prompt
    if "prompt" not in fields:
        raise SdgenError("no prompt: sdgen generate \"a cat on a beach\"")
    fields.update({f: getattr(a, opt) for opt, f in _FIELDS.items() if getattr(a, opt) is not None})
    if isinstance(fields.get("sampler"), str):
        fields["sampler"] = by_label(fields["sampler"]).name
    if a.init_image:
        fields["init_image"] = open_image(a.init_image, "init image")
    if a.mask:
        fields["mask_image"] = open_image(a.mask, "mask")
    if a.lora:
        fields["loras"] = tuple(lora_option(text) for text in a.lora)
    if a.refiner_start is not None and not a.refiner:
        raise SdgenError("--refiner-start needs --refiner MODEL")
    if a.refiner:
        fields["refiner_start"] = 0.8 if a.refiner_start is None else a.refiner_start
    request = GenerationRequest(**fields)
    request.check()
    return request


def lora_option(text: str) -> tuple[str, float]:
    """--lora PATH[:WEIGHT] -> (PATH, WEIGHT); a colon not followed by a number belongs to the path."""
    path, _, weight = text.rpartition(":")
    try:
        return (path, float(weight)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def cmd_generate(a):
    from . import pipeline
    from .families import open_checkpoint
    from .images import check_output, save_png
    from .precision import resolve_device, resolve_precision

    request = build_request(a)
    output = check_output(Path(a.output))
    # everything the user typed is checked before the (slow) model load; then against the model's own facts
    # (its scheduler, size, inpainting or not), which opening it reads without loading any weight
    ckpt = open_checkpoint(a.model, log=log)
    request = request.resolve(ckpt)
    pipeline.check_loras(request, ckpt, a.lora_dir)   # unknown names, other families, misfit shapes: before loading
    device = resolve_device(a.device)
    pipeline.check_memory(request, ckpt, resolve_precision(a.precision, device), device, loaded=False)
    pipe = pipeline.load(ckpt, device=a.device, dtype=a.precision, log=log, lora_dirs=a.lora_dir,
                         embedding_dirs=a.embeddings_dir, vae_tiling=a.vae_tiling,
                         taesd=a.taesd if a.vae_decoder == "taesd" else None, compile=a.compile,
                         refiner=a.refiner)
    if a.seed is None and not a.from_png:
        log(f"seed: {request.seed}")
    from tqdm import tqdm

    bar = tqdm(total=request.steps, desc="denoising", unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(i, n):
        bar.total = n
        bar.update(i - bar.n)
        if i == n:
            bar.close()  # the bar times the denoising alone; the stage times follow at the end

    started = time.perf_counter()
    with _warnings_as_log():
        result = pipe.generate(request, progress=progress)
    bar.close()
    total = time.perf_counter() - started
    for k, image in enumerate(result.images):
        print(save_png(image, output, result.request.parameters(pipe.name, k)))
    log("time: " + ", ".join([f"load {pipe.load_seconds:.1f} s"] + [f"{k} {v:.1f} s" for k, v in result.timings.items()]
                             + [f"generate {total:.1f} s"]))


class _warnings_as_log:
    """Library warnings (a truncated prompt) become one plain stderr line."""

    def __enter__(self):
        import warnings

        self._saved = warnings.showwarning
        warnings.showwarning = lambda message, *args, **kw: log(f"warning: {message}")

    def __exit__(self, *exc):
        import warnings

        warnings.showwarning = self._saved


def cmd_info(a):
    from .families import open_checkpoint
    from .precision import resolve_device, resolve_precision

    if a.model and is_lora_file(Path(a.model)):
        from .lora import describe, read_lora

        print("\n".join(describe(read_lora(Path(a.model)))))
        return
    ckpt = open_checkpoint(a.model, log=log)
    device = resolve_device(a.device)
    print(f"model:      {one_line(str(ckpt.path))}")
    print(f"format:     {ckpt.format}")
    print(f"family:     {ckpt.family.name} ({ckpt.family.label}){' inpainting, 9-channel UNet' if ckpt.inpainting else ''}")
    print(f"dtype:      {ckpt.dtype_on_disk} on disk; runs as {resolve_precision(a.precision, device)} "
          f"on {device}")
    print(f"size:       {ckpt.native_size[0]}x{ckpt.native_size[1]} (native)")
    total = 0
    for c in ckpt.family.components:
        count = ckpt.parameters(c.name)
        total += count
        print(f"{c.name + ':':<12}{count:>13,} parameters  {ckpt.configs[c.name]}")
    print(f"{'total:':<12}{total:>13,} parameters")
    print(f"tokenizer:  {ckpt.tokenizer_dir or 'built-in CLIP vocabulary'}")
    print(f"scheduler:  {'from ' + str(ckpt.path / 'scheduler') if ckpt.format == 'diffusers' else ckpt.family.label + ' defaults'}")
    ignored = ckpt.ignored  # key names from the file: printed escaped, never raw (terminal escape sequences)
    shown = ", ".join(one_line(k)[:120] for k in ignored[:8]) + (f", ... ({len(ignored)} in all)" if len(ignored) > 8 else "")
    print(f"ignored:    {shown or 'nothing'}")


def cmd_batch(a):
    from . import batch
    from .families import open_checkpoint

    actors = _pool_size(a.actors)
    if a.num_cpus < 0 or a.num_gpus < 0 or a.lines_per_batch < 1:
        raise SdgenError("--num-cpus and --num-gpus must be >= 0 and --lines-per-batch >= 1")
    defaults = {field: getattr(a, opt) for opt, (field, _) in _BATCH_DEFAULTS.items() if getattr(a, opt) is not None}
    lines = batch.read_lines(a.prompts, defaults)
    store = batch.Store(a.out)
    ckpt = open_checkpoint(a.model, log=log)   # headers only: every line is checked before any weight loads
    jobs, refused = batch.plan(lines, ckpt)
    ignored = sorted({k for line in lines for k in line.ignored})
    if ignored:
        log(f"warning: fields sdgen does not use were ignored: {', '.join(one_line(k)[:40] for k in ignored[:10])}")
    store.keep_only({line.id for line in lines})
    for line, error in refused:
        store.fail(line.id, line.number, one_line(f"line {line.number}: {error}"))
    todo = [j for j in jobs if not store.done(j)]
    log(f"batch: {len(lines)} lines: {len(jobs) - len(todo)} done before, {len(refused)} refused, "
        f"{len(todo)} to render{' on Ray' if a.ray is not None else ''}")
    if todo:
        progress = batch.Progress(len(todo), len(jobs) - len(todo), log)
        if a.ray is not None:
            from .serve.ray import render_on_ray

            model = a.model or str(ckpt.path)   # what each worker opens (a path every node sees, or a repo id)
            results = render_on_ray(todo, model, address=a.ray, actors=actors, num_cpus=a.num_cpus,
                                    num_gpus=a.num_gpus, lines_per_batch=a.lines_per_batch, device=a.device,
                                    precision=a.precision, log=log)
        else:
            with _warnings_as_log():
                results = batch.render_local(todo, batch.Renderer(ckpt, a.device, a.precision, log=log))
        with _warnings_as_log():
            batch.run(todo, store, results, progress)
    if store.failures:
        raise SdgenError(f"{len(store.failures)} of {len(lines)} lines failed: see {store.folder / batch.FAILURES}")
    log(f"batch: all {len(lines)} lines rendered in {store.folder}")


def _pool_size(text: str) -> int | tuple[int, int]:
    """--actors N or MIN:MAX."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] >= 1:
        return parts[0]
    if len(parts) == 2 and 1 <= parts[0] <= parts[1]:
        return parts[0], parts[1]
    raise SdgenError(f"--actors must be N or MIN:MAX with 1 <= MIN <= MAX, not {text!r}")


def cmd_serve(a):
    from .serve import Limits, Settings, serve

    for name in ("port", "queue_size", "max_side", "max_steps", "max_images"):
        value, low = getattr(a, name), 0 if name in ("port", "queue_size") else 1
        if value < low or (name == "port" and value > 65535):
            raise SdgenError(f"--{name.replace('_', '-')} must be {'from 0 to 65535' if name == 'port' else f'at least {low}'}, not {value}")
    limits = Limits(max_side=a.max_side, max_steps=a.max_steps, max_images=a.max_images)
    settings = Settings(model=a.model, models_dir=a.models_dir, lora_dir=a.lora_dir, embeddings_dir=a.embeddings_dir,
                        api_auth=a.api_auth, queue_size=a.queue_size, outputs=a.outputs, device=a.device,
                        precision=a.precision, preview_decoder=a.preview_decoder, limits=limits)
    if a.ray is not None:
        from .serve.ray import parse_autoscale, serve_on_ray

        autoscale = parse_autoscale(a.autoscale) if a.autoscale else None
        if a.replicas < 1 or a.num_cpus < 0 or a.num_gpus < 0:
            raise SdgenError("--replicas must be at least 1, --num-cpus and --num-gpus at least 0")
        serve_on_ray(settings, address=a.ray, host=a.host, port=a.port, replicas=a.replicas, autoscale=autoscale,
                     num_cpus=a.num_cpus, num_gpus=a.num_gpus, log=log)
        return
    with _warnings_as_log():
        serve(settings, host=a.host, port=a.port, log=log)


def is_lora_file(path: Path) -> bool:
    """A weights file whose keys are LoRA/LyCORIS keys (headers only)."""
    from .formats import read_weights_file
    from .lora import PARTS

    if not path.is_file() or path.suffix not in (".safetensors", ".pt", ".ckpt", ".bin"):
        return False
    keys = list(read_weights_file(path)[0])
    return bool(keys) and all(k.endswith(tuple(PARTS)) or ".processor." in k for k in keys[:50])


def cmd_bench(args):
    """Everything after `bench` goes to the benchmark script untouched."""
    import runpy

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"
    if not script.is_file():
        raise SdgenError("sdgen bench runs benchmarks/bench.py from a source checkout; it is not in this install")
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:
            cmd_bench(argv[1:])
            return 0
        if argv[:1] == ["train-demo"]:
            from .demo.train import main as train_demo

            return train_demo(argv[1:]) or 0
        a = build_parser().parse_args(argv)
        {"generate": cmd_generate, "info": cmd_info, "batch": cmd_batch, "serve": cmd_serve}[a.command](a)
        return 0
    except SdgenError as e:
        log(f"sdgen: error: {one_line(str(e))}")
        return 1
    except KeyboardInterrupt:
        log("sdgen: interrupted")
        return 130
    except MemoryError:
        log("sdgen: error: out of memory (try a smaller size or batch, or --precision bf16)")
        return 1
    except Exception as e:  # noqa: BLE001 - a bug of ours: still one line (SDGEN_DEBUG=1 shows the traceback)
        if os.environ.get("SDGEN_DEBUG"):
            raise
        log(f"sdgen: error: internal error ({type(e).__name__}: {one_line(str(e))[:300]}); "
            "rerun with SDGEN_DEBUG=1 for the traceback and report it")
        return 1


if __name__ == "__main__":
    sys.exit(main())
