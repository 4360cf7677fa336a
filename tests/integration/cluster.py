"""Real fedtune daemons on 127.0.0.1 for the deployment tests.

Every process runs in its own session; :meth:`Cluster.stop_all` kills each process
group by PID (the daemon and the ClientApp/ServerApp processes Flower started under
it). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.integration import runner

FEDTUNE = [sys.executable, "-m", "fedtune.simulations.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], *, timeout: float, what: str,
             every: float = 0.5) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Cluster:
    """A SuperLink and SuperNodes started through ``fedtune server|client``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "FEDTUNE_HOME": str(root / "operator"),
                    "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.fleet = f"127.0.0.1:{free_port()}"
        self.control = f"127.0.0.1:{free_port()}"
        self.certs = root / "certs"
        self.keys = root / "keys"

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with open(self.root / f"{name}.log", "ab") as out:
            proc = subprocess.Popen([*FEDTUNE, *args], stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        self.procs[name] = proc
        return proc

    def fedtune(self, *args: str, timeout: float = 120
                ) -> subprocess.CompletedProcess[str]:
        return runner.run(args, env=self.env, timeout=timeout)

    def start_server(self) -> None:
        started = self.log("server").count("Uvicorn running on https")
        self.start("server", "server", "--certs", str(self.certs),
                   "--fleet-address", self.fleet, "--control-address", self.control,
                   "--state-dir", str(self.root / "server-state"))
        wait_for(lambda: self.log("server").count("Uvicorn running on https") > started,
                 timeout=60, what="the SuperLink to listen")

    def provision(self, names: list[str], *, labelled: tuple[str, ...] | None = None
                  ) -> dict[str, str]:
        """A CA, the server's certificate, a key per node; the SuperLink started,
        the deployment ``test`` named, and each node registered (those in
        ``labelled`` with their name as label; default all). Returns the node ids
        by name."""
        for args in (["ca", "--out", str(self.certs)],
                     ["server", "--ca", str(self.certs), "--san", "127.0.0.1"],
                     *[["node", n, "--out", str(self.keys)] for n in names]):
            assert self.fedtune("keys", *args).returncode == 0
        self.start_server()
        added = self.fedtune("deployment", "add", "test", "--control", self.control,
                             "--ca-cert", str(self.certs / "ca.crt"))
        assert added.returncode == 0, added.stderr
        ids = {}
        for n in names:
            label = ["--label", n] if labelled is None or n in labelled else []
            reg = self.fedtune("keys", "register", str(self.keys / f"{n}.pub"),
                               "--deployment", "test", *label)
            assert reg.returncode == 0, reg.stderr
            ids[n] = reg.stdout.split()[-1]
        return ids

    def start_node(self, name: str, data: Path, *, key: str | None = None,
                   ca: Path | None = None, extra: tuple[str, ...] = ()
                   ) -> subprocess.Popen[bytes]:
        return self.start(
            name, "client", "--superlink", self.fleet, "--data", str(data),
            "--ledger-dir", str(self.root / name / "ledger"),
            "--ca-cert", str(ca or self.certs / "ca.crt"),
            "--key", str(self.keys / f"{key or name}.key"), "--device", "cpu",
            "--state-dir", str(self.root / name / "state"),
            "--clientappio-address", f"127.0.0.1:{free_port()}", *extra)

    def nodes(self) -> list[dict]:
        proc = self.fedtune("status", "--deployment", "test")
        assert proc.returncode == 0, proc.stderr
        return [{"id": int(p[0]), "status": p[1]} for p in
                (line.split() for line in proc.stdout.splitlines()
                 if line.startswith("  ") and "online since" in line)]

    def online(self) -> int:
        return sum(n["status"] == "online" for n in self.nodes())

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]
