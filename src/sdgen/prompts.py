"""The prompt language people copy from image sites, with AUTOMATIC1111's semantics (users compare against A1111).

    text, nets = extract_networks("masterpiece, (red hat:1.2) <lora:detail:0.7>")   # tags out, [NetworkTag]
    parse_attention("a (red:1.2) [hat]")  -> [("a ", 1.0), ("red", 1.2), (" ", 1.0), ("hat", 0.909...)]
    chunks = chunk_prompt(text, tokenizer.encode, comma_id, match_embedding)      # [Chunk], 75 ids at most each
    cond, pooled = encode_chunks([chunks, ...], encode_chunk, ids)                 # (B, 77*k, D), (B, P) or None

The steps follow A1111's `prompt_parser.parse_prompt_attention` and `sd_hijack_clip.tokenize_line`/`forward`:
  1. `<kind:args>` tags (extra networks) are cut out of the text;
  2. emphasis: `(x)` x1.1, `[x]` /1.1, `(x:w)` sets w, nesting multiplies, `\\(` literal, unclosed brackets close at
     the end; `BREAK` (outside brackets) ends a chunk;
  3. each piece is tokenized on its own; tokens fill chunks of 75; when a chunk is full and its last comma is at
     most 20 tokens back, the tokens after that comma move to the next chunk; a textual-inversion name puts its
     vectors in place of its tokens (never split across chunks);
  4. each chunk is encoded as BOS + 75 tokens (padded) + EOS on its own; the hidden states are multiplied token-wise
     by the weights and rescaled so that the chunk's mean is unchanged ("Original" emphasis); chunks concatenate
     on the token axis. Prompts of a batch with fewer chunks get the empty prompt's chunk appended.

A prompt without syntax and within 75 tokens is one chunk with all weights 1: exactly the plain encoding.
The text encoders are behind `encode_chunk(ids (B, 77)) -> (hidden (B, 77, D), pooled (B, P) or None)`, one per
family: SDXL concatenates its two encoders' hidden states on the last axis and takes the second one's pooled output
of the first chunk (as A1111 does).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from . import SdgenError

ROUND = 1.1            # (text)
SQUARE = 1 / 1.1       # [text]
CHUNK = 75             # tokens per chunk, without BOS/EOS
COMMA_BACKTRACK = 20   # A1111's default comma_padding_backtrack
BREAK = ("BREAK", -1.0)

# A1111 (1.8+): a weight may have spaces around it, "(cat : 1.2 )"
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_NETWORK = re.compile(r"<(\w+):([^>]+)>")


# ------------------------------------------------------------------------------------------ text


def parse_attention(text: str) -> list[tuple[str, float]]:
    """[(text, weight)]: A1111's parse_prompt_attention. A BREAK is ("BREAK", -1.0); runs of equal weight merge."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start, factor):
        for item in res[start:]:
            item[1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                multiply(round_open.pop(), float(weight))
            except ValueError:  # "(x:1.2.3)": A1111 raises here; one line instead
                raise SdgenError(f"prompt: {m.group(0).strip()!r} is not a weight (a number like 1.2)") from None
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    for start in round_open:      # unclosed brackets close at the end of the prompt
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


@dataclass(frozen=True)
class NetworkTag:
    """One `<kind:name:arg:...>` tag: `<lora:name:te_weight:unet_weight>` or `<lora:name:te=0.5:unet=1>`."""

    kind: str                 # "lora" (A1111's "lyco" is the same thing), "hypernet", ...
    name: str
    te: float = 1.0           # text-encoder multiplier
    unet: float = 1.0         # UNet multiplier

    @property
    def text(self) -> str:
        weights = _num(self.te) if self.te == self.unet else f"{_num(self.te)}:{_num(self.unet)}"
        return f"<{self.kind}:{self.name}:{weights}>"


def extract_networks(text: str) -> tuple[str, list[NetworkTag]]:
    """(the text with every `<kind:args>` tag removed, the tags), as A1111's extra_networks.parse_prompt: the tag is
    replaced by nothing (spaces and commas around it stay). Weights: positional te, unet (unet defaults to te), or
    named te=, unet=; A1111's dyn= (a rank cut) is refused rather than ignored."""
    tags: list[NetworkTag] = []

    def found(m):
        kind, args = m.group(1), m.group(2).split(":")
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        name = positional[0].strip() if positional else ""
        where = f"<{m.group(1)}:{m.group(2)}>"
        if not name:
            raise SdgenError(f"prompt: {where} names no network")
        unknown = sorted(set(named) - {"te", "unet"})
        if unknown:
            raise SdgenError(f"prompt: {where}: sdgen does not support {unknown[0]!r}= (only te= and unet=)")
        if len(positional) > 3:
            raise SdgenError(f"prompt: {where}: too many weights (name, text-encoder weight, UNet weight)")
        te = _weight(positional[1] if len(positional) > 1 else "1", where)
        te = _weight(named["te"], where) if "te" in named else te
        unet = _weight(positional[2], where) if len(positional) > 2 else te
        unet = _weight(named["unet"], where) if "unet" in named else unet
        tags.append(NetworkTag("lora" if kind == "lyco" else kind, name, te, unet))
        return ""

    return _NETWORK.sub(found, text), tags


def _weight(text: str, where: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise SdgenError(f"prompt: {where}: {text.strip()!r} is not a weight (a number like 0.8)") from None
    if not math.isfinite(w):
        raise SdgenError(f"prompt: {where}: the weight must be a finite number")
    return w


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


# ------------------------------------------------------------------------------------------ chunks


@dataclass
class Chunk:
    """Up to 75 token ids and their weights. Ids at or above the vocabulary size are textual-inversion vectors
    (rows of the extra table given to encode_chunk)."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


# (ids, position) -> (placeholder ids for the embedding's vectors, how many prompt tokens its name took) or None
EmbeddingMatch = Callable[[list[int], int], "tuple[list[int], int] | None"]


def chunk_prompt(text: str, encode: Callable[[str], list[int]], comma_id: int | None,
                 match: EmbeddingMatch | None = None, backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """The chunks of one prompt (tags already removed): A1111's tokenize_line."""
    chunks: list[Chunk] = []
    chunk = Chunk()
    last_comma = -1

    def next_chunk():
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = Chunk(), -1

    for piece, weight in parse_attention(text):
        if (piece, weight) == BREAK:
            next_chunk()
            continue
        tokens = encode(piece)
        pos = 0
        while pos < len(tokens):
            token = tokens[pos]
            if token == comma_id:
                last_comma = len(chunk.ids)
            elif backtrack and len(chunk.ids) == CHUNK and last_comma != -1 and len(chunk.ids) - last_comma <= backtrack:
                cut = last_comma + 1   # the words after the comma move to the next chunk
                moved = Chunk(chunk.ids[cut:], chunk.weights[cut:])
                del chunk.ids[cut:], chunk.weights[cut:]
                next_chunk()
                chunk = moved
            if len(chunk.ids) == CHUNK:
                next_chunk()
            found = match(tokens, pos) if match is not None else None
            if found is None:
                chunk.ids.append(token)
                chunk.weights.append(weight)
                pos += 1
                continue
            vectors, used = found
            if len(chunk.ids) + len(vectors) > CHUNK:   # an embedding is never split across chunks
                next_chunk()
            chunk.ids += vectors
            chunk.weights += [weight] * len(vectors)
            pos += used
    if chunk.ids or not chunks:
        next_chunk()
    return chunks


@dataclass(frozen=True)
class SpecialIds:
    """The tokenizer's frame: BOS, EOS, and what fills the row after EOS (CLIP-L: EOS again; OpenCLIP/SD2: 0)."""

    bos: int
    eos: int
    pad: int


def chunk_ids(chunk: Chunk, special: SpecialIds) -> list[int]:
    """77 ids: BOS, the chunk's ids, EOS up to 75, EOS; after the first EOS the pad id (A1111's SD2 rule)."""
    body = chunk.ids + [special.eos] * (CHUNK - len(chunk.ids))
    ids = [special.bos, *body, special.eos]
    first_eos = 1 + len(chunk.ids)
    return ids[: first_eos + 1] + [special.pad] * (len(ids) - first_eos - 1)


def emphasize(hidden: Tensor, weights: Tensor) -> Tensor:
    """A1111's "Original" emphasis: (B, 77, D) hidden states times (B, 77) weights, then rescaled so that each row's
    mean is its mean before weighting. (A1111 takes one mean over its whole batch; one per prompt keeps an image
    independent of what else is in the batch, and equals A1111's for the usual batch of one prompt.)"""
    hidden = hidden.float()
    if bool((weights == 1).all()):
        return hidden
    before = hidden.mean(dim=(1, 2), keepdim=True)
    out = hidden * weights[:, :, None].to(hidden)
    return out * (before / out.mean(dim=(1, 2), keepdim=True))


def encode_chunks(batch: list[list[Chunk]], encode_chunk: Callable[[Tensor], tuple[Tensor, Tensor | None]],
                  special: SpecialIds, device=None, min_chunks: int = 1) -> tuple[Tensor, Tensor | None]:
    """(B, 77*k, D) conditioning and the first chunk's pooled output (B, P) or None: every prompt's chunks encoded
    as A1111 does; prompts with fewer than k chunks get the empty prompt's chunk (k = the most chunks in the batch,
    at least `min_chunks`)."""
    k = max(min_chunks, *(len(c) for c in batch))
    empty = Chunk()
    parts, pooled = [], None
    for i in range(k):
        rows = [chunks[i] if i < len(chunks) else empty for chunks in batch]
        ids = torch.tensor([chunk_ids(c, special) for c in rows], dtype=torch.long, device=device)
        weights = torch.tensor([[1.0, *c.weights, *[1.0] * (CHUNK + 1 - len(c.weights))] for c in rows])
        hidden, pool = encode_chunk(ids)
        if i == 0:
            pooled = pool
        parts.append(emphasize(hidden, weights.to(hidden.device)))
    return torch.cat(parts, dim=1), pooled


def even(cond: Tensor, uncond: Tensor, empty: Tensor) -> tuple[Tensor, Tensor]:
    """Prompt and negative prompt with different chunk counts: the shorter gets the empty prompt's encoding
    (1, 77, D) appended until both have as many tokens (A1111's pad_cond_uncond)."""
    n, m = cond.shape[1], uncond.shape[1]
    if n == m:
        return cond, uncond
    pad = lambda x, count: torch.cat([x, empty.to(x).expand(x.shape[0], -1, -1).repeat(1, count, 1)], dim=1)
    per = empty.shape[1]
    return (pad(cond, (m - n) // per), uncond) if n < m else (cond, pad(uncond, (n - m) // per))
