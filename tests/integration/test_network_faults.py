"""Network faults on the deployment engine: a real ``fedtune server``, two hospitals
over TLS, one of them (h1) behind a fault-injecting TCP proxy
(:mod:`tests.integration.faultproxy`).

Each case runs the same small DP run and records its round times beside a clean
run's; after each, every checkpoint checks out against its recorded sha256, the
resume state loads, and each site's ledger parses with every message charged once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from fedtune.server.runtime import checkpoint
from tests.conftest import make_reviews, tiny_config, write_jsonl
from tests.integration.cluster import Cluster, metrics, wait_for
from tests.integration.faultproxy import FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROUND_TIMEOUT = 15.0  # the partition and reset cases: a short wait for a late site
SLOW_LINK_TIMEOUT = 60.0  # 300 ms each way: Flower's REST round trips add ~10 s
_times: dict[str, list[float]] = {}


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster,
                                                                    FaultProxy]]:
    c = Cluster(tmp_path_factory.mktemp("netfaults"))
    host, port = c.fleet.rsplit(":", 1)
    proxy = FaultProxy((host, int(port)))
    try:
        c.provision(["h1", "h2"])
        for i, n in enumerate(("h1", "h2")):
            data = write_jsonl(c.root / f"{n}.jsonl", make_reviews(40, 30 + i))
            # h1 reaches the SuperLink through the proxy only
            c.start_node(n, data, extra=("--superlink", proxy.address)
                         if n == "h1" else ())
        wait_for(lambda: c.online() == 2, timeout=120, what="2 nodes online")
        yield c, proxy
    finally:
        proxy.close()
        c.stop_all()


def _trained(c: Cluster) -> int:
    """Training messages h1's SuperNode has received so far."""
    return c.log("h1").count("Receiving: train message")


def _run(c: Cluster, name: str, review_files: tuple[Path, Path], tiny_bert: Path,
         *, rounds: int = 2, during: Callable[[], None] | None = None,
         timeout: float = ROUND_TIMEOUT) -> tuple[list[dict], Path]:
    raw = tiny_config(tiny_bert, *review_files, federation={
        "num_sites": 2, "min_train_nodes": 1, "num_rounds": rounds,
        "round_timeout": timeout})
    path = c.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_dir = c.root / f"run-{name}"
    done: dict[str, object] = {}

    def launch() -> None:
        done["proc"] = c.fedtune("run", str(path), "--deployment", "test",
                                 "--run-dir", str(run_dir), timeout=400)

    worker = threading.Thread(target=launch)
    worker.start()
    if during is not None:
        during()
    worker.join(420)
    proc = done["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]  # type: ignore[attr-defined]
    rows = metrics(run_dir)[1:]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    _times[name] = [round(r["round_seconds"], 1) for r in rows]
    _whole(c, run_dir)
    return rows, run_dir


def _whole(c: Cluster, run_dir: Path) -> None:
    """Every checkpoint matches its sha256, the resume state loads, and each
    ledger parses with no message charged twice."""
    ckpts = sorted((run_dir / "checkpoints").glob("round-*"))
    assert ckpts and all(checkpoint.damage(d) == "" for d in ckpts), ckpts
    assert checkpoint.load_state(run_dir).round == len(ckpts)
    for site in ("h1", "h2"):
        for ledger in (c.root / site / "ledger").glob("*.json"):
            messages = [e["message"] for e in json.loads(ledger.read_text())["entries"]]
            assert len(messages) == len(set(messages)), (site, messages)


def _h1_replied(rows: list[dict]) -> list[bool]:
    return [r["clients_replied"] == 2 for r in rows]


def _when_h1_trains(c: Cluster, before: int) -> None:
    wait_for(lambda: _trained(c) > before, timeout=120, what="h1's train message",
             every=0.1)


def test_a_clean_run_and_300_ms_each_way(net: tuple[Cluster, FaultProxy],
                                        review_files: tuple[Path, Path],
                                        tiny_bert: Path) -> None:
    c, proxy = net
    rows, _ = _run(c, "clean", review_files, tiny_bert)
    assert all(_h1_replied(rows)), rows
    # 300 ms each way, then 256 KiB/s each way
    for name, knob, value in (("latency-300ms", "latency", 0.3),
                              ("256KiBps", "bandwidth", 256 * 1024)):
        setattr(proxy, knob, value)
        try:
            rows, _ = _run(c, name, review_files, tiny_bert,
                           timeout=SLOW_LINK_TIMEOUT)
        finally:
            setattr(proxy, knob, 0.0)
        assert all(_h1_replied(rows)), (name, rows)
    print(f"\nround seconds: {_times}")


def test_connections_reset_mid_round(net: tuple[Cluster, FaultProxy],
                                     review_files: tuple[Path, Path],
                                     tiny_bert: Path) -> None:
    c, proxy = net
    before = _trained(c)

    def resets() -> None:  # every open connection reset, 5 times over 5 s
        _when_h1_trains(c, before)
        for _ in range(5):
            proxy.reset()
            time.sleep(1.0)

    rows, _ = _run(c, "resets", review_files, tiny_bert, rounds=3, during=resets)
    assert proxy.resets > 0
    # each round completes: h1's update arrives or h1 is marked late, never a hang
    assert all(r["clients_replied"] + r["clients_late"] + r["clients_failed"] == 2
               for r in rows), rows
    assert all(r["round_seconds"] < ROUND_TIMEOUT + 10 for r in rows), rows
    assert _h1_replied(rows)[-1], rows  # it reconnected by itself
    print(f"\nround seconds: {_times}")


def test_a_30_s_partition_mid_round(net: tuple[Cluster, FaultProxy],
                                    review_files: tuple[Path, Path],
                                    tiny_bert: Path) -> None:
    c, proxy = net
    before = _trained(c)
    cut: list[threading.Thread] = []

    def partition() -> None:
        _when_h1_trains(c, before)
        cut.append(proxy.partition(30.0))

    rows, _ = _run(c, "partition-30s", review_files, tiny_bert, rounds=4,
                   during=partition)
    cut[0].join(40)
    late = [r["round"] for r in rows if r["clients_replied"] < 2]
    assert late and late[0] == 1, rows  # h1 cut off mid-round 1
    assert all(r["round_seconds"] < ROUND_TIMEOUT + 10 for r in rows), rows
    assert _h1_replied(rows)[-1], rows  # back once the link healed
    print(f"\nround seconds: {_times}; rounds without h1: {late}")


def test_a_reply_lost_after_training_is_charged_once(
        net: tuple[Cluster, FaultProxy], review_files: tuple[Path, Path],
        tiny_bert: Path) -> None:
    c, proxy = net
    (ledger,) = (c.root / "h1" / "ledger").glob("*.json")

    def entries() -> list[dict]:
        return list(json.loads(ledger.read_text())["entries"])

    before = len(entries())

    def lose_the_reply() -> None:
        # the ledger is charged before the reply leaves the site: cut the link the
        # moment the charge appears, reset everything, and hold it for 5 s
        wait_for(lambda: len(entries()) > before, timeout=120,
                 what="h1's ledger charge", every=0.05)
        with proxy.cut():
            proxy.reset()
            time.sleep(5.0)

    rows, run_dir = _run(c, "reply-lost", review_files, tiny_bert,
                         during=lose_the_reply, timeout=SLOW_LINK_TIMEOUT)
    new = entries()[before:]
    run = {str(e["run"]) for e in new}
    assert len(run) == 1, new
    # one charge per message h1 trained for, never two for one message
    assert len({e["message"] for e in new}) == len(new) <= 2, new
    assert _h1_replied(rows)[-1], rows
    print(f"\nround seconds: {_times}; h1's charges this run: "
          f"{[(e['round'], e['message'][:8]) for e in new]}; replied: "
          f"{[r['clients_replied'] for r in rows]}")
