"""Run ``fedtune`` commands (and the faulty-site harness) for the integration tests
in a fresh process each, without paying Python's imports of torch, transformers,
peft, opacus, flwr and Ray every time.

Each command runs in its own process, forked from a multiprocessing *forkserver*
that imported those libraries once per test worker: the same isolation as
``subprocess.run([sys.executable, "-m", "fedtune.simulations.cli", ...])`` (own
logging, own Ray driver, own process group, killed on timeout), ~5 s cheaper on
2 CPU cores. The forkserver imports modules only; it computes nothing and starts no
threads, so forking it is safe for torch.

Daemons that the tests kill with signals (``fedtune server|client``, the SIGKILL
resume test) stay real subprocesses.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

PRELOAD = ["torch", "transformers", "peft", "opacus", "ray", "flwr.simulation",
           "fedtune.simulations.cli", "fedtune.simulations.driver",
           "fedtune.client.app", "fedtune.server.runtime.app"]

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(PRELOAD)


def _child(target: Callable[[list[str]], int | None], argv: list[str],
           env: dict[str, str], out: str, err: str) -> None:
    os.setsid()  # its own process group, like start_new_session=True
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = ["fedtune", *argv]
    try:
        code = target(argv)
        rc = int(code or 0)
    except SystemExit as stop:  # argparse's exit, sys.exit in a command
        rc = stop.code if isinstance(stop.code, int) else (0 if stop.code is None
                                                           else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:  # what an uncaught exception does to `python -m`
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def fedtune_main(argv: list[str]) -> int:
    from fedtune.simulations.cli import main

    return main(argv)


def run(argv: Sequence[str], *, timeout: float = 420,
        env: Mapping[str, str] | None = None,
        target: Callable[[list[str]], int | None] = fedtune_main
        ) -> subprocess.CompletedProcess[str]:
    """``fedtune ARGV`` in a forked process; the result reads like
    ``subprocess.run(..., capture_output=True, text=True)``'s. On timeout the
    whole process group is killed and ``subprocess.TimeoutExpired`` raised."""
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="fedtune-run-") as tmp:
        out, err = str(Path(tmp) / "out"), str(Path(tmp) / "err")
        proc = _CTX.Process(target=_child, args=(target, list(argv), environ, out,
                                                 err))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            _kill_group(proc.pid)
            proc.join(20)
            raise subprocess.TimeoutExpired(["fedtune", *argv], timeout)
        _kill_group(proc.pid)  # Ray and anything else it left behind
        return subprocess.CompletedProcess(
            ["fedtune", *argv], proc.exitcode,
            Path(out).read_text(errors="replace"),
            Path(err).read_text(errors="replace"))


def _kill_group(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
