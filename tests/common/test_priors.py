"""The label prior: a head that starts from the label descriptions' embeddings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedtune.common import model as M
from fedtune.common import priors, recipes
from fedtune.common.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    from_dict,
)

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["good great relief", "bad awful pain", "okay maybe mixed"]


def _model(tiny_bert: Path, **model: object) -> torch.nn.Module:
    cfg = ModelConfig(name_or_path=str(tiny_bert), **model)  # type: ignore[arg-type]
    return M.build_model(cfg, LoraConfig(r=4), num_labels=3)


def test_label_texts_are_the_descriptions_else_the_names() -> None:
    names = DataConfig(labels=("blood-immune", "health_factors"))
    assert priors.label_texts(names) == ["blood immune", "health factors"]
    described = DataConfig(labels=("a", "b"), label_descriptions=("first", "second"))
    assert priors.label_texts(described) == ["first", "second"]


def test_prior_rows_are_scaled_unit_embeddings_and_predict_the_nearest_label(
        tiny_bert: Path) -> None:
    model = _model(tiny_bert)
    tok = M.load_tokenizer(str(tiny_bert))
    priors.init_head(model, tok, TEXTS, scale=7.0, device=torch.device("cpu"))
    _, head = M.classifier_head(model)
    emb = priors.label_embeddings(model, tok, TEXTS, device=torch.device("cpu"))
    norms = emb.norm(dim=1, keepdim=True)
    expected = 7.0 * emb / norms / norms.mean()
    assert torch.allclose(head.weight, expected, atol=1e-6)
    assert torch.equal(head.bias, torch.zeros(3))
    # each label's own words are nearest (in angle) to its own row: round 0
    # labels them right, whatever the scale
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    cosine = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.\
        normalize(emb, dim=1).T
    assert logits.argmax(1).tolist() == cosine.argmax(1).tolist() == [0, 1, 2]


def test_init_head_refuses_a_two_layer_head_and_a_wrong_count(tiny_bert: Path
                                                              ) -> None:
    tok = M.load_tokenizer(str(tiny_bert))
    deep = _model(tiny_bert, head_init="zero", head_hidden=8)
    with pytest.raises(TypeError, match="linear head"):
        priors.init_head(deep, tok, TEXTS, scale=1.0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="2 label texts for a head of 3"):
        priors.init_head(_model(tiny_bert), tok, TEXTS[:2], scale=1.0,
                         device=torch.device("cpu"))


def test_start_head_takes_the_scale_from_the_typical_site(tiny_bert: Path) -> None:
    raw = {"model": {"name_or_path": str(tiny_bert)},
           "data": {"labels": ["positive", "negative", "neutral"]}}
    model = _model(tiny_bert)
    # sites weighted as FedAvg weighs them (by records): the typical site holds
    # sum(n^2) / sum(n) = 1,058 records, not the median's 400
    meta = priors.start_head(model, from_dict(raw), site_records=[150, 400, 1350])
    typical = (150 ** 2 + 400 ** 2 + 1350 ** 2) / (150 + 400 + 1350)
    assert meta == {"head_init": "labels", "head_init_from": "names",
                    "head_init_scale": pytest.approx(recipes.prior_scale(typical))}
    emb = priors.label_embeddings(model, M.load_tokenizer(str(tiny_bert)),
                                  ["positive", "negative", "neutral"],
                                  device=torch.device("cpu"))
    assert torch.allclose(M.classifier_head(model)[1].weight, priors.prior_weights(
        emb, scale=meta["head_init_scale"]), atol=1e-6)
    uniform = from_dict({**raw, "federation": {"weighting": "uniform"}})
    assert priors.start_head(model, uniform, site_records=[150, 400, 1350])[
        "head_init_scale"] == pytest.approx(recipes.prior_scale(1900 / 3))
    fixed = from_dict({**raw, "model": {**raw["model"], "head_init_scale": 3.0}})
    assert priors.start_head(model, fixed, site_records=[])["head_init_scale"] == 3.0
    zero = from_dict({**raw, "model": {**raw["model"], "head_init": "zero"}})
    before = M.adapter_state(model)
    assert priors.start_head(model, zero, site_records=[10]) == {"head_init": "zero"}
    assert all(torch.equal(before[k], v) for k, v in M.adapter_state(model).items())


def test_prior_scale_follows_the_map_in_log_records() -> None:
    sizes = sorted(recipes.PRIOR_SCALE_MAP)
    for n in sizes:
        assert recipes.prior_scale(n) == recipes.PRIOR_SCALE_MAP[n]
    assert recipes.prior_scale(1) == recipes.PRIOR_SCALE_MAP[sizes[0]]
    assert recipes.prior_scale(10**6) == recipes.PRIOR_SCALE_MAP[sizes[-1]]
    lo, hi = sizes[0], sizes[1]
    mid = math.sqrt(lo * hi)  # halfway in log(records)
    assert recipes.prior_scale(mid) == pytest.approx(
        (recipes.PRIOR_SCALE_MAP[lo] + recipes.PRIOR_SCALE_MAP[hi]) / 2)


def test_the_prior_map_is_the_bench_result() -> None:
    """PRIOR_SCALE_MAP holds, at each measured size, a scale whose replayed
    macro-F1 is within max(0.01, sd) of the best scale's (no hand copy)."""
    rows = json.loads((ROOT / recipes.PRIOR_SOURCE).read_text())["results"]
    by_size: dict[int, dict[float, dict]] = {}
    for r in rows:
        size = r["point"]["site_records"] or 1350  # 0: every record, 1,350
        by_size.setdefault(size, {})[r["prior"]] = r
    assert sorted(by_size) == sorted(recipes.PRIOR_SCALE_MAP)
    for size, cells in by_size.items():
        best = max(cells.values(), key=lambda r: r["macro_f1"])
        pick = cells[recipes.PRIOR_SCALE_MAP[size]]
        assert pick["macro_f1"] >= best["macro_f1"] - max(0.01, best["macro_f1_sd"])
        # and the prior never costs where sites learn well on their own
        assert pick["macro_f1"] >= cells[0.0]["macro_f1"] - max(
            0.01, cells[0.0]["macro_f1_sd"])


@pytest.mark.parametrize(("descriptions", "match"), [
    (["one", "two"], "2 given for 3 data.labels"),
    (["one", " ", "three"], "empty at position"),
    (["one", "one", "three"], "given twice"),
])
def test_bad_label_descriptions_are_refused_naming_both_keys(
        descriptions: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        from_dict({"data": {"labels": ["a", "b", "c"],
                            "label_descriptions": descriptions}})
    assert "data.label_descriptions" in str(err.value)
    assert "data.labels" in str(err.value)


def test_labels_prior_needs_a_linear_head() -> None:
    with pytest.raises(ConfigError, match="model.head_init: 'labels'.*head_hidden"):
        from_dict({"model": {"head_hidden": 16}})
    assert from_dict({"model": {"head_hidden": 16, "head_init": "zero"}})
