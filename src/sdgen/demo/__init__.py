"""The built-in demo model: a tiny SD1 model that sdgen trains itself on procedural shapes (see data.py).

    pipe = sdgen.load(DEMO_PATH)
    pipe.generate("a red circle on a blue background", steps=20, seed=1, width=128, height=128)

Retrain it with `python -m sdgen.demo.train --out DIR` (about an hour on 2 CPU cores).
"""

from pathlib import Path

DEMO_PATH = Path(__file__).resolve().parent.parent / "data" / "demo.safetensors"

__all__ = ["DEMO_PATH"]
