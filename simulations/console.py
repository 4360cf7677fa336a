"""What a simulation prints, and where the rest goes: ``RUN_DIR/logs/``.

The terminal keeps the plan, one line per round, the warnings and the summary.
``RUN_DIR/logs/run.log`` gets every line of this process (fedtune's, with the
per-site details of each round, and Flower's own INFO lines);
``RUN_DIR/logs/sites.log`` the site actors' output (:mod:`.engine`). ``-v`` puts
them all back on the terminal.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedtune.common.deployment import DETAIL_KEY, FLOWER_NOISE, LOG_FORMAT
from fedtune.server.rundir import LOG_DIR, RUN_LOG
from fedtune.simulations import engine

BENIGN = FLOWER_NOISE  # Flower's notices that tell the user nothing (in run.log)


class _Terminal(logging.Filter):
    """Off the terminal: fedtune's per-site detail lines, Flower's INFO, and its
    benign notices (all of them stay in run.log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, DETAIL_KEY, False):
            return False
        if record.name.startswith("flwr"):
            text = record.getMessage()
            return record.levelno >= logging.WARNING and not any(
                b in text for b in BENIGN)
        return True


def _stream_handlers(name: str) -> list[logging.Handler]:
    return [h for h in logging.getLogger(name).handlers
            if isinstance(h, logging.StreamHandler)
            and not isinstance(h, logging.FileHandler)]


@contextmanager
def run_logs(run_dir: Path, *, verbose: bool) -> Iterator[Path]:
    """``RUN_DIR/logs/`` for the time of the block: run.log and sites.log, and
    the terminal's filter (none when ``verbose``). Yields the directory."""
    logs = run_dir / LOG_DIR
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / RUN_LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    terminal = _Terminal()
    targets = [logging.getLogger(n) for n in ("fedtune", "flwr")]
    levels = [t.level for t in targets]
    streams = [h for n in ("fedtune", "flwr") for h in _stream_handlers(n)]
    for t in targets:
        t.addHandler(handler)
        if t.getEffectiveLevel() > logging.INFO:
            t.setLevel(logging.INFO)
    if not verbose:
        for h in streams:
            h.addFilter(terminal)
    try:
        with engine.sites_log(logs, verbose=verbose):
            yield logs
    finally:
        for t, level in zip(targets, levels, strict=True):
            t.removeHandler(handler)
            t.setLevel(level)
        for h in streams:
            h.removeFilter(terminal)
        handler.close()
