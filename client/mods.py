"""What every fedtune ClientApp wraps its handlers in, with no torch import: the
error reduction (the server learns a failure's class name only) and the SecAgg+
routing. The full app (:mod:`fedtune.client.app`) and the thin forwarder
(:mod:`fedtune.client.node.forwarder`) both use them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedtune.common.deployment import ensure_app_logging
from fedtune.common.errors import CONFIG_FAILURE, ConfigError, DataError, FedtuneError

logger = logging.getLogger(__name__)
Handler = Callable[[Message, Context], Message]
MAX_LINE = 400  # characters of a configuration error's line that leave the site


class SiteFailure(FedtuneError):
    """What the server learns when a site fails: the kind of error, no details."""


def failure_text(err: BaseException) -> str:
    """The only words about a site's failure that leave the site: its class, and
    for a configuration or data error (which file, which columns or labels: never
    a record) its first line, which the operator needs to fix the run."""
    if isinstance(err, SiteFailure):
        return str(err)
    public = (" ".join(err.problems) if isinstance(err, ConfigError) else
              err.public if isinstance(err, DataError) else "")
    if public:  # words from the run's config and the file's layout only
        return (f"{type(err).__name__} on the site ({CONFIG_FAILURE}): "
                f"{public.replace(chr(10), ' ')[:MAX_LINE]}")
    return f"{type(err).__name__} on the site (details stay in the site's own log)"


def private_errors(handler: Handler) -> Handler:
    """Log a failure in full on the site; send the server only its class name.

    Flower puts ``str(exception)`` in the error reply, and a message may name the
    site's file paths or values from its data.
    """

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        ensure_app_logging()
        try:
            return handler(msg, context)
        except SiteFailure:
            raise  # already reduced (by the worker)
        except Exception as err:  # noqa: BLE001 - re-raised without its details
            logger.error("%s failed on this site: %s: %s", msg.metadata.message_type,
                         type(err).__name__, err)
            text = failure_text(err)
            part = context.node_config.get("partition-id")
            if part is not None:  # a simulated site: its name, for the server's log
                from fedtune.common.records import site_name  # torch: a failure only

                text += f" [{site_name(int(part))}]"
            raise SiteFailure(text) from None

    return guarded


def secagg_when_asked(msg: Message, context: Context,
                      call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ rounds through Flower's ``secaggplus_mod``; others pass."""
    if msg.metadata.message_type == MessageType.TRAIN and \
            RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)
