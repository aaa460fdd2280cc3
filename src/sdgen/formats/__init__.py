"""File formats -> lazy tensors under the file's own key names. Nothing here knows about Stable Diffusion.

    refs = read_weights_file(Path("model.safetensors"))     # {key: TensorRef}; .ckpt/.pt/.bin too (safe unpickler)
    t = refs["some.weight"].load(torch.bfloat16, "cpu")      # one tensor, straight to the target dtype
"""

from .folders import WEIGHT_SUFFIXES, component_patterns, pick_weight_files, read_component, read_json, read_weights_file
from .hub import Offline, is_repo_id, snapshot
from .checks import Fields, index_of, shape_of
from .pickles import read_torch_file
from .safetensors import read_safetensors
from .tensors import TensorRef

__all__ = ["TensorRef", "read_weights_file", "read_safetensors", "read_torch_file", "read_json", "read_component",
           "pick_weight_files", "component_patterns", "snapshot", "is_repo_id", "Offline", "WEIGHT_SUFFIXES", "Fields",
           "shape_of", "index_of"]
