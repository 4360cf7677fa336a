"""The privacy-utility planner: noise against signal, verdicts, and advice."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedtune.common import config, plan_text, planning, sites
from fedtune.common.errors import DataError
from tests.conftest import tiny_config


def test_round_noise_ratio_formula() -> None:
    # sigma 2, 10 000 dims (sqrt 100), batch 50, 4 steps: 2 * 100 / 50 / 2 = 2
    assert planning.noise_to_clip(sigma=2.0, dims=10_000, batch=50) == 4.0
    assert planning.round_noise_ratio(sigma=2.0, dims=10_000, batch=50,
                                      steps=4) == 2.0
    assert [planning.verdict(r) for r in (0.1, 0.5, 1.0, 2.0, 5.0)] == [
        "expected to learn", "expected to learn", "marginal", "marginal",
        "will learn nothing"]


def test_small_sites_learn_nothing_and_get_advice() -> None:
    # Prepare: the drug-review shape - 63 records, an 80 k-dim adapter from round 1
    # (no head-only rounds), eps 8
    cfg = config.from_dict({"train": {"batch_size": 64, "local_epochs": 2,
                                      "linear_probe_rounds": 0}})
    # Execute
    small = planning.plan_site(cfg, site="s", records=63, dims=80_000)
    large = planning.plan_site(cfg, site="l", records=5_000, dims=8_000)
    # Assert
    assert small.verdict == "will learn nothing" and small.rho > planning.MARGINAL
    assert small.rho == pytest.approx(planning.round_noise_ratio(
        sigma=small.sigma, dims=80_000, batch=63, steps=small.steps))
    need = math.ceil(63 * small.rho / planning.LEARNS)
    assert f"need >= {need} records" in small.advice
    assert "epsilon >=" in small.advice and "trainable parameters" in small.advice
    assert "in the LoRA rounds (now 80000; lora.r" in small.advice
    assert large.verdict == "expected to learn" and large.advice == ""


def test_head_only_rounds_plan_their_own_dimensions() -> None:
    cfg = config.from_dict({"train": {"batch_size": 512, "linear_probe_rounds": 1},
                            "privacy": {"linear_probe_budget": 0.5},
                            "lora": {"top_layers": 2},  # a row of the map
                            "federation": {"num_rounds": 3}})
    plan = planning.plan_site(cfg, site="s", records=2_000, dims=80_000,
                              probe_dims=8_000)
    ratios = [planning.round_noise_ratio(sigma=s, dims=d, batch=512, steps=t)
              for s, d, t in ((plan.probe_sigma, 8_000, plan.probe_steps),
                              (plan.sigma, 80_000, plan.steps))]
    assert plan.rho == pytest.approx(max(ratios))
    text = plan_text.format_plan([plan], cfg)
    assert "8000/80000" in text and f"{plan.probe_sigma:.2f}/{plan.sigma:.2f}" in text
    assert text.splitlines()[-1] == f"overall: {plan.verdict}"
    # the plan says what recipe the run trains, and what overriding it costs
    recipe = [ln for ln in text.splitlines() if ln.startswith("recipe: ")]
    assert recipe[0].startswith("recipe: train.recipe: auto -> head")
    assert "overrides it: this run trains head+lora, predicted to cost" in recipe[1]


def test_dp_off_has_no_noise() -> None:
    cfg = config.from_dict({"privacy": {"enabled": False}})
    plan = planning.plan_site(cfg, site="s", records=100, dims=1_000)
    assert plan.verdict == "DP off" and plan.sigma == 0.0
    assert "DP is OFF" in plan_text.format_plan([plan], cfg)


def test_simulated_sites_match_the_sites_own_split(
        tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    from fedtune.client.site import site_data

    cfg = config.from_dict(tiny_config(tiny_bert, *review_files))
    sizes = sites.simulated_sites(cfg)
    assert sizes == [(f"partition {p}/3", len(site_data(cfg, {
        "partition-id": p, "num-partitions": 3}).train)) for p in range(3)]
    dims, probe = planning.model_dims(cfg)
    assert dims > 0 and probe == 0


def test_many_sites_are_partitioned_once(tmp_path: Path, tiny_bert: Path,
                                         review_files: tuple[Path, Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.client import site
    src = tmp_path / "many.jsonl"
    rows = review_files[0].read_text().splitlines()
    src.write_text("\n".join(rows * (20_000 // len(rows) + 1)) + "\n")
    calls: list[int] = []
    real = sites.partition

    def counted(*args: object, **kwargs: object) -> list[list[int]]:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sites, "partition", counted)
    cfg = config.from_dict(tiny_config(tiny_bert, src, review_files[1], federation={
        "num_sites": 10_000, "min_train_nodes": 100}))
    sizes = sites.simulated_sites(cfg)
    assert len(sizes) == 10_000 and len(calls) == 1  # not once per site
    # a simulated site's process (a Ray actor serving a new site each round) reads
    # and partitions the file once, then slices it for every site it serves
    site._source.cache_clear()
    got = [site.site_data(cfg, {"partition-id": p, "num-partitions": 10_000})
           for p in (0, 4_321, 9_999)]
    assert len(calls) == 2 and site._source.cache_info().misses == 1
    assert [(g.name, len(g.train)) for g in got] == [sizes[p] for p in
                                                      (0, 4_321, 9_999)]


def test_missing_data_file_is_the_same_named_error(tiny_bert: Path,
                                                   tmp_path: Path) -> None:
    cfg = config.from_dict(tiny_config(tiny_bert, tmp_path / "nope.jsonl",
                                       tmp_path / "test.jsonl"))
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        sites.simulated_sites(cfg)


@pytest.mark.parametrize("sections", [
    {"train": {"batch_size": 8, "linear_probe_rounds": 0}},  # one phase
    {"train": {"batch_size": 8, "linear_probe_rounds": 1},  # two phases, one level
     "federation": {"num_rounds": 3}},
], ids=["one-phase", "two-phases"])
def test_advised_epsilon_is_where_the_site_starts_to_learn(sections: dict) -> None:
    # Prepare: 40 records and a 1 123-dim adapter at eps 8 is marginal
    cfg = config.from_dict(sections)
    site = planning.plan_site(cfg, site="s", records=40, dims=1123, probe_dims=99)
    assert site.verdict != "expected to learn"
    advised = float(site.advice.split("epsilon >= ")[1].split(",")[0])

    # Execute: plan again at the advised epsilon, and a little below it
    def rho_at(eps: float) -> float:
        at = config.from_dict({**sections, "privacy": {
            **sections.get("privacy", {}), "target_epsilon": eps}})
        return planning.plan_site(at, site="s", records=40, dims=1123,
                                  probe_dims=99).rho

    # Assert: learns at the advice (to its 3 digits, and Opacus' 0.01 search
    # tolerance), not at 10 % less
    assert rho_at(advised * 1.01) <= planning.LEARNS
    assert rho_at(advised * 0.9) > planning.LEARNS


def test_one_tiny_site_is_named_but_the_federation_learns() -> None:
    # Prepare: the default recipe (every round head only); nine sites of 2,000
    # records and one of 11, weighted by records
    cfg = config.from_dict({"federation": {"num_sites": 10}})
    sites = [(f"site {i}", 2_000) for i in range(9)] + [("tiny", 11)]
    # Execute
    plans = planning.plan_sites(cfg, sites, dims=(80_000, 770))
    text = plan_text.format_plan(plans, cfg)
    # Assert: the tiny site alone learns nothing, holds ~0.06 % of the aggregate,
    # and the federation's verdict follows the aggregate
    tiny = plans[-1]
    assert tiny.verdict == "will learn nothing" and tiny.share < 0.001
    assert "on their own, 1 of 10 sites will learn nothing (tiny: 11 records" in text
    assert planning.aggregate_rho(plans, cfg) < planning.LEARNS
    assert text.splitlines()[-1] == "overall: expected to learn"
    # ... and the same ten sites averaged uniformly give the tiny one a tenth
    uniform = config.from_dict({"federation": {"num_sites": 10,
                                               "weighting": "uniform"}})
    flat = planning.plan_sites(uniform, sites, dims=(80_000, 770))
    assert flat[-1].share == pytest.approx(0.1)
    assert planning.aggregate_rho(flat, uniform) > planning.aggregate_rho(plans, cfg)


def test_pooled_noise_divides_the_aggregates_noise_by_sqrt_n_minus_t() -> None:
    # Prepare: 8 sites of 1,350 records, the same full-batch steps with local
    # noise (each site its own sigma) and with distributed noise (t = 1)
    pooled = {"privacy": {"noise": "distributed", "max_dropped_or_colluding": 1},
              "federation": {"secure_aggregation": True, "secagg_threshold": 7,
                             "num_rounds": 30}}
    cfg = config.from_dict(pooled)
    local = config.from_dict({"federation": {"num_rounds": 30},
                              "train": {"batch_size": 1350,
                                        "linear_probe_epochs": 1}})
    sites = [(f"s{i}", 1350) for i in range(8)]
    # Execute
    plans = planning.plan_sites(cfg, sites, dims=(80_000, 8085))
    text = plan_text.format_plan(plans, cfg)
    # Assert: one step a round at q = 1; the aggregate's rho is the local one
    # over sqrt(n - t); the plan states the threat model
    p = plans[0]
    assert (p.sample_rate, p.probe_steps) == (1.0, 1)
    assert p.rho == pytest.approx(p.probe_sigma * math.sqrt(8085) / 1350)
    same_steps = math.sqrt(sum((q.share * q.rho) ** 2 for q in plans))
    assert planning.aggregate_rho(plans, cfg) == pytest.approx(
        same_steps / math.sqrt(7))
    assert "2.65x less than the same steps with local noise" in text
    assert "up to t=1 sites that drop out or collude" in text
    assert "not promised: a server that deviates from the protocol" in text
    assert planning.aggregate_rho(planning.plan_sites(local, sites, dims=(
        80_000, 8085)), local) > planning.aggregate_rho(plans, cfg)
    # a grid without room for the shares' noise: refused, with the range needed
    pooled["federation"]["secagg_clipping_range"] = 8.0
    tight = config.from_dict(pooled)
    plans = planning.plan_sites(tight, sites, dims=(80_000, 8085))
    assert "at least 32" in (planning.grid_problem(plans, tight) or "")
    assert planning.overall(plans, tight).startswith("refused")


def test_a_head_only_plan_quotes_the_heads_dimensions() -> None:
    # Prepare: every round head only (the default) on a site too small to learn
    cfg = config.from_dict({})
    plan = planning.plan_site(cfg, site="s", records=11, dims=74_498,
                              probe_dims=770)
    text = plan_text.format_plan([plan], cfg)
    # Assert: the advice is about the 770 head dimensions the rounds train, and
    # names the key that would shrink them; the LoRA dimensions appear nowhere
    assert plan.verdict != "expected to learn"
    assert "in the head-only rounds (now 770; model.head_hidden 0)" in plan.advice
    assert "74498" not in text and " 770 " in text
    assert "records" in plan.advice and "privacy.target_epsilon >=" in plan.advice


def test_a_causal_lm_plan_uses_its_own_measured_thresholds() -> None:
    # Prepare: the causal-lm scenario's shape: 4 sites of 32 records, LoRA q/v
    cfg = config.from_dict({"model": {"task": "causal-lm"},
                            "data": {"labels": [], "label_column": ""},
                            "train": {"batch_size": 8, "recipe": "lora"},
                            "federation": {"num_sites": 4, "num_rounds": 2}})
    # 30 layers x (q 576x8 + 8x576, v 576x8 + 8x192): 460,800 LoRA dimensions
    plans = planning.plan_sites(cfg, [(f"p{i}", 32) for i in range(4)],
                                dims=(460_800, 0))
    assert 30 < plans[0].rho < 40  # the scenario measured 36.8
    # Assert: the scenario answers nothing right under DP (exact match 0), so its
    # plan says so; the instruct scenario's rho (0.27 per site), which answers
    # 0.8 of the non-private run's exact match, is "expected to learn"
    assert plans[0].verdict == "will learn nothing"
    assert planning.verdict(0.27, "causal-lm") == "expected to learn"
    text = plan_text.format_plan(plans, cfg)
    assert ("thresholds for causal-lm, measured on two scenarios judged by their "
            "answers") in text and "bench/results/sft_map.json" in text
    assert "trains LoRA r=8: 460,800 trainable dimensions" in text


def test_a_large_federations_plan_is_a_summary_by_verdict() -> None:
    # Prepare: 1,000 sites (of 7 sizes: the noise search runs once per size),
    # most large enough, 40 marginal, 10 hopeless
    cfg = config.from_dict({"federation": {"num_sites": 1000}})
    sites = ([(f"partition {i}/1000", 400 + 100 * (i % 5)) for i in range(950)]
             + [(f"partition {950 + i}/1000", 170) for i in range(40)]
             + [(f"partition {990 + i}/1000", 11) for i in range(10)])
    plans = planning.plan_sites(cfg, sites, dims=(80_000, 8085))
    # Execute
    text = plan_text.format_plan(plans, cfg)
    full = plan_text.format_plan(plans, cfg, full=True)
    # Assert: a screen, not 1,000 rows; each verdict once, with its count, its
    # worst and median site, and the worst's advice once
    lines = text.splitlines()
    assert len(lines) < 30
    assert "1,000 sites, grouped by verdict (every site's row: RUN_DIR/plan.json, " \
        "or `fedtune plan --all`)" in text
    counts = {v: sum(p.verdict == v for p in plans) for v in planning.VERDICTS}
    assert all(counts.values())
    for verdict, n in counts.items():
        assert sum(x.startswith(f"{verdict}: {n:,} sites,") for x in lines) == 1
    assert sum(x.lstrip().startswith("->") for x in lines) == 2  # not the learners
    worst = max(plans, key=lambda p: p.rho)
    assert worst.site in text
    assert "partition 500/1000" not in text
    # ... and --all keeps one row per site
    assert all(p.site in full for p in plans)
    assert len(full.splitlines()) > 1000
