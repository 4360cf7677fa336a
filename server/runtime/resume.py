"""Resume state: what a run saves after every round so that ``--resume`` continues
it identically (the global adapter, the strategy's own state, Python's RNG that
Flower samples nodes with, the config), and how a strategy packs its state.

A strategy is :class:`Resumable`: ``state()`` returns named arrays and scalars,
``restore()`` takes them back (the FedTune strategies, :mod:`.strategy`; central DP
adds its release count, :mod:`.central_dp`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord

from fedtune.common.config import RunConfig, load
from fedtune.common.errors import FedtuneError
from fedtune.server import rundir
from fedtune.server.runtime import checkpoint
from fedtune.server.runtime.selection import Selection

logger = logging.getLogger(__name__)


class Resumable(Protocol):
    """A strategy whose state survives a restart."""

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, float]]: ...

    def restore(self, arrays: Mapping[str, np.ndarray],
                scalars: Mapping[str, float]) -> None: ...


def pack(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` under ``prefix/`` (one strategy's state may hold several sets)."""
    return {f"{prefix}/{k}": np.asarray(v) for k, v in arrays.items()}


def unpack(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack` (empty when nothing was saved under ``prefix``)."""
    return {k.split("/", 1)[1]: np.array(v) for k, v in arrays.items()
            if k.startswith(prefix + "/")}


def save(run_dir: Path, *, server_round: int, arrays: ArrayRecord,
         strategy: Resumable, cfg: RunConfig) -> None:
    s_arrays, s_scalars = strategy.state()
    checkpoint.save_state(run_dir, checkpoint.ServerState(
        round=server_round, arrays={k: v.numpy() for k, v in arrays.items()},
        strategy_arrays=s_arrays, strategy_scalars=s_scalars,
        python_rng=random.getstate(), config=checkpoint.config_dict(cfg)))


def resume(run_dir: Path, *, strategy: Resumable, cfg: RunConfig
           ) -> tuple[int, ArrayRecord]:
    """Restore the saved state; returns the last completed round and the adapter."""
    saved = checkpoint.load_state(run_dir)
    checkpoint.check_resumable(saved.config, cfg, run_dir)
    last = rundir.checkpoint_dir(run_dir, saved.round)
    why = checkpoint.damage(last) if last.is_dir() else ""
    if why:  # RUN_DIR/final points at it: refuse before anything is rewritten
        raise checkpoint.corrupt_checkpoint(run_dir, last, saved.round, why)
    strategy.restore(saved.strategy_arrays, saved.strategy_scalars)
    version, internal, gauss = saved.python_rng
    random.setstate((version, tuple(internal), gauss))
    checkpoint.rewind(run_dir, saved.round)
    logger.info("resuming %s after round %d of %d", run_dir, saved.round,
                cfg.federation.num_rounds)
    return saved.round, ArrayRecord({k: Array(v) for k, v in saved.arrays.items()})


def resumed_config(run_dir: str | Path, *, items: list[str],
                   past_stop: bool) -> RunConfig:
    """The config a run directory was started with (``--resume``); a run that
    stopped early is refused here, before any engine starts, unless
    ``past_stop`` (``--past-early-stop``)."""
    if items:
        raise FedtuneError(f"--resume takes no config or overrides ("
                           f"{' '.join(items)}): a run continues with the "
                           "config it started with")
    path = Path(run_dir) / rundir.CONFIG
    if not path.is_file():
        raise FedtuneError(f"{path}: not found; --resume needs a fedtune run "
                           f"directory (it holds {rundir.CONFIG} and {rundir.STATE})")
    cfg = load(path)
    Selection.for_run(cfg).replay(checkpoint.read_metrics(run_dir),
                                  past_stop=past_stop)
    return cfg
