"""Textual inversion: A1111 .pt, safetensors emb_params, diffusers learned_embeds, one or several vectors, against
diffusers' load_textual_inversion; `TI hashes`; bad files in one line, only when a prompt uses them."""

import hashlib

import pytest
import torch
from safetensors.torch import save_file

import sdgen
from models import reference_pipeline
from reference import relerr
from sdgen.embeddings import read_embedding

WIDTH = 48


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(4)
    vec = lambda n: torch.randn(n, WIDTH, generator=g) * 0.5
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec(2)}, "name": "a1111-style", "step": 500},
               folder / "a1111-style.pt")
    save_file({"emb_params": vec(3)}, folder / "stpar.safetensors")
    torch.save({"<concept>": vec(1)[0]}, folder / "qqconcept.bin")            # diffusers learned_embeds: (D,)
    save_file({"<other>": vec(1)}, folder / "xyother.safetensors")
    (folder / "broken.pt").write_bytes(b"not a pickle at all")
    ours = sdgen.load(str(tiny[1]["safetensors"]), embedding_dirs=[folder])
    return ours, reference_pipeline(folder / "ref"), folder


def test_formats(setup):
    _, _, folder = setup
    assert read_embedding(folder / "a1111-style.pt").vectors["*"].shape == (2, WIDTH)
    assert read_embedding(folder / "stpar.safetensors").count == 3
    assert read_embedding(folder / "qqconcept.bin").vectors["*"].shape == (1, WIDTH)
    with pytest.raises(sdgen.SdgenError, match="broken.pt: not a PyTorch checkpoint"):
        read_embedding(folder / "broken.pt")


PROMPTS = ["a photo in a1111-style, (stpar:1.2)", "qqconcept on a table, xyother"]


def test_matches_diffusers_load_textual_inversion(setup):
    ours, ref, folder = setup
    for name, file in [("a1111-style", "a1111-style.pt"), ("stpar", "stpar.safetensors"), ("qqconcept", "qqconcept.bin"),
                       ("xyother", "xyother.safetensors")]:
        ref.load_textual_inversion(str(folder / file), token=name)
    try:
        plain = ["a photo in a1111-style, stpar", "qqconcept on a table, xyother"]
        want = ref.encode_prompt(plain, "cpu", 1, False)[0]
        got = ours.encode_prompt(plain)
        assert relerr(got, want) < 1e-4
        assert relerr(got, ours.encode_prompt(["a photo in a1111 style, stpar x", "qqconcepts on a table, xyothers"])) > 1e-2
        # final latents, with the weighting syntax left out (diffusers has none)
        from diffusers import EulerDiscreteScheduler

        ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
        want = ref(plain[0], negative_prompt="xyother", num_inference_steps=3, height=64, width=64,
                   generator=torch.Generator().manual_seed(2), output_type="latent").images
        result = ours.generate(plain[0], "xyother", steps=3, seed=2, width=64, height=64, output_type="latent")
        assert relerr(result, want) < 2e-3
    finally:
        ref.unload_textual_inversion()
    sha = lambda f: hashlib.sha256((folder / f).read_bytes()).hexdigest()[:12]
    text = result.request.parameters("tiny")
    assert f'TI hashes: "a1111-style: {sha("a1111-style.pt")}, stpar: {sha("stpar.safetensors")}, ' \
           f'xyother: {sha("xyother.safetensors")}"' in text


def test_weighted_embedding_runs(setup):
    ours, _, _ = setup
    assert ours.encode_prompt(PROMPTS).shape == (2, 77, WIDTH)


def test_bad_embeddings_are_one_line_before_denoising(setup, tmp_path):
    ours, _, folder = setup
    ours.generate("a cat", steps=1, seed=1, width=64, height=64, output_type="latent")  # broken.pt is never read
    steps = []
    with pytest.raises(sdgen.SdgenError, match="broken.pt: not a PyTorch checkpoint"):
        ours.generate("a broken cat", steps=1, seed=1, width=64, height=64, output_type="latent",
                      progress=lambda i, n: steps.append(i))
    save_file({"emb_params": torch.zeros(2, 768)}, tmp_path / "wide.safetensors")
    save_file({"clip_l": torch.zeros(1, WIDTH), "clip_g": torch.zeros(1, 1280)}, tmp_path / "xl.safetensors")
    save_file({"emb_params": torch.full((1, WIDTH), float("nan"))}, tmp_path / "nan.safetensors")
    other = sdgen.load(ours.checkpoint, embedding_dirs=[tmp_path])
    for name, message in [("wide", "768-wide vectors .*takes 48"), ("xl", "an SDXL embedding"), ("nan", "NaN")]:
        with pytest.raises(sdgen.SdgenError, match=f"{name}.safetensors: .*{message}"):
            other.generate(f"a {name} cat", steps=1, seed=1, width=64, height=64, output_type="latent",
                           progress=lambda i, n: steps.append(i))
    assert steps == []
    with pytest.raises(sdgen.SdgenError, match="embeddings folder not found"):
        sdgen.load(ours.checkpoint, embedding_dirs=[tmp_path / "missing"])
