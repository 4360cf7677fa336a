from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from fedtune.common import data, sites
from fedtune.common.config import DataConfig
from fedtune.common.errors import DataError
from tests.conftest import REVIEW_DATA, make_reviews, write_jsonl


def test_iid_partition_sizes_and_determinism() -> None:
    parts = sites.iid_partition(103, num_parts=4, seed=1)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert sorted(i for p in parts for i in p) == list(range(103))
    assert parts == sites.iid_partition(103, num_parts=4, seed=1)
    assert parts != sites.iid_partition(103, num_parts=4, seed=2)


def test_dirichlet_partition_skews_labels() -> None:
    labels = [i % 3 for i in range(600)]
    skewed = sites.dirichlet_partition(labels, num_parts=5, alpha=0.1, seed=0)
    mild = sites.dirichlet_partition(labels, num_parts=5, alpha=100.0, seed=0)
    assert sorted(i for p in skewed for i in p) == list(range(600))
    assert skewed == sites.dirichlet_partition(labels, num_parts=5, alpha=0.1, seed=0)

    def top_share(parts: list[list[int]]) -> float:
        shares = [max(Counter(labels[i] for i in p).values()) / len(p) for p in parts]
        return sum(shares) / len(shares)

    assert top_share(skewed) > 0.7 > top_share(mild)
    assert top_share(mild) < 0.45


def test_dirichlet_partition_reports_impossible_split() -> None:
    with pytest.raises(DataError, match="raise data.dirichlet_alpha"):
        sites.dirichlet_partition([0, 1, 0], num_parts=3, alpha=0.01, seed=0,
                                 min_size=2)


def test_column_partition_keeps_groups_together() -> None:
    values = ["a"] * 50 + ["b"] * 30 + ["c"] * 20 + ["d"] * 10 + ["e"] * 5
    parts = sites.column_partition(values, num_parts=3)
    # largest first onto the emptiest part: a | b+e | c+d
    assert sorted(len(p) for p in parts) == [30, 35, 50]
    for p in parts:
        for g in {values[i] for i in p}:
            assert {i for i, v in enumerate(values) if v == g} <= set(p)
    with pytest.raises(DataError, match="only 5 distinct values"):
        sites.column_partition(values, num_parts=6)


def test_partition_dispatch(tmp_path: Path) -> None:
    recs = make_reviews(60, 0)
    cfg = DataConfig(partition="column", partition_column="condition")
    parts = sites.partition(recs, cfg, num_parts=3, seed=0)
    assert sum(len(p) for p in parts) == 60
    with pytest.raises(DataError, match="not a column of the data"):
        sites.partition(recs, DataConfig(partition="column",
                                        partition_column="hospital"),
                       num_parts=3, seed=0)
    with pytest.raises(DataError, match="needs labels"):
        sites.partition(recs, DataConfig(partition="dirichlet"), num_parts=3, seed=0)
    with pytest.raises(DataError, match="cannot fill 80 sites"):
        sites.partition(recs, DataConfig(partition="iid"), num_parts=80, seed=0)


def test_split_validation() -> None:
    tr, va = sites.split_validation(range(50), fraction=0.1, seed=0)
    assert len(va) == 5 and not set(tr) & set(va) and len(tr) + len(va) == 50
    assert sites.split_validation(range(3), fraction=0.2, seed=0) == ([0, 1, 2], [])


def test_read_formats(tmp_path: Path) -> None:
    rows = make_reviews(5, 0)
    jl = write_jsonl(tmp_path / "a.jsonl", rows)
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("review,rating\ngood drug,positive\nbad drug,negative\n")
    tsv_path = tmp_path / "a.tsv"
    tsv_path.write_text("review\trating\ngood, drug\tpositive\n")
    assert len(data.read_records(str(jl), required=["review", "rating"])) == 5
    assert data.read_records(str(csv_path), required=["review"])[1]["rating"] == \
        "negative"
    assert data.read_records(str(tsv_path), required=["review"])[0]["review"] == \
        "good, drug"


@pytest.mark.parametrize(("name", "content", "match"), [
    ("missing.jsonl", None, "data file not found"),
    ("empty.jsonl", "", "no records; the file is empty"),
    ("cols.jsonl", '{"text": "x", "rating": "positive"}\n',
     r"missing column\(s\) \['review'\]; found \['rating', 'text'\]"),
    ("blank.jsonl", '{"review": "", "rating": "positive"}\n',
     r"record 1 has empty \['review'\]"),
    ("bad.jsonl", '{"review": "x"\n', r"bad.jsonl:1: not valid JSON"),
    ("list.jsonl", '[1, 2]\n', "expected a JSON object per line"),
    ("data.parquet", "x", "unsupported file type '.parquet'"),
    ("latin.csv", b"review,rating\n\xe9t\xe9,positive\n", "not UTF-8 text"),
])
def test_read_errors(tmp_path: Path, name: str, content: str | bytes | None,
                     match: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        data.read_records(str(path), required=["review", "rating"])


def test_unknown_labels_are_named() -> None:
    recs = [{"rating": "positive"}, {"rating": "great"}, {"rating": "meh"}]
    with pytest.raises(DataError, match=r"unknown label\(s\) \['great', 'meh'\]"):
        data.label_ids(recs, column="rating", labels=["negative", "positive"])
    assert data.label_ids(recs[:1], column="rating", labels=["positive"]) == [0]


def test_encode_sft_masks_only_the_response(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = DataConfig(max_length=8, **REVIEW_DATA)
    ds = data.encode_sft([{"prompt": "the drug was good and i felt better",
                           "response": "review is positive"}], tok, cfg=cfg)
    item = ds[0]
    assert len(item["input_ids"]) == 8  # prompt cut from the left
    resp = tok("review is positive", add_special_tokens=False)["input_ids"]
    assert item["input_ids"][-4:].tolist() == resp + [tok.eos_token_id]
    assert item["loss_mask"].tolist() == [0] * 4 + [1] * 4


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_encoding_no_records_gives_an_empty_set(tiny_bert: Path, task: str) -> None:
    """A site with data.val_fraction=0 has no validation records (transformers 5's
    tokenizer raises IndexError on an empty batch)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    assert len(data.encode_for_task([], tok, task=task, cfg=DataConfig())) == 0


def test_collate_pads_and_handles_empty() -> None:
    batch = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor(1)},
             {"input_ids": torch.tensor([8]), "labels": torch.tensor(0)}]
    out = data.collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [1, 0]
    assert data.collate([], pad_id=0)["input_ids"].shape[0] == 0


def test_embedded_drug_reviews_are_clean_jsonl() -> None:
    path = data.read_records("fedtune:drug-reviews", required=["review", "rating"])
    assert len(path) == 600
    assert {r["rating"] for r in path} == {"negative", "neutral", "positive"}
    assert all("&#039;" not in r["review"] for r in path)
    test = data.read_records("fedtune:drug-reviews-test", required=["review"])
    assert len(test) == 379
    sft = data.read_records("fedtune:drug-review-sft", required=["prompt", "response"])
    assert json.dumps(sft[0]) and sft[0]["response"].startswith("The review is")


def test_a_csv_saved_with_a_byte_order_mark_reads(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext,label\nfirst,a\nsecond,b\n".encode())
    records = data.read_records(str(path), required=["text", "label"])
    assert [r["text"] for r in records] == ["first", "second"]
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "x", "label": "a"}
                                                   ).encode() + b"\n")
    assert data.read_records(str(lines), required=["text"])[0]["label"] == "a"


def test_labels_are_read_from_the_training_file_when_not_given(tmp_path: Path
                                                               ) -> None:
    from fedtune.common.config import ConfigError, from_dict

    path = write_jsonl(tmp_path / "own.jsonl", [
        {"text": "t", "kind": k} for k in ("zeta", "alpha", "zeta", "mid")])
    own = from_dict({"data": {"source": str(path), "label_column": "kind"}})
    assert own.data.labels == ()
    assert data.with_labels(own).data.labels == ("alpha", "mid", "zeta")
    given = from_dict({"data": {"source": str(path), "label_column": "kind",
                                "labels": ["zeta", "alpha", "mid"]}})
    assert data.with_labels(given) is given
    with pytest.raises(ConfigError, match="3 given for 2"):  # descriptions counted
        data.with_labels(from_dict({"data": {  # against the labels read
            "source": str(write_jsonl(tmp_path / "two.jsonl", [
                {"text": "t", "kind": k} for k in ("a", "b")])),
            "label_column": "kind", "label_descriptions": ["x", "y", "z"]}}))
    with pytest.raises(ConfigError, match="data.labels: not set, and cannot be read"):
        data.with_labels(from_dict({"data": {"source": str(tmp_path / "gone.jsonl"),
                                             "label_column": "kind"}}))
    with pytest.raises(ConfigError, match="holds 1 distinct label"):
        data.with_labels(from_dict({"data": {"source": str(write_jsonl(
            tmp_path / "one.jsonl", [{"text": "t", "kind": "a"}])),
            "label_column": "kind"}}))


def test_a_causal_lms_dirichlet_split_skews_over_the_partition_column() -> None:
    from fedtune.common import assets

    recs = [assets.instruct_pair({"text": f"diagnosis {i}", "category": "X00",
                                  "chapter": ("eye", "ear", "skin")[i % 3]})
            for i in range(300)]
    assert recs[0] == {"prompt": "ICD chapter: diagnosis 0", "response": "eye",
                       "chapter": "eye", "category": "X00"}
    cfg = DataConfig(partition="dirichlet", partition_column="chapter",
                     dirichlet_alpha=0.1)
    parts = sites.partitions(recs, cfg, task="causal-lm", num_parts=3, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(300))
    shares = [Counter(recs[i]["response"] for i in p) for p in parts]
    assert max(max(c.values()) / sum(c.values()) for c in shares) > 0.6  # skewed
    with pytest.raises(DataError, match="skews the sites over "
                                        "data.partition_column 'condition'"):
        sites.partitions(recs, DataConfig(partition="dirichlet"), task="causal-lm",
                         num_parts=3, seed=0)
