"""After the federation: early stopping and the best round, export (adapter,
merged, int8), predict and evaluate, on one shared simulated run.

The run stops early by design: ``min_delta`` 1.0 means no round after the first
can improve macro-F1 enough, so with patience 1 it ends after round 2 of 4 and
round 1 is the best.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedtune.common.errors import FedtuneError
from tests.conftest import tiny_config
from tests.integration import runner

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path,
            review_files: tuple[Path, Path]
            ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """A DP-off run of 3 sites (it is also the suite's DP-off simulation)."""
    tmp = tmp_path_factory.mktemp("after")
    raw = tiny_config(tiny_bert, *review_files, privacy={"enabled": False},
                      federation={"num_rounds": 4, "early_stopping_patience": 1,
                                  "min_delta": 1.0})
    (tmp / "run.yaml").write_text(yaml.safe_dump(raw))
    proc = runner.run(["simulate", str(tmp / "run.yaml"), "--run-dir",
                       str(tmp / "run")], timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, tmp / "run"


@pytest.fixture
def stopped_run(stopped: tuple[subprocess.CompletedProcess[str], Path]) -> Path:
    return stopped[1]


def test_dp_off_is_loud_and_unaccounted(
        stopped: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, run_dir = stopped
    rows = _rows(run_dir)
    assert all(r["clients_replied"] == 3 for r in rows[1:])
    assert rows[2]["epsilon_max"] is None and rows[2]["clients_non_private"] == 3
    assert "DP is OFF" in proc.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["privacy"][
        "enabled"] is False


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text()
            .splitlines()]


def _hashes(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_early_stop_ends_the_run_and_points_best_at_the_best_round(
        stopped_run: Path) -> None:
    # Assert: rounds 0-2 of 4, round 2 says why it stopped, best -> round 1
    rows = _rows(stopped_run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["best_round"] == 1 and rows[1]["selection_metric"] == "macro-f1"
    assert rows[1]["best_value"] == rows[1]["eval_macro_f1"]
    assert "stopped_early" not in rows[1]
    assert "best round 1" in rows[2]["stopped_early"]
    assert (stopped_run / "best").resolve().name == "round-0001"
    assert (stopped_run / "final").resolve().name == "round-0002"
    assert not (stopped_run / "checkpoints" / "round-0003").exists()
    report = runner.run(["report", str(stopped_run)])
    assert report.returncode == 0, report.stderr[-2000:]
    assert "2 of 4 done (stopped early: no macro-f1 improvement" in report.stdout
    assert "best round: 1 by macro-f1" in report.stdout
    assert "1 (best)" in report.stdout


def test_resume_refuses_a_stopped_run(stopped_run: Path) -> None:
    # Execute
    refused = runner.run(["simulate", "--resume", str(stopped_run)])
    # Assert: refused before any engine starts, with the way out
    assert refused.returncode == 2
    assert "stopped early after round 2" in refused.stderr
    assert "--past-early-stop" in refused.stderr


@pytest.mark.slow  # CI runs it; ~12 s on 2 cores
def test_resume_past_the_early_stop_when_asked(stopped_run: Path,
                                               tmp_path: Path) -> None:
    # Prepare: a copy, so the other tests keep the stopped run
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run, symlinks=True)
    # Execute
    again = runner.run(["simulate", "--resume", str(run), "--past-early-stop"],
                       timeout=420)
    # Assert: it trains round 3, whose patience starts afresh (and ends at once
    # again: min_delta 1.0)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = _rows(run)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["best_round"] == 1 and "stopped_early" in rows[3]
    assert (run / "best").resolve().name == "round-0001"


def _standalone(export_dir: Path, texts: list[str]) -> list[dict]:
    """Run the export's own script in a Python that cannot import fedtune."""
    code = ("import sys, json; sys.modules['fedtune'] = None; "
            f"sys.path.insert(0, {str(export_dir)!r}); "
            "from fedtune_standalone import load; "
            f"print(json.dumps(load({str(export_dir)!r})({texts!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_predict_evaluate_leave_the_run_untouched(
        stopped_run: Path, tmp_path: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare
    before = _hashes(stopped_run)
    texts = ["good great relief", "awful pain worse", "okay maybe some"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    # Execute: every kind of export, predictions from the run and from exports
    out = {k: tmp_path / k for k in ("adapter", "merged", "int8")}
    for kind, extra in (("adapter", []), ("merged", ["--merge"]),
                        ("int8", ["--merge", "--quantize", "int8"])):
        proc = runner.run(["export", str(stopped_run), "--out", str(out[kind]),
                           *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "exported round 1" in proc.stdout  # best, by default
    preds = {}
    for name, src in (("run", stopped_run), ("adapter", out["adapter"]),
                      ("merged", out["merged"]), ("int8", out["int8"])):
        proc = runner.run(["predict", str(src), "--input", str(tmp_path / "in.txt"),
                           "--out", str(tmp_path / f"{name}.jsonl"), "--quiet"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        preds[name] = [json.loads(x) for x in
                       (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    jsonl = runner.run(["predict", str(out["int8"]), "--input", str(review_files[1]),
                        "--quiet"])  # the training column, read by a merged export
    assert jsonl.returncode == 0, jsonl.stderr[-2000:]
    assert len(jsonl.stdout.splitlines()) == 40
    evaluated = runner.run(["evaluate", str(stopped_run), "--data",
                            str(review_files[1]), "--out", str(tmp_path / "eval")])
    # Assert: nothing in the run directory changed
    assert _hashes(stopped_run) == before
    # the adapter export is standard PEFT + the run's config
    assert {p.name for p in out["adapter"].iterdir()} >= {
        "adapter_config.json", "adapter_model.safetensors", "fedtune_config.yaml",
        "fedtune_model.json", "README.md"}
    # the merged export needs no fedtune, and agrees with the run's own model
    alone = _standalone(out["merged"], texts)
    for mine, run, theirs in zip(alone, preds["run"], preds["merged"], strict=True):
        assert mine["label"] == run["label"] == theirs["label"]
        for label, p in run["probabilities"].items():
            assert mine["probabilities"][label] == pytest.approx(p, abs=1e-5)
    assert [p["label"] for p in preds["adapter"]] == [p["label"] for p in
                                                      preds["run"]]
    for q, run in zip(preds["int8"], preds["run"], strict=True):
        assert sum(q["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert max(abs(q["probabilities"][k] - v)
                   for k, v in run["probabilities"].items()) < 0.1
    assert not (out["int8"] / "model.safetensors").exists()
    assert (out["int8"] / "model.int8.pt").stat().st_size < (
        out["merged"] / "model.safetensors").stat().st_size
    # evaluate reproduces the central evaluation of the best round on that file
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    best = _rows(stopped_run)[1]
    assert result["macro-f1"] == pytest.approx(best["eval_macro_f1"], abs=1e-6)
    assert result["loss"] == pytest.approx(best["eval_loss"], rel=1e-4)
    assert sum(map(sum, result["confusion"])) == result["records"] == 40
    assert (tmp_path / "eval" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "precision" in evaluated.stdout and "macro-F1" in evaluated.stdout
    # scoring keeps no autograd graph (a 13k-record file once ran out of memory)
    from fedtune.server.tools.predict import Predictor

    probs = Predictor.open(stopped_run, device="cpu").probabilities(texts)
    assert probs.shape == (3, 3) and not probs.requires_grad
    # a calibrated decision bias in fedtune_model.json is applied by predict from
    # an adapter export and by the merged export's standalone code alike
    for kind in ("adapter", "merged"):
        path = out[kind] / "fedtune_model.json"
        meta = json.loads(path.read_text())
        path.write_text(json.dumps({**meta, "decision_bias": [0.0, 0.0, 50.0]}))
        proc = runner.run(["predict", str(out[kind]), "--input",
                           str(tmp_path / "in.txt"), "--quiet"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert {json.loads(x)["label"] for x in proc.stdout.splitlines()} == {
            "positive"}, kind


def test_bad_exports_and_inputs_name_the_problem(stopped_run: Path, tmp_path: Path,
                                                 tiny_llama: Path) -> None:
    # Prepare: a run directory whose config names another model
    other = tmp_path / "other"
    shutil.copytree(stopped_run, other, symlinks=True)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["model"]["name_or_path"] = str(tiny_llama)
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((stopped_run / "config.yaml").read_text())
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"body": "good great"}) + "\n")
    cases = [
        (["export", str(stopped_run), "--round", "9", "--out", str(tmp_path / "a")],
         re.escape("round 9 is not saved (saved rounds: 1-2)")),
        (["export", str(empty), "--out", str(tmp_path / "b")], "no checkpoints"),
        (["export", str(other), "--out", str(tmp_path / "c")],
         "trained on .*tiny-bert.* but the config names"),
        (["export", str(stopped_run), "--out", str(taken)], "not empty"),
        (["export", str(stopped_run), "--quantize", "int8", "--out",
          str(tmp_path / "d")], "needs --merge"),
        (["predict", str(stopped_run), "--input", str(wrong)],
         r"missing column\(s\) \['review'\]"),
    ]
    for argv, message in cases:
        # Execute
        proc = runner.run(argv)
        # Assert
        assert proc.returncode == 2, (argv, proc.stderr[-2000:])
        assert re.search(message, proc.stderr), (message, proc.stderr)
    assert (taken / "keep.txt").read_text() == "mine"
    assert not any((tmp_path / n).exists() for n in "abcd")


def _copy_run(src: Path, dst: Path, **sections: dict[str, object]) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    for name, keys in sections.items():
        cfg[name].update(keys)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


def test_compare_gives_the_difference_with_an_interval(stopped_run: Path,
                                                       tmp_path: Path) -> None:
    # Prepare: the same federation served at its round 2 instead of its best (1)
    later = _copy_run(stopped_run, tmp_path / "later")
    (later / "best").unlink()
    (later / "best").symlink_to("checkpoints/round-0002", target_is_directory=True)
    before = _hashes(stopped_run)
    # Execute
    proc = runner.run(["compare", str(stopped_run), str(later), "--resamples", "300",
                       "--out", str(tmp_path / "cmp.json")])
    # Assert: both runs side by side, the paired interval around the difference
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "cmp.json").read_text())
    a, b = out["runs"]
    assert a["best_round"] == 1 and a["rounds"] == 2 and a["bytes"] > 0
    assert set(out["per_class"]) == {"negative", "neutral", "positive"}
    (diff,) = out["differences"]
    assert diff["low"] <= diff["macro_f1_diff"] <= diff["high"]
    assert diff["macro_f1_diff"] == pytest.approx(
        b["scored_macro_f1"] - a["scored_macro_f1"])
    assert "[2] - [1] macro-F1: " in proc.stdout and "95% paired bootstrap CI" in \
        proc.stdout and "macro-F1 best round" in proc.stdout
    assert _hashes(stopped_run) == before  # compare writes nothing into a run


def test_compare_refuses_runs_on_other_test_sets(stopped_run: Path,
                                                 tmp_path: Path) -> None:
    fewer = _copy_run(stopped_run, tmp_path / "fewer", data={"max_test_samples": 5})
    blind = _copy_run(stopped_run, tmp_path / "blind", data={"test_source": ""},
                      federation={"round_patience": 0})
    for argv, message in (
            ([str(stopped_run), str(fewer)],
             rf"{re.escape(str(fewer))} was scored on .*\(5 records, sha256 \w+\), "
             r".* a paired comparison needs one test set"),
            ([str(blind), str(stopped_run)],
             rf"{re.escape(str(blind))}: has no test set"),
            ([str(stopped_run)], "needs two run directories")):
        proc = runner.run(["compare", *argv])
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert re.search(message, proc.stderr), (message, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_a_corrupt_checkpoint_fails_in_one_line_naming_what_still_loads(
        stopped_run: Path, tmp_path: Path) -> None:
    # Prepare: round 2's adapter truncated on disk (the final round)
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run, symlinks=True)
    damaged = run / "checkpoints" / "round-0002" / "adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:10])
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"review": "good great", "rating": "positive"}) + "\n")
    expected = (re.escape(f"{damaged}: round 2's checkpoint is corrupt (its sha256 ")
                + r"\w{12}\.\.\. differs from the \w{12}\.\.\. recorded when it was "
                r"saved \(truncated or overwritten on disk\)\); the saved rounds "
                r"that still load: 1 \(pass --round 1\)")
    # Execute + Assert: predict, export and evaluate, each in one line
    for argv in (["predict", str(run), "--round", "final", "--input", str(data)],
                 ["export", str(run), "--round", "2", "--out", str(tmp_path / "x")],
                 ["evaluate", str(run), "--round", "2", "--data", str(data)]):
        proc = runner.run(argv)
        assert proc.returncode == 2, (argv, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and re.search(expected, lines[0]), (argv, lines)
    assert not (tmp_path / "x").exists()
    # the round that is whole still serves
    ok = runner.run(["predict", str(run), "--round", "1", "--input", str(data),
                     "--quiet"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    # resume refuses before it rewrites anything
    from fedtune.common import config as fconfig
    from fedtune.server.runtime import resume

    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(FedtuneError, match=expected):
        resume.resume(run, strategy=None,  # type: ignore[arg-type]  # not reached
                      cfg=fconfig.load(run / "config.yaml"))
    assert sorted(p.name for p in run.rglob("*")) == before
