"""A simulation on an existing Ray cluster (``federation.ray_address``).

The cluster is the test's own: a Ray head on 127.0.0.1 with its own temp dir,
stopped by its process group id (:mod:`tests.integration.raycluster`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config
from tests.integration import raycluster, runner

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def head() -> Iterator[raycluster.Head]:
    with raycluster.ray_head(cpus=2) as h:
        yield h
    assert raycluster.group_members(h.pid) == [], "Ray processes outlived the test"


def _config(tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path],
            **federation: object) -> Path:
    raw = tiny_config(tiny_bert, *review_files,
                      federation={"run_dir": str(tmp_path / "runs"), **federation})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_simulation_runs_on_the_clusters_actors(
        tmp_path: Path, head: raycluster.Head, tiny_bert: Path,
        review_files: tuple[Path, Path]) -> None:
    # Prepare
    cfg = _config(tmp_path, tiny_bert, review_files, ray_address=head.address)
    probe = tmp_path / "probe"
    probe.mkdir()
    run_dir = tmp_path / "run"
    # Execute
    proc = runner.run([str(cfg), str(run_dir), str(probe)],
                      target=raycluster.simulate_main, timeout=400)
    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_replied"] == 3 for r in rows[1:])
    assert (f"sites run on the Ray cluster at {head.address}: 1 node, 2 CPUs, "
            "0 GPUs") in proc.stderr
    seen = [json.loads(p.read_text()) for p in probe.iterdir()]
    trained = [s for s in seen if s["type"] == "train"]
    assert sorted({s["partition"] for s in trained}) == [0, 1, 2]
    assert len(trained) == 6  # 3 sites x 2 rounds
    # every site ran in an actor of the test's cluster: connected to its GCS, a
    # process of the head's group (started by its raylet), not of the driver's
    assert {s["gcs"] for s in seen} == {head.address}
    assert {s["pgid"] for s in seen} == {head.pid}
    # the actors' output reached the driver, and went to the run's logs
    sites_log = (run_dir / "logs" / "sites.log").read_text()
    assert "ClientAppActor" in sites_log and "trained" in sites_log
    print(f"ray cluster {head.address} (head pid {head.pid}): {len(seen)} site "
          f"messages in actors {sorted({s['pid'] for s in seen})}, all in the "
          f"head's process group; rounds {[r['round'] for r in rows]}")


def test_a_gpu_per_site_is_refused_on_a_cluster_without_gpus(
        tmp_path: Path, head: raycluster.Head, tiny_bert: Path,
        review_files: tuple[Path, Path]) -> None:
    # Prepare
    cfg = _config(tmp_path, tiny_bert, review_files, ray_address=head.address,
                  client_gpus=1)
    # Execute
    proc = runner.run(["simulate", str(cfg)], timeout=120)
    # Assert: refused before round 1, quoting the cluster; no run directory
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if "fedtune: error" in x]
    assert len(errors) == 1
    assert (f"federation.client_gpus=1 asks a GPU for every site, but the Ray "
            f"cluster at {head.address}: 1 node, 2 CPUs, 0 GPUs") in errors[0]
    assert not (tmp_path / "runs").exists()


def test_an_unreachable_cluster_fails_fast_without_a_run_directory(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare: a loopback port nothing listens on
    address = f"127.0.0.1:{raycluster.free_port()}"
    cfg = _config(tmp_path, tiny_bert, review_files, ray_address=address)
    started = time.monotonic()
    # Execute
    proc = runner.run(["simulate", str(cfg)], timeout=60)
    # Assert
    took = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if "fedtune: error" in x]
    assert len(errors) == 1 and f"no Ray cluster reachable at {address}" in errors[0]
    assert took <= 30, took
    assert not (tmp_path / "runs").exists()
