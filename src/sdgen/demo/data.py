"""The demo's procedural dataset: one flat coloured shape on a flat coloured background, with a caption.

Every sample is drawn from a seeded generator, so `Scene.random(rng)` and `render(scene)` give the same picture
and caption on every machine. A scene has
  colour, background  two different colours of PALETTE (the caption's words)
  shape               circle, square or triangle (an upright triangle, apex at the top)
  size                small, medium or large (the shape's half-width in pixels, drawn from that class's range)
  position            left, right, top, bottom or center (the shape's centre, jittered around that point)

Caption grammar (the words the demo model understands):
    a [SIZE] COLOUR SHAPE [POSITION] on a BACKGROUND background      ("an" before "orange", as in English)
  SIZE      "small" | "large"            said half of the time when the shape is small or large; medium is never named
  POSITION  "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"
                                          said half of the time
e.g. "a red circle on a blue background", "a small yellow triangle at the top on a black background",
"an orange square on the left on a purple background".
A caption that leaves size or position out stands for any size or position, as in the training pictures.

HELD_OUT triples (colour, shape, background) never appear in training: the prompt-following test asks for them,
so it measures composition of known words, not recall of training pictures.
"""

from dataclasses import dataclass

import numpy as np

SIDE = 128  # pixels: the demo model's native resolution

PALETTE = {  # RGB 0..255, far apart so that the nearest palette colour names a picture's colour unambiguously
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 135, 20),
    "purple": (135, 40, 180),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (10, 15), "medium": (17, 23), "large": (26, 34)}  # half-width range, pixels
POSITIONS = {  # centre (x, y), pixels; jittered by up to JITTER
    "left": (34, 64), "right": (94, 64), "top": (64, 34), "bottom": (64, 94), "center": (64, 64),
}
POSITION_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                  "center": "in the center"}
JITTER = 8
COLOUR_JITTER = 12  # per channel, so the model learns colour names, not eight exact RGB values


def held_out(colour: str, shape: str, background: str) -> bool:
    """1 in 7 of the 168 (colour, shape, background) triples; every (colour, background) pair keeps at least
    two shapes and every colour/shape pair most backgrounds, so each word is still seen in many contexts."""
    return (3 * COLOURS.index(colour) + 5 * COLOURS.index(background) + SHAPES.index(shape)) % 7 == 0


HELD_OUT = tuple((c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if c != b and held_out(c, s, b))


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: str
    position: str
    half: float           # half-width, pixels
    cx: float             # centre, pixels
    cy: float
    rgb: tuple            # the drawn colours (palette + jitter)
    bg_rgb: tuple

    @classmethod
    def random(cls, rng: np.random.Generator, allow_held_out: bool = False) -> "Scene":
        while True:
            colour, background = rng.choice(len(COLOURS), size=2, replace=False)
            colour, background = COLOURS[colour], COLOURS[background]
            shape = SHAPES[rng.integers(len(SHAPES))]
            if allow_held_out or not held_out(colour, shape, background):
                break
        size = list(SIZES)[rng.integers(len(SIZES))]
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        half = rng.uniform(*SIZES[size])
        x0, y0 = POSITIONS[position]
        # keep the whole shape inside the picture, 2 pixels from the border (the classifier reads the border)
        lo, hi = half + 2, SIDE - half - 2
        cx = float(np.clip(x0 + rng.uniform(-JITTER, JITTER), lo, hi))
        cy = float(np.clip(y0 + rng.uniform(-JITTER, JITTER), lo, hi))

        def jitter(name):
            rgb = np.array(PALETTE[name]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
            return tuple(int(v) for v in np.clip(rgb, 0, 255))

        return cls(colour, shape, background, size, position, float(half), cx, cy, jitter(colour), jitter(background))

    def caption(self, rng: np.random.Generator) -> str:
        """One of the captions that describe this scene (see the grammar above)."""
        size = self.size if self.size != "medium" and rng.random() < 0.5 else ""
        position = self.position if rng.random() < 0.5 else ""
        return caption(self.colour, self.shape, self.background, size, position)


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def caption(colour: str, shape: str, background: str, size: str = "", position: str = "") -> str:
    """The caption for the given words; size and position are optional ("" leaves them out)."""
    where = f" {POSITION_WORDS[position]}" if position else ""
    return f"{_a(f'{size} {colour}' if size else colour)} {shape}{where} on {_a(background)} background"


def shape_mask(shape: str, cx: float, cy: float, half: float, side: int = SIDE, supersample: int = 4) -> np.ndarray:
    """(side, side) float coverage in [0, 1] of a shape, anti-aliased by supersampling."""
    n = side * supersample
    c = (np.arange(n) + 0.5) / supersample  # pixel-centre coordinates of the fine grid
    x, y = c[None, :], c[:, None]
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":  # apex (cx, cy - half), base from (cx - half, cy + half) to (cx + half, cy + half)
        t = (dy + half) / (2 * half)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= half * t)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(side, supersample, side, supersample).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """(SIDE, SIDE, 3) uint8 RGB picture of the scene."""
    a = shape_mask(scene.shape, scene.cx, scene.cy, scene.half)[..., None]
    img = (1 - a) * np.array(scene.bg_rgb, dtype=np.float64) + a * np.array(scene.rgb, dtype=np.float64)
    return np.round(img).astype(np.uint8)


def sample(seed: int, n: int, allow_held_out: bool = False) -> tuple[np.ndarray, list[Scene]]:
    """n pictures (n, SIDE, SIDE, 3) uint8 and their scenes, the same for the same seed."""
    rng = np.random.default_rng(seed)
    scenes = [Scene.random(rng, allow_held_out) for _ in range(n)]
    return np.stack([render(s) for s in scenes]), scenes


def to_tensor_batch(pixels: np.ndarray):
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 in [-1, 1], as the VAE takes images."""
    import torch

    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
