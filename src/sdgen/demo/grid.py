"""A 4x4 grid of the demo model's real outputs, each with its prompt below: `python -m sdgen.demo.grid OUT.png`.

Sixteen prompts that use the whole caption grammar (plain, with size words, with position words), one seed
each (seed + i for prompt i), Euler, 20 steps, CFG 7.5, 128x128 shown at 2x. docs/demo-grid.png is made with it.
"""

import argparse
import textwrap
from pathlib import Path

PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a white triangle on a green background",
    "an orange circle on a purple background",
    "a small green square on a white background",
    "a large purple triangle on a yellow background",
    "a small black circle on an orange background",
    "a large blue square on a red background",
    "a red triangle on the left on a white background",
    "a blue circle on the right on a yellow background",
    "a white square at the top on a black background",
    "a yellow triangle at the bottom on a blue background",
    "a green circle in the center on a red background",
    "a small orange square at the top on a green background",
    "a large black triangle on a white background",
    "a small purple circle on the left on a black background",
]
CELL, LINES = 256, 3  # pixels per picture side; caption lines under it


def render_grid(images, captions, columns=4):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line_h = 14
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * CELL, rows * (CELL + LINES * line_h + 6)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, text) in enumerate(zip(images, captions)):
        x, y = (i % columns) * CELL, (i // columns) * (CELL + LINES * line_h + 6)
        sheet.paste(image.resize((CELL, CELL), Image.NEAREST), (x, y))
        for j, line in enumerate(textwrap.wrap(text, 40)[:LINES]):
            draw.text((x + 4, y + CELL + 2 + j * line_h), line, fill="black", font=font)
    return sheet


def main(argv=None):
    from . import DEMO_PATH

    ap = argparse.ArgumentParser(prog="python -m sdgen.demo.grid", description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="the PNG to write")
    ap.add_argument("--model", default=str(DEMO_PATH), help="the model file (default: the shipped demo)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sampler", default="euler")
    args = ap.parse_args(argv)

    import sdgen

    pipe = sdgen.load(args.model, device="cpu", dtype="float32")
    images = pipe.generate(PROMPTS, "", steps=20, guidance_scale=7.5, sampler=args.sampler, seed=args.seed,
                           width=128, height=128)
    render_grid(images, PROMPTS).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
