"""Reading checkpoints: every format gives the same tensors under original names; bad input gives one clear line."""

import json
import os
import pickle
import struct
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import reference as ref
from sdgen import SdgenError
from sdgen.families import Component, load_network, open_checkpoint
from sdgen.families.sd1 import COMPONENTS
from sdgen.formats import read_safetensors, read_torch_file, read_weights_file
from sdgen.precision import Precision

# what real SD1 files carry besides the three networks; all of it must land in `ignored`
EXTRAS = {"betas": torch.rand(1000, dtype=torch.float64), "alphas_cumprod": torch.rand(1000, dtype=torch.float64),
          "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10, dtype=torch.int32),
          "logvar": torch.zeros(1000), "lvlb_weights": torch.rand(1000),
          "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}


def tiny_original(seed=0, in_channels=4):
    """A tiny SD1 state dict with original key names (shapes need not make a network here)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(shape, generator=g)

    return {
        "model.diffusion_model.input_blocks.0.0.weight": r(32, in_channels, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": r(32, 48),
        "model.diffusion_model.out.2.weight": r(4, 32, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": r(8, 8, 1, 1),
        "first_stage_model.decoder.conv_in.bias": r(8),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": r(48),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": r(10, 48),
    }


def full_file_dict(sd):
    return {**sd, **EXTRAS}


def assert_same(refs, sd, dtype=None):
    """Every tensor of `sd` read back from the file's {key: TensorRef} (the format layer), in `dtype`."""
    for key, t in sd.items():
        got = refs[key].load(dtype)
        want = t.to(dtype) if dtype is not None else t
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert torch.equal(got, want), key


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("disk", [torch.float32, torch.float16])
def test_safetensors_round_trip(tmp_path, disk):
    sd = {k: v.to(disk) for k, v in tiny_original().items()}
    save_file(full_file_dict(sd), tmp_path / "m.safetensors")
    refs, metadata = read_weights_file(tmp_path / "m.safetensors")
    assert set(refs) == set(full_file_dict(sd)) and metadata == {}
    assert_same(refs, sd)  # bit-exact
    assert_same(refs, sd, torch.bfloat16)  # exact cast
    assert_same(refs, sd, torch.float32)


def test_vae_linear_attention_weights_are_reshaped(tmp_path):
    path = original_file(tmp_path / "m.safetensors", _tiny_models())
    sd = dict(load_file(path))
    key = "first_stage_model.encoder.mid.attn_1.q.weight"
    c = sd[key].shape[0]
    sd[key] = sd[key].reshape(c, c).clone()  # (C, C): as diffusers-converted files have it
    save_file(sd, path)
    ckpt = open_checkpoint(path)
    assert ckpt.shapes("vae")["encoder.mid.attn_1.q.weight"] == (c, c, 1, 1)
    assert torch.equal(ckpt.tensors["vae"]["encoder.mid.attn_1.q.weight"].load()[..., 0, 0], sd[key])


def _lightning_extras():
    """What a real SD 1.x .ckpt carries besides weights: a Lightning callback class as a key, numpy scalars."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    mods = {n: types.ModuleType(n) for n in names}

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = names[-1], "ModelCheckpoint"
    mods[names[-1]].ModelCheckpoint = ModelCheckpoint
    sys.modules.update(mods)  # only while saving; removed again before loading
    extra = {"global_step": 470000, "epoch": 6,
             "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.5), "monitor": None}}}
    return extra, mods


@pytest.mark.parametrize("layout", ["state_dict", "bare", "legacy", "lightning"])
def test_ckpt_round_trip(tmp_path, layout):
    sd = tiny_original(1)
    path = tmp_path / "m.ckpt"
    if layout == "state_dict":
        torch.save({"state_dict": full_file_dict(sd), "global_step": 1}, path)
    elif layout == "bare":
        torch.save(full_file_dict(sd), path)
    elif layout == "legacy":
        torch.save({"state_dict": full_file_dict(sd)}, path, _use_new_zipfile_serialization=False)
    else:
        extra, mods = _lightning_extras()
        try:
            torch.save({"state_dict": full_file_dict(sd), **extra}, path)
        finally:
            for n in mods:
                sys.modules.pop(n)
    refs, _ = read_weights_file(path)
    assert set(refs) == set(full_file_dict(sd))
    assert_same(refs, sd)
    assert_same(refs, sd, torch.float16)
    assert "pytorch_lightning" not in sys.modules  # a placeholder stood in; nothing was imported


def test_ckpt_views_and_integers(tmp_path):
    """Tensors that are strided views of a bigger storage, and integer tensors that must not be cast."""
    base = torch.randn(6, 5)
    sd = {"model.diffusion_model.out.2.weight": base.t(), "model.diffusion_model.out.2.bias": base[2],
          "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    for legacy in (False, True):
        torch.save(sd, tmp_path / "v.pt", _use_new_zipfile_serialization=not legacy)
        refs = read_torch_file(tmp_path / "v.pt")
        for k, t in sd.items():
            assert torch.equal(refs[k].load(), t)
        ids = refs["cond_stage_model.transformer.text_model.embeddings.position_ids"].load(torch.bfloat16)
        assert ids.dtype == torch.int64


# ------------------------------------------------------------------------------------------ pickles that run code


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["zip", "legacy", "raw"])
def test_pickle_that_runs_code_is_refused(tmp_path, how):
    marker = tmp_path / "pwned_xyz"
    path = tmp_path / "model.ckpt"
    payload = {"state_dict": {**tiny_original(), "evil": Evil(marker)}}
    if how == "raw":
        path.write_bytes(pickle.dumps({"state_dict": {"evil": Evil(marker)}}))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "zip")
    with pytest.raises(SdgenError) as e:
        open_checkpoint(path)
    assert str(e.value).startswith("model.ckpt: refusing to load: the pickle wants to call")
    assert "system" in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["builtins.eval", "subprocess.Popen", "builtins.getattr", "torch.load",
                                    "numpy.load", "pytorch_lightning.x"])
def test_only_listed_globals_resolve(tmp_path, target):
    mod, name = target.rsplit(".", 1)
    path = tmp_path / "g.ckpt"
    # GLOBAL + a call with one string argument
    path.write_bytes(b"\x80\x02c" + f"{mod}\n{name}\n".encode() + b"X\x01\x00\x00\x00x\x85R.")
    if mod.startswith("pytorch_lightning"):  # inert placeholder: loads, runs nothing, holds no state dict
        with pytest.raises(SdgenError, match="g.ckpt: "):
            open_checkpoint(path)
        return
    with pytest.raises(SdgenError, match=f"g.ckpt: refusing to load: the pickle wants to call {target}"):
        open_checkpoint(path)


# ------------------------------------------------------------------------------------------ bad input


def _header(path, header: dict, data: bytes = b"", length=None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _bad_inputs(tmp: Path):
    good = tmp / "good.safetensors"
    save_file(tiny_original(), good)
    raw = good.read_bytes()
    torch.save({"state_dict": tiny_original()}, tmp / "good.ckpt")
    ck = (tmp / "good.ckpt").read_bytes()
    cases = {}

    def case(name, make):
        p = tmp / name
        make(p)
        cases[name] = p

    case("missing.safetensors", lambda p: None)
    case("not_a_model_dir", lambda p: (p.mkdir(), (p / "readme.txt").write_text("hi")))
    case("truncated.safetensors", lambda p: p.write_bytes(raw[: len(raw) // 2]))
    case("truncated.ckpt", lambda p: p.write_bytes(ck[: len(ck) // 2]))
    case("cut_header.safetensors", lambda p: p.write_bytes(raw[:20]))
    case("random.safetensors", lambda p: p.write_bytes(os.urandom(4096)))
    case("random.ckpt", lambda p: p.write_bytes(os.urandom(4096)))
    case("empty.safetensors", lambda p: p.write_bytes(b""))
    case("empty.ckpt", lambda p: p.write_bytes(b""))
    case("tiny.safetensors", lambda p: p.write_bytes(b"\x01\x02"))
    case("huge_len.safetensors", lambda p: _header(p, {}, length=2**62))
    case("len_past_end.safetensors", lambda p: _header(p, {}, length=1000))
    case("not_json.safetensors", lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{"))
    case("shape_lies.safetensors", lambda p: _header(
        p, {"model.diffusion_model.x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, bytes(16)))
    case("offsets_lie.safetensors", lambda p: _header(
        p, {"model.diffusion_model.x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**50]}}, bytes(16)))
    case("negative.safetensors", lambda p: _header(
        p, {"model.diffusion_model.x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16)))
    case("overlap.safetensors", lambda p: _header(
        p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)))
    case("bad_dtype.safetensors", lambda p: _header(
        p, {"a": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)))
    case("text.ckpt", lambda p: p.write_text("this is not a model, just a text file renamed .ckpt\n" * 20))
    case("random_dict.safetensors", lambda p: save_file({"fc.weight": torch.ones(2, 2)}, p))
    case("random_dict.ckpt", lambda p: torch.save({"fc.weight": torch.ones(2, 2)}, p))
    case("not_a_dict.ckpt", lambda p: torch.save([torch.ones(2)], p))
    case("sdxl.safetensors", lambda p: save_file({"conditioner.embedders.0.transformer.x": torch.ones(1),
                                                  "model.diffusion_model.input_blocks.0.0.weight": torch.ones(1)}, p))
    case("sd2.safetensors", lambda p: save_file({"cond_stage_model.model.token_embedding.weight": torch.ones(1),
                                                 "model.diffusion_model.input_blocks.0.0.weight": torch.ones(1)}, p))
    case("unet_only.safetensors", lambda p: save_file({"model.diffusion_model.out.2.weight": torch.ones(1)}, p))
    case("vae.safetensors", lambda p: save_file({"encoder.conv_in.weight": torch.ones(1),
                                                 "decoder.conv_in.weight": torch.ones(1),
                                                 "post_quant_conv.weight": torch.ones(1)}, p))

    def storage_lies(p):  # the pickle claims a bigger storage than the archive holds
        torch.save({"state_dict": {"model.diffusion_model.x": torch.ones(4)}}, p)
        import zipfile

        with zipfile.ZipFile(p) as z:
            entries = {i.filename: z.read(i) for i in z.infolist()}
        pkl = next(n for n in entries if n.endswith("data.pkl"))
        entries[pkl] = entries[pkl].replace(b"K\x04\x85", b"J\x00\x00\x00\x10\x85")  # size (4,) -> (2**28,)
        with zipfile.ZipFile(p, "w") as z:
            for n, b in entries.items():
                z.writestr(n, b)

    case("storage_lies.ckpt", storage_lies)
    return cases


def test_bad_inputs_give_one_clear_line(tmp_path):
    for name, path in _bad_inputs(tmp_path).items():
        with pytest.raises(SdgenError) as e:
            open_checkpoint(path)
        msg = str(e.value)
        assert name in msg and "\n" not in msg, (name, msg)
        print(f"{name:28s} {msg}")


def test_family_messages(tmp_path):
    cases = _bad_inputs(tmp_path)
    for name, want in [("sdxl.safetensors", "incomplete Stable Diffusion XL checkpoint: no vae or text_encoder_2"),
                       ("sd2.safetensors", "incomplete Stable Diffusion 2.x checkpoint: no vae"), ("vae.safetensors", "standalone VAE"),
                       ("random_dict.ckpt", "not a Stable Diffusion checkpoint"),
                       ("unet_only.safetensors", "no vae or text_encoder"),
                       ("huge_len.safetensors", "header claims"), ("text.ckpt", "not a PyTorch checkpoint")]:
        with pytest.raises(SdgenError, match=want):
            open_checkpoint(cases[name])


# ------------------------------------------------------------------------------------------ load_module


@dataclass(frozen=True)
class TinyConfig:
    n: int = 3


class Tiny(nn.Module):
    def __init__(self, config, compute_dtype=None):
        super().__init__()
        self.fc = nn.Linear(config.n, config.n)
        self.emb = nn.Embedding(4, config.n)


def _refs(tmp_path, sd):
    save_file(sd, tmp_path / "t.safetensors")
    return read_safetensors(tmp_path / "t.safetensors")[0]


def test_load_module_dtype_and_errors(tmp_path):
    sd = {"fc.weight": torch.randn(3, 3), "fc.bias": torch.randn(3), "emb.weight": torch.randn(4, 3)}
    tiny = Component("tiny", "", Tiny, TinyConfig, lambda config: {})
    bf16 = Precision(torch.bfloat16, torch.bfloat16)
    m = load_network(tiny, TinyConfig(), _refs(tmp_path, sd), bf16, "cpu", "t.safetensors")
    for k, v in m.state_dict().items():
        assert v.dtype == torch.bfloat16 and v.device.type == "cpu" and torch.equal(v, sd[k].bfloat16())
    for bad, want in [({k: v for k, v in sd.items() if k != "fc.bias"}, "'fc.bias' is missing"),
                      ({**sd, "fc.extra": torch.ones(1)}, "unexpected Tiny weight 'fc.extra'"),
                      ({**sd, "fc.bias": torch.ones(4)}, r"'fc.bias' has shape \(4,\), expected \(3,\)")]:
        with pytest.raises(SdgenError, match=f"t.safetensors: .*{want}"):
            load_network(tiny, TinyConfig(), _refs(tmp_path, bad), bf16, "cpu", "t.safetensors")


# ------------------------------------------------------------------------------------------ diffusers folders


def _save_component(folder, base, state, *, shards=1, variant=None, fmt="safetensors"):
    """Write `state` as diffusers/transformers do: one file or shards + index, optionally a variant."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    v = f".{variant}" if variant else ""
    groups = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"{base}{v}.{fmt}" if shards == 1 else f"{base}-{i + 1:05d}-of-{shards:05d}{v}.{fmt}"
        part = {k: state[k].contiguous() for k in group}
        save_file(part, folder / name) if fmt == "safetensors" else torch.save(part, folder / name)
        weight_map.update({k: name for k in group})
    if shards > 1:
        (folder / f"{base}.{fmt}.index{v}.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _tiny_models(in_channels=4):
    unet = ref.randomize_(ref.tiny_unet(0, in_channels=in_channels), 0)
    vae = ref.randomize_(ref.tiny_vae(1), 1)
    text = ref.randomize_(ref.tiny_text_encoder(2), 2)
    return unet, vae, text


def write_diffusers(folder, models, *, shards=1, variant=None, fmt="safetensors", also_plain=False):
    unet, vae, text = models
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "unet": ["diffusers", "UNet2DConditionModel"]}))
    for comp, model, base in (("unet", unet, "diffusion_pytorch_model"), ("vae", vae, "diffusion_pytorch_model"),
                              ("text_encoder", text, "model")):
        d = folder / comp
        cfg = dict(model.config) if comp != "text_encoder" else model.config.to_dict()
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg, default=list))
        state = model.state_dict()
        dtype = torch.float16 if variant == "fp16" else torch.float32
        _save_component(d, base if fmt == "safetensors" or comp != "text_encoder" else "pytorch_model",
                        {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                        shards=shards, variant=variant, fmt=fmt)
        if also_plain:  # a plain fp32 copy next to the variant
            _save_component(d, base, state, fmt=fmt)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler"}))
    ref.write_clip_tokenizer_files(folder / "tokenizer")
    return folder


def original_file(path, models, dtype=torch.float32):
    """The same weights as one original-layout .safetensors, via the network modules' renaming tables."""
    out = dict(EXTRAS)
    components = {c.name: c for c in COMPONENTS}
    for comp, model in zip(("unet", "vae", "text_encoder"), models):
        c = components[comp]
        cfg = dict(model.config) if comp != "text_encoder" else model.config.to_dict()
        renames = c.renames(c.config.from_diffusers(cfg))
        for k, v in model.state_dict().items():
            if k.endswith("position_ids"):
                continue
            out[c.prefix + renames.get(k, k)] = v.to(dtype) if v.is_floating_point() else v
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    return path


@pytest.mark.parametrize("layout", ["sharded", "fp16_only", "fp16_asked", "bin"])
def test_diffusers_folder_matches_single_file(tmp_path, layout):
    models = _tiny_models()
    kw = {"sharded": dict(shards=3), "fp16_only": dict(variant="fp16", shards=2),
          "fp16_asked": dict(variant="fp16", also_plain=True), "bin": dict(fmt="bin")}[layout]
    folder = write_diffusers(tmp_path / "model", models, **kw)
    disk = torch.float16 if "fp16" in layout else torch.float32
    single = open_checkpoint(original_file(tmp_path / "single.safetensors", models, disk))
    ckpt = open_checkpoint(folder, variant="fp16" if layout == "fp16_asked" else None)
    assert ckpt.format == "diffusers" and ckpt.dtype_on_disk == str(disk).removeprefix("torch.")
    assert ckpt.tokenizer_dir == folder / "tokenizer"
    assert set(ckpt.configs) == {"unet", "vae", "text_encoder"}
    assert ckpt.family.name == single.family.name == "sd1" and not ckpt.inpainting
    assert sorted(single.ignored) == sorted(EXTRAS) and single.format == "safetensors"
    assert ckpt.configs["unet"] == single.configs["unet"] and ckpt.configs["vae"].ch_mult == single.configs["vae"].ch_mult
    fp32 = Precision(torch.float32, torch.float32)
    a_nets, b_nets = ckpt.load(fp32, "cpu"), single.load(fp32, "cpu")
    for comp in ("unet", "vae", "text_encoder"):
        assert ckpt.shapes(comp) == single.shapes(comp), comp
        sa, sb = a_nets[comp].state_dict(), b_nets[comp].state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (comp, k)


def test_inpainting_and_sd2_detection(tmp_path):
    models = _tiny_models(in_channels=9)
    assert open_checkpoint(write_diffusers(tmp_path / "inpaint", models)).inpainting
    assert open_checkpoint(original_file(tmp_path / "inpaint.safetensors", models)).inpainting
    sd = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.ones(32, 1024),
          **{k: v for k, v in tiny_original().items() if "to_k" not in k}}
    save_file(sd, tmp_path / "sd2.safetensors")
    with pytest.raises(SdgenError, match="sd2.safetensors: this is an SD2.x checkpoint"):
        open_checkpoint(tmp_path / "sd2.safetensors")


def test_variant_missing_and_sdxl_folder(tmp_path):
    folder = write_diffusers(tmp_path / "m", _tiny_models())
    with pytest.raises(SdgenError, match="no weights for unet \\(variant 'fp16'\\)"):
        open_checkpoint(folder, variant="fp16")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(SdgenError, match="m: not a complete diffusers folder: text_encoder_2/config.json is missing"):
        open_checkpoint(folder)


# ------------------------------------------------------------------------------------------ Hugging Face cache


def _run_offline(tmp_path, code):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_repo_id_offline_not_cached(tmp_path):
    r = _run_offline(tmp_path, "import sdgen.families as w\n"
                               "try:\n    w.open_checkpoint('someone/some-model')\n"
                               "except Exception as e:\n    print(type(e).__name__, '|', e)")
    assert "| model 'someone/some-model' is not in the local Hugging Face cache and we are offline" in r.stdout, r
    assert "--model path/to/model.safetensors" in r.stdout


def test_repo_id_loads_from_cache_offline(tmp_path):
    """A repo already in the cache (standard layout: models--o--n/{refs/main, snapshots/<commit>/...})."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-sd"
    write_diffusers(repo / "snapshots" / commit, _tiny_models())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    r = _run_offline(tmp_path, "import sdgen.families as w\n"
                               "c = w.open_checkpoint('someone/tiny-sd')\n"
                               "print(c.format, c.path.name, len(c.tensors['unet']), c.tokenizer_dir is not None)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["diffusers", commit, str(len(open_checkpoint(repo / "snapshots" / commit).tensors["unet"])),
                                "True"]


def test_unaligned_safetensors_data(tmp_path):
    """The format allows any header length; data that is not aligned to its dtype is realigned, not misread."""
    from sdgen.formats import read_safetensors

    t = torch.randn(3, 5)
    raw = json.dumps({"x": {"dtype": "F32", "shape": [3, 5], "data_offsets": [1, 61]}}).encode() + b" "
    assert (8 + len(raw) + 1) % 4
    (tmp_path / "u.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" + t.numpy().tobytes())
    ref_ = read_safetensors(tmp_path / "u.safetensors")[0]["x"]
    assert torch.equal(ref_.load(), t) and torch.equal(ref_.load(torch.float16), t.half())
