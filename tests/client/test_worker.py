"""The persistent site worker and the thin forwarder, as real processes on a Unix
socket (no Flower deployment: the forwarder is called with Flower Messages)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import serde

from fedtune.client import mods
from fedtune.client.node import channel, forwarder
from fedtune.common import config, records
from fedtune.common.errors import DeploymentError
from fedtune.common.model import adapter_state, build_model
from tests.conftest import make_reviews, tiny_config, write_jsonl

pytestmark = pytest.mark.usefixtures("flower_identity")


class Worker:
    """A ``python -m fedtune.client.node.worker`` process and its socket."""

    def __init__(self, root: Path) -> None:
        self.socket = root / "state" / "worker" / channel.SOCKET_NAME
        self.log = root / "worker.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedtune.client.node.worker", "--socket",
                 str(self.socket)], stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + 120
        while not (self.socket.exists() and channel.answering(self.socket)):
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the worker did not listen in 120 s"
            time.sleep(0.2)

    def ping(self) -> dict:
        header, _ = channel.request(self.socket, {"op": channel.PING}, wait=5,
                                    timeout=30)
        assert header["ok"] and header["pid"] == self.proc.pid
        return dict(header["stats"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    w = Worker(tmp_path_factory.mktemp("worker"))
    try:
        yield w
    finally:
        w.stop()


def _task(tiny_bert: Path, review_files: tuple[Path, Path], data: Path, ledger: Path,
          *, kind: str = "train", rnd: int = 1, **train: object
          ) -> tuple[Message, Context]:
    cfg = config.from_dict(tiny_config(tiny_bert, *review_files, train=train))
    model = build_model(cfg.model, cfg.lora, num_labels=3)
    msg = Message(RecordDict({
        records.ARRAYS: records.to_record(adapter_state(model)),
        records.CONFIG: ConfigRecord({records.SERVER_ROUND: rnd})}),
        dst_node_id=7, message_type=kind)
    msg.metadata.__dict__["_message_id"] = f"{kind}-{rnd}"  # Flower sets it on push
    ctx = Context(run_id=5, node_id=7, node_config={
        "data-path": str(data), "ledger-dir": str(ledger), "device": "cpu"},
        state=RecordDict(), run_config=dict(config.to_run_config(cfg)))
    return msg, ctx


def test_tasks_run_on_the_warm_worker_which_loads_the_model_once(
        worker: Worker, tiny_bert: Path, review_files: tuple[Path, Path],
        tmp_path: Path) -> None:
    # Prepare
    data = write_jsonl(tmp_path / "site.jsonl", make_reviews(40, 3))
    before = worker.ping()
    # Execute: two training rounds and an evaluation, through the forwarder
    replies = []
    ctx = None
    for rnd, kind in ((1, "train"), (2, "train"), (2, "evaluate")):
        msg, fresh = _task(tiny_bert, review_files, data, tmp_path / "ledger",
                           kind=kind, rnd=rnd)
        if ctx is not None:
            fresh.state = ctx.state  # Flower keeps the node's state between rounds
        ctx = fresh
        replies.append(forwarder.forward(worker.socket, msg, ctx))
    after = worker.ping()
    # Assert: adapter tensors and metrics came back, epsilon grew, the state the
    # worker left reached the context, and nothing was loaded twice
    first, second, evaluated = (r.content for r in replies)
    assert set(first.array_records) == {records.ARRAYS}
    eps = [c[records.METRICS][records.EPSILON] for c in (first, second)]
    assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6
    assert records.MACRO_F1 in evaluated[records.METRICS]
    assert "fedtune-privacy" in ctx.state.config_records
    assert after["tasks"] - before["tasks"] == 3 and after["failed"] == before["failed"]
    assert after["model_loads"] == 1 and after["models_built"] == 1
    assert after["data_loads"] - before["data_loads"] <= 1
    (ledger,) = (tmp_path / "ledger").glob("*.json")
    assert len(json.loads(ledger.read_text())["entries"]) == 2


def test_a_failure_reaches_the_server_as_its_class_name_only(
        worker: Worker, tiny_bert: Path, review_files: tuple[Path, Path],
        tmp_path: Path) -> None:
    secret = tmp_path / "patient-jane-doe.jsonl"
    secret.write_text('{"review": "private text", "rating": "label-x"}\n' * 5)
    msg, ctx = _task(tiny_bert, review_files, secret, tmp_path / "ledger")
    with pytest.raises(mods.SiteFailure) as info:
        forwarder.forward(worker.socket, msg, ctx)
    text = str(info.value)
    assert text.startswith("DataError on the site")
    assert "jane-doe" not in text and "label-x" not in text
    assert "label-x" in worker.log.read_text()  # the site's own log has it all


def test_a_changed_data_file_is_read_again(worker: Worker, tiny_bert: Path,
                                           review_files: tuple[Path, Path],
                                           tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "site.jsonl", make_reviews(40, 4))
    msg, ctx = _task(tiny_bert, review_files, data, tmp_path / "ledger",
                     kind="evaluate")
    forwarder.forward(worker.socket, msg, ctx)
    loads = worker.ping()["data_loads"]
    forwarder.forward(worker.socket, msg, ctx)
    assert worker.ping()["data_loads"] == loads  # unchanged file: cached
    write_jsonl(data, make_reviews(60, 5))  # the site replaced its file
    reply = forwarder.forward(worker.socket, msg, ctx)
    assert worker.ping()["data_loads"] == loads + 1
    assert reply.content[records.METRICS][records.NUM_EXAMPLES] == 6  # 10% of 60


def test_garbage_gets_an_error_reply_and_the_worker_keeps_serving(
        worker: Worker) -> None:
    for junk in (b"\x00\x00\x00\x00\x00\x00\x00\x05hello",  # not JSON
                 (1 << 40).to_bytes(8, "big"),  # a length past any limit
                 b"\x00\x00\x00\x00\x00\x00\x00\x0f" + b'{"op": "sing"}\n'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(worker.socket))
            s.sendall(junk)
            header, _ = channel.recv(s)
        assert header["ok"] is False and "on the site" in header["error"]
    garbled = serde.message_to_proto(Message(RecordDict(), dst_node_id=1,
                                             message_type="train"))
    header, _ = channel.request(worker.socket, {"op": channel.TASK},
                                garbled.SerializeToString(), b"not a context",
                                wait=5, timeout=30)
    assert header["ok"] is False and "DecodeError" in header["error"]
    assert worker.ping()["tasks"] >= 0  # still serving


def test_two_tasks_at_once_are_served_one_after_the_other(
        worker: Worker, tiny_bert: Path, review_files: tuple[Path, Path],
        tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "site.jsonl", make_reviews(40, 6))
    frames = []
    for run in (11, 12):
        msg, ctx = _task(tiny_bert, review_files, data, tmp_path / f"ledger{run}")
        ctx.run_id = run
        frames.append((serde.message_to_proto(msg).SerializeToString(),
                       serde.context_to_proto(ctx).SerializeToString()))
    headers: list[dict] = []

    def send(blobs: tuple[bytes, bytes]) -> None:
        headers.append(channel.request(worker.socket, {"op": channel.TASK}, *blobs,
                                       wait=5, timeout=120)[0])

    threads = [threading.Thread(target=send, args=(f,)) for f in frames]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert len(headers) == 2 and all(h["ok"] for h in headers), headers
    a, b = sorted(headers, key=lambda h: h["began"])
    assert a["ended"] <= b["began"]


def test_a_socket_others_could_use_is_refused(worker: Worker, tiny_bert: Path,
                                              review_files: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    msg, ctx = _task(tiny_bert, review_files, tmp_path / "x.jsonl", tmp_path / "l")
    os.chmod(worker.socket, 0o666)
    try:
        with pytest.raises(DeploymentError, match="refusing the site worker socket"):
            forwarder.forward(worker.socket, msg, ctx)
    finally:
        os.chmod(worker.socket, 0o600)
    assert worker.socket.stat().st_mode & 0o777 == 0o600


def test_a_worker_killed_mid_task_fails_the_task_at_once(
        tiny_bert: Path, review_files: tuple[Path, Path], tmp_path: Path) -> None:
    # Prepare: a worker of its own and a task long enough to be caught running
    w = Worker(tmp_path)
    data = write_jsonl(tmp_path / "site.jsonl", make_reviews(40, 7))
    msg, ctx = _task(tiny_bert, review_files, data, tmp_path / "ledger",
                     local_epochs=50, max_steps=0)
    ctx.node_config[channel.WORKER_SOCKET] = str(w.socket)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            forwarder.handle(msg, ctx)
        except BaseException as err:  # noqa: BLE001 - inspected below
            outcome.append(err)

    try:
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120
        while w.ping()["current"] != "train":
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        # Execute
        killed = time.monotonic()
        os.kill(w.proc.pid, signal.SIGKILL)
        thread.join(timeout=30)
        # Assert: an error within seconds, not a wait for the round timeout
        assert not thread.is_alive() and time.monotonic() - killed < 10
        assert isinstance(outcome[0], mods.SiteFailure)
        assert str(outcome[0]).startswith("DeploymentError on the site")
    finally:
        w.stop()


def test_the_forwarder_imports_neither_torch_nor_transformers() -> None:
    code = ("import sys, time; t = time.perf_counter(); "
            "import fedtune.client.node.forwarder; "
            "print(time.perf_counter() - t, 'torch' in sys.modules, "
            "'transformers' in sys.modules, 'peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    assert out[1:] == ["False", "False", "False"], out
