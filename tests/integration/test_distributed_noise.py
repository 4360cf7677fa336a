"""Distributed noise under SecAgg+, end to end: in simulation (a full run, a site
dropping within the margin, too many dropping) and on the deployment engine
(three SuperNodes over TLS with node authentication, one declining by policy).

Every site's ledger must hold exactly what it released: one noise share per
round it sent, at sample rate 1 and one step, never a share the round did not
take, and never twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from fedtune.client.ledger import Budget, PrivacyLedger
from fedtune.client.site import site_data
from fedtune.common import config
from fedtune.server.rundir import LOG_DIR, RUN_LOG
from tests.conftest import make_reviews, tiny_config, write_jsonl
from tests.integration.cluster import Cluster, metrics, wait_for
from tests.integration.test_simulation import _rounds, _simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DISTRIBUTED = {"noise": "distributed", "max_dropped_or_colluding": 1}
SECAGG = {"secure_aggregation": True, "secagg_threshold": 2,
          "secagg_clipping_range": 256.0, "server_learning_rate": 0.05}


def _entries(ledger_dir: Path) -> list[list[dict]]:
    return [json.loads(p.read_text())["entries"]
            for p in sorted(ledger_dir.glob("*.json"))]


def _raw(tiny_bert: Path, review_files: tuple[Path, Path], ledger: Path,
         rounds: int) -> dict:
    return tiny_config(tiny_bert, *review_files,
                       privacy={**DISTRIBUTED, "ledger_dir": str(ledger),
                                "budget_epsilon": 20.0},
                       federation={**SECAGG, "num_rounds": rounds})


def _spend(raw: dict, ledger: Path, *sites: int) -> None:
    """Spend these sites' budgets: each joins SecAgg+'s key sharing, then
    declines its share (a drop-out after key sharing)."""
    cfg = config.from_dict(raw)
    for i in sites:
        site = site_data(cfg, {"partition-id": i, "num-partitions": 3})
        PrivacyLedger(ledger, site.fingerprint).charge(
            (0.6, 1.0, 40), Budget(), run="old", round_=1, message=f"old-{i}")


def test_a_run_pools_the_noise_and_charges_one_share_per_round(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare: 3 sites, t = 1 (each share 1/2 of the noise), threshold 2
    ledger = tmp_path / "ledger"
    raw = _raw(tiny_bert, review_files, ledger, rounds=3)
    # Execute
    proc, run_dir = _simulate(tmp_path, raw)
    # Assert: three rounds of three shares, each an Adam step on the sum
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rounds(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["clients_replied"] == 3 for r in rows[1:])
    log = (run_dir / LOG_DIR / RUN_LOG).read_text()
    assert log.count("unmasked the sum of 3 shares") == 3
    first = load_file(run_dir / "checkpoints" / "round-0001" /
                      "adapter_model.safetensors")
    final = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert any(not (first[k] == final[k]).all() for k in final)
    # each ledger: one share per round at (sigma, 1, 1), the run's target spent
    books = _entries(ledger)
    assert len(books) == 3
    sigmas = set()
    for entries in books:
        assert [(e["kind"], e["sample_rate"], e["steps"], e["round"])
                for e in entries] == [("noise-share", 1.0, 1, r) for r in (1, 2, 3)]
        sigmas |= {e["sigma"] for e in entries}
        assert entries[-1]["epsilon_after"] == pytest.approx(8.0, abs=0.01)
    assert len(sigmas) == 1
    assert rows[-1]["epsilon_max"] == pytest.approx(8.0, abs=0.01)


def test_a_site_dropping_within_the_margin_leaves_the_round_whole(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare: site 0 joins key sharing, then declines (its budget is spent)
    ledger = tmp_path / "ledger"
    raw = _raw(tiny_bert, review_files, ledger, rounds=1)
    _spend(raw, ledger, 0)
    # Execute
    proc, run_dir = _simulate(tmp_path, raw)
    # Assert: 2 = n - t shares unmasked; site 0 charged nothing more
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rounds(run_dir)
    assert rows[-1]["clients_replied"] == 2 and rows[-1]["clients_failed"] >= 1
    assert "unmasked the sum of 2 shares" in (run_dir / LOG_DIR / RUN_LOG).read_text()
    kinds = sorted([e["kind"] for e in entries] for entries in _entries(ledger))
    assert kinds == [["noise-share"], ["noise-share"], ["round"]]


def test_more_drop_outs_than_the_margin_unmask_nothing(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare: two of three sites decline: 1 share < n - t = 2 = the threshold
    ledger = tmp_path / "ledger"
    raw = _raw(tiny_bert, review_files, ledger, rounds=1)
    _spend(raw, ledger, 0, 1)
    # Execute
    proc, run_dir = _simulate(tmp_path, raw)
    # Assert: the round is abandoned, the global adapter stays where it was
    log = (run_dir / LOG_DIR / RUN_LOG).read_text()
    assert "unmasked the sum" not in log
    rows = _rounds(run_dir)
    assert [r["round"] for r in rows] == [0], (proc.returncode, rows)
    # the one site that sent its share booked it once (released, never unmasked:
    # charged as released); the two that declined booked nothing
    kinds = sorted([e["kind"] for e in entries] for entries in _entries(ledger))
    assert kinds == [["noise-share"], ["round"], ["round"]]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three hospitals over TLS with node auth; h3's policy requires local noise."""
    c = Cluster(tmp_path_factory.mktemp("pooled"))
    try:
        c.provision(["h1", "h2", "h3"])
        rules = c.root / "local-only.yaml"
        rules.write_text(yaml.safe_dump({"allowed_noise": ["local"]}))
        for i, n in enumerate(("h1", "h2", "h3")):
            data = write_jsonl(c.root / f"{n}.jsonl", make_reviews(40, 10 + i))
            c.start_node(n, data, extra=("--policy", str(rules)) if n == "h3" else ())
        wait_for(lambda: c.online() == 3, timeout=90, what="3 nodes online")
        yield c
    finally:
        c.stop_all()


def test_distributed_noise_on_the_deployment_engine(
        cluster: Cluster, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare: 2 rounds at 3 sites, t = 1; h3 declines by its policy each round
    raw = tiny_config(tiny_bert, *review_files, privacy=DISTRIBUTED,
                      federation={**SECAGG, "num_sites": 3, "min_train_nodes": 3,
                                  "num_rounds": 2})
    path = cluster.root / f"run-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_dir = cluster.root / "run-pooled"
    # Execute
    t0 = time.monotonic()
    proc = cluster.fedtune("run", str(path), "--deployment", "test", "--run-dir",
                           str(run_dir), timeout=420)
    wall = time.monotonic() - t0
    # Assert: two rounds of the 2 = n - t shares that came; h3 named its rule
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_replied"] == 2 and r["clients_failed"] >= 1
               for r in rows[1:])
    # (SecAgg+'s legacy failures carry no reason to the server: h3's log has it)
    assert "rule allowed_noise: the run asks distributed noise" in (
        cluster.root / "h3.log").read_text()
    books = {n: _entries(cluster.root / n / "ledger") for n in ("h1", "h2", "h3")}
    assert books["h3"] == []
    for n in ("h1", "h2"):
        (entries,) = books[n]
        assert [(e["kind"], e["sample_rate"], e["steps"]) for e in entries] == [
            ("noise-share", 1.0, 1)] * 2
    print(f"\ndistributed noise on 3 SuperNodes: {wall:.0f} s, round seconds "
          f"{[r['round_seconds'] for r in rows[1:]]}")
