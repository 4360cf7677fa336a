"""The quicker reply poll wraps Flower's Grid without changing what it returns."""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

from flwr.serverapp import Grid

from fedtune.server.runtime import polling


class SlowGrid(Grid):
    """Replies ready ``delay`` seconds after the push; Flower's 3 s pull sleep."""

    pull_interval = 3.0

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.pushed_at = 0.0
        self.pulls = 0

    def set_run(self, run: Any) -> None: ...

    @property
    def run(self) -> Any:
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Any:
        return ("created", args, kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2]

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        self.pushed_at = time.monotonic()
        return [str(m) for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        self.pulls += 1
        if time.monotonic() - self.pushed_at < self.delay:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in message_ids]

    def send_and_receive(self, messages: Iterable[Any], *,
                         timeout: float | None = None) -> Iterable[Any]:
        raise AssertionError("the wrapper polls by itself")


def test_replies_are_seen_within_a_poll_not_flowers_three_seconds() -> None:
    grid = polling.quicker(SlowGrid(delay=0.3))
    t0 = time.monotonic()
    replies = list(grid.send_and_receive(["a", "b"], timeout=10))
    assert len(replies) == 2 and time.monotonic() - t0 < 0.3 + 2 * polling.POLL_SECONDS
    assert list(grid.get_node_ids()) == [1, 2]
    assert grid.create_message(1, x=2) == ("created", (1,), {"x": 2})


def test_the_timeout_still_bounds_the_wait() -> None:
    grid = polling.quicker(SlowGrid(delay=60))
    t0 = time.monotonic()
    assert list(grid.send_and_receive(["a"], timeout=0.6)) == []
    assert time.monotonic() - t0 < 0.6 + 2 * polling.POLL_SECONDS


def test_a_grid_that_polls_often_enough_is_left_alone() -> None:
    fast = SlowGrid(delay=0)
    fast.pull_interval = 0.1  # the simulation's in-memory Grid
    assert polling.quicker(fast) is fast
