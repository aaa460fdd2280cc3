"""A1111 prompt semantics: emphasis parsing, <lora:...> tags, chunks of 75 with comma backtracking, BREAK, the
"Original" emphasis, negative prompts evened with the empty prompt. Expected values are written out here."""

import pytest
import torch

import sdgen
from reference import relerr
from sdgen.nets.tokenizer import Tokenizer
from sdgen.prompts import (Chunk, NetworkTag, SpecialIds, chunk_ids, chunk_prompt, emphasize, encode_chunks, even,
                           extract_networks, parse_attention)

TOK = Tokenizer.default()
COMMA = TOK.vocab[",</w>"]
CAT, DOG = TOK.encode("cat")[0], TOK.encode("dog")[0]


@pytest.mark.parametrize("text,expected", [   # A1111's own doctests for parse_prompt_attention
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[[blurry]] (cat : 1.5 )", [("blurry", (1 / 1.1) * (1 / 1.1)), (" ", 1.0), ("cat ", 1.5)]),
    ("unbalanced] close)", [("unbalanced] close)", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),   # inside brackets BREAK is a word
    ("", [("", 1.0)]),
])
def test_parse_attention_is_a1111s(text, expected):
    assert parse_attention(text) == expected


def test_network_tags():
    text, tags = extract_networks("masterpiece, <lora:add_detail:0.7>, <lora:b:0.5:1> <lyco:c:te=0.2:unet=0.3><lora:d>")
    assert text == "masterpiece, ,  "
    assert tags == [NetworkTag("lora", "add_detail", 0.7, 0.7), NetworkTag("lora", "b", 0.5, 1.0),
                    NetworkTag("lora", "c", 0.2, 0.3), NetworkTag("lora", "d", 1.0, 1.0)]
    assert tags[1].text == "<lora:b:0.5:1>" and tags[3].text == "<lora:d:1>"
    for bad, message in [("<lora:x:abc>", "not a weight"), ("<lora:x:1:dyn=4>", "dyn"), ("<lora:x:inf>", "finite")]:
        with pytest.raises(sdgen.SdgenError, match=message):
            extract_networks(bad)


def test_chunks_and_comma_backtracking():
    one = chunk_prompt("a (red:1.5) hat", TOK.encode, COMMA)
    assert [c.ids for c in one] == [TOK.encode("a red hat")]
    assert one[0].weights == [1.0, 1.5, 1.0]
    # 70 cats, a comma, 10 dogs: the chunk fills at the 4th dog; its comma is 5 tokens back (<= 20), so the
    # 4 dogs move on: [70 cats, comma] and [10 dogs]
    chunks = chunk_prompt("cat " * 70 + ", " + "dog " * 10, TOK.encode, COMMA)
    assert [c.ids for c in chunks] == [[CAT] * 70 + [COMMA], [DOG] * 10]
    # a comma 25 tokens back is too far: a hard cut at 75
    chunks = chunk_prompt("cat " * 50 + ", " + "dog " * 40, TOK.encode, COMMA)
    assert [c.ids for c in chunks] == [[CAT] * 50 + [COMMA] + [DOG] * 24, [DOG] * 16]
    assert [c.ids for c in chunk_prompt("cat " * 80, TOK.encode, COMMA)] == [[CAT] * 75, [CAT] * 5]
    assert [c.ids for c in chunk_prompt("cat " * 75, TOK.encode, COMMA)] == [[CAT] * 75]
    # BREAK: a new chunk; a leading BREAK leaves an empty first chunk, a trailing one adds nothing
    assert [c.ids for c in chunk_prompt("cat BREAK dog", TOK.encode, COMMA)] == [[CAT], [DOG]]
    assert [c.ids for c in chunk_prompt("BREAK dog", TOK.encode, COMMA)] == [[], [DOG]]
    assert [c.ids for c in chunk_prompt("cat BREAK", TOK.encode, COMMA)] == [[CAT]]
    assert [c.ids for c in chunk_prompt("(cat BREAK dog)", TOK.encode, COMMA)] == [TOK.encode("cat break dog")]
    assert [c.ids for c in chunk_prompt("", TOK.encode, COMMA)] == [[]]


def test_embedding_never_splits_across_chunks():
    name = TOK.encode("my-style")
    match = lambda tokens, pos: ([90000, 90001, 90002], len(name)) if tokens[pos:pos + len(name)] == name else None
    chunks = chunk_prompt("cat " * 74 + "my-style", TOK.encode, COMMA, match)
    assert [c.ids for c in chunks] == [[CAT] * 74, [90000, 90001, 90002]]


def test_chunk_ids_frame_and_padding():
    sd1 = SpecialIds(bos=49406, eos=49407, pad=49407)
    assert chunk_ids(Chunk([CAT, DOG], [1, 1]), sd1) == [49406, CAT, DOG] + [49407] * 74
    sd2 = SpecialIds(bos=49406, eos=49407, pad=0)            # OpenCLIP pads with 0 after the first EOS
    assert chunk_ids(Chunk([CAT, DOG], [1, 1]), sd2) == [49406, CAT, DOG, 49407] + [0] * 73
    assert chunk_ids(Chunk([CAT] * 75, [1] * 75), sd2) == [49406] + [CAT] * 75 + [49407]


def test_original_emphasis_and_batch_padding():
    """Each chunk: z * w, then * (mean(z) / mean(z * w)) per prompt; the empty prompt's chunk pads a shorter prompt."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50000, 6, generator=g)
    encode_chunk = lambda ids: (table[ids] + torch.arange(77)[None, :, None] * 0.01, None)
    special = SpecialIds(49406, 49407, 49407)
    long = [Chunk([CAT] * 75, [1.2] * 75), Chunk([DOG, DOG], [0.5, 1.0])]
    cond, pooled = encode_chunks([long, [Chunk([CAT], [1.0])]], encode_chunk, special)
    assert cond.shape == (2, 154, 6) and pooled is None
    z = encode_chunk(torch.tensor([chunk_ids(long[1], special)]))[0]
    w = torch.ones(1, 77)
    w[0, 1] = 0.5
    expected = z * w[..., None] * (z.mean() / (z * w[..., None]).mean())
    assert torch.allclose(cond[:1, 77:], expected, atol=1e-6)
    empty = encode_chunk(torch.tensor([chunk_ids(Chunk(), special)]))[0]
    assert torch.equal(cond[1:, 77:], empty)                 # the short prompt's second chunk: the empty prompt
    assert torch.equal(emphasize(z, torch.ones(1, 77)), z)    # all weights 1: untouched
    a, b = even(cond[1:, :77], cond[:1], empty)
    assert a.shape == b.shape == (1, 154, 6) and torch.equal(a[:, 77:], empty)


@pytest.fixture(scope="module")
def ours(tiny):
    return sdgen.load(str(tiny[1]["diffusers"]))


def test_plain_prompt_is_todays_conditioning(ours, tiny):
    prompts = ["a red cube on a table", "", "cat " * 75]
    got = ours.encode_prompt(prompts)
    assert torch.equal(got, ours.text_encoder(ours.tokenize(prompts)).float())   # bit for bit
    want = tiny[0].encode_prompt(prompts, "cpu", 1, False)[0]
    assert got.shape == (3, 77, 48) and relerr(got, want) < 1e-4


def test_weighted_long_prompt_against_a1111_algorithm(ours, tiny):
    """The A1111 chunks and weights written out, encoded with transformers' text model, weighted by hand."""
    ref = tiny[0].text_encoder
    prompt = "cat " * 70 + ", (dog:1.5) " * 3 + "BREAK [cat]"
    got = ours.encode_prompt([prompt])
    # 70 cats, then ", dog" x3: the chunk is full (75) after the 3rd comma; the 3rd dog finds the last comma 1 token
    # back, so the cut is right after it and nothing moves: [70 cats , dog , dog ,] [dog]; BREAK; [cat] at 1/1.1
    rows = [([CAT] * 70 + [COMMA, DOG, COMMA, DOG, COMMA], [1.0] * 70 + [1.0, 1.5, 1.0, 1.5, 1.0]),
            ([DOG], [1.5]), ([CAT], [1 / 1.1])]
    parts = []
    for ids, weights in rows:
        full = torch.tensor([[49406, *ids, *[49407] * (76 - len(ids))]])
        w = torch.tensor([[1.0, *weights, *[1.0] * (76 - len(weights))]])
        with torch.no_grad():
            z = ref(full).last_hidden_state
        zw = z * w[..., None]
        parts.append(zw * (z.mean() / zw.mean()))
    want = torch.cat(parts, 1)
    assert got.shape == (1, 231, 48)
    assert relerr(got, want) < 1e-4


def test_long_negative_prompt_is_evened_with_the_empty_prompt(ours):
    req = dict(steps=2, seed=3, width=64, height=64, output_type="latent")
    got = ours.generate("a cat", "blurry, " * 60, **req)
    cond, uncond, empty = (ours.encode_prompt([p]) for p in ("a cat", "blurry, " * 60, ""))
    assert uncond.shape[1] == 154 and cond.shape[1] == 77
    # the same run with the conditioning built by hand: cond + empty chunk against the 2-chunk negative
    from sdgen.sampling import guidance
    from sdgen.sampling.schedule import plan

    p = plan("euler", 2, ours.scheduler)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    den = guidance.model_denoiser(guidance.cfg(ours.unet, torch.cat([cond, empty], 1), uncond, 7.5), ours.scheduler)
    with torch.inference_mode():
        for want in p.run(den, p.start(x, None), lambda like: torch.randn(like.shape)):
            pass
    assert relerr(got, want) < 1e-5
