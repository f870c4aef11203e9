"""Paths of the offline defaults shipped with the package (see README.md in this folder), and the one place a
model argument (``SRC``) is told apart as a local folder, a mistyped path, or a Hub id."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from normswap.errors import SourceNotFoundError

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).parent
DEFAULT_MODEL_NAME = "shakespeare-gpt2"
DEFAULT_MODEL = ASSETS / DEFAULT_MODEL_NAME
DEFAULT_TEXT = ASSETS / "macbeth.txt"
DEFAULT_TEXT_SOURCE = "William Shakespeare, Macbeth (opening; public domain), Open Knowledge Foundation packaging"

#: Seconds to wait for the Hub before deciding the machine is offline (instead of ~30 s of retries per file).
HUB_PROBE_TIMEOUT = 3.0


def looks_like_path(src: str) -> bool:
    """True when ``src`` can only be meant as a local path, never as a Hub id (``owner/name``).

    Paths start with ``./``, ``../``, ``/`` or ``~``, end with a slash, have more than one slash, or start with a
    folder that exists here (``models/gpt2-typo`` when ``models/`` exists).
    """
    if src.startswith(("./", "../", "/", "~", ".\\", "..\\")) or src in (".", "..") or "\\" in src:
        return True
    if src.endswith("/") or src.count("/") > 1:
        return True
    head = src.split("/", 1)[0]
    return "/" in src and Path(head).is_dir()


def _hub_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """One quick TCP connection to the Hub (a proxy, which this cannot test, counts as reachable)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    try:
        with socket.create_connection(_hub_host(), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def go_offline() -> None:
    """Switch huggingface_hub (and transformers, which asks it) to the local cache for the rest of this process."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"


def _cached(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:  # noqa: BLE001 - an id the cache cannot even parse is not cached
        return False


def resolve_model(src: str | None, revision: str | None = None) -> str:
    """``None`` or ``embedded`` → the shipped model's folder; a local folder → itself (``~`` expanded); a Hub id →
    itself, after making sure it can load quickly.

    A mistyped path is "no such folder", not a Hub problem. For a Hub id on a machine without network, the Hub is
    probed once (a few seconds): when it is unreachable, huggingface_hub is switched to its local cache, and an id
    that is not cached fails at once instead of after half a minute of retries.
    """
    if src in (None, "", "embedded", DEFAULT_MODEL_NAME):
        return str(DEFAULT_MODEL)
    src = str(src)
    local = Path(src).expanduser()
    if local.exists():
        if not local.is_dir():
            raise SourceNotFoundError(f"{src} is a file, not a model folder; pass the folder that holds config.json")
        return str(local)
    if looks_like_path(src):
        parent = next((p for p in local.absolute().parents if p.exists()), None)
        raise SourceNotFoundError(f"no such folder: {src} (the nearest existing folder is {parent}); check the path")
    if not _hub_offline() and not hub_reachable():
        logger.info("the Hugging Face Hub is unreachable: using the local cache only")
        go_offline()
    if _hub_offline() and not _cached(src, revision):
        raise SourceNotFoundError(
            f"{src} is not a local folder, and the Hugging Face Hub is unreachable from this machine (offline), with "
            "no copy in the local cache; pass a local save_pretrained folder, or run where the Hub is reachable"
        )
    return src
