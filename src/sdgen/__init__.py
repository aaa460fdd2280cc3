"""sdgen: a Stable Diffusion inference engine written from scratch on PyTorch.

    import sdgen
    pipe = sdgen.load("model.safetensors")          # or a diffusers folder, or a Hugging Face repo id
    images = pipe.generate("a cat on a beach", steps=20, sampler="euler", seed=1)
"""

__version__ = "0.1.0"


class SdgenError(Exception):
    """An error the user can act on; the CLI prints its message as one line and exits non-zero."""


def load(model=None, device="cpu", dtype="float32", **kwargs):
    from .pipeline import load as _load

    return _load(model, device=device, dtype=dtype, **kwargs)


def __getattr__(name):  # the request and result types, imported on first use (they pull in torch)
    if name == "GenerationRequest":
        from .request import GenerationRequest

        return GenerationRequest
    if name == "Result":
        from .pipeline import Result

        return Result
    raise AttributeError(f"module 'sdgen' has no attribute {name!r}")


__all__ = ["load", "GenerationRequest", "Result", "SdgenError", "__version__"]
