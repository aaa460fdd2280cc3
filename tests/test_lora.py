"""LoRA: kohya, PEFT, LoCon, LoHa, LoKr files against diffusers' load_lora_weights (or the formulas), several at once,
`<lora:...>` tags, exact restoring, LCM-LoRA, A1111 `Lora hashes`, bad files in one line."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

import sdgen
from models import reference_pipeline
from reference import relerr
from sdgen.lora import read_lora

PROMPT, SEED = "a red cube on a table", 7
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
LCM_TARGETS = TARGETS + ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv",
                         "upsamplers.0.conv", "conv_in", "conv_out", "time_embedding.linear_1")


def layers(module, targets):
    """(name, layer) of every Linear/Conv2d whose name ends with one of `targets`."""
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.endswith(targets)]


def kohya_lora(ref, rank=4, seed=0, alpha=2.0, targets=TARGETS, te=True, scale=0.3):
    """A kohya-layout LoRA over the reference's UNet (diffusers module names) and text encoder, random up and down.
    Convs with a 3x3 kernel get 3x3 downs (LoCon)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    groups = [("lora_unet_", layers(ref.unet, targets))]
    if te:
        groups.append(("lora_te_", layers(ref.text_encoder, TE_TARGETS)))
    for prefix, found in groups:
        for name, m in found:
            key = prefix + name.replace(".", "_")
            if isinstance(m, torch.nn.Conv2d):
                down = (rank, m.in_channels, *m.kernel_size)
                up = (m.out_channels, rank, 1, 1)
            else:
                down, up = (rank, m.in_features), (m.out_features, rank)
            out[key + ".lora_down.weight"] = torch.randn(down, generator=g) * scale
            out[key + ".lora_up.weight"] = torch.randn(up, generator=g) * scale
            out[key + ".alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    """(ours, a fresh diffusers pipeline with the same weights, folder of LoRA files)."""
    folder = tmp_path_factory.mktemp("loras")
    ref = reference_pipeline(folder / "ref")
    ours = sdgen.load(str(tiny[1]["safetensors"]), lora_dirs=[folder])
    save_file(kohya_lora(ref, seed=1), folder / "style_a.safetensors", metadata={"ss_network_dim": "4"})
    save_file(kohya_lora(ref, seed=2, rank=2, alpha=1.0, te=False), folder / "style_b.safetensors")
    return ours, ref, folder


def reference_latents(ref, loras, steps=4, **kw):
    """diffusers with `loras` [(file, weight or {unet:, text_encoder:})] loaded as adapters."""
    from diffusers import EulerDiscreteScheduler
    from safetensors.torch import load_file

    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    try:
        for i, (path, _) in enumerate(loras):
            ref.load_lora_weights(load_file(path), adapter_name=f"a{i}")
        if loras:
            ref.set_adapters([f"a{i}" for i in range(len(loras))], adapter_weights=[w for _, w in loras])
        return ref(PROMPT, negative_prompt="blurry", num_inference_steps=steps, height=64, width=64,
                   generator=torch.Generator().manual_seed(SEED), output_type="latent", **kw).images
    finally:
        ref.unload_lora_weights()


def ours_latents(ours, steps=4, **kw):
    return ours.generate(PROMPT, "blurry", steps=steps, seed=SEED, width=64, height=64, output_type="latent", **kw)


def test_kohya_two_loras_match_diffusers(setup):
    ours, ref, folder = setup
    base = ours_latents(ours)
    got = ours_latents(ours, loras=[(folder / "style_a.safetensors", 0.5), (folder / "style_b.safetensors", 1.0)])
    want = reference_latents(ref, [(folder / "style_a.safetensors", 0.5), (folder / "style_b.safetensors", 1.0)])
    assert relerr(got, want) < 2e-3
    assert relerr(got, base) > 1e-2          # the LoRAs really change the image
    # the text encoder alone, and the UNet alone, at component tolerance
    ref.load_lora_weights(__import__("safetensors.torch").torch.load_file(folder / "style_a.safetensors"), adapter_name="x")
    try:
        ref.set_adapters(["x"], adapter_weights=[1.0])
        ours.patcher.set(ours.networks(), ours._open_loras([(str(folder / "style_a.safetensors"), 1.0, 1.0)]))
        ids = ours.tokenize([PROMPT])
        with torch.no_grad():
            assert relerr(ours.text_encoder(ids), ref.text_encoder(ids).last_hidden_state) < 1e-4
            x, ctx = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 77, 48)
            assert relerr(ours.unet(x, torch.tensor(500.0), ctx), ref.unet(x, 500, ctx).sample) < 1e-4
    finally:
        ref.unload_lora_weights()


def test_prompt_tag_with_separate_weights_matches_diffusers(setup):
    ours, ref, folder = setup
    got = ours.generate(PROMPT + " <lora:style_a:1.0:0.5>", "blurry", steps=4, seed=SEED, width=64, height=64,
                        output_type="latent")
    want = reference_latents(ref, [(folder / "style_a.safetensors", {"unet": 0.5, "text_encoder": 1.0})])
    assert relerr(got, want) < 2e-3
    text = got.request.parameters("tiny")
    sha = hashlib.sha256()
    raw = (folder / "style_a.safetensors").read_bytes()
    sha.update(raw[8 + int.from_bytes(raw[:8], "little"):])        # kohya's "addnet" hash: the data after the header
    assert text.split("\n")[0] == PROMPT + " <lora:style_a:1.0:0.5>"
    assert f'Lora hashes: "style_a: {sha.hexdigest()[:12]}"' in text


def test_restoring_is_exact_and_copies_only_touched_layers(setup):
    ours, _, folder = setup
    plain = ours_latents(ours)                      # (earlier tests leave LoRAs applied: this request removes them)
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in ours.unet.state_dict().items()}
    ours_latents(ours, loras=[(folder / "style_b.safetensors", 1.0)])
    touched = {k for k, v in ours.unet.state_dict().items() if v.data_ptr() != ptrs[k]}
    assert len(touched) == len(read_lora(folder / "style_b.safetensors").modules)   # nothing else was copied
    assert all(k.endswith(".weight") for k in touched)
    again = ours_latents(ours)
    assert torch.equal(plain.latents, again.latents)                 # bit for bit
    assert all(torch.equal(v, before[k]) and v.data_ptr() == ptrs[k] for k, v in ours.unet.state_dict().items())


def peft_file(ref, path, seed=3, rank=4, alpha=8):
    """A diffusers/PEFT LoRA made with peft on copies of the reference UNet and text encoder, saved as diffusers
    saves it (with the LoraConfig in its lora_adapter_metadata)."""
    import copy

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet_cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                          init_lora_weights=False)
    te_cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    unet = inject_adapter_in_model(unet_cfg, copy.deepcopy(ref.unet))
    text = inject_adapter_in_model(te_cfg, copy.deepcopy(ref.text_encoder))
    StableDiffusionPipeline.save_lora_weights(
        path.parent, weight_name=path.name,
        unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=get_peft_model_state_dict(text),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict())
    return path


def test_peft_file_matches_diffusers(setup):
    ours, ref, folder = setup
    path = peft_file(ref, folder / "peft_style.safetensors")
    lora = read_lora(path)
    assert any(k.startswith("unet.") for k in lora.modules) and any(k.startswith("text_encoder.") for k in lora.modules)
    assert {m.alpha for m in lora.modules.values()} == {8.0}          # from lora_adapter_metadata: scale 8/4
    got = ours_latents(ours, loras=[("peft_style", 0.5)])           # a name in the LoRA folder
    from diffusers import EulerDiscreteScheduler

    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.load_lora_weights(folder, weight_name="peft_style.safetensors", adapter_name="p")
    try:
        ref.set_adapters(["p"], adapter_weights=[0.5])
        want = ref(PROMPT, negative_prompt="blurry", num_inference_steps=4, height=64, width=64,
                   generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    finally:
        ref.unload_lora_weights()
    assert relerr(got, want) < 2e-3
    assert relerr(got, ours_latents(ours)) > 1e-2


def test_lcm_lora_matches_diffusers_lcm_scheduler_fused(setup):
    """An LCM-LoRA touches every layer kind (3x3 convs, time embedding, resamplers): --sampler lcm --steps 4
    --guidance 1 against diffusers' LCMScheduler with the LoRA fused."""
    from diffusers import LCMScheduler
    from safetensors.torch import load_file

    ours, ref, folder = setup
    save_file(kohya_lora(ref, seed=5, targets=LCM_TARGETS, te=False, scale=0.2), folder / "lcm.safetensors")
    got = ours.generate(PROMPT + " <lora:lcm:1>", steps=4, guidance_scale=1.0, sampler="lcm", seed=SEED, width=64,
                        height=64, output_type="latent")
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.load_lora_weights(load_file(folder / "lcm.safetensors"), adapter_name="lcm")
    try:
        ref.fuse_lora()
        want = ref(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=64, width=64,
                   generator=torch.Generator().manual_seed(SEED), output_type="latent").images
        ref.unfuse_lora()
    finally:
        ref.unload_lora_weights()
    assert relerr(got, want) < 2e-3


# ---------------------------------------------------------------------------------------------- LyCORIS formulas


def _patched_delta(ours, path, key, weight=0.7):
    """The change a LoRA file makes to one of our UNet weights at `weight`."""
    ours.patcher.restore(ours.networks())
    base = ours.unet.get_parameter(key).detach().clone()
    ours.patcher.set(ours.networks(), ours._open_loras([(str(path), weight, weight)]))
    try:
        return ours.unet.get_parameter(key).detach() - base
    finally:
        ours.patcher.restore(ours.networks())


def test_loha_and_lokr_match_their_formulas(setup, tmp_path):
    ours, _, _ = setup
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(s, generator=g) * 0.3
    q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"      # (32, 32) linear
    conv = "input_blocks.1.0.in_layers.2.weight"                        # (32, 32, 3, 3) conv
    w1a, w1b, w2a, w2b = r(32, 4), r(4, 32), r(32, 4), r(4, 32)
    c1a, c1b, c2a, c2b = r(32, 2), r(2, 32 * 9), r(32, 2), r(2, 32 * 9)
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a": w1a,
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_b": w1b,
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w2_a": w2a,
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w2_b": w2b,
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(2.0),
               "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": c1a, "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_b": c1b,
               "lora_unet_down_blocks_0_resnets_0_conv1.hada_w2_a": c2a, "lora_unet_down_blocks_0_resnets_0_conv1.hada_w2_b": c2b,
               }, tmp_path / "loha.safetensors")
    # LoHa: (w1a @ w1b) * (w2a @ w2b) * alpha / rank; no alpha: scale 1
    assert relerr(_patched_delta(ours, tmp_path / "loha.safetensors", q), 0.7 * (w1a @ w1b) * (w2a @ w2b) * 2 / 4) < 1e-5
    want = 0.7 * ((c1a @ c1b) * (c2a @ c2b)).reshape(32, 32, 3, 3)
    assert relerr(_patched_delta(ours, tmp_path / "loha.safetensors", conv), want) < 1e-5

    k1, k2a, k2b, k2 = r(4, 8), r(8, 2), r(2, 4), r(8, 4, 3, 3)
    save_file({"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lokr_w1": k1,     # original (LDM) names
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lokr_w2_a": k2a,
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lokr_w2_b": k2b,
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0),
               "lora_unet_input_blocks_1_0_in_layers_2.lokr_w1": k1.clone(), "lora_unet_input_blocks_1_0_in_layers_2.lokr_w2": k2,
               }, tmp_path / "lokr.safetensors")
    # LoKr: kron(w1, w2a @ w2b) * alpha / rank (rank of the factored side); unfactored: scale 1
    want = 0.7 * torch.kron(k1, k2a @ k2b) * 1.0 / 2
    assert relerr(_patched_delta(ours, tmp_path / "lokr.safetensors", q), want) < 1e-5
    want = 0.7 * torch.kron(k1[:, :, None, None], k2)
    assert relerr(_patched_delta(ours, tmp_path / "lokr.safetensors", conv), want) < 1e-5


# ---------------------------------------------------------------------------------------------- bad input and info


def test_bad_loras_are_one_line_before_denoising(setup, tmp_path):
    ours, ref, folder = setup
    steps = []
    run = lambda prompt=PROMPT, **kw: ours.generate(prompt, steps=2, seed=1, width=64, height=64, output_type="latent",
                                                    progress=lambda i, n: steps.append(i), **kw)
    with pytest.raises(sdgen.SdgenError, match="unknown LoRA 'nope'"):
        run(prompt=PROMPT + " <lora:nope:0.5>")
    sdxl = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
    save_file(sdxl, tmp_path / "xl.safetensors")
    with pytest.raises(sdgen.SdgenError, match="xl.safetensors: a LoRA for SDXL"):
        run(loras=[(tmp_path / "xl.safetensors", 1.0)])
    misfit = kohya_lora(ref, te=False)
    key = next(k for k in misfit if k.endswith("attn2_to_k.lora_down.weight"))
    misfit[key] = torch.zeros(4, 1024)                                  # SD2's context width
    save_file(misfit, tmp_path / "misfit.safetensors")
    with pytest.raises(sdgen.SdgenError, match=r"misfit.safetensors: a LoRA for Stable Diffusion 2"):
        run(loras=[(tmp_path / "misfit.safetensors", 1.0)])
    misfit[key] = torch.zeros(4, 40)
    save_file(misfit, tmp_path / "misfit2.safetensors")
    with pytest.raises(sdgen.SdgenError, match=r"misfit2.safetensors: .*attn2_to_k' gives a \(32, 40\) update for a "
                                               r"\(32, 48\) weight"):
        run(loras=[(tmp_path / "misfit2.safetensors", 1.0)])
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(sdgen.SdgenError, match="broken.safetensors"):
        run(loras=[(tmp_path / "broken.safetensors", 1.0)])
    with pytest.raises(sdgen.SdgenError, match="weight"):
        run(prompt=PROMPT + " <lora:style_a:lots>")
    with pytest.raises(sdgen.SdgenError, match="finite number"):
        run(loras=[("style_a", float("nan"))])
    assert steps == []
    with pytest.raises(sdgen.SdgenError, match="LoRA folder not found"):
        sdgen.load("demo", lora_dirs=[tmp_path / "missing"])


def test_cli_lora_info_and_from_png(setup, tiny, tmp_path, capsys):
    from PIL import Image

    from sdgen.cli import main

    ours, _, folder = setup
    assert main(["info", str(folder / "style_a.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "format:     LoRA, kohya key names" in out and "rank:       4" in out and "144 (12 text_encoder, 132 unet)" in out
    common = ["--model", str(tiny[1]["safetensors"]), "--steps", "2", "-W", "64", "-H", "64", "--seed", "3",
              "--precision", "fp32", "--lora-dir", str(folder)]
    assert main(["generate", "a cat", "--lora", f"{folder / 'style_b.safetensors'}:0.8", "-o",
                 str(tmp_path / "a.png"), *common]) == 0
    text = Image.open(tmp_path / "a.png").text["parameters"]
    assert text.startswith("a cat<lora:style_b:0.8>\n") and "Lora hashes: \"style_b: " in text
    assert main(["generate", "--from-png", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png"), *common]) == 0
    a, b = (Image.open(tmp_path / n) for n in ("a.png", "b.png"))
    assert list(a.getdata()) == list(b.getdata())
    assert main(["generate", "a cat <lora:missing:1>", "-o", str(tmp_path / "c.png"), *common]) == 1
    assert "unknown LoRA 'missing'" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()
