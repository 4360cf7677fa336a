"""The ClientApp Flower starts for every message: a thin forwarder to the site worker.

Flower 1.39's SuperNode runs each message in a fresh ``flwr-clientapp`` process that
exits after one task. This app imports neither torch nor transformers: it hands the
message and its context to the persistent site worker
(:mod:`fedtune.client.node.worker`)
that ``fedtune client`` keeps warm, over the Unix socket the daemon names in the
node_config (``worker-socket``), and returns the worker's reply. SecAgg+ rounds are
masked here, by Flower's ``secaggplus_mod``, around the worker's training.

Without a ``worker-socket`` (a SuperNode started by hand, ``flwr run`` on a
simulation federation) the full app runs in this process, as before.

What the server may learn of a failure is the error's class name only, whichever
process it happened in; the details stay in the site's log.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import serde
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedtune.client.mods import (
    SiteFailure,
    private_errors,
    secagg_when_asked,
)
from fedtune.client.node import channel
from fedtune.common.config import FederationConfig, run_config_key

logger = logging.getLogger(__name__)
ROUND_TIMEOUT = run_config_key("federation", "round_timeout")  # bound on one round
DEFAULT_ROUND_TIMEOUT = FederationConfig.round_timeout
WORKER_WAIT = 120.0  # seconds to wait for a (re)starting worker to listen


def task_timeout(context: Context) -> float:
    """How long one task may take: the run's round timeout (plus a margin, so the
    server's own bound fires first and names the late site)."""
    value = context.run_config.get(ROUND_TIMEOUT, DEFAULT_ROUND_TIMEOUT)
    seconds = float(value) if isinstance(value, int | float) else DEFAULT_ROUND_TIMEOUT
    return max(seconds, 1.0) + 30.0


def forward(path: Path, msg: Message, context: Context) -> Message:
    """Run ``msg`` on the worker at ``path``; its reply, with the context's state
    updated as the worker left it."""
    header, blobs = channel.request(
        path, {"op": channel.TASK, "task_id": _task_id()},
        serde.message_to_proto(msg).SerializeToString(),
        serde.context_to_proto(context).SerializeToString(),
        wait=min(WORKER_WAIT, task_timeout(context)), timeout=task_timeout(context))
    if not header.get("ok"):
        raise SiteFailure(str(header.get("error", "the site worker failed")))
    if len(blobs) != 2:
        raise channel.ChannelError(f"the worker replied with {len(blobs)} frames, "
                                   "expected 2")
    content, state = (serde.recorddict_from_proto(ProtoRecordDict.FromString(b))
                      for b in blobs)
    context.state = state
    return Message(content, reply_to=msg)


def _task_id() -> int:
    try:
        return int(TaskIdentity.task_id)
    except RuntimeError:  # called outside a Flower ClientApp process
        return 0


@functools.lru_cache(maxsize=1)
def _in_process() -> ClientApp:
    from fedtune.client.app import make_client_app

    return make_client_app(secagg=False)


@private_errors
def handle(msg: Message, context: Context) -> Message:
    """Forward to the site worker, or run in this process when there is none."""
    path: Any = context.node_config.get(channel.WORKER_SOCKET)
    if not path:
        return _in_process()(msg, context)
    return forward(Path(str(path)), msg, context)


app = ClientApp(mods=[secagg_when_asked])
app.train()(handle)
app.evaluate()(handle)
app.query()(handle)
