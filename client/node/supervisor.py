"""The daemon's two children: the persistent site worker and Flower's SuperNode.

``fedtune client`` holds an exclusive lock on its ledger directory for its whole
life (a second daemon on the same ledger is refused), starts the worker and the
SuperNode, restarts the worker whenever it exits (backing off while it keeps dying
young), and stops both on SIGTERM/SIGINT. If the SuperNode exits, the daemon stops
the worker and exits with the SuperNode's status (systemd restarts the unit).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from fedtune.client.node import channel
from fedtune.client.node.probe import Probe
from fedtune.common.errors import DeploymentError

logger = logging.getLogger(__name__)
LOCK_FILE = ".fedtune-daemon.lock"
HEALTHY_AFTER = 60.0  # a worker that lived this long resets the back-off
MAX_BACKOFF = 30.0
STOP_WAIT = 15.0


def lock_ledger(directory: Path) -> IO[str]:
    """Hold ``directory``'s daemon lock (released when the process ends)."""
    handle = open(directory / LOCK_FILE, "a+")  # noqa: SIM115 - held for life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise DeploymentError(
            f"another fedtune client (pid {holder}) already serves the ledger "
            f"directory {directory}; two daemons on one ledger could each spend the "
            "site's budget. Stop it first, or give this daemon its own --ledger-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def socket_path(state_dir: Path) -> Path:
    """Where the worker listens: ``STATE_DIR/worker/site.sock``, or a private
    temporary directory when that path is too long for a Unix socket."""
    path = state_dir / "worker" / channel.SOCKET_NAME
    if len(str(path)) <= channel.PATH_MAX:
        return path
    import tempfile

    short = Path(tempfile.mkdtemp(prefix="fedtune-worker-")) / channel.SOCKET_NAME
    logger.info("%s is too long for a Unix socket; the worker listens on %s",
                path, short)
    return short


def clear_stale(path: Path) -> None:
    """Remove a socket a crashed daemon left behind; refuse a live one or a file
    that is not ours to remove."""
    channel.prepare_dir(path.parent)
    if not (path.exists() or path.is_symlink()):
        return
    info = path.lstat()
    if info.st_uid != os.getuid() or not stat.S_ISSOCK(info.st_mode):
        raise DeploymentError(f"{path} is not a socket of this user; remove it or "
                              "use another --state-dir")
    if channel.answering(path):
        raise DeploymentError(f"a site worker already listens on {path}: another "
                              "`fedtune client` uses this --state-dir; stop it or "
                              "give this daemon its own --state-dir")
    logger.info("removing the stale worker socket %s (left by a daemon that "
                "stopped without cleaning up)", path)
    path.unlink()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the daemon dies, even by SIGKILL
    (Linux ``PR_SET_PDEATHSIG``), so no worker outlives its daemon holding the
    socket. Elsewhere the worker watches its parent itself."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


RETRY = "Connection attempt failed"  # Flower's SuperNode, retrying the SuperLink
TLS_FAILURE = ("handshake", "CERTIFICATE_VERIFY_FAILED", "BAD_SIGNATURE")
CONNECTED = "SuperNode ID:"  # Flower's line once the SuperLink accepted the node
REMIND_EVERY = 10  # attempts between the ERROR lines that say what to check


class Supervisor:
    """Start, watch and stop the worker and the SuperNode.

    The SuperNode's output is relayed line by line (unchanged) and read:
    Flower's retry lines get one of fedtune's, naming the address and the cause
    (``probe``, :mod:`fedtune.client.node.probe`), every :data:`REMIND_EVERY`
    attempts an ERROR says what to check, and a TLS failure stops the daemon with
    status 2 (a configuration error: the systemd unit does not restart it)."""

    def __init__(self, *, worker_argv: Sequence[str], supernode_argv: Sequence[str],
                 env: Mapping[str, str], socket: Path, address: str = "",
                 probe: Callable[[], Probe] | None = None) -> None:
        self.worker_argv = list(worker_argv)
        self.supernode_argv = list(supernode_argv)
        self.env = dict(env)
        self.socket = socket
        self.address = address
        self.probe = probe
        self.attempts = 0
        self.connected = False
        self.fatal: str | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.supernode: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stop: int | None = None
        self._started = 0.0
        self._backoff = 1.0
        self._restart_at: float | None = None

    def _start_worker(self) -> None:
        self.worker = subprocess.Popen(self.worker_argv, env=self.env,
                                       preexec_fn=_die_with_parent)
        self._started = time.monotonic()
        logger.info("site worker started (pid %d)", self.worker.pid)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop = signum

    def run(self) -> int:
        """Until a signal or the SuperNode's exit; the daemon's exit status."""
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        try:
            self._start_worker()
            self.supernode = subprocess.Popen(self.supernode_argv, env=self.env,
                                              stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT,
                                              preexec_fn=_die_with_parent)
            threading.Thread(target=self._relay, args=(self.supernode,),
                             daemon=True).start()
            return self._watch()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _relay(self, proc: subprocess.Popen[bytes]) -> None:
        """Copy the SuperNode's output to the daemon's and read each line."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            sys.stderr.write(line)
            sys.stderr.flush()
            try:
                self.read(line)
            except Exception:  # noqa: BLE001 - reading must never stop the relay
                logger.exception("could not read a SuperNode line")

    def read(self, line: str) -> None:
        """Act on one line of the SuperNode's output."""
        if CONNECTED in line:
            self.connected, self.attempts = True, 0
            node = line.split(CONNECTED, 1)[1].strip()
            logger.info("connected to the SuperLink at %s as node %s", self.address,
                        node)
            return
        tls = any(word in line for word in TLS_FAILURE)
        if RETRY not in line and not tls:
            return
        self.attempts += RETRY in line
        found = self.probe() if self.probe is not None else Probe(
            False, "TLS handshake failed" if tls else "no answer",
            "Check --superlink and --ca-cert", fatal=tls)
        if found.fatal:
            self.fatal = found.words(self.address)
            return
        if found.ok and not tls:
            logger.warning("the SuperNode could not connect to %s (attempt %d), "
                           "though the address answers now: it retries",
                           self.address, self.attempts)
            return
        logger.warning("%s (attempt %d; the SuperNode retries)",
                       found.words(self.address), self.attempts)
        if self.attempts % REMIND_EVERY == 0:
            logger.error("after %d attempts %s", self.attempts,
                         found.words(self.address))

    def _watch(self) -> int:
        assert self.supernode is not None
        while self._stop is None:
            if self.fatal is not None:
                logger.error("%s. The daemon stops with status 2 (a configuration "
                             "error: restarting would not help)", self.fatal)
                return 2
            code = self.supernode.poll()
            if code is not None:
                time.sleep(0.3)  # the relay reads the SuperNode's last lines
                if self.fatal is not None:
                    continue
                logger.error("the SuperNode stopped (%s); stopping the site worker",
                             _describe(code))
                return code if code > 0 else 1
            self._check_worker()
            time.sleep(0.2)
        logger.info("received %s: stopping the SuperNode and the site worker",
                    signal.Signals(self._stop).name)
        return 0

    def _check_worker(self) -> None:
        now = time.monotonic()
        if self._restart_at is not None:
            if now >= self._restart_at:
                self._restart_at = None
                self.restarts += 1
                self._start_worker()
            return
        if self.worker is None or (code := self.worker.poll()) is None:
            return
        lived = now - self._started
        self._backoff = 1.0 if lived > HEALTHY_AFTER else min(self._backoff * 2,
                                                               MAX_BACKOFF)
        delay = 0.0 if lived > HEALTHY_AFTER else self._backoff
        logger.warning("the site worker (pid %d) stopped (%s) after %.0f s; "
                       "restarting it%s. A task it was running fails with an error "
                       "reply; the ledger keeps every charge it recorded",
                       self.worker.pid, _describe(code), lived,
                       f" in {delay:.0f} s" if delay else "")
        self._restart_at = now + delay

    def stop(self) -> None:
        """SIGTERM both children, then SIGKILL what is left after a bounded wait."""
        children = [p for p in (self.supernode, self.worker) if p is not None]
        for proc in children:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_WAIT
        for proc in children:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_WAIT)
        self.socket.unlink(missing_ok=True)


def worker_command(socket: Path) -> list[str]:
    """The worker's command line (this Python, so the same environment)."""
    return [sys.executable, "-m", "fedtune.client.node.worker", "--socket", str(socket),
            "--parent", str(os.getpid())]
