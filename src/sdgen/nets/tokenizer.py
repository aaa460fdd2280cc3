"""CLIP's byte-level BPE tokenizer, giving the ids of transformers' `CLIPTokenizer`.

Pipeline (what the reference does, in order):
  1. special tokens (bos, eos, unk, pad and any added tokens) are cut out of the *raw* text and map to their ids;
  2. the rest is NFC-normalised, whitespace runs collapse, and it is lower-cased;
  3. it is split into pieces: `<|startoftext|>`/`<|endoftext|>`, the contractions 's 't 're 've 'm 'll 'd,
     runs of letters, single numeric characters, runs of other non-space characters;
  4. each piece's UTF-8 bytes are mapped to printable characters and merged by BPE, the last symbol carrying `</w>`.
ftfy is not used (the reference does not use it either).
"""

import gzip
import re
import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from .. import SdgenError
from ..formats import read_json
from ..formats.jsons import MAX_JSON

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
# The first 48894 merges of the shipped file are CLIP's (49152 - 256 bytes - 2 special tokens, minus the header).
N_MERGES = 49152 - 256 - 2

# Whitespace as the reference's regex engine (Oniguruma) sees it: \t-\r, NEL and the Unicode separators.
# Python's str.isspace() also counts U+001C..U+001F, which the reference treats as ordinary symbols.
_SPACE_CONTROLS = frozenset("\t\n\v\f\r\x85")
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
_SPECIAL_PIECES = {  # what the reference's second (GPT-2 style) split makes of these pieces
    BOS: ("<|", "startoftext", "|>"),
    EOS: ("<|", "endoftext", "|>"),
}


def _byte_chars():
    """Byte -> printable character, the GPT-2/CLIP table: printable Latin-1 bytes map to themselves, the rest to
    U+0100 onwards. Returned in vocabulary order (the printable bytes first), which is not byte order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in bs}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TABLE = _byte_chars()
_BYTE_CHARS = [_BYTE_TABLE[b] for b in range(256)]  # indexed by byte
_VOCAB_CHARS = list(_BYTE_TABLE.values())  # vocabulary order


@lru_cache(maxsize=None)
def _kind(c):
    """'s' whitespace, 'L' letter, 'N' number, 'o' anything else."""
    if c in _SPACE_CONTROLS:
        return "s"
    cat = unicodedata.category(c)
    if cat in ("Zs", "Zl", "Zp"):
        return "s"
    return cat[0] if cat[0] in "LN" else "o"


def _pieces(text):
    """Normalised, lower-cased text -> pre-tokenised pieces (step 3 above)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "<":
            special = next((s for s in _SPECIAL_PIECES if text.startswith(s, i)), None)
            if special:
                out.extend(_SPECIAL_PIECES[special])
                i += len(special)
                continue
        if c == "'":
            tail = next((t for t in _CONTRACTIONS if text.startswith(t, i + 1)), None)
            if tail:
                out.append("'" + tail)
                i += 1 + len(tail)
                continue
        kind = _kind(c)
        if kind == "s":
            i += 1
            continue
        j = i + 1
        if kind != "N":  # numbers are single characters; letters and symbols run on
            while j < n and _kind(text[j]) == kind:
                j += 1
        out.append(text[i:j])
        i = j
    return out


def _normalize(text):
    # The reference lower-cases character by character, so every Σ becomes σ; str.lower() would give a
    # word-final Σ the final form ς.
    return unicodedata.normalize("NFC", text).replace("Σ", "σ").lower()


class Tokenizer:
    """Text -> CLIP token ids. `Tokenizer.default()` for the shipped vocabulary, `from_folder` for a diffusers one."""

    def __init__(self, vocab, merges, pad="<|endoftext|>", specials=(), max_length=MAX_LENGTH):
        # vocab: token -> id; merges: list of (a, b) pairs in priority order.
        self.vocab = vocab
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        specials = {BOS, EOS, pad, *specials}
        missing = [s for s in specials if s not in vocab]
        if missing:
            raise SdgenError(f"tokenizer vocabulary lacks the special token(s) {', '.join(missing)}")
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad]
        self.max_length = max_length
        self._special_ids = {s: vocab[s] for s in specials}
        # Longest first so that the alternation finds the leftmost-longest special token, like the reference.
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
        self._cache = {}

    @classmethod
    def default(cls):
        raw = resources.files("sdgen").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
        lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        tokens = _VOCAB_CHARS + [c + "</w>" for c in _VOCAB_CHARS] + ["".join(m) for m in merges] + [BOS, EOS]
        return cls({t: i for i, t in enumerate(tokens)}, merges)

    @classmethod
    def from_folder(cls, folder):
        """A diffusers `tokenizer/` folder: vocab.json + merges.txt (or tokenizer.json) and the special tokens. A file
        that is not what transformers writes (not JSON, wrong shapes, merges whose tokens the vocabulary lacks) is one
        line naming it."""
        folder = Path(folder)
        if not folder.is_dir():
            raise SdgenError(f"tokenizer folder {folder} does not exist")
        added, tokens, max_length = {}, {}, MAX_LENGTH
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter wins, as in transformers
            if (folder / name).is_file():
                config, where = read_json(folder / name), f"{folder.name}/{name}"
                if "added_tokens_decoder" in config:
                    added = _added_tokens(config, where)
                tokens.update({k: _token(config[k], where, k) for k in ("bos_token", "eos_token", "unk_token",
                                                                        "pad_token") if k in config})
                n = config.get("model_max_length", max_length)
                max_length = n if type(n) is int and 2 < n <= 4096 else MAX_LENGTH  # huge: "no limit"
        pad = tokens.pop("pad_token", None) or EOS
        specials = list(added) + [t for t in tokens.values() if t]

        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            where = f"{folder.name}/vocab.json"
            vocab = _vocab(read_json(folder / "vocab.json"), where)
            merges = _merges(folder / "merges.txt", f"{folder.name}/merges.txt")
        elif (folder / "tokenizer.json").is_file():  # what transformers >= 5 writes
            where = f"{folder.name}/tokenizer.json"
            model = read_json(folder / "tokenizer.json").get("model")
            if not isinstance(model, dict):
                raise SdgenError(f"{where}: field 'model' is not an object")
            vocab = _vocab(model.get("vocab"), where)
            merges = model.get("merges")
            if not isinstance(merges, list) or not all(
                    type(m) is str and len(m.split()) == 2 or type(m) is list and len(m) == 2 and
                    all(type(t) is str and t for t in m) for m in merges):
                raise SdgenError(f"{where}: field 'merges' is not a list of token pairs")
            merges = [tuple(m.split()) if type(m) is str else tuple(m) for m in merges]
        else:
            default = cls.default()
            return cls({**added, **default.vocab}, list(default.ranks), pad=pad, specials=specials,
                       max_length=max_length)
        vocab = {**added, **vocab}  # added tokens (e.g. textual inversion words) may live outside vocab.json
        # BPE looks up every byte symbol and every merge result: a vocabulary without them would fail mid-prompt
        missing = next((t for t in (*_VOCAB_CHARS, *(c + "</w>" for c in _VOCAB_CHARS)) if t not in vocab), None)
        if missing is None:
            missing = next(("".join(m) for m in merges if "".join(m) not in vocab), None)
        if missing is not None:
            raise SdgenError(f"{where}: the vocabulary lacks the token {missing[:60]!r}, which BPE makes")
        try:
            return cls(vocab, merges, pad=pad, specials=specials, max_length=max_length)
        except SdgenError as e:
            raise SdgenError(f"{where}: {e}") from None

    def _bpe(self, piece):
        """One pre-tokenised piece -> ids. Cached: prompts repeat words."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        chars = [_BYTE_CHARS[b] for b in piece.encode("utf-8")]
        word = chars[:-1] + [chars[-1] + "</w>"]
        while len(word) > 1:
            # Merge every occurrence of the best-ranked pair, left to right (merges that build on a merged
            # symbol always rank later, so this equals the reference's one-merge-at-a-time priority queue).
            pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.vocab[s] for s in word]
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without bos/eos and without truncation."""
        ids, start = [], 0
        for m in [*self._special_re.finditer(text), None]:
            chunk = text[start : m.start() if m else len(text)]
            for piece in _pieces(_normalize(chunk)):
                ids.extend(self._bpe(piece))
            if m:
                ids.append(self._special_ids[m.group()])
                start = m.end()
        return ids

    def __call__(self, prompts: list[str]) -> torch.LongTensor:
        """(B,) prompts -> (B, max_length) ids: bos + ids + eos, truncated (eos kept last), padded with pad_id."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(prompts):
            ids = [self.bos_id, *self.encode(text)[: self.max_length - 2], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


# ---------------------------------------------------------------------------------------------- tokenizer files

_MAX_ID = 2**20  # token ids (CLIP: 49408)


def _token(value, where: str, field: str) -> str | None:
    """A special token as transformers writes it: a string, or {"content": string, ...}."""
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and (type(text) is not str or not 0 < len(text) <= 256):
        raise SdgenError(f"{where}: field {field!r} is not a token (a short string)")
    return text or None


def _added_tokens(config: dict, where: str) -> dict[str, int]:
    """added_tokens_decoder: {"49406": {"content": "<|startoftext|>", ...}, ...} -> {token: id}."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise SdgenError(f"{where}: field 'added_tokens_decoder' is not an object")
    out = {}
    for i, t in decoder.items():
        if not (i.isascii() and i.isdigit() and int(i) < _MAX_ID):
            raise SdgenError(f"{where}: field 'added_tokens_decoder': {i[:40]!r} is not a token id")
        out[_token(t, where, "added_tokens_decoder")] = int(i)
    out.pop(None, None)
    return out


def _vocab(vocab, where: str) -> dict[str, int]:
    if not isinstance(vocab, dict) or not all(type(i) is int and 0 <= i < _MAX_ID for i in vocab.values()):
        raise SdgenError(f"{where}: the vocabulary is not an object of token ids (0 to {_MAX_ID - 1})")
    return vocab


def _merges(path: Path, where: str) -> list[tuple[str, str]]:
    if path.stat().st_size > MAX_JSON:
        raise SdgenError(f"{where}: is {path.stat().st_size} bytes: too big for a merges file")
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise SdgenError(f"{where}: is not readable UTF-8 text ({type(e).__name__})") from None
    merges = []
    for number, line in enumerate(lines, 1):
        if line and not line.startswith("#version"):
            pair = tuple(line.split())
            if len(pair) != 2:
                raise SdgenError(f"{where}: line {number} is not a pair of tokens")
            merges.append(pair)
    return merges
