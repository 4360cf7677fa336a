"""The simulation's Ray: a local one sized to this machine, or an existing cluster.

``federation.ray_address`` empty starts a local Ray (this machine's CPUs); ``auto``
or ``HOST:PORT`` connects to a cluster the researcher already runs (``ray start
--head`` on one machine, ``ray start --address HEAD:PORT`` on the others), and the
sites run on its resources, ``client_cpus`` and ``client_gpus`` each. fedtune calls
``ray.init`` itself, before Flower's backend (which then finds Ray initialised and
keeps it): so an unreachable address fails in seconds, before any run directory
exists; a site asking for a GPU the cluster lacks is refused before round 1; the
actors get the environment they need (the asset cache, the shared features
directory) through Ray's ``runtime_env``, which a worker on another machine does
not inherit from this process otherwise.

The actors' output (every site's log lines, the model loads' progress bars) goes
to ``RUN_DIR/logs/sites.log`` through Ray's stream of worker output: on one
machine or many, it arrives at this driver. Their warnings still reach the
terminal, each text once.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.config import FederationConfig
from fedtune.common.errors import FedtuneError
from fedtune.server.rundir import SITES_LOG

logger = logging.getLogger(__name__)
CONNECT_TIMEOUT = 5.0  # seconds for the TCP check of HOST:PORT
# environment variables the site actors need from this process (a cluster's
# workers were started by `ray start`, in another shell or on another machine)
ACTOR_ENV_PREFIXES = ("FEDTUNE_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NUMBERS = re.compile(r"\d+(\.\d+)?")


@dataclass(frozen=True)
class Cluster:
    """The Ray the sites run on, as the run log names it."""

    address: str  # "local" or the cluster's GCS address
    nodes: int
    resources: Mapping[str, float]
    concurrent_sites: int  # sites that fit at once (Flower's actor pool)

    def words(self) -> str:
        r = self.resources
        where = ("a local Ray" if self.address == "local"
                 else f"the Ray cluster at {self.address}")
        return (f"{where}: {self.nodes} node{'s' if self.nodes != 1 else ''}, "
                f"{r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} GPUs, "
                f"{r.get('memory', 0) / 2**30:.1f} GiB memory")


def bootstrap_address(address: str) -> str:
    """``HOST:PORT`` as Ray will dial it: ``auto`` read from ``RAY_ADDRESS`` or
    the cluster this machine runs, a loopback host turned into this machine's
    routable address (Ray's own resolution)."""
    from ray._private import services  # how ray.init resolves its address

    try:
        resolved = services.canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as err:
        raise FedtuneError(f"federation.ray_address: {address}: {err}") from None
    if resolved is None:
        raise FedtuneError(
            "federation.ray_address: auto found no running Ray cluster on this "
            "machine (no RAY_ADDRESS, no `ray start` here); give the head's "
            "HOST:PORT, or leave ray_address empty for a local Ray")
    return str(resolved)


def check_reachable(address: str, *, timeout: float = CONNECT_TIMEOUT) -> str:
    """The address Ray will dial for ``address``; a :class:`FedtuneError` naming
    it when nothing listens there (in at most ``timeout`` seconds, where
    ``ray.init`` would retry for minutes)."""
    target = bootstrap_address(address)
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return target
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) else (
            err.strerror or type(err).__name__)
        via = ("" if target == address else
               f", which Ray dials as {target}: a head started with "
               "--node-ip-address 127.0.0.1 is not reachable that way; start it on "
               "this machine's address")
        raise FedtuneError(
            f"federation.ray_address: no Ray cluster reachable at {address}{via} "
            f"({why} within {timeout:g} s); start its head there with `ray start "
            f"--head --port {port}`, or leave ray_address empty to simulate on a "
            "local Ray") from None


def actor_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment variables every site actor gets: this process' fedtune,
    Hugging Face and tokenizer settings, the import path (as Flower's backend
    passes it) and ``extra``."""
    path = os.pathsep.join(p for p in sys.path if p)
    if os.environ.get("PYTHONPATH"):
        path = f"{path}{os.pathsep}{os.environ['PYTHONPATH']}"
    env = {k: v for k, v in os.environ.items() if k.startswith(ACTOR_ENV_PREFIXES)}
    return {**env, "PYTHONPATH": path, **extra}


def pool_size(nodes: Sequence[Mapping[str, float]], *, cpus: float, gpus: float) -> int:
    """Sites that run at once on these nodes' resources (Flower's actor pool: per
    node, its CPUs over ``cpus``, and its GPUs over ``gpus`` when asked)."""
    total = 0
    for res in nodes:
        fit = int(res.get("CPU", 0) / cpus)
        if gpus > 0:
            fit = min(fit, int(res.get("GPU", 0) / gpus))
        total += fit
    return total


def check_resources(fed: FederationConfig, cluster: Cluster,
                    nodes: Sequence[Mapping[str, float]]) -> None:
    """Refuse, quoting the cluster, a site's resources no node can host."""
    if fed.client_gpus > 0 and not cluster.resources.get("GPU"):
        raise FedtuneError(
            f"federation.client_gpus={fed.client_gpus:g} asks a GPU for every site, "
            f"but {cluster.words()} has none; set federation.client_gpus=0, or add "
            "GPU machines to the cluster (`ray start --address HEAD:PORT "
            "--num-gpus N` on each)")
    if cluster.concurrent_sites == 0:
        biggest = max((n.get("CPU", 0) for n in nodes), default=0)
        raise FedtuneError(
            f"no node of {cluster.words()} can host a site with federation."
            f"client_cpus={fed.client_cpus:g} and client_gpus={fed.client_gpus:g} "
            f"(the largest node has {biggest:g} CPUs); lower them")


@contextmanager
def ray_engine(fed: FederationConfig, *, env: Mapping[str, str]
               ) -> Iterator[Cluster]:
    """Ray initialised for one simulation (and shut down after): a local instance,
    or the cluster at ``fed.ray_address``. Raises a :class:`FedtuneError` before
    anything starts when the cluster is unreachable or cannot host a site."""
    import ray

    address = fed.ray_address
    if address:
        check_reachable(address)
    if ray.is_initialized():  # an earlier run of this process: other environment
        ray.shutdown()
    runtime_env = {"env_vars": actor_env(env)}
    os.environ["PYTHONPATH"] = runtime_env["env_vars"]["PYTHONPATH"]
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        else:
            ray.init(num_cpus=max(int(fed.client_cpus), os.cpu_count() or 1),
                     include_dashboard=False, runtime_env=runtime_env,
                     log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise FedtuneError(f"federation.ray_address: cannot connect to the Ray "
                           f"cluster at {address}: {err}; check the address (`ray "
                           "status` on the head) or leave ray_address empty for a "
                           "local Ray") from None
    try:
        alive = [dict(n["Resources"]) for n in ray.nodes()
                 if n.get("Alive") and n.get("Resources")]
        cluster = Cluster(
            address=("local" if not address else
                     ray.get_runtime_context().gcs_address),
            nodes=len(alive),
            resources={k: float(v) for k, v in ray.cluster_resources().items()
                       if k in ("CPU", "GPU", "memory")},
            concurrent_sites=pool_size(alive, cpus=fed.client_cpus,
                                       gpus=fed.client_gpus))
        check_resources(fed, cluster, alive)
        logger.info("sites run on %s; %d at a time (client_cpus %g, client_gpus %g)",
                    cluster.words(), cluster.concurrent_sites, fed.client_cpus,
                    fed.client_gpus)
        yield cluster
    finally:
        ray.shutdown()


class _SitesLog:
    """Ray's stream of the actors' output into ``sites.log``; each distinct
    warning or error text (numbers aside) also to the terminal, once."""

    def __init__(self, path: Path, *, echo: Callable[[str], None]) -> None:
        self.file = path.open("a", encoding="utf-8")
        self.echo = echo
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, data: Mapping[str, Any]) -> None:
        who = (f"({data.get('actor_name') or data.get('task_name') or 'ray'} "
               f"pid={data.get('pid')}, {data.get('ip')})")
        with self.lock:
            for line in data.get("lines", []):
                text = _ANSI.sub("", str(line))
                self.file.write(f"{who} {text}\n")
                if " WARNING " in text or " ERROR " in text:
                    key = _NUMBERS.sub("#", text.split(" WARNING ", 1)[-1]
                                       .split(" ERROR ", 1)[-1])
                    if key not in self.seen:
                        self.seen.add(key)
                        self.echo(f"{who} {text}")
            self.file.flush()

    def close(self) -> None:
        with self.lock:
            self.file.close()


@contextmanager
def sites_log(log_dir: Path, *, verbose: bool) -> Iterator[Path]:
    """The actors' output to ``log_dir/sites.log`` for the time of the block
    (``verbose``: also to the terminal, as Ray prints it)."""
    from ray._private import ray_logging  # Ray's dispatcher of worker output

    path = log_dir / SITES_LOG
    sink = _SitesLog(path, echo=lambda s: print(s, file=sys.stderr, flush=True))
    dispatcher = ray_logging.global_worker_stdstream_dispatcher
    saved = list(dispatcher.handlers)
    if not verbose:
        dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("fedtune_sites_log", sink)
    try:
        yield path
    finally:
        dispatcher.remove_handler("fedtune_sites_log")
        with dispatcher._lock:  # noqa: SLF001 - restore Ray's own printer
            dispatcher.handlers = saved
        sink.close()
