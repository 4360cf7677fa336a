"""The audit's canaries and its input checks (the attack itself runs in
tests/integration/test_privacy_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.common import config
from fedtune.common.errors import ConfigError
from fedtune.server.tools.audit import make_canaries, run_audit
from tests.conftest import make_reviews, tiny_config


def test_canaries_are_distinct_labelled_and_spread_over_sites(
        tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    cfg = config.from_dict(tiny_config(tiny_bert, *review_files,
                                       data={"partition": "column",
                                             "partition_column": "condition"}))
    recs = make_reviews(60, 3)
    canaries = make_canaries(recs, cfg, count=40, seed=0)
    assert len({c["review"] for c in canaries}) == 40
    assert {c["rating"] for c in canaries} <= set(cfg.data.labels)
    assert {c["condition"] for c in canaries} <= {r["condition"] for r in recs}
    assert len({c["condition"] for c in canaries}) > 1
    assert make_canaries(recs, cfg, count=40, seed=0) == canaries  # seeded


def test_audit_needs_held_out_records(tmp_path: Path, tiny_bert: Path,
                                      review_files: tuple[Path, Path]) -> None:
    raw = tiny_config(tiny_bert, *review_files)
    raw["data"]["test_source"] = ""
    with pytest.raises(ConfigError, match="needs held-out records"):
        run_audit(config.from_dict(raw), out_dir=tmp_path,
                  train=lambda *_: pytest.fail("trained"))
