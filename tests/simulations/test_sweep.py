"""fedtune sweep: the search space is checked before any trial; trials are runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fedtune.common.errors import ConfigError
from fedtune.simulations import sweep
from tests.conftest import tiny_config


def _space(space: dict, **extra: object) -> dict:
    return {"sweep": {"metric": "eval_macro_f1", "space": space, **extra}}


@pytest.mark.parametrize(("raw", "match"), [
    ({}, r"sweep: the config has no sweep section"),
    ({"sweep": {"space": {}, "budget": 3}}, r"sweep: unknown key\(s\) \['budget'\]"),
    (_space({}), r"sweep.space: expected a mapping"),
    (_space({"train.lr": {"low": 1e-3, "high": 1e-1}}),
     r"sweep.space.train.lr: unknown key"),
    (_space({"nope.learning_rate": {"low": 1, "high": 2}}),
     r"sweep.space.nope.learning_rate: unknown key"),
    (_space({"train.learning_rate": {"low": 0.1, "high": 0.01}}),
     r"sweep.space.train.learning_rate: empty range: low 0.1 must be < high 0.01"),
    (_space({"train.batch_size": {"low": 16.5, "high": 64}}),
     r"sweep.space.train.batch_size: low and high must be integers"),
    (_space({"train.learning_rate": {"low": "a", "high": 1}}),
     r"sweep.space.train.learning_rate: low and high must be numbers"),
    (_space({"train.optimizer": {"low": 1, "high": 2}}),
     r"sweep.space.train.optimizer: a range needs a numeric key"),
    (_space({"train.learning_rate": {"low": 0, "high": 1, "log": True}}),
     r"a log range needs low > 0"),
    (_space({"train.batch_size": {"choices": []}}),
     r"sweep.space.train.batch_size.choices: expected a non-empty list"),
    (_space({"train.batch_size": {"step": 2}}), r"expected \{low, high\[, log\]\}"),
    (_space({"train.batch_size": {"choices": [8]}}, direction="up"),
     r"sweep.direction: expected maximize or minimize"),
])
def test_bad_search_spaces_are_refused(raw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        sweep.load_space(raw)


def test_a_bound_that_breaks_the_config_is_refused_before_any_trial(
        tmp_path: Path) -> None:
    base = tmp_path / "run.yaml"
    base.write_text(yaml.safe_dump(_space(
        {"train.batch_size": {"low": -1, "high": 64},
         "train.optimizer": {"choices": ["adamw", "lion"]}})))
    with pytest.raises(ConfigError, match=r"sweep.space.train.batch_size=-1: "
                       r"train.batch_size: must be >= 0"):
        sweep.sweep(base, trials=1, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    base.write_text(yaml.safe_dump(_space(
        {"train.optimizer": {"choices": ["adamw", "lion"]}})))
    with pytest.raises(ConfigError, match=r"train.optimizer='lion'"):
        sweep.sweep(base, trials=1, out=tmp_path / "out")


def test_space_and_table() -> None:
    space = sweep.load_space(_space({
        "train.learning_rate": {"low": 1e-3, "high": 1e-1, "log": True},
        "train.batch-size": {"choices": [8, 16]},
        "federation.num_rounds": {"low": 1, "high": 3}}))
    assert [p.kind for p in space.params] == [float, int, int]
    assert space.params[0].log and space.params[1].choices == (8, 16)
    rows = [{"trial": 0, "state": "complete", "params": {"train.batch-size": 8},
             "eval_loss": 0.9, "rounds": 2},
            {"trial": 1, "state": "pruned", "params": {"train.batch-size": 16},
             "eval_loss": None, "rounds": 1},
            {"trial": 2, "state": "complete", "params": {"train.batch-size": 16},
             "eval_loss": 0.5, "rounds": 2}]
    text = sweep.format_trials(rows, "eval_loss", direction="minimize")
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["2", "0", "1"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_small_sweep_runs_trials_as_simulations(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    pytest.importorskip("optuna")
    # Prepare: 3 trials over the learning rate, 2 rounds each
    raw = tiny_config(tiny_bert, *review_files, privacy={"enabled": False})
    raw["sweep"] = {"metric": "eval_macro_f1", "direction": "maximize",
                    "space": {"train.learning_rate": {"low": 1e-3, "high": 5e-2,
                                                      "log": True}}}
    base = tmp_path / "run.yaml"
    base.write_text(yaml.safe_dump(raw))
    # Execute
    rows = sweep.sweep(base, trials=3, out=tmp_path / "sweep", timeout=400)
    # Assert: every trial a run directory; the best config written and loadable
    assert [r["trial"] for r in rows] == [0, 1, 2]
    assert {r["state"] for r in rows} <= {"complete", "pruned"}
    for r in rows:
        assert (Path(r["run_dir"]) / "config.yaml").is_file()
    saved = json.loads((tmp_path / "sweep" / "trials.json").read_text())
    assert saved == rows
    best = (tmp_path / "sweep" / "best.yaml").read_text()
    assert best.startswith("# best of 3 trials (eval_macro_f1")
    assert "sweep" not in yaml.safe_load(best)
