"""JSON from files we did not write: bounded size and nesting, no repeated keys. Nothing here knows about Stable
Diffusion."""

from __future__ import annotations

import json
import operator
import re
from itertools import accumulate, count

MAX_JSON = 16 * 2**20  # bytes of a config, index or tokenizer file (CLIP tokenizer.json: 3.6 MB; parsing: ~3 s at most)
MAX_JSON_DEPTH = 64    # nesting; diffusers configs and tokenizer files are < 6 deep

_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_BRACKET_STEPS = str.maketrans("[{]}", "\x02\x02\x00\x00")  # an opener adds 2, a closer 0: depth = sum - count


class JsonError(ValueError):
    """Text that is not JSON we accept; the message says why, without the file (the caller names it)."""


def nesting(text: str) -> int:
    """How deep brackets nest outside strings: a linear pass in C (json itself recurses, one level per bracket)."""
    steps = _NOT_BRACKETS.sub("", _STRINGS.sub("", text)).translate(_BRACKET_STEPS).encode("latin-1")
    return max(map(operator.sub, accumulate(steps), count(1)), default=0)


def _no_repeats(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise JsonError(f"the key {_show(key)} appears twice")
    return out


def loads(text: str, max_depth: int = MAX_JSON_DEPTH):
    """json.loads, refusing deep nesting (before parsing) and repeated keys (which json would silently merge)."""
    if nesting(text) > max_depth:
        raise JsonError(f"nests deeper than {max_depth} levels")
    try:
        return json.loads(text, object_pairs_hook=_no_repeats)
    except RecursionError:  # cannot happen after the check above; kept so that it never becomes a crash
        raise JsonError(f"nests deeper than {max_depth} levels") from None
    except JsonError:
        raise
    except ValueError as e:
        raise JsonError(str(e)[:200]) from None


def _show(value, limit=60) -> str:
    text = repr(value) if not isinstance(value, (list, dict)) else json.dumps(value)[: limit + 1]
    return text if len(text) <= limit else text[: limit - 3] + "..."
