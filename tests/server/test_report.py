"""`fedtune report`: tables, text, the self-contained page and its plots, errors;
the TensorBoard event log."""

from __future__ import annotations

import base64
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fedtune.common import config
from fedtune.common.errors import FedtuneError
from fedtune.server.runtime import events
from fedtune.server.tools import plots, report
from fedtune.simulations.cli import main
from tests.conftest import REVIEW_DATA

PNG = b"\x89PNG\r\n\x1a\n"
A, B, C = "1111111111", "2222222222", "3333333333"


def _row(rnd: int, **kw: object) -> dict:
    row = {"round": rnd, "eval_loss": 1.0 - 0.1 * rnd, "eval_accuracy": 0.5 + 0.1 * rnd,
           "eval_macro_f1": 0.3 + 0.1 * rnd}
    if rnd:
        row.update({
            "train_loss": 1.0, "clients_sampled": 3, "clients_replied": 3,
            "clients_failed": 0, "clients_declined": 0, "clients_rejected": 0,
            "clients_late": 0, "nodes_replied": [A, B, C], "nodes_failed": [],
            "nodes_declined": [], "nodes_rejected": {}, "bytes_sent": 3_000_000,
            "bytes_received": 2_000_000, "adapter_payload_bytes": 600_000,
            "epsilon_max": 2.0 * rnd, "epsilon_by_node": {A: 2.0 * rnd, B: 2.0 * rnd,
                                                          C: 1.5 * rnd},
            "epsilon_total_by_node": {A: 2.0 * rnd + 1, B: 2.0 * rnd, C: 1.5 * rnd},
            "client_train_seconds_sum": 20.0, "round_seconds": 12.5,
            "eval_seconds": 1.5})
    row.update(kw)
    return row


def make_run(tmp_path: Path, rows: list[dict], **sections: dict) -> Path:
    run = tmp_path / "run-1"
    run.mkdir()
    raw = {"federation": {"num_sites": 3, "num_rounds": 3, "min_train_nodes": 3},
           "data": REVIEW_DATA, **sections}
    (run / "config.yaml").write_text(config.dump_yaml(config.from_dict(raw)))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


@pytest.fixture
def troubled_run(tmp_path: Path) -> Path:
    """Round 2: C rejected; round 3: B declined (budget), C failed, one late."""
    return make_run(tmp_path, [
        _row(0), _row(1),
        _row(2, clients_replied=2, clients_rejected=1, nodes_replied=[A, B],
             nodes_rejected={C: "update norm 812 > max_update_norm 50"},
             epsilon_by_node={A: 4.0, B: 4.0}),
        _row(3, clients_sampled=4, clients_replied=1, clients_failed=2,
             clients_declined=1, clients_late=1, nodes_replied=[A],
             nodes_failed=[B, C], nodes_declined=[B], epsilon_by_node={A: 6.0})])


def test_round_table_counts_every_outcome(troubled_run: Path) -> None:
    run = report.load_run(troubled_run)
    head, body = report.round_table(run)
    assert head[:4] == ["round", "eval loss", "acc", "macro-F1"]
    assert body[0][0] == "0 (start)" and len(body) == 4
    r3 = dict(zip(head, body[3], strict=True))
    assert (r3["accepted/sampled"], r3["rejected"], r3["declined"], r3["failed"],
            r3["late"]) == ("1/4", "0", "1", "1", "1")
    assert r3["MB up"] == "2.00" and r3["MB down"] == "3.00"
    assert r3["ε max"] == "6.000" and r3["round s"] == "12.5"
    counts = plots.participation_counts(run.rows[2])
    assert sum(counts.values()) == run.rows[2]["clients_sampled"]


def test_site_table_gives_epsilon_of_target_and_reasons(troubled_run: Path) -> None:
    head, body = report.site_table(report.load_run(troubled_run))
    sites = {r[0]: dict(zip(head, r, strict=True)) for r in body}
    assert sites[A]["ε this run"] == "6.000" and sites[A]["of target"] == "75 %"
    assert sites[A]["ledger total"] == "7.000" and sites[A]["accepted"] == "3"
    assert sites[B]["declined"] == "1" and sites[B]["failed"] == "0"
    assert sites[C]["failed"] == "1"
    assert sites[C]["rejected (why)"] == "r2: update norm 812 > max_update_norm 50"


def test_report_writes_a_self_contained_page_and_pngs(troubled_run: Path,
                                                      capsys: pytest.CaptureFixture
                                                      ) -> None:
    # Execute (the CLI, as an operator runs it)
    assert main(["report", str(troubled_run)]) == 0
    # Assert
    text = capsys.readouterr().out
    assert "rounds: 3 of 3 done" in text and "target ε=8" in text
    assert "r2: update norm 812" in text and "report:" in text
    out = troubled_run / "report"
    page = (out / "index.html").read_text(encoding="utf-8")
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == len(report.FIGURES) == 5
    for name, data in zip(report.FIGURES, uris, strict=True):
        png = base64.b64decode(data)
        assert png.startswith(PNG) and png == (out / f"{name}.png").read_bytes()
        width, height = int.from_bytes(png[16:20]), int.from_bytes(png[20:24])
        assert width > 600 and height > 300
    # self-contained: no script, no external address or file
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert not re.search(r'(src|href)="(?!data:)', page)


def test_dp_off_is_loud_and_causal_runs_show_perplexity(tmp_path: Path) -> None:
    rows = [{"round": 0, "eval_loss": 3.0, "eval_perplexity": 20.1,
             "eval_answer_exact": 0.0},
            {**_row(1, epsilon_max=None, epsilon_by_node={},
                    epsilon_total_by_node={}), "eval_perplexity": 12.0,
             "eval_answer_exact": 0.4}]
    for r in rows:
        r.pop("eval_accuracy", None), r.pop("eval_macro_f1", None)
    run_dir = make_run(tmp_path, rows, privacy={"enabled": False},
                       model={"task": "causal-lm"})
    page, text = report.write_report(run_dir, tmp_path / "out")
    assert "WARNING: DP is OFF" in text and "rounds: 1 of 3 done (unfinished" in text
    head, body = report.round_table(report.load_run(run_dir))
    assert "perplexity" in head and "acc" not in head
    # exact match before training (zero-shot) and after each round, by perplexity
    assert [r[head.index("answers")] for r in body] == ["exact 0.00", "exact 0.40"]
    assert ("perplexity 12.00, answers exact 0.40 (zero-shot, round 0: exact "
            "0.00)") in text
    assert 'class=warn' in page.read_text(encoding="utf-8")


def test_bad_run_directories_are_named(tmp_path: Path) -> None:
    with pytest.raises(FedtuneError, match="config.yaml: not found"):
        report.load_run(tmp_path)
    run_dir = make_run(tmp_path, [_row(0)])
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 1, "eval_lo\n')
    with pytest.raises(FedtuneError, match=r"metrics.jsonl:2: not a JSON line"):
        report.load_run(run_dir)
    (run_dir / "metrics.jsonl").write_text('{"no_round": 1}\n')
    with pytest.raises(FedtuneError, match=r"metrics.jsonl:1: not a fedtune"):
        report.load_run(run_dir)
    (run_dir / "metrics.jsonl").write_text("")
    with pytest.raises(FedtuneError, match="no rounds yet"):
        report.write_report(run_dir)
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_event_log_tags_and_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    assert events.tag("eval_macro_f1") == "eval/macro_f1"
    assert events.tag("bytes_received") == "communication/received"
    assert events.tag("round_seconds") == "time/round_seconds"
    assert events.tag("nodes_replied") is None
    log = events.EventLog(tmp_path)
    for rnd in (0, 1, 2):
        log.write(_row(rnd))
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/loss", "eval/accuracy", "privacy/epsilon_max", "sites/replied",
            f"privacy/epsilon_by_node/{C}", "time/round_seconds"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars(f"privacy/epsilon_by_node/{C}")
            ] == [(1, 1.5), (2, 3.0)]


def test_event_log_is_a_no_op_without_tensorboard(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    log = events.EventLog(tmp_path)
    log.write(_row(1))
    log.close()
    assert log.writer is None and not (tmp_path / "tensorboard").exists()


def test_budget_line_when_the_run_sets_one(troubled_run: Path) -> None:
    run = report.load_run(troubled_run)
    run = replace(run, cfg=replace(run.cfg, privacy=replace(run.cfg.privacy,
                                                            budget_epsilon=10.0)))
    png = report.FIGURES["privacy"][1](run)
    assert png.startswith(PNG)


def test_collapse_noise_ratio_and_classes_are_reported(tmp_path: Path) -> None:
    # Prepare: round 2 collapsed onto "positive"; the sites' DP figures
    dp = {A: {"records": 63.0, "sigma": 2.0, "sample_rate": 1.0, "steps": 2.0,
              "dims": 74883.0, "rho": 6.19}}
    collapse = "predicts 'positive' for 98% of the test records; 2 class(es) never"
    run = make_run(tmp_path, [
        _row(0), _row(1, rho_max=6.19, dp_by_node=dp, weight_by_node={A: 1.0}),
        _row(2, rho_max=6.19, dp_by_node=dp, eval_collapse=collapse,
             eval_precision_positive=0.65, eval_recall_positive=1.0,
             eval_f1_positive=0.79, eval_precision_negative=0.0,
             eval_recall_negative=0.0, eval_f1_negative=0.0)],
        federation={"num_sites": 3, "num_rounds": 2, "min_train_nodes": 3})
    # Execute
    page, text = report.write_report(run)
    # Assert: the collapse in words (red on the page), rho and the per-class table
    assert f"WARNING: COLLAPSED in round 2: the global model {collapse}" in text
    assert "ρ max 6.190 (will learn nothing" in text
    assert "0.500 COLLAPSED" in text  # macro-F1 cell of round 2
    classes = text.split("Per class (last round):")[1]
    assert re.search(r"positive\s+0\.650\s+1\.000\s+0\.790", classes)
    assert re.search(r"negative\s+0\.000\s+0\.000\s+0\.000", classes)
    html_page = page.read_text()
    assert "<li class=warn>WARNING: COLLAPSED" in html_page
    head, body = report.site_table(report.load_run(run))
    row = dict(zip(head, body[0], strict=True))
    assert (row["records"], row["σ"], row["noise ρ"], row["weight"]) == (
        "63", "2.000", "6.190", "1.000")


def test_collapse_words_count_the_classes_at_f1_zero() -> None:
    from fedtune.server.runtime.recorder import spread_words

    ev = {"top_prediction": 2.0, "top_prediction_share": 0.997, "collapsed": 1.0,
          "f1-negative": 0.0, "f1-neutral": 0.0, "f1-positive": 0.79}
    assert spread_words(ev, ["negative", "neutral", "positive"]) == {
        "eval_top_prediction": "positive",
        "eval_collapse": "predicts 'positive' for 100% of the test records; 2 of 3 "
                         "classes at F1 0"}
    assert "eval_collapse" not in spread_words({**ev, "collapsed": 0.0},
                                               ["negative", "neutral", "positive"])


def test_sites_are_named_by_partition_beside_the_node_id(tmp_path: Path) -> None:
    # Prepare: two simulated sites (p2, p10) and a deployed node without a name
    rows = [{"round": 1, "epsilon_by_node": {"111": 1.0, "222": 1.0, "333": 1.0},
             "nodes_replied": ["111", "222", "333"],
             "site_by_node": {"111": "p10", "222": "p2"}}]
    run = report.Run(path=tmp_path, cfg=config.RunConfig(), initial=None, rows=rows)
    # Execute
    head, body = report.site_table(run)
    # Assert: partition order (p2 before p10), the node id beside, unnamed last
    assert head[0] == "site (node id)"
    assert [r[0] for r in body] == ["p2 (222)", "p10 (111)", "333"]
    assert plots.site_label("222", {"222": "p2"}) == "p2 222"
    assert plots.privacy(rows, target=8.0, budget=None)[:4] == b"\x89PNG"


def test_a_simulated_site_reports_its_partition_index() -> None:
    from fedtune.common import records
    from fedtune.server.runtime.stats import RoundStats, record_site_metrics

    stats = RoundStats()
    record_site_metrics(stats, "42", {records.PARTITION: 3, records.TRAIN_SECONDS: 1})
    record_site_metrics(stats, "43", {records.TRAIN_SECONDS: 1})  # deployed
    assert stats.summary()["site_by_node"] == {"42": "p3"}


def test_a_failed_site_is_named_with_the_class_of_its_error() -> None:
    from fedtune.server.runtime.stats import failure_words

    sent = ("<class 'fedtune.client.mods.SiteFailure'>:<'DataError on the site "
            "(details stay in the site's own log)'>")
    assert failure_words(sent) == "DataError on the site"
    assert failure_words("x" * 300) == "x" * 120  # Flower's own reasons, shortened
    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::"
           "ClientAppActor.run()\x1b[39m\nTraceback ...\nRuntimeError: faulty site\n"
           "The above exception ... ClientAppException: wrapped'>")
    assert failure_words(ray) == "RuntimeError: faulty site"


def test_the_summary_names_each_failed_site_and_why(tmp_path: Path) -> None:
    rows = [{"round": r, "nodes_failed": ["7"],
             "nodes_failed_why": {"7": "DataError on the site"}} for r in (1, 2)]
    run = report.Run(path=tmp_path, cfg=config.RunConfig(), initial=None, rows=rows)
    assert "failed sites: node 7: DataError on the site (round 1, 2)" in \
        report.headline(run)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux pty")
def test_the_rounds_bar_shows_in_a_terminal_that_reports_no_size() -> None:
    import os
    import pty

    # Prepare: a pseudo-terminal of 0 x 0, as some consoles give
    code = ("from fedtune.server.runtime.recorder import progress_bar\n"
            "bar = progress_bar(2)\nbar.update(1)\nbar.close()\n")
    out = bytearray()

    def read(fd: int) -> bytes:
        data = os.read(fd, 4096)
        out.extend(data)
        return data

    # Execute
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        pty.spawn([sys.executable, "-c", code], read)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    # Assert
    assert b"rounds:  50%" in out, bytes(out)


def test_retention_and_personalisation_are_reported(tmp_path: Path) -> None:
    # Prepare: a causal-LM run whose general-text perplexity rose 20 %, and a
    # classification run with a personalisation round
    causal = [{"round": 0, "eval_loss": 3.0, "eval_perplexity": 20.0,
               "retention_perplexity": 50.0},
              {**_row(1), "eval_perplexity": 12.0, "retention_perplexity": 60.0}]
    for r in causal:
        r.pop("eval_accuracy", None), r.pop("eval_macro_f1", None)
    forgot = make_run(tmp_path, causal, model={"task": "causal-lm"},
                      data={"source": "x.jsonl", "retention_source": "general.jsonl"})
    (tmp_path / "b").mkdir()
    personal = make_run(tmp_path / "b", [_row(0), _row(1, best_round=1,
                                                        selection_metric="macro-f1",
                                                        best_value=0.4)])
    scores = {"eval-loss": 1.0, "accuracy": 0.5, "macro-f1": 0.4}
    better = {"eval-loss": 0.8, "accuracy": 0.7, "macro-f1": 0.6}
    (personal / "personalization.json").write_text(json.dumps({
        "method": "local fine-tuning", "round": 1, "epochs": 2, "epsilon": 1.0,
        "sites": {A: {"site": "p0", "records": 10, "global": scores,
                      "personalised": better, "epsilon": 1.0, "epsilon_run": 3.0}},
        "failed": {}, "late": [],
        "mean": {"global": scores, "personalised": better}}))
    # Execute
    _, forgot_text = report.write_report(forgot, tmp_path / "out-a")
    page, personal_text = report.write_report(personal, tmp_path / "out-b")
    # Assert
    assert ("WARNING: retention (general text, general.jsonl): perplexity 50.00 "
            "before training, 60.00 after round 1 (+20.0%); fine-tuning damaged "
            "general ability") in forgot_text
    assert ("personalisation (1 sites, local fine-tuning, ε 1 more each): mean "
            "macro-f1 on the sites' own held-out records 0.400 global -> 0.600 "
            "personalised") in personal_text
    assert "best round: 1 by macro-f1" in personal_text
    assert "0.4000 → 0.6000" in page.read_text(encoding="utf-8")


def test_the_decision_calibration_is_reported(tmp_path: Path) -> None:
    # Prepare: round 2's line carries the calibration the server recorded
    def scores(p: float, r: float) -> dict:
        return {"accuracy": 0.9, "macro-f1": 0.8, "precision-positive": p,
                "recall-positive": r, "f1-positive": 2 * p * r / (p + r)}

    cal = {"round": 2, "strength": 0.5, "logit_adjustment": 1.0,
           "effective_adjustment": 0.5, "sites": 3, "failed": {},
           "validation_records": 120, "noise_multiplier": 2.0,
           "prior": [0.6, 0.2, 0.2], "decision_bias": [-0.26, -0.8, -0.8],
           "candidates": [{"strength": s, "val_macro_f1": 0.7 + 0.1 * (s == 0.5),
                           "val_precision": [], "val_recall": [],
                           "test": scores(0.6 + 0.4 * s, 0.95 - 0.1 * s)}
                          for s in (0.0, 0.5, 1.0)],
           "eval": scores(0.8, 0.9)}
    run = make_run(tmp_path, [_row(0), _row(1), _row(2, calibration=cal,
                                                     eval_precision_positive=0.6,
                                                     eval_recall_positive=0.95,
                                                     eval_f1_positive=0.74)],
                   federation={"num_sites": 3, "num_rounds": 2, "min_train_nodes": 3})
    # Execute
    _, text = report.write_report(run)
    # Assert: the headline, the per-class table's calibrated columns, the candidates
    assert ("decision calibration (round 2, validation counts of 3 sites under DP): "
            "strength 0.5 of the logit adjustment τ=1, decisions at τ=0.5: accuracy "
            "0.900, macro-F1 0.800 (balanced, strength 0: 0.800)") in text
    classes = text.split("Per class (last round):")[1]
    assert re.search(r"positive\s+0\.600\s+0\.950\s+0\.740\s+0\.800\s+0\.900\s+0\.847",
                     classes)
    assert re.search(r"0\.5\s+0\.5\s+0\.800\s+-\s+0\.800\s+0\.900  <- chosen", text)


def test_the_privacy_line_names_the_sites_that_declined(troubled_run: Path) -> None:
    # Prepare: B declined round 3 (its budget); its label from the registration
    rows = report.load_run(troubled_run).rows
    rows[-1]["site_by_node"] = {B: "hospital-b"}
    (troubled_run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    # Execute
    lines = report.headline(report.load_run(troubled_run))
    # Assert
    (line,) = [x for x in lines if x.startswith("privacy:")]
    assert "every site that trained (hospital-b declined)" in line
    assert "DP-SGD on every site," not in line


def test_a_later_release_is_folded_into_the_runs_epsilon(tmp_path: Path) -> None:
    # Prepare: two rounds, then the calibration's replies (this run's epsilon and
    # the ledger's total, as each site's Releases reports them)
    from fedtune.common import records
    from fedtune.server.runtime import checkpoint

    run = make_run(tmp_path, [_row(0), _row(1), _row(2)])
    replies = {A: {records.EPSILON: 4.6, records.EPSILON_TOTAL: 5.6},
               C: {records.EPSILON: 3.4, records.EPSILON_TOTAL: 3.4},
               B: {records.NUM_EXAMPLES: 3}}  # DP off on B: no epsilon at all
    # Execute
    top = checkpoint.fold_epsilons(run, replies, release="calibration")
    # Assert: the last line (what the summary, report and status read) holds them
    last = checkpoint.read_metrics(run)[-1]
    assert top == last["epsilon_max"] == 4.6
    assert last["epsilon_by_node"] == {A: 4.6, B: 4.0, C: 3.4}
    assert last["epsilon_total_by_node"] == {A: 5.6, B: 4.0, C: 3.4}
    assert last["epsilon_releases"] == ["calibration", "round"]
    line = next(x for x in report.headline(report.load_run(run))
                if x.startswith("privacy:"))
    assert "max ε 4.600 (the calibration + rounds" in line
    head, body = report.site_table(report.load_run(run))
    a_row = dict(zip(head, next(r for r in body if r[0] == A), strict=True))
    assert (a_row["ε this run"], a_row["ledger total"]) == ("4.600", "5.600")
    assert checkpoint.fold_epsilons(run, {B: {}}, release="calibration") is None
