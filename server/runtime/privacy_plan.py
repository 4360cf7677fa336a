"""Before round 1: every site's record count, and its DP-SGD noise plan.

The same planner as ``fedtune plan`` (:mod:`fedtune.common.planning`), fed with the
sizes the sites report themselves (a deployment's operator knows no other way). A
site answers with its number of training records only - the figure it reports as
``num-examples`` every round anyway. A simulation's sites are the partitions of
``data.source``: the server splits the file as they do (``fedtune plan``'s figures,
named ``partition k/N``) instead of waking every virtual site before round 1.
The plan goes to the log (a WARNING when a site is expected to learn
nothing) and to ``RUN_DIR/plan.json`` for the report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from fedtune.common import plan_text, planning, records, sites
from fedtune.common.config import RunConfig
from fedtune.common.errors import CONFIG_FAILURE, ConfigError
from fedtune.server.rundir import PLAN_FILE
from fedtune.server.runtime import stats

logger = logging.getLogger(__name__)


def site_sizes(grid: Grid, *, timeout: float,
               labels: Mapping[str, str] | None = None) -> list[tuple[str, int]]:
    """(the site's name, training records) of every connected node that answers
    (``labels``: the operator's, by node id); a configuration or data error on a
    site stops the run here, before round 1."""
    ask: dict[str, Any] = {records.QUERY: records.SITE_SIZE}
    messages = [Message(content=RecordDict({records.CONFIG: ConfigRecord(ask)}),
                        dst_node_id=node, message_type=MessageType.QUERY)
                for node in sorted(grid.get_node_ids())]
    sizes = []
    broken: dict[str, str] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = stats.site_label(labels or {}, str(reply.metadata.src_node_id))
        if reply.has_error():
            reason = reply.error.reason or ""
            why = stats.declined_words(reason)
            if why:
                logger.warning("%s declines this run: %s", node, why)
            elif CONFIG_FAILURE in reason:
                broken[node] = stats.failure_words(reason)
            else:
                logger.warning("%s did not report its size: %s", node,
                               stats.failure_words(reason))
            continue
        metrics = reply.content.metric_records.get(records.METRICS, MetricRecord())
        if records.NUM_EXAMPLES in metrics:
            count = metrics[records.NUM_EXAMPLES]
            sizes.append((node, int(count if isinstance(count, int | float) else 0)))
    if broken:  # deterministic: no round could succeed on these sites
        raise stats.config_stop("before round 1", broken)
    return sizes


def plan_privacy(grid: Grid, cfg: RunConfig, *, run_dir: Path, dims: tuple[int, int],
                 timeout: float, simulated: bool = False,
                 labels: Mapping[str, str] | None = None
                 ) -> list[planning.SitePlan]:
    """Plan every answering site (``simulated``: every partition), log the table
    (a summary at scale), warn on a bad verdict, and write ``plan.json``."""
    sizes = (sites.simulated_sites(cfg) if simulated else
             site_sizes(grid, timeout=timeout, labels=labels))
    plans = planning.plan_sites(cfg, sizes, dims=dims)
    if not plans:
        logger.warning("no site reported its size: no privacy-utility plan")
        return plans
    problem = planning.grid_problem(plans, cfg)
    if problem:  # before any site releases anything
        raise ConfigError(problem)
    table = plan_text.format_plan(plans, cfg)
    verdict = planning.overall(plans, cfg)
    if verdict in planning.VERDICTS[1:]:
        logger.warning("%s\nWARNING: %s - see the advice above (fedtune plan "
                       "explains the figures)", table, verdict.upper())
    else:
        logger.info("%s", table)
    (run_dir / PLAN_FILE).write_text(json.dumps(
        {"overall": verdict, "aggregate_rho": planning.aggregate_rho(plans, cfg),
         "noise": cfg.privacy.noise if cfg.privacy.enabled else "off",
         "sites": [asdict(p) for p in plans]}, indent=2) + "\n")
    return plans
