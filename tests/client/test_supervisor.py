"""The daemon's supervision of the site worker: ledger lock, stale sockets,
restarts and shutdown (with stand-in children, no torch)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedtune.client.node import channel, supervisor
from fedtune.common.errors import DeploymentError


def test_a_second_daemon_on_the_same_ledger_is_refused(tmp_path: Path) -> None:
    held = supervisor.lock_ledger(tmp_path)
    try:
        with pytest.raises(DeploymentError,
                           match=rf"another fedtune client \(pid {os.getpid()}\)"):
            supervisor.lock_ledger(tmp_path)
    finally:
        held.close()
    supervisor.lock_ledger(tmp_path).close()  # free again once the first stops


def _bound(path: Path, *, listen: bool) -> socket.socket:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    if listen:
        sock.listen()
    return sock


def test_a_stale_socket_is_removed_and_a_live_one_refused(tmp_path: Path) -> None:
    stale = tmp_path / "a" / channel.SOCKET_NAME
    _bound(stale, listen=False).close()  # a crashed daemon's leftover
    supervisor.clear_stale(stale)
    assert not stale.exists()
    live = tmp_path / "b" / channel.SOCKET_NAME
    with _bound(live, listen=True):
        with pytest.raises(DeploymentError, match="already listens"):
            supervisor.clear_stale(live)
    plain = tmp_path / "c" / channel.SOCKET_NAME
    plain.parent.mkdir()
    plain.write_text("not a socket")
    with pytest.raises(DeploymentError, match="is not a socket of this user"):
        supervisor.clear_stale(plain)
    assert plain.read_text() == "not a socket"  # refused, not removed


def test_the_socket_directory_is_private(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    channel.prepare_dir(loose)
    assert loose.stat().st_mode & 0o777 == 0o700
    long = tmp_path / ("x" * 120)
    path = supervisor.socket_path(long)
    assert len(str(path)) <= channel.PATH_MAX
    assert path.parent.stat().st_mode & 0o077 == 0


SCRIPT = """
import logging, sys
from pathlib import Path
from fedtune.client.node import supervisor
logging.basicConfig(level=logging.INFO, format="%(message)s")
supervisor.HEALTHY_AFTER = 0.0  # restart at once, whatever the worker's age
sup = supervisor.Supervisor(
    worker_argv=[sys.executable, "-c", "import time; time.sleep(0.3)"],
    supernode_argv=[sys.executable, "-c", "import time; time.sleep(600)"],
    env={}, socket=Path(sys.argv[1]))
code = sup.run()
print("restarts", sup.restarts, "children",
      sup.supernode.poll() is not None, sup.worker.poll() is not None, flush=True)
sys.exit(code)
"""


def test_the_worker_is_restarted_and_sigterm_stops_everything(tmp_path: Path) -> None:
    # Prepare: a worker that exits every 0.3 s, a SuperNode that would run 10 min
    script = tmp_path / "sup.py"
    script.write_text(textwrap.dedent(SCRIPT))
    sock = tmp_path / "w" / channel.SOCKET_NAME
    sock.parent.mkdir()
    sock.write_text("")  # stands for the worker's socket: removed at the end
    proc = subprocess.Popen([sys.executable, str(script), str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    try:
        # Execute
        time.sleep(4)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Assert
    assert proc.returncode == 0, out
    restarts = int(out.split("restarts ")[1].split()[0])
    assert restarts >= 2, out
    assert "restarting it" in out and "received SIGTERM" in out
    assert out.rstrip().endswith("children True True")
    assert not sock.exists()


def test_a_supernode_that_stops_stops_the_daemon(tmp_path: Path) -> None:
    sup = supervisor.Supervisor(
        worker_argv=[sys.executable, "-c", "import time; time.sleep(600)"],
        supernode_argv=[sys.executable, "-c", "import sys; sys.exit(3)"],
        env=dict(os.environ), socket=tmp_path / "s.sock")
    assert sup.run() == 3
    assert sup.worker is not None and sup.worker.poll() is not None


KILLED = """
import sys
from pathlib import Path
from fedtune.client.node import supervisor
child = ("import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); "
         "time.sleep(600)")
root = Path(sys.argv[1])
supervisor.Supervisor(
    worker_argv=[sys.executable, "-c", child, str(root / "worker.pid")],
    supernode_argv=[sys.executable, "-c", child, str(root / "supernode.pid")],
    env={}, socket=root / "s.sock").run()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie waits for its reaper only
        return fh.read().split(") ")[1][0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG")
def test_children_do_not_outlive_a_daemon_killed_by_sigkill(tmp_path: Path) -> None:
    script = tmp_path / "sup.py"
    script.write_text(textwrap.dedent(KILLED))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while len(pids) < 2:
            assert time.monotonic() < deadline, "children did not start"
            files = [tmp_path / "worker.pid", tmp_path / "supernode.pid"]
            if all(f.exists() and f.read_text() for f in files):
                pids = [int(f.read_text()) for f in files]
            time.sleep(0.1)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids):
            assert time.monotonic() < deadline, "a child outlived its daemon"
            time.sleep(0.1)
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_second_daemon_is_refused_through_the_cli(tmp_path: Path) -> None:
    # Prepare: one daemon (no server needs to answer: it retries) on a ledger
    from tests.conftest import make_reviews, write_jsonl
    from tests.integration.cluster import free_port

    data = write_jsonl(tmp_path / "site.jsonl", make_reviews(10, 1))
    args = [sys.executable, "-m", "fedtune.simulations.cli", "client", "--superlink",
            f"127.0.0.1:{free_port()}", "--data", str(data), "--ledger-dir",
            str(tmp_path / "ledger"), "--insecure", "--device", "cpu"]
    first = subprocess.Popen([*args, "--state-dir", str(tmp_path / "a"),
                              "--clientappio-address", f"127.0.0.1:{free_port()}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        lock = tmp_path / "ledger" / supervisor.LOCK_FILE
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text().strip()):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        # Execute: a second daemon on the same ledger, with its own state dir
        second = subprocess.run([*args, "--state-dir", str(tmp_path / "b")],
                                capture_output=True, text=True, timeout=60)
        # Assert
        assert second.returncode == 2
        assert f"another fedtune client (pid {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=30)
    assert not (tmp_path / "a" / "worker" / channel.SOCKET_NAME).exists()
