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
    parser = Parser(prog="sdgen", description="Stable Diffusion 1.x image generation on your own machine.")
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
    g.add_argument("--from-png", metavar="PNG", help="start from the generation parameters stored in a PNG "
                                                     "(A1111 'parameters' text); options given here override them")
    g.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32")
    g.add_argument("--device", default="auto", choices=list(DEVICES))
    g.add_argument("-o", "--output", default="outputs/sdgen.png",
                   help="PNG path; an existing file is never overwritten: the next free name is used")

    i = sub.add_parser("info", help="what a checkpoint holds")
    i.add_argument("model", nargs="?", help=MODEL_HELP)
    i.add_argument("--precision", choices=list(PRECISIONS), default="auto")
    i.add_argument("--device", default="auto", choices=list(DEVICES))

    sub.add_parser("train-demo", help="train the built-in demo model (python -m sdgen.demo.train; its options "
                                      "follow: sdgen train-demo --help)", add_help=False)
    sub.add_parser("bench", help="time sdgen against diffusers on an SD1.5-size random model (benchmarks/bench.py; "
                                 "its options follow: sdgen bench --help)", add_help=False)
    return parser


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
    request = GenerationRequest(**fields)
    request.check()
    return request


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
    device = resolve_device(a.device)
    pipeline.check_memory(request, ckpt, resolve_precision(a.precision, device), device, loaded=False)
    pipe = pipeline.load(ckpt, device=a.device, dtype=a.precision, log=log)
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
        print(save_png(image, output, request.parameters(pipe.name, k)))
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
    print(f"scheduler:  {'from ' + str(ckpt.path / 'scheduler') if ckpt.format == 'diffusers' else 'SD1.5 defaults'}")
    ignored = ckpt.ignored  # key names from the file: printed escaped, never raw (terminal escape sequences)
    shown = ", ".join(one_line(k)[:120] for k in ignored[:8]) + (f", ... ({len(ignored)} in all)" if len(ignored) > 8 else "")
    print(f"ignored:    {shown or 'nothing'}")


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
        {"generate": cmd_generate, "info": cmd_info}[a.command](a)
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
