"""Each site sets its own rules, on the deployment engine: seven ``fedtune client``
daemons, six with a policy that one run breaks, one that allows non-private runs.

The run that breaks every rule at once is declined by each policy site for its own
rule (the server's log, metrics.jsonl and the report name the site and the rule), no
declined site reads a record or charges its ledger, and the other two train. A DP-off
run is declined by every site but the one started with ``--allow-non-private``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.conftest import make_reviews, tiny_config, write_jsonl
from tests.integration import runner
from tests.integration.cluster import Cluster, metrics, wait_for
from tests.integration.test_deployment import worker_stats

pytestmark = pytest.mark.integration


def _policies(tiny_bert: Path) -> dict[str, dict]:
    weights = next(tiny_bert.glob("*.safetensors"))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    return {"eps": {"max_epsilon_per_run": 8, "budget_epsilon": 30},
            "clip": {"max_clipping_norm": 1.0},
            "noise": {"min_noise_multiplier": 0.5},
            "model": {"allowed_models": [f"sha256:{digest}"]},
            "task": {"allowed_tasks": ["causal-lm"]},
            "nopersonal": {"personalized_adapters": False}}


RULES = {"eps": "max_epsilon_per_run", "clip": "max_clipping_norm",
         "noise": "min_noise_multiplier", "model": "allowed_models",
         "task": "allowed_tasks"}


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path
          ) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("policy"))
    policies = _policies(tiny_bert)
    names = [*policies, "open"]
    try:
        c.provision(names)
        for i, n in enumerate(names):
            data = write_jsonl(c.root / f"{n}.jsonl", make_reviews(40, 20 + i))
            extra: tuple[str, ...] = ("--allow-non-private",)
            if n in policies:
                path = c.root / f"{n}-policy.yaml"
                path.write_text(yaml.safe_dump(policies[n]))
                extra = ("--policy", str(path))
            c.start_node(n, data, extra=extra)
        wait_for(lambda: c.online() == len(names), timeout=180,
                 what=f"{len(names)} nodes online")
        yield c
    finally:
        c.stop_all()


def _other_model(tiny_bert: Path, out: Path) -> Path:
    """The tiny BERT with one weight changed: a model no sha256 rule allows."""
    shutil.copytree(tiny_bert, out)
    (weights,) = out.glob("*.safetensors")
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01 * torch.ones_like(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


def _run(c: Cluster, raw: dict, name: str) -> tuple[str, Path]:
    path = c.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_dir = c.root / f"run-{name}"
    proc = c.fedtune("run", str(path), "--deployment", "test", "--run-dir",
                     str(run_dir), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc.stdout + proc.stderr, run_dir


def _ledger_entries(c: Cluster, name: str) -> int:
    return sum(len(json.loads(p.read_text())["entries"])
               for p in (c.root / name / "ledger").glob("*.json"))


@pytest.mark.slow  # ~2-3 minutes on 2 cores: seven daemons, two runs
def test_each_site_declines_what_its_policy_forbids(
        sites: Cluster, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare: a run breaking five rules at once (epsilon 10 > 8, clipping 2 > 1,
    # noise 0.4 < 0.5, a model no digest allows, a classification task) and asking
    # for personalised adapters
    other = _other_model(tiny_bert, sites.root / "other-model")
    raw = tiny_config(other, *review_files,
                      privacy={"target_epsilon": 10.0, "max_grad_norm": 2.0,
                               "noise_multiplier": 0.4},
                      train={"personalize_epochs": 1},
                      federation={"num_sites": 7, "num_rounds": 1,
                                  "min_train_nodes": 7})
    started = time.monotonic()
    # Execute
    log, run_dir = _run(sites, raw, "breaks-rules")
    # Assert: each policy site declined for its own rule; the other two trained
    (row,) = metrics(run_dir)[1:]
    assert row["clients_replied"] == 2 and row["clients_declined"] == 5, row
    why = row["nodes_declined_why"]
    assert sorted(w.split(":")[0] for w in why.values()) == sorted(
        f"site policy rule {r}" for r in RULES.values())
    names = row["site_by_node"]  # the labels the operator registered
    for node, words in why.items():
        assert f"{names[node]} declined the round: {words}" in log
    for name, rule in RULES.items():
        assert f"declined by this site's policy: SitePolicy on the site: rule {rule}" \
            in sites.log(name)
        assert _ledger_entries(sites, name) == 0  # nothing charged
        assert worker_stats(sites, name)["data_loads"] == 0  # no record read
    assert _ledger_entries(sites, "nopersonal") == 1
    assert _ledger_entries(sites, "open") == 2  # its round, its personalisation
    # the personalised adapter: refused by the site that writes none
    personal = json.loads((run_dir / "personalization.json").read_text())
    assert len(personal["sites"]) == 1
    assert [w.split(":")[0] for w in personal["failed"].values()].count(
        "site policy rule personalized_adapters") == 1
    report = sites.fedtune("report", str(run_dir))
    assert report.returncode == 0, report.stderr
    page = (run_dir / "report" / "index.html").read_text()
    assert "declined by their own site policy" in page
    assert "rule max_epsilon_per_run: the run asks epsilon 10" in page
    print(f"\nthe run breaking five rules: {time.monotonic() - started:.0f} s; "
          f"declined: {sorted(why.values())}")

    # Prepare: a DP-off run of the allowed model
    off = tiny_config(tiny_bert, *review_files, privacy={"enabled": False},
                      federation={"num_sites": 7, "num_rounds": 1,
                                  "min_train_nodes": 7})
    # Execute
    log, run_dir = _run(sites, off, "dp-off")
    # Assert: only the site started with --allow-non-private trained
    (row,) = metrics(run_dir)[1:]
    assert row["clients_replied"] == 1 and row["clients_non_private"] == 1, row
    assert row["clients_declined"] == 6
    assert {w.split(":")[0] for w in row["nodes_declined_why"].values()} == {
        "site policy rule dp-required"}
    assert "NON-PRIVATE RUNS ALLOWED" in sites.log("open")


def test_a_policy_with_an_unknown_key_stops_the_daemon(tmp_path: Path,
                                                       review_files: tuple[Path, Path]
                                                       ) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("max_epsilon_per_run: 8\nallow_models: [x]\n")
    proc = runner.run(["client", "--superlink", "127.0.0.1:9", "--data",
                       str(review_files[0]), "--ledger-dir", str(tmp_path / "l"),
                       "--insecure", "--state-dir", str(tmp_path / "s"),
                       "--policy", str(bad)], timeout=60)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert "unknown key(s) 'allow_models'" in line and str(bad) in line
    assert "Traceback" not in proc.stderr
