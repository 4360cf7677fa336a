"""Adapter updates on the wire: compression and heterogeneous LoRA ranks.

Pure functions on numpy arrays, shared by the site (encode, truncate) and the server
(decode, pad); no Flower, no torch.

Compression (``federation.compression``) sends ``update - global`` instead of the
update itself:

- ``fp16``: the delta in half precision (half the bytes of fp32);
- ``int8``: the delta rounded to ``round(delta / scale)`` in int8 with one fp32
  ``scale = max|delta| / 127`` per tensor, sent as ``<name>#scale`` (a quarter of the
  bytes). The error per value is at most ``scale / 2``.

The compression is applied to the site's DP-SGD output: it is post-processing and
costs no privacy.

Heterogeneous ranks (``lora.site_ranks``): a rank-``r`` site holds the first ``r``
rows of every ``lora_A`` (``[r, in]``) and the first ``r`` columns of every
``lora_B`` (``[out, r]``). The server pads a site's update back to the global rank
with the global adapter's own values, i.e. the site's delta is zero on the ranks it
does not train (HetLoRA's zero-padding, applied to the update), and every strategy
then aggregates full-rank tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

SCALE = "#scale"
Arrays = Mapping[str, np.ndarray]


class UpdateError(ValueError):
    """An update that cannot be decoded (the server rejects the reply)."""


def encode(update: Arrays, base: Arrays, mode: str) -> dict[str, np.ndarray]:
    """What a site sends: the update itself (``none``) or its compressed delta."""
    if mode == "none":
        return {k: np.asarray(v) for k, v in update.items()}
    out: dict[str, np.ndarray] = {}
    for k, v in update.items():
        delta = np.asarray(v, dtype=np.float32) - np.asarray(base[k], np.float32)
        if mode == "fp16":
            out[k] = delta.astype(np.float16)
        elif mode == "int8":
            peak = float(np.max(np.abs(delta))) if delta.size else 0.0
            scale = peak / 127.0 if peak > 0 else 1.0
            out[k] = np.clip(np.rint(delta / scale), -127, 127).astype(np.int8)
            out[k + SCALE] = np.array([scale], dtype=np.float32)
        else:
            raise ValueError(f"unknown compression {mode!r}")
    return out


def decode(sent: Arrays, base: Arrays, mode: str) -> dict[str, np.ndarray]:
    """The fp32 update a site meant (``base`` + its delta); raises
    :class:`UpdateError` on the wrong dtype or a missing or bad scale."""
    if mode == "none":
        return {k: np.asarray(v) for k, v in sent.items()}
    want = np.float16 if mode == "fp16" else np.int8
    out: dict[str, np.ndarray] = {}
    for k, v in sent.items():
        if k.endswith(SCALE) and mode == "int8":
            continue
        if k not in base:
            out[k] = np.asarray(v)  # an extra name: validation rejects it
            continue
        if v.dtype != want:
            raise UpdateError(f"{k}: {mode} compression sends {np.dtype(want).name}, "
                              f"got {v.dtype}")
        delta = v.astype(np.float32)
        if mode == "int8":
            scale = sent.get(k + SCALE)
            if scale is None or scale.shape != (1,) or \
                    not np.isfinite(scale).all() or float(scale[0]) <= 0:
                raise UpdateError(f"{k}: int8 compression needs a positive finite "
                                  f"scale {k + SCALE!r} of shape (1,)")
            delta *= np.float32(scale[0])
        ref = _prefix(np.asarray(base[k], np.float32), delta.shape)
        out[k] = delta if ref is None else ref + delta  # None: validation rejects
    return out


def _prefix(ref: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """``ref``'s leading block of ``shape`` (a lower-rank site's part), if it fits."""
    if len(shape) != ref.ndim or any(n > m for n, m in zip(shape, ref.shape,
                                                            strict=True)):
        return None
    return ref[tuple(slice(0, n) for n in shape)]


def digest(arrays: Arrays) -> str:
    """sha256 (hex) over the names and bytes of ``arrays``, in name order."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def rank_axis(name: str) -> int | None:
    """The rank axis of a LoRA tensor: 0 for ``lora_A``, 1 for ``lora_B``."""
    if ".lora_A." in name:
        return 0
    if ".lora_B." in name:
        return 1
    return None


def truncate(state: Arrays, rank: int) -> dict[str, np.ndarray]:
    """The first ``rank`` ranks of every LoRA tensor (other tensors unchanged)."""
    out = {}
    for k, v in state.items():
        axis = rank_axis(k)
        out[k] = np.asarray(v) if axis is None else np.ascontiguousarray(
            np.take(v, np.arange(min(rank, v.shape[axis])), axis=axis))
    return out


def pad(update: Arrays, base: Arrays) -> dict[str, np.ndarray]:
    """A lower-rank update at the global rank, with ``base``'s values on the ranks
    the site does not hold; raises :class:`UpdateError` if a tensor does not fit or
    the LoRA tensors disagree on the rank."""
    ranks = {int(v.shape[a]) for k, v in update.items()
             if (a := rank_axis(k)) is not None and v.ndim == 2}
    if len(ranks) > 1:
        raise UpdateError(f"LoRA tensors of ranks {sorted(ranks)} in one update; a "
                          "site trains one rank")
    out = {}
    for k, v in update.items():
        ref = base.get(k)
        axis = rank_axis(k)
        if ref is None or axis is None or v.shape == ref.shape:
            out[k] = np.asarray(v)
            continue
        other = 1 - axis
        if v.ndim != 2 or v.shape[other] != ref.shape[other] or \
                not 1 <= v.shape[axis] <= ref.shape[axis]:
            raise UpdateError(f"{k}: shape {tuple(v.shape)} is not a rank slice of "
                              f"the global {tuple(ref.shape)}")
        full = np.array(ref, dtype=np.float32, copy=True)
        index = [slice(None), slice(None)]
        index[axis] = slice(0, v.shape[axis])
        full[tuple(index)] = v
        out[k] = full
    return out


def site_rank(update: Arrays) -> int | None:
    """The LoRA rank of an update (None if it holds no LoRA tensor)."""
    for k, v in update.items():
        axis = rank_axis(k)
        if axis is not None and v.ndim == 2:
            return int(v.shape[axis])
    return None
