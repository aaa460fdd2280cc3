"""The command line: PNG and metadata, determinism, no overwriting, one clear line for every bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdgen.cli import main


@pytest.fixture(scope="module")
def model(tiny):
    return str(tiny[1]["safetensors"])


def run(*args):
    return main(["generate", *args])


def small(model):
    return ["--model", model, "--steps", "3", "--width", "64", "--height", "64", "--precision", "fp32"]


def test_png_with_a1111_parameters(model, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "cat.png"
    assert run("a cat on a beach", "--negative-prompt", "blurry", "--seed", "42", "--sampler", "dpmpp_2m",
               "--schedule", "karras", "-o", str(out), *small(model)) == 0
    captured = capsys.readouterr()
    assert str(out) in captured.out
    assert "denoising" in captured.err and "time: load" in captured.err
    image = Image.open(out)
    assert image.size == (64, 64)
    lines = image.text["parameters"].split("\n")
    assert lines[0] == "a cat on a beach"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 3, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: model")
    assert "Schedule type: Karras" in lines[2]


def test_same_seed_same_image_and_no_overwrite(model, tmp_path, capsys):
    out = tmp_path / "a.png"
    out.write_bytes(b"the user's own file")
    assert run("--prompt", "a dog", "--seed", "7", "-o", str(out), *small(model)) == 0
    assert run("--prompt", "a dog", "--seed", "7", "-o", str(out), *small(model)) == 0
    assert out.read_bytes() == b"the user's own file"
    first, second = tmp_path / "a-1.png", tmp_path / "a-2.png"
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    printed = capsys.readouterr().out.split()
    assert printed == [str(first), str(second)]


def test_random_seed_is_printed_and_batch_seeds_increase(model, tmp_path, capsys):
    assert run("a dog", "-b", "2", "-o", str(tmp_path / "b.png"), *small(model)) == 0
    err = capsys.readouterr().err
    seed = int(err.split("seed: ")[1].split()[0])
    seeds = [int(Image.open(tmp_path / n).text["parameters"].split("Seed: ")[1].split(",")[0]) for n in ("b.png", "b-1.png")]
    assert seeds == [seed, seed + 1]


def test_img2img_and_inpaint(model, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    assert run("a dog", "--init-image", str(init), "--strength", "0.5", "--seed", "1", "-o", str(tmp_path / "i.png"),
               *small(model)) == 0
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "i.png").text["parameters"]
    assert run("a dog", "--init-image", str(init), "--mask", str(mask), "--seed", "1", "-o", str(tmp_path / "m.png"),
               *small(model)) == 0


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "text.png").write_text("not an image")
    Image.new("RGB", (64, 64)).save(d / "ok.png")
    Image.new("L", (32, 32)).save(d / "small_mask.png")
    # a PNG whose header claims 100000 x 100000 pixels (a decompression bomb)
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    chunk = lambda t, data: struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data))
    (d / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return d


@pytest.mark.parametrize("args,message", [
    (["--steps", "0"], "steps"), (["--steps", "-5"], "steps"), (["--guidance", "nan"], "guidance"),
    (["--guidance", "-2"], "guidance"), (["--strength", "1.5", "--init-image", "{d}/ok.png"], "strength"),
    (["--strength", "-0.1", "--init-image", "{d}/ok.png"], "strength"), (["--sampler", "magic"], "sampler"),
    (["--schedule", "cosine"], "schedule"), (["--init-image", "{d}/text.png"], "not a readable init image"),
    (["--init-image", "{d}/bomb.png"], "larger than"), (["--init-image", "{d}/missing.png"], "not found"),
    (["--init-image", "{d}/ok.png", "--mask", "{d}/small_mask.png"], "mask"), (["--mask", "{d}/ok.png"], "init image"),
    (["--width", "100"], "width"), (["--height", "999999"], "height"), (["--steps", "ten"], "invalid int"),
    (["--model", "{d}/nothing.safetensors"], "nothing.safetensors"), (["-o", "{d}/x.jpg"], ".png"),
])
def test_bad_input_is_one_line_and_writes_nothing(model, bad_files, tmp_path, capsys, args, message):
    args = [a.replace("{d}", str(bad_files)) for a in args]
    base = small(model)
    for flag in ("--steps", "--width", "--height", "--model"):  # let the case override the defaults
        if flag in args and flag in base:
            i = base.index(flag)
            del base[i : i + 2]
    out = tmp_path / "never.png"
    code = run("a cat", *base, "-o", str(out), *args) if "-o" not in args else run("a cat", *base, *args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("sdgen: error:") and message in err[0], err
    assert not out.exists()


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sdgen.cli", "generate", "x", "--steps", "0", "--model",
                        str(tmp_path / "none.safetensors")], capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_offline_without_a_model_uses_the_demo_model(tmp_path, monkeypatch):
    """A fresh machine without hub access: the README's first command makes a picture with the built-in model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "cat.png"
    r = subprocess.run([sys.executable, "-m", "sdgen.cli", "generate", "a cat on a beach", "--steps", "2", "-o", str(out)],
                       capture_output=True, text=True, env={**os.environ})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "stable-diffusion-v1-5" in r.stderr and "demo model" in r.stderr and "--model" in r.stderr
    assert r.stdout.strip() == str(out) and Image.open(out).size == (128, 128)
    assert "Model: demo" in Image.open(out).text["parameters"]


def test_info(model, capsys):
    assert main(["info", model]) == 0
    out = capsys.readouterr().out
    assert "sd1" in out and "safetensors" in out and "ignored:" in out and "betas" in out


def test_unreachable_hub_is_one_line_without_retries(tmp_path):
    """Offline without HF_HUB_OFFLINE: one line, at once (not the hub client's retries and warnings)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on port 9
    r = subprocess.run([sys.executable, "-m", "sdgen.cli", "generate", "a cat", "--model", "someone/some-model"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "not in the local Hugging Face cache" in r.stderr
