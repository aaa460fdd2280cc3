"""Hugging Face hub repos: the files a caller names, from the local cache or downloaded (progress bar)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, TypeVar

from .. import SdgenError

T = TypeVar("T")


class Offline(SdgenError):
    """The repo is not in the local cache and the hub cannot be reached."""

def reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Can the hub's host be resolved and reached? Offline, this answers in moments instead of the hub client's
    half a minute of retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def snapshot(repo: str, patterns: Callable[[set[str] | None], list[str]], open_folder: Callable[[Path], T]) -> T:
    """open_folder(local copy of `repo`), with the files patterns(names in the repo) selects; patterns(None) is
    asked for when the repo's listing is not known (the cache). A complete cached copy is used without touching
    the network; offline and not cached: one line saying so."""
    try:
        from huggingface_hub import HfApi, constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise SdgenError(f"{repo}: not a file or folder, and huggingface_hub is not installed to download it") from None
    offline_hint = (f"model {repo!r} is not in the local Hugging Face cache and we are offline; "
                    "point at a local file instead: --model path/to/model.safetensors")
    try:
        cached = Path(snapshot_download(repo, local_files_only=True, allow_patterns=patterns(None)))
    except (LocalEntryNotFoundError, OSError, ValueError):
        cached = None
    if cached is not None:
        try:
            return open_folder(cached)
        except SdgenError:
            if constants.HF_HUB_OFFLINE:  # what the cache holds is all there is
                raise
    if constants.HF_HUB_OFFLINE or not reachable(constants.ENDPOINT):
        raise Offline(offline_hint)
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry warnings would bury our one line
    try:
        names = set(HfApi().list_repo_files(repo))
        folder = Path(snapshot_download(repo, allow_patterns=patterns(names)))
    except LocalEntryNotFoundError:
        raise Offline(offline_hint) from None
    except Exception as e:  # noqa: BLE001 - network, auth, missing repo: one line for the user
        kind = type(e).__name__
        if "Connect" in kind or "Timeout" in kind or "Offline" in kind:
            raise Offline(offline_hint) from None
        raise SdgenError(f"{repo}: could not download from Hugging Face ({kind}: {str(e).splitlines()[0][:200]})"
                         ) from None
    return open_folder(folder)


def is_repo_id(text: str) -> bool:
    """owner/name, and not something that looks like a file path."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", text)) and not text.startswith((".", "/")) \
        and Path(text).suffix not in (".safetensors", ".ckpt", ".pt", ".bin", ".pth")
