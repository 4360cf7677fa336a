"""The round loop's retries and stops, and the resume state on disk."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message

from fedtune.common import config, records
from fedtune.common.errors import FedtuneError
from fedtune.server import rundir
from fedtune.server.runtime import checkpoint, rounds
from fedtune.server.runtime.registry import build_strategy
from tests.server.test_aggregators import FakeGrid
from tests.server.test_strategy import _reply


class ScriptedGrid(FakeGrid):
    """Answers each ``send_and_receive`` with the next scripted list of replies
    (``"ok"``, ``"error"``, ``"declined"``; a missing entry is a late site)."""

    def __init__(self, nodes: list[int], script: list[list[str]]) -> None:
        super().__init__(nodes)
        self.script, self.timeouts = script, []

    def send_and_receive(self, messages, *, timeout: float):  # noqa: ANN001,ANN201
        self.timeouts.append(timeout)
        out = []
        for msg, kind in zip(list(messages), self.script.pop(0), strict=False):
            if kind == "ok":
                out.append(_reply(msg, {"w": torch.ones(1)}, 1))
            else:
                reason = "PrivacyBudgetExhausted" if kind == "declined" else "boom"
                out.append(Message(Error(code=0, reason=reason), reply_to=msg))
        return out


def _cfg(**fed: object) -> config.RunConfig:
    return config.from_dict({"federation": {"num_sites": 3, "min_train_nodes": 3,
                                            "round_timeout": 7.0, **fed}})


def _round(cfg: config.RunConfig, grid: ScriptedGrid) -> ArrayRecord:
    strategy = build_strategy(cfg.federation, min_train_nodes=3, min_available_nodes=3)
    arrays = ArrayRecord({"w": Array(np.zeros(1, np.float32))})
    return rounds.train_round(grid, strategy, server_round=1, arrays=arrays, cfg=cfg,
                              config=ConfigRecord())


@pytest.mark.usefixtures("flower_identity")
def test_a_short_round_is_retried_once_then_aggregated() -> None:
    grid = ScriptedGrid([1, 2, 3], [["ok"], ["ok", "ok", "error"]])
    got = _round(_cfg(min_replies=2), grid)
    assert records.from_record(got)["w"].item() == 1.0
    assert grid.timeouts == [7.0, 7.0] and grid.script == []


@pytest.mark.usefixtures("flower_identity")
def test_a_round_short_after_its_retries_stops_with_a_message() -> None:
    grid = ScriptedGrid([1, 2, 3], [["ok"], ["ok", "error"]])
    with pytest.raises(FedtuneError, match="fewer than federation.min_replies=2 "
                       "accepted updates within round_timeout=7 s, 2 attempt"):
        _round(_cfg(min_replies=2), grid)


@pytest.mark.usefixtures("flower_identity")
def test_every_site_declining_stops_at_once() -> None:
    grid = ScriptedGrid([1, 2, 3], [["declined"] * 3, ["ok"] * 3])
    with pytest.raises(FedtuneError, match="every site declined"):
        _round(_cfg(), grid)
    assert len(grid.script) == 1  # not retried


def test_too_few_nodes_is_a_bounded_wait() -> None:
    with pytest.raises(FedtuneError, match="only 1 of the 3 nodes"):
        rounds.wait_for_nodes(FakeGrid([1]), 3, timeout=0.6)


def _state(cfg: config.RunConfig, rnd: int) -> checkpoint.ServerState:
    return checkpoint.ServerState(
        round=rnd, arrays={"w": np.arange(3, dtype=np.float32) / 7},
        strategy_arrays={"m_t/w": np.ones(3)}, strategy_scalars={"x": 2.0},
        python_rng=random.getstate(), config=checkpoint.config_dict(cfg))


def test_state_round_trips_exactly_and_rewind_drops_later_rounds(tmp_path: Path
                                                                 ) -> None:
    # Prepare: rounds 1-3 written, state saved after round 2
    cfg = config.RunConfig()
    for rnd in (0, 1, 2, 3):
        checkpoint.append_metrics(tmp_path, {"round": rnd})
        if rnd:
            ckpt = rundir.checkpoint_dir(tmp_path, rnd)
            ckpt.mkdir(parents=True)
            (ckpt / "adapter_model.safetensors").write_bytes(b"x")
    checkpoint.save_state(tmp_path, _state(cfg, 2))
    # Execute
    got = checkpoint.load_state(tmp_path)
    checkpoint.rewind(tmp_path, got.round)
    # Assert
    assert got.round == 2 and got.strategy_scalars == {"x": 2.0}
    assert np.array_equal(got.arrays["w"], np.arange(3, dtype=np.float32) / 7)
    assert got.arrays["w"].dtype == np.float32
    assert [r["round"] for r in checkpoint.read_metrics(tmp_path)] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "round-0001", "round-0002"]
    assert (tmp_path / "final").resolve().name == "round-0002"
    checkpoint.check_resumable(got.config, cfg, tmp_path)


def test_damaged_missing_or_foreign_state_is_named(tmp_path: Path) -> None:
    with pytest.raises(FedtuneError, match="no resume state"):
        checkpoint.load_state(tmp_path)
    (tmp_path / rundir.STATE).write_bytes(b"not a zip")
    with pytest.raises(FedtuneError, match="damaged resume state"):
        checkpoint.load_state(tmp_path)
    checkpoint.save_state(tmp_path, _state(config.RunConfig(), 1))
    other = config.from_dict({"federation": {"num_rounds": 9}})
    with pytest.raises(FedtuneError, match="config differs .*federation.num_rounds"):
        checkpoint.check_resumable(checkpoint.load_state(tmp_path).config, other,
                                   tmp_path)


def test_resume_cli_refuses_overrides_and_non_run_directories(tmp_path: Path,
                                                              capsys) -> None:  # noqa: ANN001
    from fedtune.simulations.cli import main

    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    assert "config.yaml: not found; --resume needs a fedtune run" in \
        capsys.readouterr().err
    checkpoint.write_config(tmp_path, config.RunConfig())
    assert main(["simulate", "--resume", str(tmp_path), "train.seed=3"]) == 2
    assert "--resume takes no config or overrides" in capsys.readouterr().err



def test_run_resume_submits_the_run_directory_and_the_flag(tmp_path: Path) -> None:
    import tomllib

    from fedtune.common.config import RESUME, RUN_PATH
    from fedtune.server.operations import control

    app = control.write_app(config.RunConfig(), tmp_path / "app",
                             run_path=tmp_path / "run", resume=True)
    flat = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"][
        "app"]["config"]
    assert flat[RUN_PATH] == str(tmp_path / "run") and flat[RESUME] is True
    fresh = control.write_app(config.RunConfig(), tmp_path / "fresh", run_path=None)
    assert RESUME not in tomllib.loads((fresh / "pyproject.toml").read_text())[
        "tool"]["flwr"]["app"]["config"]


def test_status_tells_a_failed_run_and_the_app_carries_the_labels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    from fedtune.common.config import SITE_LABELS
    from fedtune.server.operations import control

    # the registered labels travel in the run's config
    app = control.write_app(config.RunConfig(), tmp_path / "app", run_path=None,
                            site_labels={"12": "hospital-a"})
    flat = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"][
        "app"]["config"]
    assert flat[SITE_LABELS] == "12=hospital-a"
    # a failed run is not shown as running; its directory always shows
    shown = {"round": 1, "rounds": 2, "run_dir": None, "epsilon": 3.25}
    monkeypatch.setattr(control, "progress", lambda rid, name: shown)
    failed = control.run_line({"run-id": 5, "status": "finished:failed",
                               "elapsed": 16}, name="t")
    assert "FAILED at round 1/2" in failed and "ε max 3.250" in failed
    assert "no run directory (the run failed before the server made one)" in failed
    shown["run_dir"] = "/srv/runs/run-5"
    running = control.run_line({"run-id": 5, "status": "running", "elapsed": 3},
                               name="t")
    assert "  round 1/2  ε max 3.250  /srv/runs/run-5" in running
    assert "FAILED" not in running


def test_a_serverapp_failure_reaches_the_operator_as_one_line() -> None:
    from fedtune.server.operations import control

    # Prepare: what `flwr log --stream` prints for a ServerApp's DataError
    # (Flower 1.39, abridged: each traceback frame is two lines)
    frames = ['  File "/x/central_eval.py", line 54, in __init__\n',
              "    self.dataset = data.encode_for_task(recs, tok)\n"] * 3
    raw = ["\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process\n",
           "2026-12-07 13:11:26,346 INFO fedtune.server.runtime.app: run "
           "directory: /srv/runs/run-1\n",
           "\x1b[93mWARNING \x1b[0m:   fraction_evaluate is set to 0.0. Federated "
           "evaluation will be skipped.\n",
           "\x1b[91mERROR \x1b[0m:     ServerApp raised an exception\n",
           "Traceback (most recent call last):\n", *frames,
           "fedtune.common.errors.DataError: /srv/test.jsonl: data file not found; "
           "set data.source\n",
           "12/07/2026 13:11:26:ERROR:ServerApp raised an exception\n",
           "Traceback (most recent call last):\n", *frames,
           "fedtune.common.errors.DataError: /srv/test.jsonl: data file not found\n",
           "\x1b[91mERROR \x1b[0m:     Exit Code: 201\n", "\n",
           "An unhandled exception occurred in the ServerApp.\n", "\n",
           "For more information, visit: <https://flower.ai/docs/201.html>\n",
           "12/07/2026 13:11:26:ERROR:Exit Code: 201\n", "\n",
           "An unhandled exception occurred in the ServerApp.\n", "\n",
           "For more information, visit: <https://flower.ai/docs/201.html>\n",
           "\n"]
    # Execute
    shown = list(control.operator_lines(raw))
    # Assert: the run's own lines (not Flower's notices), then its error once, in
    # one line
    assert shown == [raw[1],
                     "the run failed: DataError: /srv/test.jsonl: data file not "
                     "found; set data.source\n", "\n"]
