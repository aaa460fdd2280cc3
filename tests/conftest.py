import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(diffusers reference pipeline, {format: path}) for one tiny random SD1 model."""
    from models import write_all_formats

    return write_all_formats(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_inpaint(tmp_path_factory):
    """The same for a 9-channel inpainting model."""
    from models import write_all_formats

    return write_all_formats(tmp_path_factory.mktemp("tiny_inpaint"), inpainting=True)
