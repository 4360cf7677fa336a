"""Data mistakes are caught by ``fedtune simulate`` before any engine starts: one
line naming the file, the line or column and the fix; exit 2; no traceback; no run
directory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_reviews, tiny_config, write_jsonl
from tests.integration import runner


def _bad_files(root: Path) -> dict[str, tuple[Path, dict, str]]:
    """case -> (train file, config sections, the error's words)."""
    good = write_jsonl(root / "good.jsonl", make_reviews(30, 0))
    malformed = root / "malformed.jsonl"
    malformed.write_text(good.read_text() + '{"review": "good", "rating":\n')
    no_label = root / "no-label.csv"
    no_label.write_text("review,condition\ngood drug,acne\nbad drug,pain\n")
    unknown = root / "unknown.jsonl"
    unknown.write_text('{"review": "good", "rating": "stellar", "condition": "a"}\n'
                       * 12)
    empty = root / "empty.jsonl"
    empty.write_text("")
    return {
        "missing-file": (root / "absent.jsonl", {},
                         "absent.jsonl: data file not found; set data.source"),
        "malformed-jsonl": (malformed, {}, "malformed.jsonl:31: not valid JSON"),
        "csv-without-label": (no_label, {},
                              "missing column(s) ['rating']; found ['condition', "
                              "'review']"),
        "unknown-label": (unknown, {}, "unknown label(s) ['stellar'] in column "
                          "'rating'"),
        "empty-file": (empty, {}, "empty.jsonl: no records; the file is empty"),
        "too-few-partition-values": (
            good, {"data": {"partition": "column"},
                   "federation": {"num_sites": 8, "min_train_nodes": 8}},
            "data.partition_column 'condition' has only 6 distinct values to "
            "split into 8 sites; set federation.num_sites=6"),
        "test-set-wrong-columns": (
            good, {"data": {"test_source": str(no_label)}},
            "this is data.test_source, the held-out test set"),
        "too-many-top-layers": (
            good, {"lora": {"top_layers": 3}},
            "lora.top_layers: 3 is more than the model's 2 layers; use 1..2"),
        "adapter-the-model-cannot-host": (
            good, {"lora": {"method": "ia3", "target_modules": ["gate"]}},
            "lora.method: ia3 found no module to adapt in model_type 'bert' "
            "(targets ['gate'])"),
    }


CASES = ["missing-file", "malformed-jsonl", "csv-without-label", "unknown-label",
         "empty-file", "too-few-partition-values", "test-set-wrong-columns",
         "too-many-top-layers", "adapter-the-model-cannot-host"]


@pytest.mark.parametrize("case", CASES)
def test_bad_data_stops_before_the_engine_with_one_line(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path],
        case: str) -> None:
    # Prepare
    train, sections, words = _bad_files(tmp_path)[case]
    raw = tiny_config(tiny_bert, train, review_files[1])
    for name, values in sections.items():
        raw[name].update(values)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    # Execute
    started = time.monotonic()
    proc = runner.run(["simulate", str(cfg), "--run-dir", str(run_dir)], timeout=120)
    took = time.monotonic() - started
    # Assert: exit 2, one line that names the problem, nothing started or left
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines()
              if line.startswith("fedtune: error:")]
    assert len(errors) == 1 and words in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stderr
    assert "simulating" not in proc.stderr
    assert not run_dir.exists()
    assert took < 60, f"{took:.0f} s: the engine must not start"


def test_config_runs_the_same_preflight(tmp_path: Path, tiny_bert: Path,
                                        review_files: tuple[Path, Path]) -> None:
    bad = tmp_path / "missing.jsonl"
    raw = tiny_config(tiny_bert, bad, review_files[1])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    checked = runner.run(["config", str(cfg)], timeout=120)
    assert checked.returncode == 2
    assert "missing.jsonl: data file not found" in checked.stderr
    skipped = runner.run(["config", str(cfg), "--no-data-check"], timeout=120)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert f"source: {bad}" in skipped.stdout


def test_more_partition_values_than_sites_is_a_warning(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    from fedtune.common import config, sites

    raw = tiny_config(tiny_bert, *review_files, data={"partition": "column"},
                      federation={"num_sites": 4, "min_train_nodes": 4})
    warnings = sites.check_simulation_data(config.from_dict(raw))
    assert warnings == ["data.partition_column 'condition' has 6 values for 4 "
                        "sites: each site holds the records of several values "
                        "(federation.num_sites=6 gives one value per site)"]
