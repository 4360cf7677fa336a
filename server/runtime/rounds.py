"""The round loop: Flower's ``Strategy.start`` plus resume, retries and persistence.

Flower's loop always starts at round 1, waits without bound for nodes to connect, and
keeps nothing a crashed run could continue from. This one drives the same strategy
hooks (``configure_train`` -> ``grid.send_and_receive`` -> ``aggregate_train``,
then the optional federated evaluation and the recorder) and:

- starts at any round (``--resume``), with the state saved after the previous one;
- bounds every wait by ``federation.round_timeout``: replies that come later are
  ignored and counted as late;
- retries a round that got fewer than ``federation.min_replies`` accepted updates
  (``round_retries`` times), then stops with a message; a round that every site
  declined for its privacy budget stops the run at once;
- saves ``state.npz`` after every round (:mod:`fedtune.server.runtime.checkpoint`);
- stops after a round that ends the run early (the recorder's ``stop_early``:
  ``federation.round_patience``, :mod:`fedtune.server.runtime.selection`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from fedtune.common import records
from fedtune.common.config import RunConfig
from fedtune.common.deployment import DETAIL
from fedtune.common.errors import FedtuneError
from fedtune.server.runtime import resume
from fedtune.server.runtime.stats import all_declined, config_failed
from fedtune.server.runtime.strategy import FedTuneStrategy

logger = logging.getLogger(__name__)


class Recorder(Protocol):
    """What records each round
    (:class:`fedtune.server.runtime.recorder.RoundRecorder`)."""

    def __call__(self, server_round: int, arrays: ArrayRecord
                 ) -> MetricRecord | None: ...

    @property
    def stop_early(self) -> bool: ...


def wait_for_nodes(grid: Grid, needed: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < needed:
        if time.monotonic() > deadline:
            raise FedtuneError(
                f"only {len(list(grid.get_node_ids()))} of the {needed} nodes "
                f"federation.min_train_nodes asks for connected within "
                f"federation.round_timeout={timeout:g} s; start more sites or lower "
                "min_train_nodes")
        time.sleep(0.5)


def train_round(grid: Grid, strategy: FedTuneStrategy, *, server_round: int,
                arrays: ArrayRecord, cfg: RunConfig, config: ConfigRecord
                ) -> ArrayRecord:
    """One training round, retried while too few updates were accepted."""
    fed = cfg.federation
    for attempt in range(fed.round_retries + 1):
        wait_for_nodes(grid, fed.train_nodes, fed.round_timeout)
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, config, grid),
            timeout=fed.round_timeout)
        new, _ = strategy.aggregate_train(server_round, replies)
        if new is not None:
            return new
        stats = strategy.round_stats[server_round]
        if stats.every_site_declined:
            raise all_declined(server_round, stats)
        if stats.config_failures:
            raise config_failed(server_round, stats)
        summary = stats.summary()
        logger.warning(
            "round %d attempt %d: %d of %d needed updates accepted (%s late, %d "
            "failed, %d rejected)%s", server_round, attempt + 1, stats.accepted,
            fed.min_replies, summary["clients_late"], stats.failed,
            len(stats.nodes_rejected),
            "; retrying" if attempt < fed.round_retries else "")
    raise FedtuneError(
        f"round {server_round}: fewer than federation.min_replies={fed.min_replies} "
        f"accepted updates within round_timeout={fed.round_timeout:g} s, "
        f"{fed.round_retries + 1} attempt(s); see the warnings above for the late, "
        "failed and rejected sites. The run stops; rounds before it are "
        "checkpointed, and `fedtune simulate --resume RUN_DIR` (or `fedtune run "
        "--resume RUN_DIR`) continues from the last one once the sites are back.")


def _evaluate(grid: Grid, strategy: FedTuneStrategy, *, server_round: int,
              arrays: ArrayRecord, cfg: RunConfig) -> None:
    if cfg.federation.fraction_evaluate <= 0:
        return
    messages = strategy.configure_evaluate(  # type: ignore[attr-defined]  # Flower's
        server_round, arrays, ConfigRecord(), grid)
    replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout)
    strategy.aggregate_evaluate(server_round, replies)


def run_rounds(grid: Grid, strategy: FedTuneStrategy, *, cfg: RunConfig,
               run_dir: Path, arrays: ArrayRecord, recorder: Recorder,
               resumed: int = 0) -> ArrayRecord:
    """Rounds ``resumed + 1 .. num_rounds``; returns the final global adapter."""
    config: dict[str, Any] = {records.RESUMED_AT: resumed + 1 if resumed else 0}
    if resumed == 0:
        recorder(0, arrays)
    for rnd in range(resumed + 1, cfg.federation.num_rounds + 1):
        # Flower's own round marker: `fedtune status` reads progress from it
        logger.info("[ROUND %d/%d]", rnd, cfg.federation.num_rounds, extra=DETAIL)
        arrays = train_round(grid, strategy, server_round=rnd, arrays=arrays,
                             cfg=cfg, config=ConfigRecord(config))
        _evaluate(grid, strategy, server_round=rnd, arrays=arrays, cfg=cfg)
        recorder(rnd, arrays)
        resume.save(run_dir, server_round=rnd, arrays=arrays, strategy=strategy,
                    cfg=cfg)
        if recorder.stop_early:
            logger.info("the run stopped early after round %d of %d", rnd,
                        cfg.federation.num_rounds)
            break
    return arrays
