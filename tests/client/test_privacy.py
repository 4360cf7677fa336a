from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedtune.client import dpsgd, privacy, recipe
from fedtune.client.ledger import Budget, PrivacyLedger
from fedtune.client.releases import Book
from fedtune.common import accounting, config, data, loops, records
from fedtune.common import model as M
from fedtune.common.config import LoraConfig, ModelConfig, PrivacyConfig
from fedtune.common.errors import PrivacyBudgetExhausted, PrivacyError
from tests.conftest import tiny_config


def _batch(tiny_bert: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["good great drug", "bad awful pain nausea", "okay", "love it relief"]
    items = [{"input_ids": torch.tensor(tok(t)["input_ids"]),
              "labels": torch.tensor(i % 3)} for i, t in enumerate(texts)]
    return data.collate(items, pad_id=tok.pad_token_id)


def _flat_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def _one_sample_grads(model: torch.nn.Module, params: list[torch.nn.Parameter],
                      batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each record's gradient, by a one-sample-at-a-time loop (the reference)."""
    out = []
    for i in range(len(batch["labels"])):
        model.zero_grad()
        one = {k: v[i:i + 1] for k, v in batch.items()}
        loops.per_sample_loss(model, one, task="classification").sum().backward()
        out.append(_flat_grads(params).clone())
    model.zero_grad()
    return out


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_clipping_matches_manual_computation(tiny_bert: Path,
                                                        mode: str) -> None:
    # Prepare: per-sample gradients by a one-sample-at-a-time loop
    torch.manual_seed(0)
    model = M.build_model(ModelConfig(name_or_path=str(tiny_bert)), LoraConfig(r=4),
                          num_labels=3)
    with torch.no_grad():  # non-zero LoRA B so that A gets gradients too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch(tiny_bert)
    bsz, clip = len(batch["labels"]), 0.05
    manual = _one_sample_grads(model, params, batch)
    norms = torch.stack([g.norm() for g in manual])
    assert (norms > clip).all()  # every sample really gets clipped
    expected = sum(g * min(1.0, clip / float(g.norm())) for g in manual) / bsz
    # Execute: Opacus with zero noise
    opt = torch.optim.SGD(params, lr=0.0)
    gsm, dp_opt = dpsgd.make_private(
        model, opt, cfg=PrivacyConfig(max_grad_norm=clip, grad_sample_mode=mode),
        noise_multiplier=0.0, expected_batch_size=bsz)
    loops.per_sample_loss(gsm, batch, task="classification").mean().backward()
    per_sample = torch.cat([p.grad_sample.reshape(bsz, -1) for p in params], dim=1)
    dp_opt.pre_step()
    got = _flat_grads(params)
    gsm._close()
    # Assert: Opacus' per-sample grads equal the loop's, and the update is the mean
    # of the clipped per-sample gradients (so each sample moves it by <= clip / B)
    for i in range(bsz):
        rel = (per_sample[i] - manual[i]).norm() / manual[i].norm()
        assert rel < 1e-4
    assert torch.allclose(got, expected, atol=1e-7, rtol=1e-4)
    assert float(got.norm()) <= clip + 1e-6


def test_noise_is_added_with_the_configured_scale(tiny_bert: Path) -> None:
    model = M.build_model(ModelConfig(name_or_path=str(tiny_bert)), LoraConfig(r=4),
                          num_labels=3)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    gsm, dp_opt = dpsgd.make_private(
        model, torch.optim.SGD(params, lr=0.0), cfg=PrivacyConfig(max_grad_norm=1.0),
        noise_multiplier=2.0, expected_batch_size=1,
        generator=torch.Generator().manual_seed(0))
    for p in params:  # an empty Poisson batch: the update is pure noise
        p.grad_sample = torch.zeros((0, *p.shape))
    dp_opt.pre_step()
    noise = _flat_grads(params)
    gsm._close()
    assert abs(float(noise.std()) - 2.0) < 0.1  # sigma * C / expected batch size


def test_epsilon_grows_with_rounds_and_matches_opacus() -> None:
    # Prepare
    sigma, q, steps, rounds, delta = 1.1, 0.05, 20, 5, 1e-5
    state = privacy.PrivacyState(noise_multiplier=sigma)
    reference = RDPAccountant()
    cfg = PrivacyConfig(target_delta=delta)
    eps = []
    for _ in range(rounds):
        # Execute: one round charged, vs Opacus stepping the same steps in-process
        state.charge(q=q, steps=steps)
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=q)
        eps.append(state.epsilon(cfg))
        # Assert
        assert eps[-1] == pytest.approx(reference.get_epsilon(delta), rel=1e-9)
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))
    back = privacy.PrivacyState.from_config(state.to_config())
    assert back == state


def test_calibrated_noise_spends_the_target_over_the_planned_rounds() -> None:
    cfg = PrivacyConfig(target_epsilon=3.0, target_delta=1e-5)
    q = accounting.sample_rate(batch_size=16, num_examples=400)
    per_round = accounting.steps_per_round(q=q, epochs=2, max_steps=0)
    assert per_round == 50
    sigma = accounting.plan_schedule(cfg, q=q, round_steps=per_round,
                                     num_rounds=4).tune_sigma
    spent = accounting.epsilon_spent([(sigma, q, per_round * 4)], delta=1e-5)
    assert 2.9 < spent <= 3.0
    assert accounting.plan_schedule(PrivacyConfig(noise_multiplier=0.7), q=q,
                                    round_steps=1, num_rounds=1).tune_sigma == 0.7


def test_privacy_errors() -> None:
    assert accounting.epsilon_spent([], delta=1e-5) == 0.0
    with pytest.raises(PrivacyError, match="invalid noise multiplier"):
        dpsgd.make_private(torch.nn.Linear(2, 2), torch.optim.SGD(
            torch.nn.Linear(2, 2).parameters(), lr=0.1), cfg=PrivacyConfig(),
            noise_multiplier=float("nan"), expected_batch_size=1)
    with pytest.raises(PrivacyError, match="cannot reach epsilon"):
        accounting.calibrate_noise(target_epsilon=1e-6, target_delta=1e-5,
                                sample_rate=1.0, steps=10_000)


def test_record_weights_apply_after_clipping(tiny_bert: Path) -> None:
    # Prepare: per-sample gradients by a one-sample loop, as above
    torch.manual_seed(0)
    model = M.build_model(ModelConfig(name_or_path=str(tiny_bert)), LoraConfig(r=4),
                          num_labels=3)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _batch(tiny_bert)
    bsz, clip = len(batch["labels"]), 0.05
    weights = torch.tensor([1.0, 0.25, 0.5, 0.0])
    manual = _one_sample_grads(model, params, batch)
    # w_i * clip(g_i): a weight scales the clipped gradient, so no record moves the
    # sum by more than the clipping bound (weighting the loss would be clipped away)
    expected = sum(w * g * min(1.0, clip / float(g.norm()))
                   for w, g in zip(weights, manual, strict=True)) / bsz
    opt = torch.optim.SGD(params, lr=0.0)
    gsm, dp_opt = dpsgd.make_private(
        model, opt, cfg=PrivacyConfig(max_grad_norm=clip), noise_multiplier=0.0,
        expected_batch_size=bsz)
    # Execute
    loops.per_sample_loss(gsm, batch, task="classification").mean().backward()
    dp_opt.sample_weights = weights
    dp_opt.pre_step()
    got = _flat_grads(params)
    dp_opt.zero_grad()
    loops.per_sample_loss(gsm, batch, task="classification").mean().backward()
    dp_opt.sample_weights = torch.tensor([1.0, 1.5, 0.0, 0.0])
    with pytest.raises(PrivacyError, match=r"record weights must lie in \[0, 1\]"):
        dp_opt.pre_step()
    gsm._close()
    # Assert
    assert torch.allclose(got, expected, atol=1e-7, rtol=1e-4)


def test_class_histogram_noise_has_the_configured_scale() -> None:
    labels = [0] * 700 + [1] * 300
    exact = recipe.noisy_class_counts(labels, num_classes=3, sigma=0.0)
    assert exact == [700.0, 300.0, 0.0]
    draws = torch.tensor([recipe.noisy_class_counts(
        labels, num_classes=3, sigma=5.0, generator=torch.Generator().manual_seed(s))
        for s in range(400)])
    assert draws.mean(0).tolist() == pytest.approx([700, 300, 0], abs=1.0)
    assert float(draws.std(0).mean()) == pytest.approx(5.0, rel=0.1)


def _round_cfg(tiny_bert: Path, review_files: tuple[Path, Path], **privacy_: object
               ) -> config.RunConfig:
    return config.from_dict(tiny_config(
        tiny_bert, *review_files, train={"logit_adjustment": 1.0, "batch_size": 8},
        privacy={"target_epsilon": 4.0, **privacy_}))


def test_open_round_releases_the_histogram_once_and_charges_the_ledger(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    # Prepare
    cfg = _round_cfg(tiny_bert, review_files)
    labels = [0, 1, 2, 2] * 25
    book = Book(PrivacyLedger(tmp_path, "d" * 64, records=100), Budget(8.0))
    # Execute: round 1 releases the histogram, round 2 reuses it
    first = privacy.open_round(cfg, num_examples=100, labels=lambda: labels,
                               round_=1, saved=None, prior=None, book=book,
                               run="r", message="m1")
    metrics = first.charge(steps=5)
    second = privacy.open_round(cfg, num_examples=100, labels=lambda: labels,
                                round_=2, saved=first.state.to_config(),
                                prior=first.prior, book=book, run="r",
                                message="m2")
    # Assert
    entries = book.ledger.read()["entries"]
    assert [e["message"] for e in entries] == ["m1/histogram", "m1"]
    assert first.prior is not None and len(first.prior) == 3
    assert second.prior == first.prior  # released once per run, then reused
    assert first.terms.logit_bias is not None
    assert first.sample_rate == pytest.approx(8 / 100)
    assert metrics[records.EPSILON] == pytest.approx(first.state.epsilon(cfg.privacy))
    assert metrics[records.EPSILON_TOTAL] == pytest.approx(book.ledger.spent(1e-5))
    assert second.noise_multiplier == first.noise_multiplier > 0


def test_open_round_refuses_before_training_what_the_budget_cannot_pay(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    cfg = _round_cfg(tiny_bert, review_files)
    book = Book(PrivacyLedger(tmp_path, "d" * 64), Budget(0.5))
    with pytest.raises(PrivacyBudgetExhausted):
        privacy.open_round(cfg, num_examples=100, labels=lambda: [0, 1] * 50,
                           round_=1, saved=None, prior=None,
                           book=book)
    assert book.ledger.read()["entries"] == []  # nothing charged
    off = _round_cfg(tiny_bert, review_files, enabled=False)
    with pytest.raises(PrivacyBudgetExhausted, match="DP is off"):
        privacy.open_round(off, num_examples=100, labels=lambda: [0, 1] * 50,
                           round_=1, saved=None, prior=None,
                           book=book)
    unlimited = Book(PrivacyLedger(tmp_path / "u", "d" * 64), Budget())
    plain = privacy.open_round(off, num_examples=100, labels=lambda: [0, 1] * 50,
                               round_=1, saved=None, prior=None, book=unlimited)
    assert plain.charge(steps=3) == {}  # not private: no epsilon
