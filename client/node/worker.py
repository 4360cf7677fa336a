"""The persistent site worker: torch, the model, the tokenized data and the ledger,
loaded once and kept warm across rounds and runs.

``fedtune client`` starts it (``python -m fedtune.client.node.worker --socket PATH``)
and
restarts it if it dies. It listens on a Unix-domain socket (mode 0600 in a 0700
directory; connections from another user are refused) and runs each task Flower's
thin per-message ClientApp (:mod:`fedtune.client.node.forwarder`) hands it through
exactly the ClientApp code a simulation runs: training, evaluation, privacy
planning and ledger charging are today's, not a copy. Tasks run one at a time (two
runs arriving at once are serialised here; the ledger's file lock still decides
what may be spent). A request it cannot parse gets an error reply, and it goes on
serving.

Requests (see :mod:`fedtune.client.node.channel` for the framing):

- ``{"op": "task"}`` + Flower's Message and Context protobufs -> ``{"ok": true}`` +
  the reply's RecordDict and the context's new state, or ``{"ok": false, "error":
  "<ErrorClass> on the site ..."}`` (the only words about a failure that leave);
- ``{"op": "ping"}`` -> ``{"ok": true, "pid": ..., "stats": {...}}``: tasks served,
  model and data loads (the daemon, the tests and ``bench/`` read them).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import socketserver
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import serde
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.supercore.task_identity import TaskIdentity

from fedtune.client import mods
from fedtune.client.node import channel
from fedtune.common.deployment import ensure_app_logging

logger = logging.getLogger("fedtune.client.node.worker")


class Worker:
    """Runs tasks one at a time through the full ClientApp."""

    def __init__(self) -> None:
        started = time.perf_counter()
        from fedtune.client import app, site  # torch, transformers, peft, opacus

        self._app: ClientApp = app.make_client_app(secagg=False)
        self._loads = site.load_counts
        self._lock = threading.Lock()
        self.tasks = 0
        self.failed = 0
        self.current = ""  # the message type of the task running now
        self.import_seconds = time.perf_counter() - started

    def stats(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "failed": self.failed, "current": self.current,
                **self._loads(),
                "import_seconds": round(self.import_seconds, 3)}

    def run(self, header: dict[str, Any], blobs: list[bytes]
            ) -> tuple[dict[str, Any], list[bytes]]:
        """One task; the reply header and frames."""
        if len(blobs) != 2:
            raise channel.ChannelError(f"a task has 2 frames, got {len(blobs)}")
        msg = serde.message_from_proto(ProtoMessage.FromString(blobs[0]))
        context = serde.context_from_proto(ProtoContext.FromString(blobs[1]))
        with self._lock:
            # What Flower's ClientApp process would hold for this task (the reply
            # Message the app builds reads it)
            TaskIdentity.task_id = int(header.get("task_id", 0))
            TaskIdentity.run_id = context.run_id
            TaskIdentity.node_id = context.node_id
            began = time.time()
            self.current = msg.metadata.message_type
            try:
                reply = self._serve(msg, context)
            except Exception as err:  # noqa: BLE001 - reduced to its class name
                self.failed += 1
                return ({"ok": False, "error": mods.failure_text(err),
                         "began": began, "ended": time.time()}, [])
            finally:
                self.tasks += 1
                self.current = ""
            ended = time.time()
        logger.info("%s task of run %d served in %.2f s (%s)",
                    msg.metadata.message_type, context.run_id, ended - began,
                    ", ".join(f"{k} {v}" for k, v in self._loads().items()))
        return ({"ok": True, "began": began, "ended": ended},
                [serde.recorddict_to_proto(reply.content).SerializeToString(),
                 serde.recorddict_to_proto(context.state).SerializeToString()])

    def _serve(self, msg: Message, context: Context) -> Message:
        reply = self._app(msg, context)
        if reply.has_error():
            raise mods.SiteFailure(reply.error.reason)
        return reply


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        conn: socket.socket = self.request
        uid = channel.peer_uid(conn)
        if uid is not None and uid != os.getuid():
            logger.warning("refused a connection from uid %d", uid)
            return
        try:
            header, blobs = channel.recv(conn)
            op = header.get("op")
            if op == channel.PING:
                stats = self.server.worker.stats()
                reply: tuple[dict[str, Any], list[bytes]] = (
                    {"ok": True, "pid": os.getpid(), "stats": stats}, [])
            elif op == channel.TASK:
                reply = self.server.worker.run(header, blobs)
            else:
                raise channel.ChannelError(f"unknown request {op!r}")
        except channel.ChannelClosed:
            return  # the caller went away; nothing to answer
        except Exception as err:  # noqa: BLE001 - a bad request must not stop us
            logger.warning("unusable request: %s: %s", type(err).__name__, err)
            reply = ({"ok": False, "error": mods.failure_text(err)}, [])
        try:
            channel.send(conn, reply[0], *reply[1])
        except OSError as err:
            logger.warning("could not answer (the caller left?): %s", err)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, worker: Worker) -> None:
        self.worker = worker
        old = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)


def _watch_parent(parent: int, server: _Server) -> None:
    """Stop serving once the daemon that started us is gone (we were re-parented)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    logger.warning("the daemon (pid %d) is gone: the site worker stops", parent)
    server.shutdown()


def serve(path: Path, *, parent: int = 0) -> None:
    """Load, listen on ``path`` until SIGTERM/SIGINT (or until the ``parent``
    daemon is gone), then remove the socket."""
    ensure_app_logging()
    worker = Worker()
    channel.prepare_dir(path.parent)
    if path.exists() or path.is_symlink():
        path.unlink()  # the daemon checked nothing else listens here
    server = _Server(path, worker)

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if parent:
        threading.Thread(target=_watch_parent, args=(parent, server), daemon=True,
                         name="parent-watch").start()
    logger.info("site worker %d ready on %s (torch, transformers, peft and opacus "
                "imported in %.1f s)", os.getpid(), path, worker.import_seconds)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        path.unlink(missing_ok=True)
        logger.info("site worker %d stopped", os.getpid())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedtune.client.node.worker",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--parent", type=int, default=0,
                        help="the daemon's pid: stop when it is gone")
    args = parser.parse_args(argv)
    serve(args.socket, parent=args.parent)


if __name__ == "__main__":
    main()
