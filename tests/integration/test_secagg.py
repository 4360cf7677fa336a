"""SecAgg+: the server learns only the sum, and the sum is FedAvg's.

Flower's SecAgg+ quantizes each site's weighted update ``w * params`` (``w`` =
examples / max_weight) to 22 bits within +-clipping_range; after unmasking the sum
is divided by the total weight, so each value may differ from plain FedAvg by at
most ``n_sites * 2 * clipping_range / 2**22 / total_weight``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedtune.client.ledger import Budget, PrivacyLedger
from fedtune.client.site import site_data
from fedtune.common import config
from fedtune.server.rundir import LOG_DIR, RUN_LOG
from tests.conftest import tiny_config
from tests.integration.test_simulation import _rounds, _simulate

pytestmark = pytest.mark.integration


def _final(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "adapter_model.safetensors")


def _max_diff(a: Path, b: Path) -> float:
    x, y = _final(a), _final(b)
    assert set(x) == set(y)
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def _bound(n_sites: int) -> float:
    total_weight = 36 * n_sites / 1000.0  # 40 records per site, 10% validation
    return n_sites * 2 * 8.0 / 2**22 / total_weight


def _both(tmp_path: Path, raw: dict) -> tuple[Path, Path, list[dict]]:
    (tmp_path / "secagg").mkdir()
    (tmp_path / "plain").mkdir()
    sec, sec_dir = _simulate(tmp_path / "secagg", raw)
    assert sec.returncode == 0, sec.stderr[-3000:]
    # Flower's INFO lines go to the run's log, not the terminal
    assert "Secure aggregation completed" not in sec.stderr
    assert "Secure aggregation completed" in (sec_dir / LOG_DIR / RUN_LOG).read_text()
    raw["federation"]["secure_aggregation"] = False
    plain, plain_dir = _simulate(tmp_path / "plain", raw)
    assert plain.returncode == 0, plain.stderr[-3000:]
    return sec_dir, plain_dir, _rounds(sec_dir)


@pytest.mark.slow  # the dropout test below checks the sum against FedAvg too
def test_secagg_sum_equals_fedavg(tmp_path: Path, tiny_bert: Path,
                                  review_files: tuple[Path, Path]) -> None:
    raw = tiny_config(tiny_bert, *review_files, privacy={"enabled": False},
                      federation={"num_rounds": 1, "secure_aggregation": True})
    sec_dir, plain_dir, rows = _both(tmp_path, raw)
    assert rows[-1]["clients_replied"] == 3
    assert 0 < _max_diff(sec_dir, plain_dir) <= _bound(3)


@pytest.mark.slow  # 1-2 minutes: out of the ~5-minute default suite
def test_secagg_survives_a_site_dropping_after_key_sharing(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare: site 0's budget is spent, so it takes part in SecAgg+'s setup and
    # key-sharing stages, then fails when asked for its masked update.
    raw = tiny_config(tiny_bert, *review_files,
                      privacy={"ledger_dir": str(tmp_path / "ledger"),
                               "secure_noise": False,  # same noise in both runs
                               "budget_epsilon": 20.0},
                      federation={"num_rounds": 1, "secure_aggregation": True,
                                  "secagg_threshold": 2})
    cfg = config.from_dict(raw)
    site0 = site_data(cfg, {"partition-id": 0, "num-partitions": 3})
    PrivacyLedger(tmp_path / "ledger", site0.fingerprint).charge(
        (0.6, 1.0, 40), Budget(), run="old", round_=1, message="old-1")
    # Execute: SecAgg+, then plain FedAvg with the same two sites.
    sec_dir, plain_dir, rows = _both(tmp_path, raw)
    # Assert: 2 of 3 unmasked (threshold 2), equal to FedAvg of those two.
    assert rows[-1]["clients_replied"] == 2 and rows[-1]["clients_failed"] >= 1
    assert _max_diff(sec_dir, plain_dir) <= _bound(2)
