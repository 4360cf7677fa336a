"""``fedtune client``: the hospital daemon, a Flower SuperNode with this site's config.

Everything the site owns is checked before it connects: the private data file is
readable and parses, the privacy-ledger directory is writable (and no other daemon
holds it), the device exists, the CA certificate is a certificate and the node key is
an EC key Flower accepts.

Then the daemon starts two children and supervises them
(:mod:`fedtune.client.node.supervisor`): the persistent site worker
(:mod:`fedtune.client.node.worker`),
which loads torch, the model, the tokenized data and
the ledger once, and ``flower-supernode``, which keeps running across runs and
retries the connection for as long as the SuperLink is away. Flower starts a fresh
ClientApp process for every message; fedtune's is a thin forwarder to the worker
(:mod:`fedtune.client.node.forwarder`). With ``--no-worker`` every message loads
everything again in its own process (Flower's default, slower; for comparison or a
site that cannot keep the model in memory), and the daemon becomes the SuperNode.
Only the path of the data file reaches Flower (as node_config); the records are read
by the worker.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from fedtune.client import policy
from fedtune.client.node import channel, probe, supervisor
from fedtune.common import data, deployment, keys
from fedtune.common.errors import ConfigError, DeploymentError

logger = logging.getLogger(__name__)
LABEL = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    """What ``fedtune client`` was asked to start."""

    superlink: str
    data_path: Path
    ledger_dir: Path
    ca_cert: Path | None
    node_key: Path | None
    device: str = "auto"
    state_dir: Path = Path("fedtune-node")
    clientappio_address: str = "127.0.0.1:9094"
    insecure: bool = False
    budget_epsilon: float = 0.0  # 0: spending is recorded but not limited
    budget_delta: float = 1e-5
    lora_rank: int = 0  # 0: the run's lora.r; else this site's (smaller) rank
    worker: bool = True  # False: Flower's process per message, nothing kept warm
    policy: Path | None = None  # the site's rules (client/policy.py)
    allow_non_private: bool = False  # the only way to train without DP
    label: str = ""  # the site's name for the operator (not secret)


def check_device(name: str) -> str:
    """``--device``, present on this machine (:func:`fedtune.common.loops.
    resolve_device`'s check, the one the worker makes again when it loads)."""
    if name in ("auto", "cpu"):
        return name  # present everywhere: no torch import for the check
    from fedtune.common import loops

    try:
        loops.resolve_device(name)
    except ConfigError as err:
        raise DeploymentError(f"--{err}") from None
    return name


def check_data(path: Path) -> int:
    """The file exists, is readable and parses into records; returns their count.

    The records are not logged; only their number is.
    """
    path = path.expanduser()
    if not path.exists():
        raise DeploymentError(f"--data {path}: no such file; point it at this site's "
                              "private .jsonl/.csv/.tsv file")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as err:
        raise DeploymentError(f"--data {path}: cannot be read ({err.strerror}); give "
                              "the daemon's user read access") from None
    return len(data.read_records(str(path.resolve()), required=()))


def _quote(value: str) -> str:
    if '"' in value or "\\" in value:
        raise DeploymentError(f"path {value!r} contains a quote or backslash; "
                              "move the file to a plainer path")
    return f'"{value}"'


def site_dirs(opts: ClientOptions) -> tuple[Path, Path]:
    """The ledger and state directories, created and checked writable."""
    return (deployment.writable_dir(opts.ledger_dir.expanduser(), what="--ledger-dir"),
            deployment.writable_dir(opts.state_dir.expanduser(), what="--state-dir"))


def supernode_command(opts: ClientOptions, *, socket: Path | None = None,
                      dirs: tuple[Path, Path] | None = None
                      ) -> tuple[list[str], dict[str, str]]:
    """The checked ``flower-supernode`` command line and its environment;
    ``socket``: where the site worker listens (the ClientApps forward to it);
    ``dirs``: :func:`site_dirs`, where the caller has checked them already."""
    deployment.split_address(opts.superlink, what="--superlink")
    io_host, io_port = deployment.split_address(opts.clientappio_address,
                                                what="--clientappio-address")
    if not deployment.is_private_host(io_host):
        raise DeploymentError("--clientappio-address must be a loopback address: "
                              "it hands this site's tasks to local ClientApps")
    count = check_data(opts.data_path)
    ledger, state = dirs or site_dirs(opts)
    device = check_device(opts.device)
    if opts.budget_epsilon < 0 or not 0 < opts.budget_delta < 1:
        raise DeploymentError("--budget-epsilon must be >= 0 (0: no limit) and "
                              "--budget-delta in (0, 1)")
    if opts.lora_rank < 0:
        raise DeploymentError("--lora-rank must be >= 1 (or 0: the run's lora.r)")
    if opts.label and not LABEL.fullmatch(opts.label):
        raise DeploymentError(f"--label {opts.label!r}: use 1-64 letters, digits, "
                              "'.', '-' or '_' (e.g. hospital-a)")
    rules = site_policy(opts)
    budget = opts.budget_epsilon or rules.budget_epsilon
    node_config = " ".join([
        f"data-path={_quote(str(opts.data_path.expanduser().resolve()))}",
        f"ledger-dir={_quote(str(ledger))}", f"device={_quote(device)}",
        f"budget-epsilon={float(budget)!r}",
        f"budget-delta={float(opts.budget_delta)!r}",
        *([f"lora-rank={int(opts.lora_rank)}"] if opts.lora_rank else []),
        *([f"{channel.WORKER_SOCKET}={_quote(str(socket))}"] if socket else []),
        *([f"{policy.POLICY_PATH}={_quote(str(opts.policy.expanduser().resolve()))}"]
          if opts.policy else []),
        *([f"{policy.NON_PRIVATE}=true"] if opts.allow_non_private else []),
        *([f"site-label={_quote(opts.label)}"] if opts.label else [])])
    logger.info("site policy%s: %s", f" ({opts.policy})" if opts.policy else
                " (no --policy: the defaults)", rules.describe())
    if budget == 0:
        logger.warning("no privacy budget set (--budget-epsilon): this site's spending "
                       "is recorded in %s but not limited", ledger)
    argv = [deployment.executable("flower-supernode"), "--superlink", opts.superlink,
            "--node-config", node_config, "--host", io_host, "--port", str(io_port)]
    extra: dict[str, str] = {}
    if opts.insecure:
        argv.append("--insecure")
        extra[deployment.INSECURE_ENV] = "1"
    else:
        if opts.ca_cert is None or opts.node_key is None:
            raise DeploymentError(
                "--ca-cert and --key are required: the federation's CA certificate "
                "proves the server is genuine and the node key authenticates this "
                "site. To connect without TLS on a trusted test network, pass "
                "--insecure explicitly")
        keys.load_ca_cert(opts.ca_cert)
        keys.check_node_private_key(opts.node_key)
        argv += ["--root-certificates", str(opts.ca_cert.resolve()),
                 "--auth-supernode-private-key", str(opts.node_key.resolve())]
    logger.info("site data: %d records in %s; ledger: %s; device: %s", count,
                opts.data_path, ledger, device)
    logger.info("site label: %s (the SuperLink's node id follows in Flower's "
                "'SuperNode ID' line once connected)", opts.label or
                "none (--label names this site in the operator's logs and report)")
    return argv, deployment.flower_env(home=state / "flwr", extra=extra)


def site_policy(opts: ClientOptions) -> policy.SitePolicy:
    """The site's rules, checked now (an unknown key or a bad value stops the
    daemon), with one total budget: ``--budget-epsilon`` or the policy's."""
    rules = (policy.load(opts.policy, allow_non_private=opts.allow_non_private)
             if opts.policy else
             policy.SitePolicy(allow_non_private=opts.allow_non_private))
    if rules.budget_epsilon and opts.budget_epsilon and \
            rules.budget_epsilon != opts.budget_epsilon:
        raise DeploymentError(
            f"--budget-epsilon {opts.budget_epsilon:g} and the policy's "
            f"budget_epsilon {rules.budget_epsilon:g} differ: set the site's total "
            "budget in one place")
    return rules


def run_client(opts: ClientOptions) -> int:
    """Check everything, warn about insecure settings, then run the site worker and
    the SuperNode until a signal (or become the SuperNode, without a worker).
    Returns the daemon's exit status."""
    ledger, state = dirs = site_dirs(opts)
    lock = supervisor.lock_ledger(ledger)
    socket = None
    if opts.worker:
        socket = supervisor.socket_path(state)
        supervisor.clear_stale(socket)
    argv, env = supernode_command(opts, socket=socket, dirs=dirs)
    look = functools.partial(probe.probe, opts.superlink,
                             ca_cert=None if opts.insecure else opts.ca_cert)
    first = look()
    if first.fatal:  # no retry fixes it: status 2, systemd leaves the unit stopped
        raise DeploymentError(first.words(opts.superlink))
    if not first.ok:
        logger.warning("%s; the SuperNode keeps retrying", first.words(opts.superlink))
    if opts.allow_non_private:
        logger.warning(
            "NON-PRIVATE RUNS ALLOWED (--allow-non-private): a run with "
            "privacy.enabled=false trains on this site's data WITHOUT differential "
            "privacy, and its updates can reveal individual records. Remove the "
            "flag unless the privacy officer has approved it.")
    if opts.insecure:
        logger.warning(
            "INSECURE CLIENT: TLS and node authentication are OFF (--insecure). This "
            "site's adapter updates travel in clear text and it cannot tell the real "
            "server from an impostor. Use this only on a trusted test network.")
    if socket is None:
        deployment.exec_flower(argv, env)  # the lock stays held by this PID
        return 0  # not reached
    try:
        return supervisor.Supervisor(worker_argv=supervisor.worker_command(socket),
                                     supernode_argv=argv, env=env,
                                     socket=socket, address=opts.superlink,
                                     probe=look).run()
    finally:
        lock.close()
