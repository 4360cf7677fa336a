"""The site's local channel between Flower's per-message ClientApp and the worker.

A Unix-domain socket (no TCP port) in a directory only the daemon's user may enter
(mode 0700); the socket itself is mode 0600. Each side speaks in frames: an 8-byte
big-endian length, then the bytes. A request or reply is one JSON header frame
followed by ``header["frames"]`` binary frames (Flower's own protobuf encoding of
the message and its context).

No torch and no Flower here: the forwarder that imports this starts in well under a
second.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.common.errors import DeploymentError

MAX_HEADER = 1 << 16  # bytes of JSON
MAX_FRAME = 1 << 30  # an adapter payload is megabytes; refuse a garbled length
MAX_FRAMES = 4
_LENGTH = struct.Struct(">Q")
SOCKET_NAME = "site.sock"
WORKER_SOCKET = "worker-socket"  # node_config key set by `fedtune client`
TASK = "task"  # op: run one Flower message through the ClientApp
PING = "ping"  # op: is the worker up, and what has it served
PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS


class ChannelError(DeploymentError):
    """A frame that is not what the protocol says (garbled, too long, not JSON)."""


class ChannelClosed(ChannelError):
    """The other side went away in the middle of a request or reply."""


def send(sock: socket.socket, header: Mapping[str, Any], *blobs: bytes) -> None:
    """One header and its binary frames."""
    head = json.dumps({**header, "frames": len(blobs)}).encode()
    for part in (head, *blobs):
        sock.sendall(_LENGTH.pack(len(part)))
        sock.sendall(part)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[bytes]]:
    """One header and its binary frames, or :class:`ChannelError`."""
    raw = _frame(sock, MAX_HEADER)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ChannelError("the header frame is not JSON") from None
    if not isinstance(header, dict):
        raise ChannelError("the header frame is not a JSON object")
    count = header.get("frames", 0)
    if not isinstance(count, int) or not 0 <= count <= MAX_FRAMES:
        raise ChannelError(f"bad frame count {count!r}")
    return header, [_frame(sock, MAX_FRAME) for _ in range(count)]


def _frame(sock: socket.socket, limit: int) -> bytes:
    (size,) = _LENGTH.unpack(_exactly(sock, _LENGTH.size))
    if size > limit:
        raise ChannelError(f"a frame of {size} bytes exceeds the limit of {limit}")
    return _exactly(sock, size)


def _exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ChannelClosed(f"the connection closed after {got} of {size} bytes")
        got += n
    return bytes(buf)


def prepare_dir(directory: Path) -> Path:
    """The socket's directory: created 0700, or an existing one of ours tightened
    to 0700; another user's directory is refused."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise DeploymentError(
            f"{directory} is not a directory owned by this user (uid {os.getuid()}); "
            "the site worker's socket must live in a private directory: point "
            "--state-dir elsewhere")
    if info.st_mode & 0o077:
        os.chmod(directory, 0o700)
    return directory.resolve()


def check_socket(path: Path) -> None:
    """``path`` is a socket of this user, mode 0600, in a directory only this user
    may enter; anything else is refused before a byte is sent."""
    try:
        info = path.lstat()
        parent = path.parent.lstat()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise DeploymentError(f"cannot inspect the site worker's socket {path}: "
                              f"{err.strerror}") from None
    problems = []
    if not stat.S_ISSOCK(info.st_mode):
        problems.append("it is not a socket")
    if info.st_uid != os.getuid() or parent.st_uid != os.getuid():
        problems.append(f"it (or its directory) belongs to uid {info.st_uid}, not "
                        f"to this user ({os.getuid()})")
    if info.st_mode & 0o077 or parent.st_mode & 0o077:
        problems.append(f"mode {stat.S_IMODE(info.st_mode):04o} in a directory of "
                        f"mode {stat.S_IMODE(parent.st_mode):04o} (expected 0600 in "
                        "0700)")
    if problems:
        raise DeploymentError(f"refusing the site worker socket {path}: "
                              f"{'; '.join(problems)}. Restart `fedtune client`: it "
                              "recreates the socket privately")


def connect(path: Path, *, wait: float) -> socket.socket:
    """Connect to the worker, waiting up to ``wait`` seconds while it (re)starts."""
    deadline = time.monotonic() + wait
    while True:
        try:
            check_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
            except OSError:
                sock.close()
                raise
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() >= deadline:
                raise DeploymentError(
                    f"the site worker is not answering on {path} after {wait:.0f} s; "
                    "`fedtune client` starts and restarts it - see the daemon's "
                    "log") from None
            time.sleep(0.2)


def answering(path: Path) -> bool:
    """Whether a process accepts connections on ``path`` now."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def peer_uid(sock: socket.socket) -> int | None:
    """The connecting process's user id (Linux ``SO_PEERCRED``); None elsewhere."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    return int(struct.unpack("3i", raw)[1])


def request(path: Path, header: Mapping[str, Any], *blobs: bytes, wait: float,
            timeout: float) -> tuple[dict[str, Any], list[bytes]]:
    """Send one request and return the reply; ``timeout`` bounds the answer."""
    with connect(path, wait=wait) as sock:
        sock.settimeout(timeout)
        try:
            send(sock, header, *blobs)
            return recv(sock)
        except TimeoutError:
            raise DeploymentError(f"the site worker did not answer within "
                                  f"{timeout:.0f} s") from None
        except ChannelClosed:
            raise DeploymentError("the site worker stopped before it answered (it "
                                  "crashed or was killed; `fedtune client` restarts "
                                  "it - see the daemon's log)") from None
