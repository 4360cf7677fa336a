"""A Ray cluster of the test's own on 127.0.0.1, and a simulation run on it.

:func:`ray_head` starts ``ray start --head --block`` in a session of its own, on
free loopback ports and its own ``--temp-dir``; every Ray process it starts (GCS,
raylet, agents, workers) is in that process group. It is stopped by that id:
SIGTERM to the group, SIGKILL after a bounded wait, never ``ray stop`` (which ends
every Ray process on the machine).

``simulate_main`` (a :func:`tests.integration.runner.run` target) runs
``fedtune.simulations.driver.simulate`` with a mod that records, in each site
actor, the Ray cluster it is connected to and its process ids.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

START_TIMEOUT = 90.0
# the head on the loopback, like the drivers (tests/conftest.py sets it for them)
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass(frozen=True)
class Head:
    pid: int  # the `ray start --block` process: the group's id
    address: str  # 127.0.0.1:PORT
    temp_dir: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def group_members(pgid: int) -> list[int]:
    """Process ids of the live processes in group ``pgid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def ray_head(*, cpus: int = 2) -> Iterator[Head]:
    """A one-node Ray cluster on 127.0.0.1, stopped (by its process group) after."""
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: unix sockets
    port = free_port()
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--temp-dir", str(temp), "--num-cpus", str(cpus), "--num-gpus", "0",
           "--include-dashboard=false", "--disable-usage-stats",
           "--dashboard-port", str(free_port()),
           "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()),
           "--dashboard-agent-grpc-port", str(free_port()),
           "--runtime-env-agent-port", str(free_port()),
           "--metrics-export-port", str(free_port())]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           **LOOPBACK_ENV}
    log = (temp / "head.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _reachable(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Ray head did not start: "
                                   + (temp / "head.log").read_text()[-2000:])
            time.sleep(0.5)
        yield Head(pid=proc.pid, address=f"127.0.0.1:{port}", temp_dir=temp)
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the head's process group, then SIGKILL to what is left."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while group_members(proc.pid) and time.monotonic() < deadline:
            proc.poll()  # reaps the head itself once it exits
            time.sleep(0.2)
        if not group_members(proc.pid):
            break
    proc.wait(timeout=10)


def probe_mod(out: str):  # noqa: ANN201 - a Flower mod
    """Records, in the actor that runs the site, its Ray cluster and process ids."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        import ray

        part = int(context.node_config.get("partition-id", -1))
        Path(out, f"{msg.metadata.message_id}.json"
             ).write_text(json.dumps({
                 "gcs": ray.get_runtime_context().gcs_address, "pid": os.getpid(),
                 "pgid": os.getpgid(0), "partition": part,
                 "type": msg.metadata.message_type}))
        return call_next(msg, context)

    return mod


def simulate_main(argv: list[str]) -> int:
    """``CONFIG RUN_DIR PROBE_DIR``: the simulation, with :func:`probe_mod`."""
    from fedtune.common import config
    from fedtune.common.deployment import ensure_app_logging
    from fedtune.simulations.driver import simulate

    ensure_app_logging()
    cfg_path, run_dir, probe = argv[:3]
    simulate(config.load(cfg_path), run_dir=Path(run_dir),
             client_mods=[probe_mod(probe)])
    return 0
