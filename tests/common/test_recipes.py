"""train.recipe: the phases a run trains, resolved from the measured map; keys set
to anything but their default win, and the plan says what that is predicted to
cost."""

from __future__ import annotations

import pytest

from fedtune.common import planning, recipes
from fedtune.common.config import ConfigError, from_dict, from_run_config, to_run_config


def test_auto_follows_the_map() -> None:
    cfg = from_dict({})
    pick = recipes.auto_row()
    assert cfg.train.recipe == "auto" and recipes.row_of(cfg) == pick
    (reason,) = recipes.overrides(cfg, 1350)
    assert reason.startswith(f"train.recipe: auto -> {pick}")
    assert recipes.SOURCE in reason and "1,350 records/site head 0." in reason
    if pick == "head":
        assert cfg.train.linear_probe_rounds == -1 and cfg.probe_rounds == 5
        length = planning.head_length(cfg, 1350)
        assert length.endswith(": 37 steps at the median site's 1,350 records")
        assert recipes.STEPS_SOURCE in length


def test_head_rounds_take_sqrt_records_steps_within_bounds() -> None:
    assert [recipes.head_steps(n) for n in (0, 36, 150, 500, 1350, 5400)] == [
        10, 10, 12, 22, 37, 40]
    # the rule's pick is the best cell of the measured map at every size
    for size, row in recipes.STEPS_MAP.items():
        assert max(row, key=lambda s: row[s]) == recipes.head_steps(size)
    cfg = from_dict({})
    assert cfg.phase(1, 1350).max_steps == 37 and cfg.phase(1, 1350).batch_size == 512
    with pytest.raises(ValueError, match="num_examples"):
        cfg.phase(1)
    # explicit epochs or steps win; LoRA rounds keep local_epochs
    assert from_dict({"train": {"linear_probe_epochs": 4}}).phase(1).local_epochs == 4
    assert from_dict({"train": {"max_steps": 7}}).phase(1).max_steps == 7
    lora = from_dict({"train": {"recipe": "lora"}})
    assert lora.phase(1).max_steps == 0 and lora.phase(1).local_epochs == 1


def test_a_length_override_is_named_with_its_predicted_cost() -> None:
    few = from_dict({"train": {"max_steps": 10}})
    line = planning.head_length(few, 1350)
    assert line.startswith("head rounds: train.max_steps=10 overrides the recipe's "
                           "length: batch 512, 10 steps per round at the median "
                           "site's 1,350 records, where the rule takes batch 512 "
                           "and 37 steps, predicted to cost 0.099 macro-F1")
    small = planning.head_length(from_dict({"train": {"batch_size": 64}}), 1350)
    assert small.endswith("its batch predicted to cost 0.013 macro-F1 (the map at "
                          "1,350 records/site: batch 128 against 512)")
    # 40 steps at 1,350 records lies within 0.01 of the best: no cost is claimed
    near = planning.head_length(from_dict({"train": {"linear_probe_epochs": 20}}),
                                1350)
    assert "40 steps" in near and "cost" not in near


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
    # Prepare: the rows the map measured at 1,350 records per site
    row = recipes.MAP[1350]
    # Execute: a run that trains LoRA on the top 2 layers in its last 3 of 10 rounds
    cfg = from_dict({"train": {"linear_probe_rounds": 7}, "lora": {"top_layers": 2},
                     "federation": {"num_rounds": 10}})
    reason, override = recipes.overrides(cfg, 1400)
    # Assert: it is the map's head+lora2 row, named with what it is predicted to cost
    assert recipes.row_of(cfg) == "head+lora2"
    assert override.startswith("train.linear_probe_rounds=7 overrides it: this run "
                               "trains head+lora")
    pick = recipes.auto_row()
    if row["head+lora2"][0] < row[pick][0]:
        assert (f"predicted to cost {row[pick][0] - row['head+lora2'][0]:.3f} "
                f"macro-F1 (the map at 1,350 records/site: head+lora2") in override
    lora = from_dict({"train": {"recipe": "lora"}})
    assert lora.probe_rounds == 0 and recipes.overrides(lora) == [
        "train.recipe: lora"]


def test_a_causal_lm_trains_lora_and_a_bad_recipe_is_refused() -> None:
    cfg = from_dict({"model": {"task": "causal-lm"}})
    assert cfg.probe_rounds == 0
    assert recipes.overrides(cfg)[0].startswith("a causal LM has no classification")
    with pytest.raises(ConfigError, match="train.recipe"):
        from_dict({"train": {"recipe": "lp-ft"}})


def test_the_maps_are_the_bench_results() -> None:
    """MAP and STEPS_MAP hold the committed bench JSON's figures (no hand copy
    drifting from what was measured); auto's pick at each size is within
    max(0.01, sd) of that size's best row."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    rows = json.loads((root / recipes.SOURCE).read_text())["rows"]
    measured: dict[int, dict[str, tuple[float, float]]] = {}
    for r in rows:
        if r["recipe"] in recipes.ROWS and r["runs"] >= 2:
            measured.setdefault(r["records_per_site"], {})[r["recipe"]] = (
                round(r["macro_f1_mean"], 4), round(r["macro_f1_sd"], 4))
    assert measured == recipes.MAP and {150, 1350} <= set(recipes.MAP)
    pick = recipes.auto_row()
    for size, row in recipes.MAP.items():
        best = max(row.values())
        assert "head" in row and set(row) <= set(recipes.ROWS)
        assert row[pick][0] >= best[0] - max(0.01, best[1]), size
    steps = json.loads((root / recipes.STEPS_SOURCE).read_text())["rows"]
    table: dict[int, dict[int, float]] = {}
    for r in steps:
        if r["batch"] == 512:
            table.setdefault(r["records_per_site"], {})[r["steps_per_round"]] = round(
                r["macro_f1_mean"], 4)
    assert table == recipes.STEPS_MAP


def test_a_causal_lms_auto_row_is_the_measured_sft_map() -> None:
    """SFT_MAP holds the committed bench JSON's full-scale DP rows; auto sets a
    causal LM's method and layers from it where they are left at their
    defaults, and the plan quotes it."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    rows = json.loads((root / recipes.SFT_SOURCE).read_text())["rows"]
    measured = {r["method"]: (round(r["exact_match_mean"], 4),
                              round(r["exact_match_sd"] or 0.0, 4))
                for r in rows if r["dp"] and r["method"] in recipes.SFT_ROWS}
    assert measured == recipes.SFT_MAP and recipes.SFT_MAP
    row = recipes.sft_auto_row()
    assert row is not None
    best = max(recipes.SFT_MAP.values())
    assert recipes.SFT_MAP[row][0] >= best[0] - max(0.01, best[1])
    cfg = from_dict({"model": {"task": "causal-lm"}})
    assert (cfg.lora.method, cfg.lora.top_layers) == recipes.SFT_ROWS[row]
    assert f"train.recipe: auto -> {row}" in recipes.overrides(cfg)[0]
    assert recipes.SFT_SOURCE in recipes.overrides(cfg)[0]
    kept = from_dict({"model": {"task": "causal-lm"}, "lora": {"method": "ia3"}})
    assert (kept.lora.method, kept.lora.top_layers) == ("ia3", 0)  # a set key wins
    pinned = from_dict({"model": {"task": "causal-lm"}, "train": {"recipe": "lora"}})
    assert (pinned.lora.method, pinned.lora.top_layers) == ("lora", 0)
