from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from fedtune.common import config
from fedtune.common.errors import ConfigError

SHIPPED = sorted(Path(str(resources.files("fedtune.simulations"))).glob("*.yaml"))


def test_defaults_are_valid_and_hashable() -> None:
    cfg = config.RunConfig()
    assert hash(cfg) == hash(config.RunConfig())
    assert cfg.privacy.enabled and cfg.model.task == "classification"


def test_run_config_round_trip_is_exact() -> None:
    # Prepare
    cfg = config.from_dict({"lora": {"target_modules": ["q", "v"]},
                            "data": {"labels": ["a", "b"]},
                            "train": {"learning_rate": 1e-4}})
    # Execute
    flat = config.to_run_config(cfg)
    # Assert
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert flat["lora.target-modules"] == '["q", "v"]'
    assert flat["train.learning-rate"] == 1e-4
    assert config.from_run_config({**flat, "flower.own-key": 1}) == cfg


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = config.from_dict({"federation": {"num_rounds": 7}})
    path = tmp_path / "run.yaml"
    path.write_text(config.dump_yaml(cfg))
    assert config.load(path) == cfg


def test_overrides_accept_kebab_and_yaml_values(tmp_path: Path) -> None:
    cfg = config.load(None, ["train.batch-size=32", "data.labels=[x, y]",
                             "privacy.enabled=false"])
    assert cfg.train.batch_size == 32
    assert cfg.data.labels == ("x", "y")
    assert cfg.privacy.enabled is False


def test_all_problems_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        config.from_dict({
            "nope": {}, "lora": {"r": 0, "bogus": 1},
            "train": {"batch_size": "big"}, "privacy": {"target_delta": 2.0},
        })
    text = str(info.value)
    assert len(info.value.problems) == 5
    for part in ("nope: unknown section", "lora.bogus: unknown key",
                 "lora.r: must be > 0", "train.batch_size: expected an integer",
                 "privacy.target_delta: must be in (0, 1)"):
        assert part in text


@pytest.mark.parametrize(("raw", "match"), [
    ({"model": {"task": "regression"}}, r"model.task: expected one of 'classif"),
    ({"model": {"name_or_path": " "}}, r"model.name_or_path: must name"),
    ({"model": {"dtype": "int8"}}, r"model.dtype: expected one of"),
    ({"lora": {"alpha": -1}}, r"lora.alpha: must be > 0"),
    ({"lora": {"dropout": 1.0}}, r"lora.dropout: must be in \[0, 1\)"),
    ({"lora": {"target_modules": "q"}}, r"lora.target_modules: expected a list"),
    ({"privacy": {"target_epsilon": 0}}, r"privacy.target_epsilon: must be > 0"),
    ({"privacy": {"max_grad_norm": 0}}, r"privacy.max_grad_norm: must be > 0"),
    ({"privacy": {"noise_multiplier": -1}}, r"privacy.noise_multiplier: must be >= 0"),
    ({"privacy": {"enabled": "yes"}}, r"privacy.enabled: expected true or false"),
    ({"privacy": {"accountant": "gdp"}}, r"privacy.accountant: expected one of"),
    ({"privacy": {"grad_sample_mode": "ghost"}}, r"privacy.grad_sample_mode"),
    # Opacus's expanded weights cannot run Hugging Face models (bench/dp_overhead.py)
    ({"privacy": {"grad_sample_mode": "ew"}}, r"privacy.grad_sample_mode"),
    ({"train": {"local_epochs": 0}}, r"train.local_epochs: must be > 0"),
    ({"train": {"max_steps": -1}}, r"train.max_steps: must be >= 0"),
    ({"train": {"warmup_ratio": 1.0}}, r"train.warmup_ratio: must be in \[0, 1\)"),
    ({"train": {"precision": "fp8"}}, r"train.precision: expected one of"),
    ({"train": {"optimizer": "lion"}}, r"train.optimizer: expected one of"),
    ({"train": {"momentum": 1.0}}, r"train.momentum: must be in \[0, 1\)"),
    ({"train": {"learning_rate": True}}, r"train.learning_rate: expected a number"),
    ({"data": {"max_length": -1}}, r"data.max_length: must be >= 0"),
    ({"data": {"val_fraction": 0.5}}, r"data.val_fraction: must be in \[0, 0.5\)"),
    ({"data": {"labels": ["a", "a"]}}, r"data.labels: must be distinct"),
    ({"data": {"partition": "column", "partition_column": ""}},
     r"data.partition_column: required"),
    ({"data": {"partition": "random"}}, r"data.partition: expected one of"),
    ({"data": {"dirichlet_alpha": 0}}, r"data.dirichlet_alpha: must be > 0"),
    ({"federation": {"num_sites": 0}}, r"federation.num_sites: must be > 0"),
    ({"federation": {"fraction_train": 1.5}}, r"federation.fraction_train: must be in"),
    ({"federation": {"num_sites": 2, "min_train_nodes": 3}},
     r"federation.min_train_nodes: 3 exceeds num_sites 2"),
    ({"federation": {"client_gpus": -1}}, r"federation.client_gpus: must be >= 0"),
    ({"federation": {"strategy": "fedsgd"}}, r"federation.strategy: expected one of"),
    ({"lora": {"site_ranks": [2, 16], "r": 8}},
     r"lora.site_ranks: each must be in \[1, r=8\].*got \[16\]"),
    ({"lora": {"ffa": True, "site_ranks": [2]}}, r"lora.ffa and site_ranks cannot"),
    ({"federation": {"compression": "int4"}}, r"federation.compression: expected"),
    ({"federation": {"trim_fraction": 0.5}}, r"federation.trim_fraction: must be in"),
    ({"federation": {"server_beta_2": 1.0}}, r"federation.server_beta_2: must be in"),
    ({"federation": {"server_learning_rate": 0}},
     r"federation.server_learning_rate: must be > 0"),
    ({"federation": {"proximal_mu": -1}}, r"federation.proximal_mu: must be >= 0"),
    ({"federation": {"min_replies": 3, "min_train_nodes": 2}},
     r"federation.min_replies: 3 exceeds the 2 sites a round trains"),
    ({"federation": {"round_retries": -1}}, r"federation.round_retries: must be >= 0"),
    ({"federation": {"secure_aggregation": True, "compression": "int8"}},
     r"federation.secure_aggregation: needs strategy fedavg and compression none"),
    ({"federation": {"strategy": "median"}, "privacy": {"central_dp": True}},
     r"privacy.central_dp: needs federation.strategy fedavg"),
    ({"federation": {"secure_aggregation": True}, "lora": {"site_ranks": [2]}},
     r"lora.site_ranks: cannot be combined with federation.secure_aggregation"),
    ({"federation": {"secure_aggregation": True}, "privacy": {"central_dp": True}},
     r"privacy.central_dp: cannot be combined with federation.secure_aggregation"),
    ({"privacy": {"noise": "distributed"}},
     r"privacy.noise: distributed needs federation.secure_aggregation: true"),
    ({"privacy": {"noise": "pooled"}},
     r"privacy.noise: expected one of .local., .distributed."),
    ({"privacy": {"noise": "distributed", "max_dropped_or_colluding": 8},
      "federation": {"secure_aggregation": True}},
     r"privacy.max_dropped_or_colluding: 8 must be below the 8 sites"),
    ({"privacy": {"noise": "distributed", "max_dropped_or_colluding": 2},
      "federation": {"secure_aggregation": True, "secagg_threshold": 4}},
     r"federation.secagg_threshold: 4 does not fit privacy.max_dropped_or_colluding"
     r" 2 at 8 sites: it must be at least n - t = 6"),
    ({"privacy": {"noise": "distributed", "max_dropped_or_colluding": 4},
      "federation": {"secure_aggregation": True, "secagg_threshold": 4}},
     r"no threshold fits: t must be below n/2 \(3 at most\)"),
    ({"privacy": {"noise": "distributed"},
      "federation": {"secure_aggregation": True, "secagg_threshold": 7,
                     "secagg_clipping_range": 1000.0}},
     r"federation.secagg_clipping_range: distributed noise needs a power of two "
     r".*got 1000; e.g. 1024"),
    ({"privacy": {"noise": "distributed", "noise_multiplier": 1.0},
      "federation": {"secure_aggregation": True, "secagg_threshold": 7}},
     r"privacy.noise_multiplier: distributed noise calibrates its own"),
    ({"model": {"head_init": "ones"}}, r"model.head_init: expected one of"),
    ({"privacy": {"linear_probe_budget": 1.0}},
     r"privacy.linear_probe_budget: must be in \[0, 1\)"),
    ({"privacy": {"count_noise_multiplier": 0}},
     r"privacy.count_noise_multiplier: must be > 0"),
    ({"train": {"linear_probe_rounds": -2}},
     r"train.linear_probe_rounds: must be >= -1 \(-1: every round, 0: none\)"),
    ({"data": {"val_fraction": 0.0}},
     r"train.calibrate_decisions: needs data.val_fraction > 0 .* set "
     r"data.val_fraction \(e.g. 0.1\) or train.calibrate_decisions: false"),
    ({"train": {"logit_adjustment": -0.5}}, r"train.logit_adjustment: must be >= 0"),
    ({"train": {"class_weighting": "inverse"}}, r"train.class_weighting: expected one"),
    ({"federation": {"weighting": "records"}}, r"federation.weighting: expected one"),
    ({"federation": {"server_momentum": 1.0}}, r"federation.server_momentum: must be"),
    ({"privacy": {"linear_probe_budget": 0.3}},
     r"privacy.linear_probe_budget: needs train.linear_probe_rounds between 1"),
    ({"privacy": {"linear_probe_budget": 0.3}, "train": {"linear_probe_rounds": 5},
      "federation": {"num_rounds": 5}},
     r"privacy.linear_probe_budget: needs train.linear_probe_rounds between 1"),
    ({"privacy": {"linear_probe_budget": 0.3, "noise_multiplier": 1.0},
      "train": {"linear_probe_rounds": 1}},
     r"privacy.linear_probe_budget: cannot be combined with a fixed "
     r"privacy.noise_multiplier"),
    ({"model": {"task": "causal-lm"}, "train": {"logit_adjustment": 0.5}},
     r"train.logit_adjustment: needs model.task classification"),
    ({"model": {"task": "causal-lm"}, "train": {"linear_probe_rounds": 1}},
     r"train.linear_probe_rounds: needs model.task classification"),
    ({"model": {"task": "causal-lm"}, "train": {"logit_adjustment": 0.5}},
     r"train.logit_adjustment: needs model.task classification"),
    ({"model": {"task": "causal-lm"}, "train": {"class_weighting": "sqrt"}},
     r"train.class_weighting: needs model.task classification"),
    ({"federation": {"strategy": "median", "weighting": "uniform"}},
     r"federation.weighting: 'uniform' applies to the FedAvg family only; "
     r"federation.strategy 'median'"),
    ({"federation": {"weighting": "sqrt"}, "privacy": {"central_dp": True}},
     r"federation.weighting: 'sqrt' applies to the FedAvg family only"),
    ({"federation": {"early_stopping_patience": -1}},
     r"federation.early_stopping_patience: must be >= 0"),
    ({"federation": {"min_delta": -0.1}}, r"federation.min_delta: must be >= 0"),
    ({"federation": {"selection_metric": "f1"}}, r"federation.selection_metric"),
    ({"model": {"task": "causal-lm"}, "federation": {"selection_metric": "macro-f1"}},
     r"federation.selection_metric: 'macro-f1' is not measured for model.task "
     r"'causal-lm'; use loss, or perplexity"),
    ({"federation": {"selection_metric": "perplexity"}},
     r"federation.selection_metric: 'perplexity' is not measured for model.task "
     r"'classification'; use loss, or macro-f1 / accuracy"),
    ({"data": {"source": "x.jsonl"}, "federation": {"early_stopping_patience": 2}},
     r"federation.early_stopping_patience: needs the central evaluation set "
     r"data.test_source"),
    ({"data": {"retention_source": "general.jsonl"}},
     r"data.retention_source: needs model.task causal-lm"),
    ({"train": {"personalize_epochs": 2}, "data": {"val_fraction": 0.0}},
     r"train.personalize_epochs: needs data.val_fraction > 0"),
    ({"privacy": {"personalize_epsilon": 0}},
     r"privacy.personalize_epsilon: must be > 0"),
    ({"train": []}, r"train: expected a mapping"),
    ([1, 2], r"top level: expected a mapping"),
])
def test_each_validation_branch(raw: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config.from_dict(raw)  # type: ignore[arg-type]


def test_selection_metric_auto_follows_the_task() -> None:
    assert config.from_dict({}).selection_metric == "macro-f1"
    causal = config.from_dict({"model": {"task": "causal-lm"}})
    assert causal.selection_metric == "loss"
    chosen = config.from_dict({"federation": {"selection_metric": "accuracy"}})
    assert chosen.selection_metric == "accuracy"


def test_int_accepted_where_float_expected() -> None:
    assert config.from_dict({"train": {"learning_rate": 1}}).train.learning_rate == 1.0


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        config.load(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load(scalar)


def test_bad_overrides_are_reported() -> None:
    with pytest.raises(ConfigError, match=r"expected section.key=value"):
        config.parse_overrides(["batch_size=3"])
    with pytest.raises(ConfigError, match=r"value is not valid YAML"):
        config.parse_overrides(["train.batch_size=[1"])


def test_bad_list_in_run_config() -> None:
    with pytest.raises(ConfigError, match="data.labels: expected a JSON list"):
        config.from_run_config({"data.labels": "[not json"})


def test_every_shipped_yaml_loads() -> None:
    assert {p.name for p in SHIPPED} >= {"default.yaml", "iid-nodp.yaml",
                                          "causal-lm.yaml"}
    for path in SHIPPED:
        text = path.read_text()
        assert text.startswith("#") and "fedtune simulate" in text.splitlines()[1]
        cfg = config.load(path)
        assert config.from_run_config(config.to_run_config(cfg)) == cfg
        assert yaml.safe_load(text)  # plain YAML, no custom tags


def test_default_yaml_is_the_main_job() -> None:
    cfg = config.load(next(p for p in SHIPPED if p.name == "default.yaml"))
    assert cfg.privacy.enabled and cfg.privacy.target_epsilon == 8.0
    assert cfg.federation.num_sites >= 8 and cfg.data.max_samples_per_site >= 1000
    assert cfg.data.source == "fedtune:icd10-chapters"
    assert len(cfg.data.labels) == 21 and cfg.data.partition == "dirichlet"
    assert cfg.model.name_or_path == "fedtune:all-MiniLM-L6-v2"
    assert cfg.probe_rounds == cfg.federation.num_rounds  # the built-in recipe
    assert cfg.logit_adjustment > 0 and cfg.calibrates
    small = config.load(next(p for p in SHIPPED if p.name == "drug-reviews.yaml"))
    assert small.data.partition_column == "condition"  # the small-sites case


def test_pyproject_flower_config_equals_typed_defaults() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    flower = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["flwr"]
    assert flower["app"]["config"] == config.to_run_config(config.RunConfig())
    assert flower["app"]["components"] == {
        "serverapp": "fedtune.server.runtime.app:app",
        "clientapp": "fedtune.client.node.forwarder:app"}


def test_exponent_without_dot_is_a_number() -> None:
    # YAML 1.1 (PyYAML) reads "1e-4" as a string; users write it anyway
    cfg = config.load(None, ["train.learning-rate=1e-4", "privacy.target-delta=1E-5"])
    assert cfg.train.learning_rate == 1e-4 and cfg.privacy.target_delta == 1e-5
    with pytest.raises(ConfigError, match="expected a number, got 'fast'"):
        config.load(None, ["train.learning-rate=fast"])


def test_a_causal_lm_accepts_the_recipe_keys_switched_off() -> None:
    # a shared base config may name the classification recipe's keys at their
    # "off" values (or defaults); only a value that would act on a head is refused
    cfg = config.from_dict({"model": {"task": "causal-lm", "head_init": "random"},
                            "data": {"val_fraction": 0.0},
                            "train": {"linear_probe_rounds": 0,
                                      "logit_adjustment": 0.0,
                                      "calibrate_decisions": False,
                                      "class_weighting": "none"}})
    assert not cfg.calibrates and cfg.probe_rounds == 0


def test_a_saved_causal_lm_config_with_earlier_head_defaults_still_loads() -> None:
    # a run directory's config.yaml records every key; the head rounds' own
    # settings are inert for a causal LM, so an earlier default of theirs loads
    cfg = config.from_dict({"model": {"task": "causal-lm"}, "train": {
        "linear_probe_learning_rate": 0.1, "linear_probe_epochs": 10,
        "linear_probe_optimizer": "adamw"}})
    assert cfg.probe_rounds == 0


@pytest.mark.parametrize(("section", "new"), [("train", "epoch_patience"),
                                              ("federation", "round_patience")])
def test_a_renamed_key_still_reads_for_one_release_with_a_warning(
        section: str, new: str, caplog: pytest.LogCaptureFixture) -> None:
    extra = {"data": {"test_source": "fedtune:icd10-chapters-test"}} \
        if section == "federation" else {}
    with caplog.at_level("WARNING", logger="fedtune.common.config"):
        cfg = config.from_dict({section: {"early_stopping_patience": 3}, **extra})
    assert getattr(getattr(cfg, section), new) == 3
    assert f"{section}.early_stopping_patience is deprecated" in caplog.text
    assert f"write {section}.{new}" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedtune.common.config"):
        both = config.from_dict({section: {new: 2, "early_stopping_patience": 3},
                                 **extra})  # an old key written over a new config
    assert getattr(getattr(both, section), new) == 3
    assert "both set: the old key, the one a person wrote, is used" in caplog.text
    with pytest.raises(config.ConfigError, match=rf"{section}.early_stopping_patience: "
                       rf"must be >= 0.*\(renamed {section}.{new}\)"):
        config.from_dict({section: {"early_stopping_patience": -1}})
    flat = config.to_run_config(cfg)
    assert f"{section}.{new.replace('_', '-')}" in flat
    assert not any("early-stopping" in k for k in flat)
