"""``fedtune server``: the SuperLink an operator runs, secure by default.

TLS (Fleet, Control and Runtime APIs) and SuperNode authentication are on; state
persists in a SQLite database; Flower's runtime ``uv sync`` of app dependencies and
telemetry are off. The Control API (run submission, node registration) is bound to a
loopback or private address only; hospitals reach the Fleet API alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedtune.common import deployment, keys
from fedtune.common.errors import DeploymentError
from fedtune.server import rundir

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServerOptions:
    """What ``fedtune server`` was asked to start."""

    certs: Path | None
    fleet_address: str = "0.0.0.0:9092"
    control_address: str = "127.0.0.1:9093"
    state_dir: Path = Path("fedtune-server")
    insecure: bool = False
    log_file: Path | None = None


def _check_certs(certs: Path) -> tuple[Path, Path, Path]:
    paths = (certs / keys.CA_CERT, certs / keys.SERVER_CERT, certs / keys.SERVER_KEY)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DeploymentError(
            f"missing TLS file(s) {missing}: create them with `fedtune keys ca --out "
            f"{certs}` and `fedtune keys server --ca {certs} --out {certs} --san "
            "HOSTNAME`")
    keys.load_ca_cert(paths[0])
    keys.load_cert(paths[1], what="server certificate",
                   fix=f"sign one with `fedtune keys server --ca {certs}`")
    return paths


def superlink_command(opts: ServerOptions) -> tuple[list[str], dict[str, str]]:
    """The checked ``flower-superlink`` command line and its environment."""
    fleet_host, _ = deployment.split_address(opts.fleet_address,
                                             what="--fleet-address")
    c_host, c_port = deployment.split_address(opts.control_address,
                                              what="--control-address")
    if not deployment.is_private_host(c_host):
        raise DeploymentError(
            f"--control-address {opts.control_address} is not a loopback or private "
            "address. The Control API submits runs and registers nodes: bind it to "
            "127.0.0.1 (or a private operator network) and expose only the Fleet API "
            "to hospitals")
    if opts.fleet_address == opts.control_address:
        raise DeploymentError("--fleet-address and --control-address must differ")
    state = deployment.writable_dir(opts.state_dir, what="--state-dir")
    argv = [deployment.executable("flower-superlink"),
            "--fleet-api-address", opts.fleet_address,
            "--host", c_host, "--port", str(c_port),
            "--database", str(state / "superlink.db"),
            "--disable-runtime-dependency-installation"]
    extra = {rundir.RUNS_DIR_ENV: str(deployment.writable_dir(state / "runs",
                                                       what="runs directory"))}
    if opts.insecure:
        argv.append("--insecure")
        extra[deployment.INSECURE_ENV] = "1"
    else:
        if opts.certs is None:
            raise DeploymentError(
                "TLS certificates are required: pass --certs DIR holding ca.crt, "
                "server.crt and server.key (see `fedtune keys --help`). To run "
                "without TLS and node authentication on a trusted test network, pass "
                "--insecure explicitly")
        ca, cert, key = _check_certs(opts.certs)
        argv += ["--ssl-ca-certfile", str(ca.resolve()), "--ssl-certfile",
                 str(cert.resolve()), "--ssl-keyfile", str(key.resolve()),
                 "--enable-supernode-auth"]
    if opts.log_file:
        argv += ["--log-file", str(opts.log_file)]
    if fleet_host in ("0.0.0.0", "::"):
        logger.info("Fleet API on all interfaces (%s): hospitals connect here",
                    opts.fleet_address)
    return argv, deployment.flower_env(home=state / "flwr", extra=extra)


def run_server(opts: ServerOptions) -> None:
    """Check everything, warn about insecure settings, then become the SuperLink."""
    argv, env = superlink_command(opts)
    if opts.insecure:
        logger.warning(
            "INSECURE SERVER: TLS and SuperNode authentication are OFF (--insecure). "
            "Adapter updates travel in clear text and ANY machine that reaches %s can "
            "join the federation. Use this only on a trusted test network.",
            opts.fleet_address)
    logger.info("SuperLink state: %s; run directories: %s", opts.state_dir,
                env[rundir.RUNS_DIR_ENV])
    deployment.exec_flower(argv, env)
