"""The ClientApp called directly with Flower Messages: what a site sends."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune.client.app import make_client_app
from fedtune.client.ledger import PrivacyLedger
from fedtune.client.mods import SiteFailure
from fedtune.common import config, recipes, records
from fedtune.common.model import (
    adapter_state,
    build_model,
    load_tokenizer,
)
from tests.conftest import tiny_config

DECLARED_METRICS = {records.NUM_EXAMPLES, records.TRAIN_LOSS, records.TRAIN_SECONDS,
                    records.DP_STEPS, records.EPSILON, records.DELTA,
                    records.NOISE_MULTIPLIER, records.EPSILON_TOTAL,
                    # public: q = batch / num-examples, and the model's size
                    records.SAMPLE_RATE, records.TRAINABLE_PARAMS,
                    records.PARTITION}  # a simulated site's partition index
EVAL_METRICS = {records.NUM_EXAMPLES, records.EVAL_LOSS, records.ACCURACY,
                records.MACRO_F1}


def _setup(tiny_bert: Path, review_files: tuple[Path, Path], **sections: dict
           ) -> tuple[config.RunConfig, dict, Message]:
    cfg = config.from_dict(tiny_config(tiny_bert, *review_files, **sections))
    flat = config.to_run_config(cfg)
    model = build_model(cfg.model, cfg.lora, num_labels=3)
    msg = Message(RecordDict({
        records.ARRAYS: records.to_record(adapter_state(model)),
        records.CONFIG: ConfigRecord({records.SERVER_ROUND: 1})}),
        dst_node_id=7, message_type="train")
    return cfg, flat, msg


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


@pytest.mark.usefixtures("flower_identity")
def test_reply_holds_only_adapter_tensors_and_declared_scalars(
        tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare
    cfg, flat, msg = _setup(tiny_bert, review_files)
    app = make_client_app(flat)
    ctx = _context({"partition-id": 1, "num-partitions": 3})
    # Execute
    reply = app(msg, ctx)
    # Assert: one ArrayRecord of adapter tensors, one MetricRecord, nothing else
    content = reply.content
    assert set(content.array_records) == {records.ARRAYS}
    assert set(content.metric_records) == {records.METRICS}
    assert not content.config_records
    arrays = content[records.ARRAYS]
    assert all(("lora_A" in k or "lora_B" in k or ".head." in k) for k in arrays)
    expected = adapter_state(build_model(cfg.model, cfg.lora, num_labels=3))
    assert list(arrays) == list(expected)
    assert records.payload_bytes(arrays) == sum(
        t.numel() * t.element_size() for t in expected.values())
    trainable = build_model(cfg.model, cfg.lora, num_labels=3)
    assert records.payload_bytes(arrays) == 4 * sum(
        p.numel() for p in trainable.parameters() if p.requires_grad)
    metrics = content[records.METRICS]
    assert set(metrics) <= DECLARED_METRICS
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert metrics[records.NUM_EXAMPLES] == 36  # 40 records, 10% validation
    assert 0 < metrics[records.EPSILON] < cfg.privacy.target_epsilon


@pytest.mark.usefixtures("flower_identity")
def test_epsilon_accumulates_in_the_node_state(tiny_bert: Path,
                                               review_files: tuple[Path, Path]
                                               ) -> None:
    _, flat, msg = _setup(tiny_bert, review_files)
    app = make_client_app(flat)
    ctx = _context({"partition-id": 0, "num-partitions": 3})
    first = app(msg, ctx).content[records.METRICS][records.EPSILON]
    second = app(msg, ctx).content[records.METRICS][records.EPSILON]
    assert 0 < first < second <= 8.0 + 1e-6


@pytest.mark.usefixtures("flower_identity")
@pytest.mark.parametrize(("epochs", "steps"), [(0, recipes.head_steps(36)), (2, 8)])
def test_a_head_round_takes_the_recipe_steps_for_the_site_size(
        tiny_bert: Path, review_files: tuple[Path, Path], epochs: int, steps: int
        ) -> None:
    # 36 training records at batch 8: linear_probe_epochs 0 (the default) takes
    # sqrt(records) steps within 10..40, an explicit 2 epochs 2 x int(36 / 8)
    _, flat, msg = _setup(tiny_bert, review_files, train={
        "linear_probe_rounds": 1, "linear_probe_epochs": epochs})
    reply = make_client_app(flat)(msg, _context({"partition-id": 1,
                                                 "num-partitions": 3}))
    assert reply.content[records.METRICS][records.DP_STEPS] == steps


@pytest.mark.usefixtures("flower_identity")
def test_dp_off_is_loud_and_reports_no_epsilon(tiny_bert: Path,
                                               review_files: tuple[Path, Path],
                                               caplog: pytest.LogCaptureFixture
                                               ) -> None:
    _, flat, msg = _setup(tiny_bert, review_files, privacy={"enabled": False})
    with caplog.at_level(logging.WARNING):
        reply = make_client_app(flat)(msg, _context({"data-path": str(
            review_files[0]), "allow-non-private": "true"}))
    assert records.EPSILON not in reply.content[records.METRICS]
    assert any("DP is OFF" in r.message for r in caplog.records)
    assert reply.content[records.METRICS][records.NUM_EXAMPLES] == 108


@pytest.mark.usefixtures("flower_identity")
def test_node_without_data_is_told_how_to_fix_it(
        tiny_bert: Path, review_files: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    _, flat, msg = _setup(tiny_bert, review_files)
    with pytest.raises(SiteFailure) as info:
        make_client_app(flat)(msg, _context({}))
    # The site's own log says what to fix; the server only learns the error's kind.
    assert "this node has no data" in caplog.text and "data-path=" in caplog.text
    assert str(info.value).startswith("DataError on the site")
    assert "data-path" not in str(info.value)


@pytest.mark.usefixtures("flower_identity")
def test_site_failure_sends_no_paths_or_values(tmp_path: Path, tiny_bert: Path,
                                               review_files: tuple[Path, Path]
                                               ) -> None:
    _, flat, msg = _setup(tiny_bert, review_files)
    secret = tmp_path / "patient-jane-doe.jsonl"
    secret.write_text('{"review": "private text", "rating": "label-x"}\n' * 5)
    with pytest.raises(SiteFailure) as info:
        make_client_app(flat)(msg, _context({"data-path": str(secret)}))
    text = str(info.value)
    assert "jane-doe" not in text and "label-x" not in text and "private" not in text


@pytest.mark.usefixtures("flower_identity")
def test_client_evaluate_reports_metrics(tiny_bert: Path,
                                         review_files: tuple[Path, Path]) -> None:
    _, flat, msg = _setup(tiny_bert, review_files)
    ev = Message(msg.content, dst_node_id=7, message_type="evaluate")
    reply = make_client_app(flat)(ev, _context({"partition-id": 2,
                                                "num-partitions": 3}))
    metrics = reply.content[records.METRICS]
    assert set(metrics) == {"eval-loss", "accuracy", "macro-f1", records.NUM_EXAMPLES}
    assert not reply.content.array_records


@pytest.mark.usefixtures("flower_identity")
def test_no_reply_carries_raw_text_tokens_labels_or_per_sample_values(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare: a site whose every record holds a canary phrase.
    site = tmp_path / "site.jsonl"
    canary = "zebra canary phrase"
    rows = [f'{{"review": "{canary} good {i}", "rating": "positive"}}'
            for i in range(24)]
    site.write_text("\n".join(rows) + "\n")
    cfg, flat, msg = _setup(tiny_bert, review_files)
    app = make_client_app(flat)
    ctx = _context({"data-path": str(site)})
    tok = load_tokenizer(str(tiny_bert), "")
    ids = tok(f"{canary} good 1")["input_ids"]
    evaluate = Message(msg.content, dst_node_id=7, message_type="evaluate")
    # Execute: every message this site sends in a round (train, then evaluate)
    replies = [app(msg, ctx), app(evaluate, ctx)]
    # Assert
    allowed_arrays = set(adapter_state(build_model(cfg.model, cfg.lora,
                                                   num_labels=3)))
    for reply in replies:
        content = reply.content
        assert not content.config_records
        assert set(content.metric_records) == {records.METRICS}
        metrics = content[records.METRICS]
        assert set(metrics) <= DECLARED_METRICS | EVAL_METRICS
        assert all(isinstance(v, int | float) for v in metrics.values())
        for name, arr in content.array_records.get(records.ARRAYS, {}).items():
            assert name in allowed_arrays
            data = arr.numpy()
            assert 24 not in data.shape and 22 not in data.shape  # no per-sample axis
            raw = arr.data
            assert canary.encode() not in raw
            assert np.asarray(ids, dtype=np.int64).tobytes() not in raw
            assert np.asarray(ids, dtype=np.int32).tobytes() not in raw
        text = repr(content)
        assert canary not in text and "positive" not in text


@pytest.mark.usefixtures("flower_identity")
def test_the_resident_model_trains_exactly_like_a_fresh_one(
        tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare: seeded noise, so two trainings of one round are comparable; FFA
    # (a frozen A that must come back to its seeded value)
    from fedtune.client import site as client_app

    _, flat, msg = _setup(tiny_bert, review_files, privacy={"secure_noise": False},
                          lora={"ffa": True})
    app = make_client_app(flat)

    def train_once() -> dict[str, np.ndarray]:
        reply = app(msg, _context({"partition-id": 1, "num-partitions": 3}))
        return {k: v.numpy() for k, v in reply.content[records.ARRAYS].items()}

    # Execute: a fresh build, then the kept model twice (after training on it)
    client_app._RESIDENT.clear()
    built = client_app.load_counts()["models_built"]
    fresh = train_once()
    again, third = train_once(), train_once()
    # Assert: one build, and the kept model gave bit-identical updates
    assert client_app.load_counts()["models_built"] == built + 1
    for other in (again, third):
        assert other.keys() == fresh.keys()
        assert all(np.array_equal(fresh[k], other[k]) for k in fresh)


PERSONAL_METRICS = {records.NUM_EXAMPLES, records.DP_STEPS, records.TRAIN_SECONDS,
                    records.PERSONAL_EPSILON, records.EPSILON, records.EPSILON_TOTAL,
                    records.NOISE_MULTIPLIER, records.PARTITION, records.DELTA} | {
    prefix + key for prefix in (records.GLOBAL, records.PERSONAL)
    for key in (records.EVAL_LOSS, records.ACCURACY, records.MACRO_F1)}


@pytest.mark.usefixtures("flower_identity")
def test_personalisation_keeps_the_adapter_and_replies_with_scores_only(
        tiny_bert: Path, review_files: tuple[Path, Path], tmp_path: Path) -> None:
    # Prepare: a site with a ledger asked to personalise round 2's adapter
    import json

    cfg, flat, msg = _setup(tiny_bert, review_files,
                            train={"personalize_epochs": 2},
                            privacy={"personalize_epsilon": 1.5})
    ask = Message(RecordDict({
        records.ARRAYS: msg.content.array_records[records.ARRAYS],
        records.CONFIG: ConfigRecord({records.PERSONALIZE: 1,
                                      records.SERVER_ROUND: 2})}),
        dst_node_id=7, message_type="evaluate")
    ledger_dir = tmp_path / "ledger"
    ctx = _context({"partition-id": 1, "num-partitions": 3,
                    "ledger-dir": str(ledger_dir)})
    # Execute
    reply = make_client_app(flat)(ask, ctx)
    # Assert: scalars only; the adapter stays beside the site's ledger; one charge
    assert not reply.has_error(), reply.error
    assert not reply.content.array_records and not reply.content.config_records
    metrics = reply.content[records.METRICS]
    assert set(metrics) == PERSONAL_METRICS
    assert 1.0 < metrics[records.PERSONAL_EPSILON] <= 1.5 + 1e-6
    assert metrics[records.EPSILON] == pytest.approx(metrics[records.PERSONAL_EPSILON])
    kept = ledger_dir / "personalised" / "run-1"
    assert (kept / "adapter_model.safetensors").is_file()
    assert (kept / "fedtune_config.yaml").is_file()
    entries = [e for f in ledger_dir.glob("*.json")
               for e in json.loads(f.read_text())["entries"]]
    assert len(entries) == 1 and entries[0]["round"] == 2


@pytest.mark.usefixtures("flower_identity")
def test_calibration_counts_are_noised_charged_once_and_refused_past_the_budget(
        tiny_bert: Path, review_files: tuple[Path, Path], tmp_path: Path) -> None:
    # Prepare: a site that trained round 1 of the recipe (head only, its class
    # histogram released), then the server's calibration message
    import json

    from fedtune.common import calibration

    cfg, flat, msg = _setup(tiny_bert, review_files,
                            train={"linear_probe_rounds": -1, "logit_adjustment": 1.0,
                                   "calibrate_decisions": True},
                            federation={"num_rounds": 1})
    ledger_dir = tmp_path / "ledger"
    ctx = _context({"partition-id": 1, "num-partitions": 3,
                    "ledger-dir": str(ledger_dir)})
    app = make_client_app(flat)
    trained = app(msg, ctx)
    assert not trained.has_error(), trained.error
    sent = trained.content.array_records[records.ARRAYS]
    assert sent and all(".head." in k for k in sent)  # a head-only round: the head
    query = Message(RecordDict({records.CONFIG: ConfigRecord(
        {records.QUERY: records.CLASS_COUNTS})}), dst_node_id=7, message_type="query")
    counts = app(query, ctx).content[records.METRICS][records.CLASS_COUNTS]
    assert len(counts) == 3  # the histogram already released: noisy floats
    biases = calibration.candidate_biases([0.5, 0.3, 0.2], calibration.STRENGTHS)
    ask = Message(RecordDict({
        records.ARRAYS: trained.content.array_records[records.ARRAYS],
        records.CONFIG: ConfigRecord({records.CALIBRATE: 1, records.SERVER_ROUND: 1,
                                      records.DECISION_BIASES:
                                      [float(v) for v in biases.ravel()]})}),
        dst_node_id=7, message_type="evaluate")
    # Execute: the message, and the same message delivered again
    first = app(ask, ctx)
    again = app(ask, ctx)
    # Assert: 11 x 3 noisy counts, the run's epsilon within the target with this
    # release, one ledger entry for it however often the message arrives
    assert not first.has_error(), first.error
    m = first.content[records.METRICS]
    assert set(m) == {records.NUM_EXAMPLES, records.CALIBRATION_COUNTS,
                      records.EPSILON, records.EPSILON_TOTAL, records.DELTA,
                      records.PARTITION}
    flat_counts = m[records.CALIBRATION_COUNTS]
    assert len(flat_counts) == 11 * 3 and m[records.NUM_EXAMPLES] == 4
    assert any(v != round(v) for v in flat_counts)  # noised, not exact
    assert m[records.EPSILON] <= cfg.privacy.target_epsilon + 1e-6
    entries = [e for f in ledger_dir.glob("*.json")
               for e in json.loads(f.read_text())["entries"]]
    assert [e["message"].rsplit("/", 1)[-1] for e in entries].count("calibration") == 1
    assert [e["kind"] for e in entries] == ["histogram", "round", "calibration"]
    assert not again.has_error()
    # the reply's epsilons are the ledger's: this run's releases, and the total
    (ledger_file,) = ledger_dir.glob("*.json")
    spent = PrivacyLedger(ledger_dir, ledger_file.stem).spent(cfg.privacy.target_delta)
    assert m[records.EPSILON] == pytest.approx(spent)
    assert m[records.EPSILON_TOTAL] == pytest.approx(spent)
    # ... and a site whose budget cannot afford the release declines it
    poor = _context({"partition-id": 1, "num-partitions": 3,
                     "ledger-dir": str(tmp_path / "poor"), "budget-epsilon": 0.5})
    with pytest.raises(SiteFailure, match="PrivacyBudgetExhausted"):
        app(ask, poor)
    assert not list((tmp_path / "poor").glob("*.json"))  # nothing charged
