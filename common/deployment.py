"""What the server and client daemons share: addresses, Flower's environment, exec.

No Flower imports: the daemons start Flower's own ``flower-superlink`` and
``flower-supernode`` executables after fedtune has checked their inputs.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedtune.common.errors import DeploymentError

logger = logging.getLogger(__name__)

INSECURE_ENV = "FEDTUNE_INSECURE"  # set by `fedtune server --insecure` for the apps
# Flower's SuperExec polls for new ClientApp/ServerApp tasks every 1 s by default;
# 0.1 s trims the wait before each round's ClientApp process starts.
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
TASK_POLL_SECONDS = "0.1"
# a log record's attribute marking a per-site detail line: every deployed log
# keeps it; a simulation's terminal leaves it to RUN_DIR/logs/run.log
DETAIL_KEY = "fedtune_detail"
DETAIL = {DETAIL_KEY: True}  # logger.info(..., extra=DETAIL)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def split_address(address: str, *, what: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``) -> (host, port), or a clear error."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeploymentError(f"{what} {address!r} is not HOST:PORT "
                              "(e.g. 127.0.0.1:9093)")
    return host, int(port)


def is_private_host(host: str) -> bool:
    """Loopback, RFC 1918/4193 private or link-local: not reachable from outside."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a DNS name may resolve to anything
    return (ip.is_loopback or ip.is_private or ip.is_link_local) and \
        not ip.is_unspecified


def flower_env(*, home: Path, extra: Mapping[str, str] | None = None
               ) -> dict[str, str]:
    """Environment for Flower processes: telemetry off, state under ``home``."""
    env = dict(os.environ)
    # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name:
    # find the ones of this environment even when it is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                   env.get("PATH", "")])
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_HOME": str(home)})
    env.setdefault(TASK_POLL_ENV, TASK_POLL_SECONDS)  # bench/ compares with 1.0
    env.update(extra or {})
    return env


def executable(name: str) -> str:
    """Path of a Flower executable, preferring the one beside this Python."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise DeploymentError(f"{name} not found: install fedtune (it brings flwr) in "
                              "this environment")
    return found


def exec_flower(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Replace this process by a Flower daemon (same PID: systemd and tests can stop
    it directly; signals reach Flower's own handlers)."""
    logger.info("exec: %s", " ".join(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], list(argv), dict(env))


def writable_dir(path: Path, *, what: str) -> Path:
    """Create ``path`` if needed and prove it is writable, or say why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".fedtune-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DeploymentError(f"{what} {path} is not a writable directory ({err})"
                              ) from None
    return path.resolve()


# Flower's lines that tell an operator nothing (fedtune's own round line says what
# happened; federated evaluation is off on purpose, fedtune evaluates centrally):
# kept in the run's log (run.log, `flwr log RUN_ID`), off the operator's terminal
FLOWER_NOISE = ("Federated evaluation will be skipped",
                "Start `flwr-serverapp` process", "Successfully installed fedtune-run",
                "configure_train: Sampled", "aggregate_train: Received",
                "Loading weights:")


def ensure_app_logging() -> None:
    """Give the ``fedtune`` loggers their own INFO handler on stderr (once).

    A deployed ServerApp/ClientApp process has no logging set up, and importing
    Opacus installs a WARNING-level root handler; fedtune's INFO lines would vanish.
    Flower streams the ServerApp's stderr to ``flwr log`` / ``fedtune run``; a
    ClientApp's land in its daemon's log.
    """
    ours = logging.getLogger("fedtune")
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
