"""Reaching the Hugging Face hub, or knowing at once that it cannot be reached: a
model id that is no local path costs one bounded TCP contact (not a minute of
transformers' retries), and a load that fails says why in one line.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from fedtune.common import assets
from fedtune.common.errors import ModelError

HUB_CONTACT_SECONDS = 3.0  # the first contact with the hub, before any retry loop
_OFFLINE_VALUES = ("1", "on", "yes", "true")


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """One TCP contact with the hub (``HF_ENDPOINT``, default huggingface.co:443)
    within :data:`HUB_CONTACT_SECONDS`, name resolution included; False where
    ``HF_HUB_OFFLINE`` says so. Once per process."""
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    if offline_env():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (
        80 if url.scheme == "http" else 443)
    ok: list[bool] = []

    def contact() -> None:
        try:
            with socket.create_connection((host, port), timeout=HUB_CONTACT_SECONDS):
                ok.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=contact, daemon=True)  # bounds DNS, too
    probe.start()
    probe.join(HUB_CONTACT_SECONDS)
    return bool(ok)


def offline_env() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set."""
    import os

    return any(os.environ.get(k, "").lower() in _OFFLINE_VALUES
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_words(path: str) -> str:
    """Why a name that is no local path cannot be fetched, or "" when it may be."""
    if Path(path).expanduser().exists():
        return ""
    if path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
        return f"{path!r} is no local path (no such file or directory)"
    if hub_reachable():
        return ""
    return (f"{path!r} is no local path, and the Hugging Face hub is "
            + ("off (HF_HUB_OFFLINE)" if offline_env() else
               f"unreachable from this machine (no answer in {HUB_CONTACT_SECONDS:g} "
               "s)") + "; only this machine's hub cache was searched")


def from_pretrained(loader: Any, path: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(path)``, failing fast (one line naming the fix)
    where ``path`` is no local path and the hub is off or unreachable."""
    unreachable = hub_words(path)
    if unreachable:  # a cached hub model still loads; no minute of retries first
        kwargs["local_files_only"] = True
        from huggingface_hub import constants

        # what HF_HUB_OFFLINE=1 would have set at import: transformers' own
        # lookups (e.g. an adapter_config.json beside the model) retry otherwise
        constants.HF_HUB_OFFLINE = True
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        reason = unreachable or " ".join(str(err).split())[:500].rstrip(".")
        raise ModelError(
            f"cannot load {path!r} with {loader.__name__}: {reason}. Name a local "
            "directory holding config.json + weights (or a .gguf with "
            "model.gguf_file), a hub id this machine can reach, or an embedded "
            f"default ({', '.join(assets.PREFIX + n for n in assets.MODELS)})"
        ) from err
