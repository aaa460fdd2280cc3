"""`sdgen generate`, `sdgen info`, `sdgen bench`: argument parsing, progress and files; the work is in the API."""

import argparse
import math
import os
import sys
import time
from pathlib import Path

from . import SdgenError, __version__

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# A1111's names, so that image sites and A1111's "PNG info" read our metadata back
SAMPLER_LABELS = {"ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
                  "heun": "Heun", "dpmpp_2m": "DPM++ 2M", "unipc": "UniPC", "lcm": "LCM"}
PRECISIONS = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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

    g = sub.add_parser("generate", help="turn a prompt into PNG images")
    g.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (or use --prompt)")
    g.add_argument("--prompt", help="the prompt")
    g.add_argument("-n", "--negative-prompt", default="", help="what to steer away from")
    g.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help="a .safetensors/.ckpt file, a diffusers folder or a Hugging Face repo id (default: %(default)s)")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", "--cfg", type=number, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--sampler", default="euler", help="ddim, ddpm, pndm, lms, euler, euler_a, heun, dpmpp_2m, unipc, lcm")
    g.add_argument("--schedule", default="normal", help="normal or karras")
    g.add_argument("--seed", type=int, help="random when omitted (printed)")
    g.add_argument("-W", "--width", type=int, help="multiple of 8 (default 512, or the init image's width)")
    g.add_argument("-H", "--height", type=int, help="multiple of 8 (default 512, or the init image's height)")
    g.add_argument("-b", "--batch-size", type=int, default=1)
    g.add_argument("--init-image", help="img2img: the starting image")
    g.add_argument("--strength", type=number, default=0.8, help="img2img/inpainting: how much to change (0..1)")
    g.add_argument("--mask", help="inpainting: white = repaint, black = keep (same size as the init image)")
    g.add_argument("--clip-skip", type=int, default=1, help="1 = last CLIP layer (default), 2 = penultimate")
    g.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                   help="auto: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("-o", "--output", default="outputs/sdgen.png",
                   help="PNG path; an existing file is never overwritten: the next free name is used")

    i = sub.add_parser("info", help="what a checkpoint holds")
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL)

    sub.add_parser("bench", help="time sdgen against diffusers on an SD1.5-size random model (benchmarks/bench.py; "
                                 "its options follow: sdgen bench --help)", add_help=False)
    return parser


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def cmd_generate(a):
    from . import pipeline
    from .images import open_image, parameters_text, save_png

    prompt = a.prompt if a.prompt is not None else a.prompt_pos
    if prompt is None:
        raise SdgenError("no prompt: sdgen generate \"a cat on a beach\"")
    if a.prompt is not None and a.prompt_pos is not None:
        raise SdgenError("give the prompt once: either as an argument or with --prompt")
    if a.clip_skip not in (1, 2, 3, 4):
        raise SdgenError(f"clip skip must be 1 to 4, not {a.clip_skip}")
    output = Path(a.output)
    if output.suffix.lower() != ".png":
        raise SdgenError(f"{output}: the output must be a .png file")
    if output.exists() and output.is_dir():
        raise SdgenError(f"{output}: is a folder; give a file name like {output / 'image.png'}")
    # everything the user typed is checked before the (slow) model load
    init = open_image(a.init_image, "init image") if a.init_image else None
    mask = open_image(a.mask, "mask") if a.mask else None
    width, height = pipeline._size(a.width, a.height, init)
    pipeline.check_size(width, height)
    pipeline.check_arguments([prompt], [a.negative_prompt], a.steps, a.guidance, a.sampler, a.schedule, a.seed,
                             a.batch_size, a.strength, init, mask, inpainting_model=False)
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    pipe = pipeline.load(a.model, device=a.device, dtype=PRECISIONS[a.precision], log=log)
    if a.seed is None:
        log(f"seed: {seed}")
    from tqdm import tqdm

    bar = tqdm(total=a.steps, desc="denoising", unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(i, n):
        bar.total = n
        bar.update(i - bar.n)
        if i == n:
            bar.close()  # the bar times the denoising alone; the stage times follow at the end

    started = time.perf_counter()
    with _warnings_as_log():
        images = pipe.generate(prompt, a.negative_prompt, steps=a.steps, guidance_scale=a.guidance, sampler=a.sampler,
                               schedule=a.schedule, seed=seed, width=width, height=height, batch_size=a.batch_size,
                               init_image=init, strength=a.strength, mask_image=mask, clip_skip=a.clip_skip,
                               progress=progress)
    bar.close()
    total = time.perf_counter() - started
    for k, image in enumerate(images):
        text = parameters_text(prompt, a.negative_prompt, a.steps, SAMPLER_LABELS[a.sampler], a.guidance, seed + k,
                               width, height, pipe.name,
                               **{"Schedule type": "Karras" if a.schedule == "karras" else None,
                                  "Denoising strength": a.strength if init is not None else None,
                                  "Clip skip": a.clip_skip if a.clip_skip != 1 else None})
        path = save_png(image, output, text)
        print(path)
    t = pipe.timings
    log("time: " + ", ".join([f"load {pipe.load_seconds:.1f} s"] + [f"{k} {v:.1f} s" for k, v in t.items()]
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
    from .spec import detect
    from .weights import open_checkpoint

    ckpt = open_checkpoint(a.model)
    spec = detect(ckpt)
    print(f"model:      {ckpt.path}")
    print(f"format:     {ckpt.format}")
    print(f"family:     {spec.family}{' (inpainting, 9-channel UNet)' if spec.inpainting else ''}")
    print(f"dtype:      {ckpt.dtype_on_disk}")
    total = 0
    for name in ("text_encoder", "unet", "vae"):
        count = sum(math.prod(s) for s in ckpt.shapes(name).values())
        total += count
        print(f"{name + ':':<12}{count:>13,} parameters  {getattr(spec, name)}")
    print(f"{'total:':<12}{total:>13,} parameters")
    print(f"tokenizer:  {ckpt.tokenizer_dir or 'built-in CLIP vocabulary'}")
    print(f"scheduler:  {'from ' + str(ckpt.path / 'scheduler') if ckpt.scheduler_config else 'SD1.5 defaults'}")
    ignored = ckpt.ignored
    shown = ", ".join(ignored[:8]) + (f", ... ({len(ignored)} in all)" if len(ignored) > 8 else "")
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
        a = build_parser().parse_args(argv)
        {"generate": cmd_generate, "info": cmd_info}[a.command](a)
        return 0
    except SdgenError as e:
        log(f"sdgen: error: {e}")
        return 1
    except KeyboardInterrupt:
        log("sdgen: interrupted")
        return 130
    except MemoryError:
        log("sdgen: error: out of memory (try a smaller size or batch, or --precision bf16)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
