"""deploy/README.md, walked as an operator with two hospitals on one machine
(loopback): the CA, the server, two daemons with their own state dirs and ports,
registration with labels, two 2-round runs, status, the report and each
hospital's ledger; then the guide's mistakes.

What must hold: every epsilon the operator sees (the run's metrics, the report,
``fedtune status``) is what each hospital's ledger holds for that run and in all;
the sites are named by their labels; a daemon with the wrong CA exits with status
2 and one line; a label typo and a missing test file reach the operator as one
line each, at once.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from fedtune.client.ledger import summarize
from tests.conftest import make_reviews, tiny_config, write_jsonl
from tests.integration.cluster import Cluster, free_port, metrics, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~3 min on 2 cores
SITES = ("hospital-a", "hospital-b")


def _yaml(root: Path, tiny_bert: Path, review_files: tuple[Path, Path],
          name: str, **data: object) -> Path:
    """The run YAML: the DP recipe's releases (the class histogram, two rounds,
    the decision calibration) on the two hospitals."""
    raw = tiny_config(tiny_bert, *review_files,
                      train={"logit_adjustment": 1.0, "calibrate_decisions": True},
                      federation={"num_sites": 2, "min_train_nodes": 2,
                                  "num_rounds": 2, "round_timeout": 120})
    raw["data"].update(data)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _ledger_runs(c: Cluster, site: str) -> dict[str, dict]:
    (row,) = summarize(c.root / site / "ledger")
    return {run["name"]: {**run, "total": row["epsilon"]} for run in row["runs"]}


def test_the_guide_on_loopback(tmp_path: Path, tiny_bert: Path,
                               review_files: tuple[Path, Path]) -> None:
    c = Cluster(tmp_path)
    start = time.monotonic()
    try:
        # Operator, once: the CA and the server's certificate, the server, the
        # deployment named, each hospital's key registered (b without a label: it
        # names itself with its daemon's --label)
        ids = c.provision(list(SITES), labelled=("hospital-a",))
        node_a, node_b = ids["hospital-a"], ids["hospital-b"]
        # (the guide: `deployment add` writes $FEDTUNE_HOME/flwr/config.toml)
        assert (tmp_path / "operator" / "flwr" / "config.toml").is_file()
        # Hospitals: each daemon its own ledger, state dir and ClientApp port
        for i, n in enumerate(SITES):
            data = write_jsonl(c.root / f"{n}.jsonl", make_reviews(40, 20 + i))
            c.start_node(n, data, extra=("--label", n) if n == "hospital-b" else ())
        wait_for(lambda: c.online() == 2, timeout=90, what="2 hospitals online")
        assert "this site is node" not in c.log("hospital-a")  # no message yet
        assert "site label: hospital-b" in c.log("hospital-b")

        # Two runs of two rounds; after each, every epsilon the operator sees is
        # what each hospital's ledger holds for that run, and in all
        for run in ("run-1", "run-2"):
            run_dir = c.root / "server-runs" / run
            proc = c.fedtune("run", str(_yaml(c.root, tiny_bert, review_files, run)),
                             "--deployment", "test", "--run-dir", str(run_dir),
                             timeout=300)
            out = proc.stdout + proc.stderr
            assert proc.returncode == 0, out[-3000:]
            assert "Federated evaluation will be skipped" not in out  # Flower's noise
            last = metrics(run_dir)[-1]
            assert last["site_by_node"] == {node_a: "hospital-a",
                                            node_b: "hospital-b"}
            assert last["epsilon_releases"] == ["calibration", "round"]
            for site, node in zip(SITES, (node_a, node_b), strict=True):
                held = _ledger_runs(c, site)[run]
                assert held["releases"] == {"histogram": 1, "round": 2,
                                            "calibration": 1}
                assert last["epsilon_by_node"][node] == pytest.approx(held["epsilon"])
                assert last["epsilon_total_by_node"][node] == pytest.approx(
                    held["total"])
                assert held["epsilon"] <= 8.0 + 1e-6
                shown = (last["epsilon_by_node"][node],
                         last["epsilon_total_by_node"][node])
                print(f"{run} {site}: metrics epsilon {shown[0]:.3f} / total "
                      f"{shown[1]:.3f}; ledger {held['epsilon']:.3f} / "
                      f"{held['total']:.3f}")
            report = c.fedtune("report", str(run_dir))
            assert report.returncode == 0, report.stderr[-2000:]
            top = max(last["epsilon_by_node"].values())
            assert f"max ε {top:.3f} (the calibration + rounds" in report.stdout
            for site, node in zip(SITES, (node_a, node_b), strict=True):
                total = last["epsilon_total_by_node"][node]
                line = next(x for x in report.stdout.splitlines()
                            if f"{site} ({node})" in x)
                assert f"{total:.3f}" in line
        # The second run's totals are the sum of both runs' releases
        assert _ledger_runs(c, "hospital-a")["run-2"]["total"] > \
            _ledger_runs(c, "hospital-a")["run-1"]["epsilon"]
        # Each hospital ties its own log to the operator's names and runs
        assert f"this site is node {node_a} on the SuperLink" in c.log("hospital-a")
        shown = c.fedtune("privacy", "show", "--ledger-dir",
                          str(c.root / "hospital-a" / "ledger"))
        assert shown.returncode == 0
        assert re.search(r"2 runs  8 releases  total epsilon", shown.stdout)
        for run in ("run-1", "run-2"):
            assert re.search(rf"  run \d+ {run}: epsilon \d\.\d{{3}}  \(1 histogram, "
                             r"2 rounds, 1 calibration", shown.stdout), shown.stdout
        status = c.fedtune("status", "--deployment", "test")
        assert status.returncode == 0, status.stderr
        assert "2 online of 2 registered" in status.stdout
        assert re.search(rf"{node_a}\s+online .* hospital-a", status.stdout)
        eps = max(metrics(c.root / "server-runs" / "run-2")[-1][
            "epsilon_by_node"].values())
        assert f"round 2/2  ε max {eps:.3f}  " in status.stdout, status.stdout
        assert str(c.root / "server-runs" / "run-2") in status.stdout

        # Mistakes. A typo in data.labels: one line naming the column and the
        # labels (never the site's values), the run failed at once, no resume
        t0 = time.monotonic()
        typo = c.fedtune("run", str(_yaml(c.root, tiny_bert, review_files, "typo",
                                          labels=["negative", "neutrl",
                                                  "positive"], test_source="")),
                         "--deployment", "test", "--run-dir",
                         str(c.root / "server-runs" / "typo"), timeout=300)
        said = typo.stdout + typo.stderr
        assert typo.returncode != 0
        assert "DataError: the site's column 'rating' holds 1 label(s) that " \
               "data.labels=['negative', 'neutrl', 'positive'] does not declare" in said
        assert "Traceback" not in said and "min_replies" not in said, said[-3000:]
        assert "the run failed: FedtuneError: before round 1:" in said
        assert time.monotonic() - t0 < 90
        # The server's own test file missing: one line, before any round
        lost = c.fedtune("run", str(_yaml(c.root, tiny_bert, review_files, "lost",
                                          test_source=str(c.root / "no.jsonl"))),
                         "--deployment", "test", timeout=300)
        said = lost.stdout + lost.stderr
        assert lost.returncode != 0
        assert "the run failed: DataError: " in said and "no.jsonl" in said
        assert "Traceback" not in said and "Exit Code" not in said, said[-3000:]
        status = c.fedtune("status", "--deployment", "test")
        assert status.stdout.count("FAILED before round 1") == 2, status.stdout

        # A daemon given another federation's CA: status 2 and one line
        other = c.root / "other-ca"
        assert c.fedtune("keys", "ca", "--out", str(other)).returncode == 0
        wrong = c.start(
            "wrong-ca", "client", "--superlink", c.fleet, "--data",
            str(c.root / "hospital-a.jsonl"), "--ledger-dir",
            str(c.root / "wrong" / "ledger"), "--ca-cert", str(other / "ca.crt"),
            "--key", str(c.keys / "hospital-a.key"), "--device", "cpu",
            "--state-dir", str(c.root / "wrong" / "state"),
            "--clientappio-address", f"127.0.0.1:{free_port()}")
        assert wrong.wait(timeout=60) == 2
        log = c.log("wrong-ca")
        assert f"cannot reach the SuperLink at {c.fleet}: TLS: the server's " \
               "certificate is not signed by --ca-cert" in log
        assert "Traceback" not in log
        # ... and a wrong port: each retry names the address and the cause
        dead = f"127.0.0.1:{free_port()}"
        c.start("wrong-port", "client", "--superlink", dead, "--data",
                str(c.root / "hospital-b.jsonl"), "--ledger-dir",
                str(c.root / "wrong2" / "ledger"), "--ca-cert",
                str(c.certs / "ca.crt"), "--key", str(c.keys / "hospital-b.key"),
                "--device", "cpu", "--state-dir", str(c.root / "wrong2" / "state"),
                "--clientappio-address", f"127.0.0.1:{free_port()}")
        wait_for(lambda: "attempt 1; the SuperNode retries" in c.log("wrong-port"),
                 timeout=90, what="a named retry")
        assert f"cannot reach the SuperLink at {dead}: connection refused" in \
            c.log("wrong-port")
    finally:
        c.stop_all()
        print(f"operator guide walkthrough: {time.monotonic() - start:.0f} s")
