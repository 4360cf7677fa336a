"""Local simulation: every site as a virtual SuperNode in Flower's simulation engine."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.clientapp.typing import Mod

from fedtune.common import adapters, assets, features, sites
from fedtune.common.config import (
    PAST_STOP,
    RESUME,
    RUN_PATH,
    SIMULATED,
    RunConfig,
    to_run_config,
)
from fedtune.common.errors import FedtuneError
from fedtune.common.model import check_top_layers, load_pretrained, load_tokenizer
from fedtune.server import rundir
from fedtune.server.runtime import checkpoint
from fedtune.server.runtime.selection import STOPPED
from fedtune.simulations import console, engine

logger = logging.getLogger(__name__)


def check_inputs(cfg: RunConfig, *, data_checked: bool = False) -> None:
    """Everything a run needs that can be checked before the engine starts, in
    seconds: every simulated site's data and the test set (the training code's
    readers and errors), then the model, loaded once here so that the ServerApp
    (same process) reuses it. A failure raises a :class:`FedtuneError` naming the
    file and the fix; nothing is started and no run directory is made."""
    for ref in (cfg.data.source, cfg.data.test_source):
        if ref:
            assets.resolve(ref)
    if not data_checked:
        for warning in sites.check_simulation_data(cfg):
            logger.warning("%s", warning)
    load_tokenizer(cfg.model.name_or_path, cfg.model.gguf_file)
    pretrained = load_pretrained(cfg.model)
    check_top_layers(pretrained.config, cfg.lora.top_layers)
    adapters.check_model(pretrained, cfg.lora)


def simulate(cfg: RunConfig, *, name: str = "sim", run_dir: Path | None = None,
             resume: bool = False, client_mods: Sequence[Mod] = (),
             data_checked: bool = False, past_stop: bool = False,
             verbose: bool = False) -> Path:
    """Run a whole federation on this machine; returns the run directory.

    ``resume`` continues ``run_dir`` after its last completed round (``past_stop``:
    also a run that stopped early).
    ``client_mods`` are extra Flower mods around every site's ClientApp (the tests
    use them to play faulty and malicious sites). ``data_checked``: the caller ran
    :func:`fedtune.common.data.check_simulation_data` already (the CLI does, before
    it imports the engine). ``verbose``: the terminal also shows what goes to
    ``RUN_DIR/logs/`` (the sites' output, Flower's INFO, per-site details).
    """
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from fedtune.client.app import make_client_app
    from fedtune.server.runtime.app import make_server_app

    check_inputs(cfg, data_checked=data_checked)
    fed = cfg.federation
    # the actors share the frozen encoder's features of each site's records through
    # this directory (on this machine), removed with its derived data at the end
    shared = tempfile.mkdtemp(prefix="fedtune-features-")
    saved = os.environ.get(features.SHARED_ENV)
    os.environ[features.SHARED_ENV] = shared  # this process: central evaluation
    try:
        with engine.ray_engine(fed, env={features.SHARED_ENV: shared}):
            run_dir = run_dir or rundir.new_run_dir(fed.run_dir, name)
            run_dir.mkdir(parents=True, exist_ok=True)
            flat = {**to_run_config(cfg), RUN_PATH: str(run_dir.resolve()),
                    RESUME: resume, PAST_STOP: past_stop, SIMULATED: True}
            backend: dict[str, Any] = {"client_resources": {
                "num_cpus": fed.client_cpus, "num_gpus": fed.client_gpus}}
            with console.run_logs(run_dir, verbose=verbose) as logs:
                logger.info("simulating %d sites for %d rounds -> %s (logs: %s)",
                            fed.num_sites, fed.num_rounds, run_dir, logs)
                run_simulation(server_app=make_server_app(flat),
                               client_app=make_client_app(flat, mods=client_mods),
                               num_supernodes=fed.num_sites, backend_config=backend)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        if saved is None:
            os.environ.pop(features.SHARED_ENV, None)
        else:
            os.environ[features.SHARED_ENV] = saved
    done = [r for r in checkpoint.read_metrics(run_dir) if r.get("round", 0) > 0]
    if len(done) < fed.num_rounds and not (done and done[-1].get(STOPPED)):
        raise FedtuneError(f"simulation ended after {len(done)} of {fed.num_rounds} "
                           f"rounds; see the errors above. Partial results: {run_dir}")
    return run_dir
