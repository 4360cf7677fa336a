"""train.recipe: the phases a run trains, resolved from the measured map; keys set
to anything but their default win, and the plan says what that is predicted to
cost."""

from __future__ import annotations

import pytest

from fedtune.common import recipes
from fedtune.common.config import ConfigError, from_dict, from_run_config, to_run_config


def test_auto_follows_the_map() -> None:
    cfg = from_dict({})
    assert cfg.train.recipe == "auto" and set(recipes.best_in_map().values()) == {
        "head"}
    assert cfg.train.linear_probe_rounds == -1 and cfg.probe_rounds == 5
    (reason,) = recipes.overrides(cfg, 1350)
    assert reason.startswith("train.recipe: auto -> head") and recipes.SOURCE in reason


def test_head_then_lora_sets_what_is_left_at_its_default() -> None:
    cfg = from_dict({"train": {"recipe": "head+lora"}})
    assert (cfg.train.linear_probe_rounds, cfg.lora.top_layers,
            cfg.privacy.linear_probe_budget) == (3, 2, 0.5)  # 3 head + 2 LoRA of 5
    mine = from_dict({"train": {"recipe": "head+lora", "linear_probe_rounds": 4},
                      "lora": {"top_layers": 1}})
    assert (mine.train.linear_probe_rounds, mine.lora.top_layers) == (4, 1)
    # the flat run_config the sites read resolves to the same recipe
    for c in (cfg, mine):
        assert from_run_config(to_run_config(c)) == c


def test_an_override_is_named_with_its_predicted_cost() -> None:
    cfg = from_dict({"train": {"linear_probe_rounds": 2}})
    reason, override = recipes.overrides(cfg, 1400)
    assert reason.startswith("train.recipe: auto -> head")
    assert override.startswith("train.linear_probe_rounds=2 overrides it: this run "
                               "trains head+lora, predicted to cost 0.07")
    assert "the map at 1,350 records/site" in override
    lora = from_dict({"train": {"recipe": "lora"}})
    assert lora.probe_rounds == 0 and recipes.overrides(lora) == [
        "train.recipe: lora"]


def test_a_causal_lm_trains_lora_and_a_bad_recipe_is_refused() -> None:
    cfg = from_dict({"model": {"task": "causal-lm"}})
    assert cfg.probe_rounds == 0
    assert recipes.overrides(cfg)[0].startswith("a causal LM has no classification")
    with pytest.raises(ConfigError, match="train.recipe"):
        from_dict({"train": {"recipe": "lp-ft"}})
