"""Tokenizer and CLIP text encoder against transformers' CLIPTokenizer / CLIPTextModel."""

import json
import time

import pytest
import torch

import reference
from sdgen import SdgenError
from sdgen.nets.clip import CLIPConfig, CLIPTextModel, diffusers_renames, normalize_keys
from sdgen.nets.tokenizer import Tokenizer

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "   ",
    "Hello, World! 123 4.5e-3 1,000,000 #hashtag @user",
    "don't stop, it's what we're doing; they've I'm you'll he'd DON'T IT'S ''s !'s",
    "café crème, naïve résumé, Ångström, ÉCOLE, straße, ΟΔΟΣ, İstanbul",
    "cafe\u0301 (decomposed accent), ﬁ ligature, ½ ² Ⅻ ٣",
    "日本語のプロンプト 한국어 中文提示",
    "emoji 🙂👍🏽🚀 and ❤️ hearts",
    "runs  of   spaces\tand\ttabs\nand\n\nnewlines\r\n \u00a0nbsp \u3000ideographic \u200bzwsp",
    "MiXeD CaSe PrOmPt WITH CAPS",
    "(masterpiece:1.2), [bad hands], ((best quality)), {blue|red} eyes, <lora:foo:0.8>",
    "see https://example.com/path?q=1&x=%20y#frag and www.test.org",
    "literal <|endoftext|> and <|startoftext|> and <|EndOfText|>!! tokens",
    "trailing punctuation!!! ??? ... --- ___ ***",
    " ".join(f"word{i} token" for i in range(120)),  # far past 77 tokens
]


def reference_ids(tok, prompts):
    return torch.tensor(tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids)


@pytest.fixture(scope="module")
def ref_tokenizer(tmp_path_factory):
    return reference.clip_tokenizer(tmp_path_factory.mktemp("clip_tok"))


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_matches_transformers(ref_tokenizer):
    ours = Tokenizer.default()
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.max_length) == (49406, 49407, 49407, 77)
    got = ours(PROMPTS)
    assert got.shape == (len(PROMPTS), 77) and got.dtype == torch.long
    want = reference_ids(ref_tokenizer, PROMPTS)
    for prompt, g, w in zip(PROMPTS, got, want):
        assert g.tolist() == w.tolist(), prompt
    # encode() is the bare ids, untruncated
    for prompt in PROMPTS:
        assert ours.encode(prompt) == ref_tokenizer(prompt, add_special_tokens=False).input_ids, prompt
    long = ours.encode(PROMPTS[-1])
    assert len(long) > 200 and got[-1, -1] == ours.eos_id and got[-1, 1:76].tolist() == long[:75]


def test_tokenizer_fuzz(ref_tokenizer):
    """Random strings over an alphabet of the awkward cases: classes of characters, contractions, specials."""
    import random

    alphabet = list("aAsStTdDlLmMrReEvV' \t\n\x0b\x1c\xa0\u3000\u2028!?.,:;()[]<>|_=*/\"#%~0123456789²½éÉñßİΣς日한🙂\u0301") + [
        "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "'ll", "'RE", "ΟΔΟΣ", "(cat:1.2)"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25))) for _ in range(2000)]
    ours = Tokenizer.default()
    want = ref_tokenizer(texts, add_special_tokens=False).input_ids
    bad = [t for t, w in zip(texts, want) if ours.encode(t) != w]
    assert not bad, bad[:5]


def test_tokenizer_from_folder(tmp_path, ref_tokenizer):
    folder = reference.write_clip_tokenizer_files(tmp_path / "tokenizer")
    ours = Tokenizer.from_folder(folder)
    assert ours(PROMPTS).tolist() == reference_ids(ref_tokenizer, PROMPTS).tolist()


def test_tokenizer_pad_token_from_folder(tmp_path):
    """SD2's tokenizer pads with "!" (id 0); like transformers, the pad token is then a special token in text too."""
    from transformers import CLIPTokenizer

    folder = reference.write_clip_tokenizer_files(tmp_path / "tokenizer")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": {"content": "!"}}))
    ref = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)
    ours = Tokenizer.from_folder(folder)
    assert ours.pad_id == 0
    prompts = ["a red cube", "wow!!! hi! ok", PROMPTS[-1]]
    got = ours(prompts)
    assert got.tolist() == reference_ids(ref, prompts).tolist()
    assert got[0, 5:].eq(0).all()

    # transformers >= 5 saves tokenizer.json instead of vocab.json + merges.txt
    saved = tmp_path / "saved"
    ref.save_pretrained(saved)
    assert Tokenizer.from_folder(saved)(prompts).tolist() == got.tolist()


def test_tokenizer_errors_and_speed(tmp_path):
    with pytest.raises(SdgenError):
        Tokenizer.from_folder(tmp_path / "missing")
    start = time.perf_counter()
    tok = Tokenizer.default()
    load = time.perf_counter() - start
    start = time.perf_counter()
    tok([PROMPTS[-1]] * 8)
    encode = time.perf_counter() - start
    assert load < 1.5 and encode < 0.5, (load, encode)  # generous: the test machine is shared


# ---------------------------------------------------------------- text encoder


def load_ours(ref_model, config):
    sd = ref_model.state_dict()
    names = normalize_keys(sd.keys())
    tensors = {names[k]: v for k, v in sd.items() if names[k] is not None}
    with torch.device("meta"):
        ours = CLIPTextModel(config)
    ours.load_state_dict(tensors, assign=True, strict=True)
    return ours.eval()


@pytest.fixture(scope="module")
def tiny_pair(ref_tokenizer):
    ref = reference.randomize_(reference.tiny_text_encoder())
    config = CLIPConfig.from_diffusers(ref.config.to_dict())
    assert config == CLIPConfig(hidden_size=48, intermediate_size=96, num_layers=2, num_heads=12)
    ids = reference_ids(ref_tokenizer, PROMPTS[:6])
    return ref, load_ours(ref, config), ids


def test_text_encoder_matches_transformers(tiny_pair):
    ref, ours, ids = tiny_pair
    with torch.no_grad():
        want = ref(ids).last_hidden_state
        got = ours(ids)
    assert got.shape == want.shape == (6, 77, 48)
    assert reference.relerr(got, want) < 1e-4


def test_text_encoder_clip_skip(tiny_pair):
    ref, ours, ids = tiny_pair
    with torch.no_grad():
        hidden = ref(ids, output_hidden_states=True).hidden_states
        want = ref.final_layer_norm(hidden[-2])
        got = ours(ids, clip_skip=2)
    assert reference.relerr(got, want) < 1e-4
    assert reference.relerr(got, ours(ids)) > 1e-2  # it really is a different layer
    with pytest.raises(SdgenError):
        ours(ids, clip_skip=3)


def test_text_encoder_bf16(tiny_pair):
    ref, ours, ids = tiny_pair
    with torch.no_grad():
        want = ours(ids)
        got = ours.to(torch.bfloat16)(ids)
        ours.float()
    assert got.dtype == torch.bfloat16
    assert reference.relerr(got.float(), want) < 5e-2


def test_keys_and_renames():
    config = CLIPConfig(hidden_size=48, intermediate_size=96, num_layers=2, num_heads=12)
    with torch.device("meta"):
        ours = CLIPTextModel(config)
    keys = set(ours.state_dict())
    assert not list(ours.buffers())
    renames = diffusers_renames(config)
    assert set(renames.values()) == keys
    assert renames["encoder.layers.1.mlp.fc2.bias"] == "text_model.encoder.layers.1.mlp.fc2.bias"
    old = normalize_keys(["embeddings.position_ids", "embeddings.token_embedding.weight",
                          "text_model.final_layer_norm.weight", "text_model.embeddings.position_ids"])
    assert old == {"embeddings.position_ids": None,
                   "embeddings.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                   "text_model.final_layer_norm.weight": "text_model.final_layer_norm.weight",
                   "text_model.embeddings.position_ids": None}


def test_text_encoder_sd15_size(ref_tokenizer):
    """The real SD1.5 text encoder size (openai/clip-vit-large-patch14's text tower) with random weights."""
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as RefModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, hidden_act="quick_gelu")
    ref = RefModel(cfg).eval()  # transformers' own random init: randomize_ at this size costs seconds
    ours = load_ours(ref, CLIPConfig.from_diffusers(ref.config.to_dict()))
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert CLIPConfig.from_shapes(shapes) == CLIPConfig()
    ids = reference_ids(ref_tokenizer, PROMPTS[:1])
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        assert reference.relerr(ours(ids), out.last_hidden_state) < 1e-4
        assert reference.relerr(ours(ids, clip_skip=2), ref.final_layer_norm(out.hidden_states[-2])) < 1e-4
