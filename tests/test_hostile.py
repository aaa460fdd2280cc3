"""Hostile files end in one clear line (SdgenError), within seconds and bounded memory: never a crash, a hang or a
memory blow-up, and no file left behind.

Every hostile case runs in one child interpreter, so that a case that would crash it (C recursion, SIGSEGV) fails
the tests instead of killing pytest; the child reports each case's outcome, time and peak memory growth. Cases are
generated here, per class of attack: the unpickler (depth, work, memory, codecs, zip members), lying tensor records,
JSON and config values, tokenizer files and shard maps. A seeded fuzz test then feeds thousands of random mutations
of small valid files in every format to the format readers and to open_checkpoint, in a child interpreter too.
"""

import functools
import io
import json
import math
import os
import pickle
import random
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from sdgen import SdgenError

TESTS = Path(__file__).parent
SECONDS = 5     # per case; every case here ends far sooner
MEGABYTES = 200  # peak memory growth per case


# ------------------------------------------------------------------------------------------ small valid models


@functools.lru_cache(maxsize=None)
def mini_state(seed=0, dtype=torch.float16) -> dict:
    """The smallest complete SD1 original-layout state dict sdgen opens: one level, 32 channels, a 12-wide text
    encoder of one layer (~0.8 MB in fp16), plus the extras real files carry (integer buffers)."""
    from sdgen.families.sd1 import COMPONENTS

    g = torch.Generator().manual_seed(seed)
    out = {}
    configs = _mini_configs()
    for c in COMPONENTS:
        with torch.device("meta"):
            net = c.network(configs[c.name])
        for k, t in net.state_dict().items():
            out[c.prefix + k] = (torch.randn(t.shape, generator=g) * 0.1).to(dtype)
    out["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int32)
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def _mini_configs():
    from sdgen.nets.clip import CLIPConfig
    from sdgen.nets.unet import UNetConfig
    from sdgen.nets.vae import VAEConfig

    return {"text_encoder": CLIPConfig(**MINI_DIFFUSERS_AS_OURS["text_encoder"]),
            "unet": UNetConfig(**MINI_DIFFUSERS_AS_OURS["unet"]), "vae": VAEConfig(**MINI_DIFFUSERS_AS_OURS["vae"])}


MINI_DIFFUSERS_AS_OURS = {
    "text_encoder": dict(vocab_size=16, hidden_size=12, intermediate_size=12, num_layers=1, num_heads=12),
    "unet": dict(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,), context_dim=12),
    "vae": dict(ch=32, ch_mult=(1,), num_res_blocks=1),
}
MINI_DIFFUSERS = {  # the same sizes as diffusers/transformers config.json files
    "text_encoder": {"hidden_size": 12, "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 12,
                     "vocab_size": 16, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "layer_norm_eps": 1e-5},
    "unet": {"block_out_channels": [32], "down_block_types": ["CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D"], "layers_per_block": 1, "attention_head_dim": 8,
             "cross_attention_dim": 12, "norm_num_groups": 32, "in_channels": 4, "out_channels": 4, "sample_size": 8},
    "vae": {"block_out_channels": [32], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32,
            "in_channels": 3, "out_channels": 3, "scaling_factor": 0.18215},
}


def write_mini_folder(folder: Path) -> Path:
    """The mini model as a diffusers folder (configs, weights under diffusers names, tokenizer files)."""
    from safetensors.torch import save_file

    from sdgen.families.sd1 import COMPONENTS
    import reference

    state = mini_state()
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    configs = _mini_configs()
    for c in COMPONENTS:
        d = folder / c.name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(MINI_DIFFUSERS[c.name]))
        theirs = {ours: key for key, ours in c.renames(configs[c.name]).items()}
        part = {theirs[k[len(c.prefix):]]: v for k, v in state.items()
                if k.startswith(c.prefix) and k[len(c.prefix):] in theirs}
        base = "model" if c.name == "text_encoder" else "diffusion_pytorch_model"
        save_file(part, d / f"{base}.safetensors")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler"}))
    reference.write_clip_tokenizer_files(folder / "tokenizer")
    return folder


def small_state() -> dict:
    """A few tensors for the format readers: floats, integers, a 0-d tensor and two views of one storage."""
    base = torch.arange(30, dtype=torch.float32).reshape(6, 5)
    return {"model.diffusion_model.a.weight": torch.randn(4, 3, 2, 2), "b.weight": base.t(), "b.bias": base[2],
            "model_ema.decay": torch.tensor(0.9999), "ids": torch.arange(7)[None],
            "half": torch.ones(3, dtype=torch.half)}


def write_formats(folder: Path, state: dict, stem: str) -> dict[str, Path]:
    from safetensors.torch import save_file

    paths = {"safetensors": folder / f"{stem}.safetensors", "zip": folder / f"{stem}.ckpt",
             "legacy": folder / f"{stem}_legacy.ckpt"}
    save_file({k: v.contiguous() for k, v in state.items()}, paths["safetensors"])
    torch.save(state, paths["zip"])
    torch.save(state, paths["legacy"], _use_new_zipfile_serialization=False)
    return paths


def test_mini_models_open_and_load(tmp_path):
    """The valid starting points of the cases below: each hostile case is hostile only through its mutation."""
    from sdgen.families import open_checkpoint
    from sdgen.nets.tokenizer import Tokenizer
    from sdgen.precision import Precision

    fp32 = Precision(torch.float32, torch.float32)
    paths = [*write_formats(tmp_path, mini_state(), "mini").values(), write_mini_folder(tmp_path / "folder")]
    for p in paths:
        ckpt = open_checkpoint(p)
        nets = ckpt.load(fp32, "cpu")
        assert set(nets) == {"unet", "vae", "text_encoder"}, p
    assert Tokenizer.from_folder(tmp_path / "folder" / "tokenizer")(["a cat"]).shape == (1, 77)


# ------------------------------------------------------------------------------------------ pickle programs


class _StorageRec:
    """A storage as torch.save records it (a persistent id), possibly lying about its size."""

    def __init__(self, key, numel, kind="FloatStorage"):
        self.key, self.numel, self.kind = key, numel, kind


class _TensorRec:
    """A tensor record as torch.save writes it: _rebuild_tensor_v2(storage, offset, size, stride, ...), optionally
    followed by BUILD(state)."""

    def __init__(self, storage, size, stride, offset=0, state=None):
        self.storage, self.size, self.stride, self.offset, self.state = storage, size, stride, offset, state

    def __reduce__(self):
        args = (self.storage, self.offset, tuple(self.size), tuple(self.stride), False, OrderedDict())
        if self.state is None:
            return torch._utils._rebuild_tensor_v2, args
        return torch._utils._rebuild_tensor_v2, args, self.state


class _Pairs:
    """A dict pickled from explicit (key, value) pairs: the pickle may then set a key twice."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __reduce__(self):
        return dict, (), None, None, iter(self.pairs)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRec):
            return "storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel
        return None


def program(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_zip(path: Path, pkl: bytes, storages=None, byteorder=b"little", compress=zipfile.ZIP_STORED) -> Path:
    """A torch.save zip archive around a pickle program."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", byteorder, compress_type=compress)
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


def write_legacy(path: Path, pkl: bytes, storages=None) -> Path:
    """A legacy torch.save file: magic, protocol, system info, the object, its storage keys, then float32 data."""
    storages = storages or {}
    head = b"".join(pickle.dumps(x, protocol=2) for x in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                       "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    tail = b"".join(struct.pack("<q", len(d) // 4) + d for d in storages.values())
    path.write_bytes(head + pkl + pickle.dumps(list(storages), protocol=2) + tail)
    return path


def one_tensor(size, stride, numel=4, offset=0, state=None, key="model.diffusion_model.x"):
    """(program, storages) of a state dict holding one (possibly lying) tensor record."""
    st = _StorageRec("0", numel)
    return program({key: _TensorRec(st, size, stride, offset, state)}), {"0": bytes(4 * numel)}


P2 = b"\x80\x02"


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _text(s):
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _put(i):
    return b"r" + struct.pack("<I", i)


def _get(i):
    return b"j" + struct.pack("<I", i)


def _memo_bomb(levels=30, fan=10, empty=b"]", close=b"l"):
    """Memoised nesting: level i holds level i-1 `fan` times, so its expansion has fan**levels leaves while the
    pickle has a few hundred bytes. `empty`/`close`: a list (] ... l) or a tuple () ... t)."""
    out = empty + _put(0) + b"0"  # built, memoised, popped: only the last level stays on the stack
    for i in range(1, levels + 1):
        out += b"(" + _get(i - 1) * fan + close + _put(i) + (b"0" if i < levels else b"")
    return out


# ------------------------------------------------------------------------------------------ the hostile cases

HOSTILE = {}  # name -> (make(folder) -> action, substrings the message must hold)


def hostile(*expect):
    def register(make):
        HOSTILE[make.__name__] = (make, expect)
        return make
    return register


def _open(path):
    from sdgen.families import open_checkpoint

    return lambda: open_checkpoint(path)


def _open_and_load(path):
    from sdgen.families import open_checkpoint
    from sdgen.precision import Precision

    return lambda: open_checkpoint(path).load(Precision(torch.float32, torch.float32), "cpu")


# --- the unpickler: depth, work, memory, codecs, zip members


@hostile("deep.ckpt", "MARKs nest more than")
def pickle_deep_marks(d):  # 1 MB: half a million MARKs, then as many TUPLEs
    return _open(write_legacy(d / "deep.ckpt", P2 + b"(" * 500_000 + b"t" * 500_000 + b"."))


@hostile("deep.ckpt", "containers nest more than")
def pickle_deep_tuple_as_key(d):  # 1 MB: a tuple nested a million deep used as a dict key (hashing it: SIGSEGV)
    return _open(write_legacy(d / "deep.ckpt", P2 + b"}N" + b"\x85" * 1_000_000 + b"K\x01s."))


@hostile("deep.ckpt", "containers nest more than")
def pickle_deep_lists_in_zip(d):  # lists nested through the memo, no MARK at all
    body = b"]" + _put(0) + b"".join(b"]" + _get(i) + b"a" + _put(i + 1) for i in range(100_000))
    return _open(write_zip(d / "deep.ckpt", P2 + body + b"."))


@hostile("bomb.ckpt", "_codecs.encode with arguments")
def pickle_memo_bomb_into_codec(d):  # < 1 KB; str() of it would be 10**30 items
    return _open(write_zip(d / "bomb.ckpt", P2 + _global("_codecs", "encode") + _memo_bomb() + _text("latin1")
                           + b"\x86R."))


@hostile("bomb.ckpt", "dict key or set element")
def pickle_memo_bomb_into_set(d):
    return _open(write_zip(d / "bomb.ckpt", P2 + _global("builtins", "set") + _memo_bomb() + b"\x85R."))


@hostile("bomb.ckpt", "dict key or set element")
def pickle_memo_tuple_bomb_as_key(d):  # hashing a tuple walks its whole expansion, every time
    return _open(write_zip(d / "bomb.ckpt", P2 + b"}" + _memo_bomb(empty=b")", close=b"t") + b"K\x01s."))


@hostile("slow.ckpt", "_codecs.encode with arguments")
def pickle_slow_codec(d):  # punycode is quadratic: ~190 KB of it runs for minutes
    return _open(write_zip(d / "slow.ckpt", P2 + _global("_codecs", "encode") + _text("é" * 95_000)
                           + _text("punycode") + b"\x86R."))


@hostile("copies.ckpt", "steps")
def pickle_copy_bomb(d):  # list(L) of one memoised 100k-item list, 2000 times: 200M slots from 220 KB
    pkl = P2 + b"]" + _put(0) + b"(" + b"N" * 100_000 + b"e" + b"0" + _global("builtins", "list") + _put(1)
    pkl += b"]" + b"(" + (_get(1) + _get(0) + b"\x85R") * 2000 + b"e."
    return _open(write_zip(d / "copies.ckpt", pkl))


@hostile("bytes.ckpt", "MB of objects")
def pickle_bytes_bomb(d):  # one memoised 1 MB string encoded to bytes 1000 times, 1 MB of pickle
    pkl = P2 + _global("_codecs", "encode") + _put(0) + b"0" + _text("a" * 2**20) + _put(1) + b"0"
    pkl += (_get(0) + _get(1) + _text("latin1") + b"\x86R0") * 1000 + b"N."
    return _open(write_zip(d / "bytes.ckpt", pkl))


@hostile("steps.ckpt", "steps")
def pickle_endless_steps(d):  # 5 MB of NONE POP: cheap steps, bounded in number
    return _open(write_zip(d / "steps.ckpt", P2 + b"N0" * 2_500_000 + b"N."))


@hostile("order.ckpt", "byteorder", "bytes")
def pickle_oversized_byteorder(d):  # 50 MB of zeros deflate to 50 KB
    return _open(write_zip(d / "order.ckpt", program({}), byteorder=bytes(50 * 2**20), compress=zipfile.ZIP_DEFLATED))


@hostile("order.ckpt", "corrupt zip archive")
def pickle_corrupt_byteorder(d):
    path = write_zip(d / "order.ckpt", program({}), byteorder=b"little")
    raw = bytearray(path.read_bytes())
    at = raw.index(b"little")
    raw[at:at + 6] = b"bigend"  # the CRC no longer matches
    path.write_bytes(bytes(raw))
    return _open(path)


@hostile("huge.ckpt", "data.pkl", "bytes")
def pickle_huge_program_member(d):  # 70 MB of pickle deflated into 70 KB
    path = d / "huge.ckpt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", P2 + b"N0" * (35 * 2**20) + b"N.")
    return _open(path)


@hostile("evil.ckpt", "refusing to load", "posix.system")
def pickle_runs_code(d):
    return _open(write_zip(d / "evil.ckpt", P2 + _global("posix", "system") + _text("true") + b"\x85R."))


@hostile("names.ckpt", "globals")
def pickle_many_names(d):  # every name a fresh inert class: bounded
    body = b"".join(_global("pytorch_lightning.x", f"C{i}") + b"0" for i in range(5000))
    return _open(write_zip(d / "names.ckpt", P2 + body + b"N."))


@hostile("self.ckpt", "container changes after")
def pickle_list_inside_itself(d):
    return _open(write_zip(d / "self.ckpt", P2 + b"]" + _put(0) + _get(0) + b"a."))


# --- lying tensor records


@hostile("zero.ckpt", "model.diffusion_model.x", "larger than any real tensor")
def record_stride0_terabytes(d):  # 4 bytes of storage, a (2**20, 2**20) view of it: 4 TB claimed
    pkl, st = one_tensor((2**20, 2**20), (0, 0), numel=1)
    return _open(write_zip(d / "zero.ckpt", pkl, st))


@hostile("zero.ckpt", "model.diffusion_model.x", "claims 4294967296 elements but its storage holds 1")
def record_stride0_gigabytes(d):
    pkl, st = one_tensor((2**16, 2**16), (0, 0), numel=1)
    return _open(write_legacy(d / "zero.ckpt", pkl, st))


@hostile("huge.ckpt", "model.diffusion_model.x", "larger than any real tensor")
def record_huge_dims(d):
    pkl, st = one_tensor((2**40, 0), (1, 1))
    return _open(write_zip(d / "huge.ckpt", pkl, st))


@hostile("past.ckpt", "model.diffusion_model.x", "reaches past the end")
def record_offset_past_end(d):
    pkl, st = one_tensor((4,), (1,), offset=3)
    return _open(write_zip(d / "past.ckpt", pkl, st))


@hostile("build.ckpt", "changed after it was built")
def record_altered_by_build(d):
    pkl, st = one_tensor((4,), (1,), state={"size": (2**30,), "stride": (0,)})
    return _open(write_zip(d / "build.ckpt", pkl, st))


@hostile("storage.ckpt", "claims", "holds")
def record_storage_bigger_than_member(d):
    st = _StorageRec("0", 2**30)
    return _open(write_zip(d / "storage.ckpt", program({"x": _TensorRec(st, (4,), (1,))}), {"0": bytes(16)}))


@hostile("alias.ckpt", "tensors claim")
def record_many_keys_one_storage(d):  # 100 keys viewing all of one 4 MB storage: 400 MB claimed
    st = _StorageRec("0", 2**20)
    return _open(write_zip(d / "alias.ckpt", program({f"k{i}": _TensorRec(st, (2**20,), (1,)) for i in range(100)}),
                           {"0": bytes(4 * 2**20)}))


@hostile("twice.ckpt", "'model.diffusion_model.x' is set twice")
def record_pickle_key_twice(d):
    st = _StorageRec("0", 4)
    rec = _TensorRec(st, (4,), (1,))
    pkl = program(_Pairs([("model.diffusion_model.x", rec), ("model.diffusion_model.x", rec)]))
    return _open(write_zip(d / "twice.ckpt", pkl, {"0": bytes(16)}))


def _st_header(path, text: str, data=b""):
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@hostile("twice.safetensors", "'model.diffusion_model.x' appears twice")
def record_safetensors_key_twice(d):
    entry = '"model.diffusion_model.x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
    return _open(_st_header(d / "twice.safetensors", "{" + entry + ", " + entry + "}", bytes(8)))


@hostile("dims.safetensors", "model.diffusion_model.x", "larger than any real tensor")
def record_safetensors_zero_and_huge_dims(d):  # 0 bytes "back" a (0, 2**40) tensor
    return _open(_st_header(d / "dims.safetensors", json.dumps(
        {"model.diffusion_model.x": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}})))


@hostile("deep.safetensors", "nests deeper than")
def record_safetensors_deep_header(d):
    return _open(_st_header(d / "deep.safetensors", '{"__metadata__": ' + "[" * 100_000 + "]" * 100_000 + "}"))


def _mini_with(d, name, **changes):
    from safetensors.torch import save_file

    save_file({**mini_state(), **changes}, d / name)
    return d / name


@hostile("input_blocks.0.0.weight", "expected 4 dimensions")
def record_conv_weight_of_rank_3(d):
    w = mini_state()["model.diffusion_model.input_blocks.0.0.weight"]
    return _open(_mini_with(d, "rank.safetensors", **{"model.diffusion_model.input_blocks.0.0.weight": w[0]}))


@hostile("to_k.weight", "expected 2 dimensions")
def record_linear_weight_of_rank_0(d):
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    return _open(_mini_with(d, "scalar.safetensors", **{key: torch.tensor(1.0, dtype=torch.half)}))


@hostile("input_blocks.0.0.weight", "at least 1")
def record_zero_channels(d):
    return _open(_mini_with(d, "empty.safetensors", **{
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(0, 4, 3, 3, dtype=torch.half)}))


@hostile("bias.safetensors", "out.2.bias", "has shape ()")
def record_other_weight_of_rank_0(d):  # not read for sizes: the network's own shapes catch it
    return _open_and_load(_mini_with(d, "bias.safetensors", **{"model.diffusion_model.out.2.bias":
                                                               torch.tensor(1.0, dtype=torch.half)}))


@hostile("norm groups")
def record_channels_not_a_multiple_of_groups(d):  # 33 channels cannot be split in 32 GroupNorm groups
    from safetensors.torch import save_file

    state = {k: v for k, v in mini_state().items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(33, 4, 3, 3, dtype=torch.half)
    state["model.diffusion_model.input_blocks.1.0.out_layers.3.weight"] = torch.zeros(33, 33, 3, 3, dtype=torch.half)
    save_file(state, d / "odd.safetensors")
    return _open(d / "odd.safetensors")


# --- JSON, configs, tokenizer files, shard maps (diffusers folders)


def _folder_with(d, change):
    """The mini diffusers folder, with one file changed by change(folder)."""
    import shutil

    template = d.parent / "mini_folder"
    if not template.exists():
        write_mini_folder(template)
    folder = d / "model"
    shutil.copytree(template, folder)
    change(folder)
    return folder


def _config(component, **fields):
    def change(folder):
        config = {**MINI_DIFFUSERS[component], **fields}
        (folder / component / "config.json").write_text(json.dumps(config))
    return change


@hostile("unet/config.json", "nests deeper than")
def json_deep_config(d):
    return _open(_folder_with(d, lambda f: (f / "unet" / "config.json").write_text("[" * 100_000 + "]" * 100_000)))


@hostile("model_index.json", "appears twice")
def json_repeated_key(d):
    return _open(_folder_with(d, lambda f: (f / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "_class_name": "StableDiffusionXLPipeline"}')))


@hostile("vae/config.json", "not valid JSON")
def json_not_utf8(d):
    return _open(_folder_with(d, lambda f: (f / "vae" / "config.json").write_bytes(b'{"a": "\xff\xfe"}')))


CONFIG_CASES = [  # component, field, bad value, what the message says
    ("unet", "block_out_channels", [], "entries"), ("unet", "block_out_channels", [32, -64], "out of range"),
    ("unet", "block_out_channels", "32", "not a list of integers"), ("unet", "norm_num_groups", 0, "out of range"),
    ("unet", "norm_num_groups", 7, "do not divide"), ("unet", "attention_head_dim", 0, "out of range"),
    ("unet", "attention_head_dim", 5, "5 heads do not divide the 32 channels"),
    ("unet", "in_channels", -4, "out of range"), ("unet", "in_channels", True, "not an integer"),
    ("unet", "layers_per_block", "2", "not an integer or a list"), ("unet", "layers_per_block", 10**9, "out of range"),
    ("unet", "cross_attention_dim", 1.5, "not an integer or a list"),
    ("unet", "use_linear_projection", "yes", "not true or false"), ("unet", "sample_size", "big", "not an integer"),
    ("unet", "sample_size", [64, 64, 64], "entries"), ("unet", "down_block_types", [1], "strings"),
    ("vae", "block_out_channels", [], "entries"), ("vae", "latent_channels", 0, "out of range"),
    ("vae", "scaling_factor", 0, "out of range"), ("vae", "scaling_factor", float("nan"), "out of range"),
    ("vae", "scaling_factor", float("inf"), "out of range"), ("vae", "scaling_factor", "0.18", "not a number"),
    ("vae", "scaling_factor", -0.18, "out of range"), ("vae", "layers_per_block", True, "not an integer"),
    ("vae", "norm_num_groups", 5, "do not divide"), ("vae", "use_quant_conv", "no", "not true or false"),
    ("text_encoder", "num_attention_heads", 0, "out of range"),
    ("text_encoder", "num_attention_heads", 5, "do not divide"),
    ("text_encoder", "hidden_size", "768", "not an integer"), ("text_encoder", "vocab_size", -1, "out of range"),
    ("text_encoder", "hidden_act", "relu", "not one of"), ("text_encoder", "layer_norm_eps", 0, "out of range"),
    ("text_encoder", "num_hidden_layers", 10**9, "out of range"),
    ("text_encoder", "max_position_embeddings", [77], "not an integer"),
]
for _i, (_comp, _field, _value, _says) in enumerate(CONFIG_CASES):
    HOSTILE[f"config_{_comp}_{_field}_{_i}"] = (
        lambda d, c=_comp, f=_field, v=_value: _open(_folder_with(d, _config(c, **{f: v}))),
        (f"config.json: field {_field!r}", _says))


def _tokenizer(d, change):
    from sdgen.nets.tokenizer import Tokenizer
    import reference

    folder = reference.write_clip_tokenizer_files(d / "tokenizer")
    change(folder)
    return lambda: Tokenizer.from_folder(folder)


def _vocab_without(token=None):
    """vocab.json without `token` (default: the first merge's result)."""
    def change(folder):
        vocab = json.loads((folder / "vocab.json").read_text())
        del vocab[token or "".join((folder / "merges.txt").read_text().split("\n")[1].split())]
        (folder / "vocab.json").write_text(json.dumps(vocab))
    return change


TOKENIZER_CASES = {  # name: (change(folder), what the message says)
    "vocab_not_json": (lambda f: (f / "vocab.json").write_text("{'a': 1"), ("tokenizer/vocab.json", "not valid JSON")),
    "vocab_a_list": (lambda f: (f / "vocab.json").write_text("[1, 2]"), ("tokenizer/vocab.json", "not a JSON object")),
    "vocab_strings": (lambda f: (f / "vocab.json").write_text('{"a": "1"}'), ("tokenizer/vocab.json", "token ids")),
    "vocab_deep": (lambda f: (f / "vocab.json").write_text('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}"),
                   ("tokenizer/vocab.json", "nests deeper")),
    "vocab_lacks_bytes": (_vocab_without("a"), ("tokenizer/vocab.json", "lacks the token 'a'")),
    "vocab_lacks_merge": (_vocab_without(), ("tokenizer/vocab.json", "lacks the token")),
    "merges_triples": (lambda f: (f / "merges.txt").write_text("#version: 0.2\na b c\n"),
                       ("tokenizer/merges.txt", "line 2 is not a pair")),
    "merges_not_utf8": (lambda f: (f / "merges.txt").write_bytes(b"\xff\xfe a b\n"),
                        ("tokenizer/merges.txt", "UTF-8")),
    "config_bad_token": (lambda f: (f / "special_tokens_map.json").write_text('{"bos_token": 7}'),
                         ("tokenizer/special_tokens_map.json", "'bos_token'")),
    "config_bad_added": (lambda f: (f / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"x": "y"}}'),
                         ("tokenizer/tokenizer_config.json", "not a token id")),
    "config_not_object": (lambda f: (f / "tokenizer_config.json").write_text("[]"),
                          ("tokenizer/tokenizer_config.json", "not a JSON object")),
    "tokenizer_json_no_model": (
        lambda f: ((f / "vocab.json").unlink(), (f / "tokenizer.json").write_text('{"model": 1}')),
        ("tokenizer/tokenizer.json", "'model'")),
}
for _name, (_change, _says) in TOKENIZER_CASES.items():
    HOSTILE[f"tokenizer_{_name}"] = (lambda d, c=_change: _tokenizer(d, c), _says)


def _index(weight_map):
    """Shard the mini UNet: its weights in one shard file named by an index with this weight_map."""
    def change(folder):
        unet = folder / "unet"
        shard = unet / "diffusion_pytorch_model-00001-of-00001.safetensors"
        (unet / "diffusion_pytorch_model.safetensors").rename(shard)
        (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return change


SHARD_CASES = {
    "not_a_string": ({"conv_in.weight": 7}, "maps to a int"),
    "absolute": ({"conv_in.weight": "/etc/passwd.safetensors"}, "outside its folder"),
    "parent": ({"conv_in.weight": "../vae/diffusion_pytorch_model.safetensors"}, "outside its folder"),
    "dotdot": ({"conv_in.weight": "..safetensors"}, "outside its folder"),
    "subfolder": ({"conv_in.weight": "sub/x.safetensors"}, "outside its folder"),
    "not_weights": ({"conv_in.weight": "config.json"}, "not a weights file"),
    "no_map": ([], "no weight_map"),
}
for _name, (_map, _says) in SHARD_CASES.items():
    HOSTILE[f"shards_{_name}"] = (
        lambda d, m=_map: _open(_folder_with(d, _index(m) if isinstance(m, dict) else lambda f: _index({})(f) or
                                             (f / "unet" / "diffusion_pytorch_model.safetensors.index.json")
                                             .write_text(json.dumps({"weight_map": m})))),
        ("diffusion_pytorch_model.safetensors.index.json", _says))


@hostile("tensor 'conv_in.weight' is also in another shard")
def shards_tensor_in_two(d):
    from safetensors.torch import save_file

    def change(folder):
        unet = folder / "unet"
        for i in (1, 2):
            shard = unet / f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"
            save_file({"conv_in.weight": torch.zeros(1)}, shard)
        (unet / "diffusion_pytorch_model.safetensors").unlink()
        (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "conv_in.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "conv_in.bias": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    return _open(_folder_with(d, change))


# ------------------------------------------------------------------------------------------ the child interpreter


def _measured(action):
    """(outcome, message, seconds, peak MB above the start) of action(); memory sampled every 2 ms."""
    import resource
    import threading
    import time

    import psutil

    proc = psutil.Process()
    start = proc.memory_info().rss
    peak, done = [start], threading.Event()

    def sample():
        while not done.wait(0.002):
            peak[0] = max(peak[0], proc.memory_info().rss)

    watcher = threading.Thread(target=sample, daemon=True)
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    watcher.start()
    t0 = time.perf_counter()
    try:
        action()
        outcome, message = "ok", ""
    except SdgenError as e:
        outcome, message = "SdgenError", str(e)
    except BaseException as e:  # noqa: BLE001 - what the test is looking for
        outcome, message = type(e).__name__, str(e)[:500]
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grew = max(peak[0], proc.memory_info().rss) - start
    return outcome, message, seconds, max(grew, max_after - max_before) / 2**20


def _limit_memory(extra=4 * 2**30):
    """A blow-up in the child ends in MemoryError instead of swapping the machine."""
    import resource

    import psutil

    vms = psutil.Process().memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (vms + extra, resource.getrlimit(resource.RLIMIT_AS)[1]))


def run_hostile(work: str, out: str):
    """In the child: make and run every case, one fresh folder each; results as JSON into `out`."""
    import sdgen.families  # noqa: F401 - imported before measuring

    _limit_memory()
    results = {}
    for i, (name, (make, _)) in enumerate(HOSTILE.items()):
        folder = Path(work) / f"{i:03d}"
        folder.mkdir()
        try:
            action = make(folder)
        except Exception as e:  # noqa: BLE001 - a bug in the case itself, reported as such
            results[name] = {"outcome": "make failed", "message": f"{type(e).__name__}: {e}"}
            continue
        before = _files(folder) | _files(Path(tempfile.gettempdir()))
        print(f"case {name}", file=sys.stderr, flush=True)
        outcome, message, seconds, mb = _measured(action)
        after = _files(folder) | _files(Path(tempfile.gettempdir()))
        results[name] = {"outcome": outcome, "message": message, "seconds": seconds, "mb": mb,
                         "new_files": sorted(after - before)}
    Path(out).write_text(json.dumps(results))


def _files(folder: Path) -> set[str]:
    return {p.as_posix() for p in folder.rglob("*")}


def _child(tmp: Path, call: str, timeout: int) -> dict:
    """Run `call` (a function of this module, given a work folder and a result file) in a fresh interpreter with
    a private TMPDIR; a crash or hang fails the calling test with the last case the child started."""
    work, tmpdir, out = tmp / "work", tmp / "tmpdir", tmp / "out.json"
    work.mkdir()
    tmpdir.mkdir()
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_hostile as t; "
            f"t.{call}({str(work)!r}, {str(out)!r})")
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the child hung; its last lines: {(e.stderr or b'')[-1500:]!r}")
    if r.returncode != 0:
        pytest.fail(f"the child died (exit {r.returncode}); its last lines:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory):
    return _child(tmp_path_factory.mktemp("hostile"), "run_hostile", timeout=600)


def _check(results, prefix):
    names = [n for n in HOSTILE if n.startswith(prefix)]
    assert names
    for name in names:
        r, expect = results[name], HOSTILE[name][1]
        assert r["outcome"] == "SdgenError", (name, r)
        msg = r["message"]
        assert "\n" not in msg and len(msg) < 400, (name, msg)
        for text in expect:
            assert text in msg, (name, text, msg)
        assert r["seconds"] < SECONDS, (name, r)
        assert r["mb"] < MEGABYTES, (name, r)
        assert not r["new_files"], (name, r)
        print(f"{name:45s} {r['seconds']:6.2f}s {r['mb']:6.0f}MB  {msg}")


def test_unpickler_bounds_depth_work_and_memory(hostile_results):
    _check(hostile_results, "pickle_")


def test_lying_tensor_records(hostile_results):
    _check(hostile_results, "record_")


def test_malformed_json(hostile_results):
    _check(hostile_results, "json_")


def test_malformed_configs(hostile_results):
    _check(hostile_results, "config_")


def test_broken_tokenizer_files(hostile_results):
    _check(hostile_results, "tokenizer_")


def test_bad_shard_maps(hostile_results):
    _check(hostile_results, "shards_")


# Sizes read off the tensor shapes are refused by the config classes (from_shapes), which do not know the file: the
# family layer is to prefix their errors with the file's name (see the report). Until then these lines lack it.
FILE_NAMED_BY_FAMILIES = {"record_conv_weight_of_rank_3": "rank.safetensors",
                          "record_linear_weight_of_rank_0": "scalar.safetensors",
                          "record_zero_channels": "empty.safetensors",
                          "record_channels_not_a_multiple_of_groups": "odd.safetensors"}


def test_shape_errors_name_the_file(hostile_results):
    for name, file in FILE_NAMED_BY_FAMILIES.items():
        assert hostile_results[name]["message"].startswith(file + ": "), hostile_results[name]


def test_integer_weights_are_refused(tmp_path):
    from sdgen.families import open_checkpoint
    from sdgen.precision import Precision

    from sdgen.formats import read_weights_file

    path = _mini_with(tmp_path, "int.safetensors", **{"model.diffusion_model.out.2.bias":
                                                      torch.ones(4, dtype=torch.int32)})
    assert not read_weights_file(path)[0]["model.diffusion_model.out.2.bias"].is_float
    with pytest.raises(SdgenError, match="int.safetensors: .*out.2.bias"):  # at open, or at the latest on load
        open_checkpoint(path).load(Precision(torch.float32, torch.float32), "cpu")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_limits_leave_real_files_alone(tmp_path, protocol):
    """Shared storages (views, tied weights), 0-d and integer tensors, training extras (optimizer state, sets,
    bytes, numpy scalars) still read, in every pickle protocol torch.save can write."""
    import numpy as np

    from sdgen.formats import read_weights_file

    state = small_state()
    tied = torch.randn(8, 8)
    for legacy in (False, True):
        path = tmp_path / f"t{legacy}.ckpt"
        torch.save({"state_dict": {**state, "w1": tied, "w2": tied}, "global_step": 3, "epoch": 1,
                    "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [
                        {"params": [0, 1], "lr": 1e-4, "betas": (0.9, 0.999)}]}],
                    "extra": {"seen": {1, 2}, "frozen": frozenset({3}), "raw": b"\x00\x01", "score": np.float64(0.5)}},
                   path, _use_new_zipfile_serialization=not legacy, pickle_protocol=protocol)
        refs, _ = read_weights_file(path)
        assert torch.equal(refs["w1"].load(), tied) and torch.equal(refs["w2"].load(), tied)
        for k, t in state.items():
            assert torch.equal(refs[k].load(), t), k
        assert refs["ids"].dtype == torch.int64 and not refs["ids"].is_float and refs["half"].is_float


# ------------------------------------------------------------------------------------------ fuzzing

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1]


class _Mutator:
    """Random mutations of one valid file, biased towards its structure (header, pickle, zip directory)."""

    def __init__(self, raw: bytes, fmt: str, rng: random.Random):
        self.raw, self.fmt, self.rng = raw, fmt, rng
        if fmt == "safetensors":
            n = struct.unpack("<Q", raw[:8])[0]
            self.structure = (0, 8 + n)
        elif fmt == "legacy":  # the pickles come first; their end is where the storage data starts
            self.structure = (0, _legacy_pickles_end(raw))
        else:  # zip: data.pkl (CRC fixed after editing it) and the directory at the end
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
                self.directory = z.start_dir
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            self.pkl = (start, start + info.file_size, info.header_offset)
            self.structure = self.pkl[:2]

    def position(self, structure=0.85):
        lo, hi = self.structure if self.rng.random() < structure else (0, len(self.raw))
        return self.rng.randrange(lo, max(lo + 1, hi))

    def __call__(self) -> tuple[str, bytes]:
        rng, raw = self.rng, bytearray(self.raw)
        kind = rng.choice(["flip", "flip", "ints", "truncate", "insert", "header", "directory"])
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                raw[self.position()] = rng.randrange(256)
        elif kind == "ints":  # a run of bytes becomes an interesting little-endian number
            at, width = self.position(), rng.choice([1, 2, 4, 8])
            value = rng.choice(INTERESTING) * rng.choice([1, -1])
            raw[at:at + width] = value.to_bytes(8, "little", signed=True)[:width]
            del raw[len(self.raw):]
        elif kind == "truncate":
            del raw[self.position(0.7):]
        elif kind == "insert":
            at = self.position()
            raw[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == "header" and self.fmt == "safetensors":
            return kind, self._edit_header()
        elif kind == "directory" and self.fmt == "zip":  # corrupt the zip directory itself
            for _ in range(rng.randint(1, 3)):
                raw[rng.randrange(self.directory, len(raw))] = rng.randrange(256)
            return kind, bytes(raw)
        else:
            raw[self.position()] ^= 1 << rng.randrange(8)
        if self.fmt == "zip" and len(raw) == len(self.raw):
            _fix_crc(raw, *self.pkl, self.directory)  # so that the edited pickle reaches the unpickler
        return kind, bytes(raw)

    def _edit_header(self) -> bytes:
        """Lying header entries: a shape, dtype or offsets changed, an entry copied under another key."""
        rng = self.rng
        n = struct.unpack("<Q", self.raw[:8])[0]
        header = json.loads(self.raw[8:8 + n])
        key = rng.choice([k for k in header if k != "__metadata__"])
        entry = header[key]
        what = rng.choice(["shape", "reshape", "reshape", "dtype", "offsets", "copy", "drop"])
        if what == "reshape":  # the same bytes under another shape: a lie only the shapes' users can see
            shape = entry["shape"] or [1]
            shape = rng.choice([[math.prod(shape)], shape[::-1], [1, *shape], shape[1:] if len(shape) > 1 else [1, 1],
                                [shape[0] * (shape[1] if len(shape) > 1 else 1), *shape[2:]]])
            entry["shape"] = shape if math.prod(shape) == math.prod(entry["shape"]) else entry["shape"][::-1]
        elif what == "shape" and entry["shape"]:
            i = rng.randrange(len(entry["shape"]))
            entry["shape"][i] = rng.choice([0, 1, entry["shape"][i] * 2, 2**40, -1])
        elif what == "shape":
            entry["shape"] = [rng.choice([0, 1, 2**34])]
        elif what == "dtype":
            entry["dtype"] = rng.choice(["I32", "BOOL", "F64", "U8", "F8_E4M3", "X"])
        elif what == "offsets":
            entry["data_offsets"][rng.randrange(2)] += rng.choice([-4, -1, 1, 4, 2**40])
        elif what == "copy":
            header[rng.choice(list(header)) + "x"] = dict(entry)
        else:
            entry["shape"] = entry["shape"][:-1] or [1, 1]
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + self.raw[8 + n:]


def _legacy_pickles_end(raw: bytes) -> int:
    import pickletools

    f = io.BytesIO(raw)
    for _ in range(5):
        for _ in pickletools.genops(f):
            pass
    return f.tell()


def _fix_crc(raw: bytearray, start: int, end: int, local: int, directory: int):
    import zlib

    crc = struct.pack("<I", zlib.crc32(bytes(raw[start:end])))
    raw[local + 14:local + 18] = crc
    at = raw.find(b"PK\x01\x02", directory)  # data.pkl is the first entry torch.save writes
    if at >= 0:
        raw[at + 16:at + 20] = crc


def run_fuzz(work: str, out: str, seed=1234, small_cases=800, mini_cases=200):
    """In the child: random mutations of the small files through the format readers, of the mini model through
    open_checkpoint and, when it opens, loading its networks; every tensor of what opens is read. Only SdgenError
    or success is allowed."""
    import time

    import psutil

    from sdgen.families import open_checkpoint
    from sdgen.formats import read_weights_file
    from sdgen.precision import Precision

    _limit_memory()
    rng, work = random.Random(seed), Path(work)
    sources = [(path, fmt, "small", small_cases) for fmt, path in write_formats(work, small_state(), "small").items()]
    sources += [(path, fmt, "mini", mini_cases) for fmt, path in write_formats(work, mini_state(), "mini").items()]
    proc = psutil.Process()
    start_rss, peak_rss, slowest, failures, outcomes = proc.memory_info().rss, 0, (0.0, ""), [], {}
    temp_before, work_before = _files(Path(tempfile.gettempdir())), _files(work)
    for path, fmt, which, cases in sources:
        mutate = _Mutator(path.read_bytes(), fmt, rng)
        target = work / f"case{path.suffix}"
        for i in range(cases):
            kind, data = mutate()
            target.write_bytes(data)
            label = f"{which} {fmt} #{i} {kind}"
            print(label, file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                if which == "small":
                    refs = read_weights_file(target)[0]
                else:
                    ckpt = open_checkpoint(target)
                    ckpt.load(Precision(torch.float32, torch.float32), "cpu")
                    refs = {k: r for c in ckpt.tensors.values() for k, r in c.items()}
                for r in refs.values():
                    r.load()
                outcome = "ok"
            except SdgenError as e:
                outcome = "SdgenError"
                if "\n" in str(e):
                    failures.append(f"{label}: a message of several lines: {e!r}")
            except Exception as e:  # noqa: BLE001 - what the test is looking for
                outcome = type(e).__name__
                failures.append(f"{label}: {type(e).__name__}: {str(e)[:300]}")
            seconds = time.perf_counter() - t0
            slowest = max(slowest, (seconds, label))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            peak_rss = max(peak_rss, proc.memory_info().rss)
    cases = {(work / f"case{p.suffix}").as_posix() for p, *_ in sources}
    left = sorted((_files(Path(tempfile.gettempdir())) - temp_before) | (_files(work) - work_before - cases))
    Path(out).write_text(json.dumps({"failures": failures, "slowest": slowest, "outcomes": outcomes,
                                     "rss_growth_mb": (peak_rss - start_rss) / 2**20, "left": left}))


def test_fuzz_format_readers_and_open_checkpoint(tmp_path):
    report = _child(tmp_path, "run_fuzz", timeout=600)
    print(report["outcomes"], "slowest", report["slowest"], f"RSS +{report['rss_growth_mb']:.0f} MB")
    assert not report["failures"], report["failures"][:10]
    assert not report["left"], report["left"]
    assert report["slowest"][0] < SECONDS, report["slowest"]
    assert report["rss_growth_mb"] < MEGABYTES, report
    assert sum(report["outcomes"].values()) >= 3000 and report["outcomes"].get("ok", 0) > 100, report["outcomes"]
