"""A saved round read back: a run directory's (or an adapter export's) config and
one round's adapter, checked against the sha256 recorded when it was saved, and the
model with that adapter loaded. The server's runtime (calibration, personalisation)
and every after-run tool (export, predict, report) read trained rounds through here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedtune.common import config
from fedtune.common.errors import FedtuneError, ModelError
from fedtune.common.model import (
    ADAPTER_FILE,
    FEDTUNE_META,
    RUN_CONFIG,
    build_model,
    set_adapter_state,
)
from fedtune.server import rundir
from fedtune.server.runtime import checkpoint


@dataclass(frozen=True)
class Trained:
    """A run's (or an adapter export's) config and one round's adapter directory."""

    cfg: config.RunConfig
    round: int
    adapter: Path
    source: Path

    @property
    def meta(self) -> dict[str, Any]:
        """The adapter's ``fedtune_model.json`` ({} where there is none)."""
        path = self.adapter / FEDTUNE_META
        return dict(json.loads(path.read_text())) if path.is_file() else {}

    def check(self) -> None:
        """The adapter is the file that was saved (its recorded sha256), else one
        line naming the file, the round and the saved rounds that still load."""
        why = checkpoint.damage(self.adapter)
        if why:
            raise checkpoint.corrupt_checkpoint(
                None if self.source == self.adapter else self.source, self.adapter,
                self.round, why)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors, checked; an unreadable file names the rounds
        that still load."""
        self.check()
        try:
            return load_file(str(self.adapter / ADAPTER_FILE))
        except Exception as err:  # noqa: BLE001 - safetensors' error has no base we share
            why = f"unreadable: {' '.join(str(err).split())[:120]}"
            raise checkpoint.corrupt_checkpoint(
                None if self.source == self.adapter else self.source, self.adapter,
                self.round, why) from None


def resolve(source: str | Path, which: str | None = None) -> Trained:
    """The config and adapter of ``which`` (``final``, ``best`` or a round number;
    None: best where the run recorded one, else final) in a run directory, or of
    an adapter export (``which`` is then ignored)."""
    path = Path(source)
    if (path / RUN_CONFIG).is_file() and (path / ADAPTER_FILE).is_file():
        export_dir = Trained(cfg=config.load(path / RUN_CONFIG), round=0,
                             adapter=path, source=path)
        export_dir = dataclasses.replace(export_dir,
                                         round=int(export_dir.meta.get("round", 0)))
        export_dir.check()
        return export_dir
    if not rundir.is_run_dir(path):
        raise FedtuneError(f"{path}: not a fedtune run directory (no config.yaml) nor "
                           "an adapter export (no fedtune_config.yaml); pass the "
                           "directory `fedtune simulate`/`fedtune run` wrote")
    if which is None:
        which = rundir.BEST if (path / rundir.BEST).exists() else rundir.FINAL
    rounds = rundir.saved_rounds(path)
    if not rounds:
        raise FedtuneError(f"{path}: no checkpoints (no round completed), nothing "
                           "to export; run or resume the federation first")
    if which in (rundir.FINAL, rundir.BEST):
        link = path / which
        if not link.exists():
            if which == rundir.BEST:
                raise FedtuneError(
                    f"{path}: no best round recorded (the run has no central "
                    "evaluation, data.test_source, or predates best-round "
                    "selection); pass --round final or a round number "
                    f"({_span(rounds)})")
            target = rundir.checkpoint_dir(path, rounds[-1])
        else:
            target = link.resolve()
        rnd = (rundir.round_of(target) if rundir.is_round_dir(target)
               else int(json.loads((link / FEDTUNE_META).read_text())["round"]))
    else:
        try:
            rnd = int(which)
        except ValueError:
            raise FedtuneError(f"--round {which!r}: expected best, final or a round "
                               "number") from None
        if rnd not in rounds:
            raise FedtuneError(f"{path}: round {rnd} is not saved (saved rounds: "
                               f"{_span(rounds)})")
        target = rundir.checkpoint_dir(path, rnd)
    trained = Trained(cfg=config.load(path / rundir.CONFIG), round=rnd,
                      adapter=rundir.checkpoint_dir(path, rnd), source=path)
    _check_meta(trained)
    trained.check()
    return trained


def _check_meta(trained: Trained) -> None:
    """The checkpoint must come from the model and labels the config names."""
    cfg, meta = trained.cfg, trained.meta
    base = meta.get("base_model")
    if base and base != cfg.model.name_or_path:
        raise ModelError(f"{trained.adapter}: trained on {base!r}, but the config "
                         f"names {cfg.model.name_or_path!r}; this directory mixes "
                         "runs: export from the run directory that wrote it")
    if meta.get("labels") and list(meta["labels"]) != list(cfg.data.labels):
        raise ModelError(f"{trained.adapter}: labels {meta['labels']} differ from the "
                         f"config's {list(cfg.data.labels)}; this directory mixes runs")


def _span(rounds: list[int]) -> str:
    return f"{rounds[0]}-{rounds[-1]}" if len(rounds) > 1 else str(rounds[0])


def load_model(trained: Trained, device: torch.device | None = None
               ) -> torch.nn.Module:
    """The base model with the round's adapter loaded (eval mode). Tensors of
    another shape (another model or LoRA config) are a ModelError."""
    cfg = trained.cfg
    model = build_model(cfg.model, cfg.lora, num_labels=len(cfg.data.labels),
                        seed=cfg.train.seed)
    state = trained.tensors()
    try:
        set_adapter_state(model, state)
    except ModelError as err:
        raise ModelError(f"{trained.adapter}: {err} (an adapter of another model "
                         "or LoRA config)") from None
    return model.to(device or torch.device("cpu")).eval()
