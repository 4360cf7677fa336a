"""``fedtune predict`` and ``fedtune evaluate``: the trained model on new records.

``predict`` takes a run directory (its ``best``/``final``/round-K adapter), an adapter
export, or a merged export (``fedtune export --merge [--quantize int8]``), reads
JSONL / CSV / TSV with the training readers (the same ``DataError`` for a missing
column), plain text lines (``.txt`` or ``-`` for stdin: one record per line), and
writes one JSON line per record: the label and the class probabilities, or the
generated response of a causal LM. ``evaluate`` scores a labelled file with the full
metric set and draws the confusion matrix. Neither writes into the run directory.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm

from fedtune.common import data, metrics, standalone
from fedtune.common.config import RunConfig
from fedtune.common.errors import DataError
from fedtune.common.loops import evaluate, resolve_device
from fedtune.common.model import ADAPTER_FILE, load_tokenizer
from fedtune.server.runtime import trained as saved

Record = dict[str, Any]


def input_column(cfg: RunConfig) -> str:
    """The column a record's model input is read from."""
    return (cfg.data.text_column if cfg.model.task == "classification"
            else cfg.data.prompt_column)


def read_inputs(source: str, *, column: str, stdin: TextIO | None = None
                ) -> list[Record]:
    """Records to predict: a data file (the training readers and errors), text
    lines (``.txt``), or ``-``: stdin as JSON lines or text lines."""
    if source == "-" or source.endswith(".txt"):
        try:
            text = (stdin or sys.stdin).read() if source == "-" else \
                Path(source).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"{source}: input file not found") from None
        except UnicodeDecodeError as err:
            raise DataError(f"{source}: not UTF-8 text ({err})") from err
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise DataError(f"{source}: no records; the input is empty")
        if source == "-" and lines[0].lstrip().startswith("{"):
            records = data.jsonl_records(lines, where="stdin")
            missing = [n for n, r in enumerate(records, 1) if r.get(column) in
                       (None, "")]
            if missing:
                raise DataError(f"stdin: record {missing[0]} has no {column!r}; "
                                f"found {sorted(records[missing[0] - 1])}")
            return records
        return [{column: ln} for ln in lines]
    return data.read_records(source, required=[column])


@dataclass
class Predictor:
    """A trained model from a run directory or an export, ready to predict."""

    task: str
    labels: list[str]
    column: str
    batch_size: int
    cfg: RunConfig | None  # None for a merged export
    model: Any
    tokenizer: Any
    device: torch.device
    # the run's calibrated decision bias (fedtune_model.json), added to the logits
    decision_bias: torch.Tensor | None = None

    @classmethod
    def open(cls, source: str | Path, *, which: str | None = None, device: str = "auto",
             batch_size: int = 0, column: str = "") -> Predictor:
        path = Path(source)
        dev = resolve_device(device)
        if (path / standalone.META).is_file() and not (
                path / ADAPTER_FILE).is_file():
            merged = standalone.load(path)
            return cls(task=merged.task, labels=getattr(merged, "labels", []),
                       column=column or str(merged.meta.get("input_column") or (
                           "text" if merged.task == "classification" else "prompt")),
                       batch_size=batch_size or 32, cfg=None, model=merged,
                       tokenizer=merged.tokenizer, device=torch.device("cpu"))
        trained = saved.resolve(path, which)
        cfg = trained.cfg
        model = saved.load_model(trained, dev)
        tok = load_tokenizer(cfg.model.name_or_path, cfg.model.gguf_file)
        bias = trained.meta.get("decision_bias")
        return cls(task=cfg.model.task, labels=list(cfg.data.labels),
                   column=column or input_column(cfg),
                   batch_size=batch_size or cfg.train.eval_batch_size, cfg=cfg,
                   model=model, tokenizer=tok, device=dev,
                   decision_bias=torch.tensor(bias, dtype=torch.float32)
                   if bias else None)

    def predict(self, records: Sequence[Record], *, progress: bool = True
                ) -> Iterator[Record]:
        """One output per record, in order (batched)."""
        texts = [str(r[self.column]) for r in records]
        bar = tqdm(total=len(texts), desc="predict", unit="rec", disable=not progress,
                   file=sys.stderr)
        step = self.batch_size if self.task == "classification" else 1
        for i in range(0, len(texts), step):
            chunk = texts[i:i + step]
            yield from self._batch(chunk)
            bar.update(len(chunk))
        bar.close()

    @torch.no_grad()
    def _batch(self, texts: list[str]) -> list[Record]:
        if self.cfg is None:  # a merged export runs its own code
            outs = self.model(texts)
            return [o if isinstance(o, dict) else {"response": o} for o in outs]
        if self.task != "classification":
            return [{"response": self._generate(t)} for t in texts]
        probs = self.probabilities(texts)
        return [{"label": self.labels[int(p.argmax())],
                 "probabilities": {n: round(float(v), 6) for n, v in
                                   zip(self.labels, p.tolist(), strict=True)}}
                for p in probs]

    def all_probabilities(self, texts: list[str], *, progress: bool = False
                          ) -> torch.Tensor:
        """Class probabilities of every text, in batches of ``batch_size``."""
        step = self.batch_size
        return torch.cat([self.probabilities(texts[i:i + step]) for i in tqdm(
            range(0, len(texts), step), desc="evaluate", unit="batch",
            file=sys.stderr, disable=not progress)])

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> torch.Tensor:
        """Class probabilities of a batch of texts (classification)."""
        assert self.cfg is not None
        enc = self.tokenizer(texts, truncation=True,
                             max_length=self.cfg.data.length_cap, padding=True,
                             return_tensors="pt").to(self.device)
        logits = self.model(input_ids=enc["input_ids"],
                            attention_mask=enc["attention_mask"]).float()
        if self.decision_bias is not None:
            logits = logits + self.decision_bias.to(logits.device)
        return torch.softmax(logits, -1).cpu()

    def _generate(self, prompt: str) -> str:
        assert self.cfg is not None
        ids = self.tokenizer(prompt + "\n", return_tensors="pt",
                             add_special_tokens=False).to(self.device)
        out = self.model.generate(**ids, max_new_tokens=self.cfg.data.length_cap,
                                  do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return str(self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                         skip_special_tokens=True))


def predict_file(source: str | Path, inputs: str, *, out: TextIO,
                 which: str | None = None, device: str = "auto", batch_size: int = 0,
                 progress: bool = True) -> int:
    """``fedtune predict``: JSON lines to ``out``; returns the records written."""
    predictor = Predictor.open(source, which=which, device=device,
                               batch_size=batch_size)
    records = read_inputs(inputs, column=predictor.column)
    n = 0
    for i, (rec, pred) in enumerate(zip(records, predictor.predict(
            records, progress=progress), strict=True)):
        line = {"record": i + 1, **({"id": rec["id"]} if "id" in rec else {}), **pred}
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
        n += 1
    out.flush()
    return n


def evaluate_file(source: str | Path, data_file: str, *, which: str | None = None,
                  device: str = "auto", batch_size: int = 0) -> dict[str, Any]:
    """``fedtune evaluate``: the full metric set on a labelled file (and, for
    classification, the confusion matrix under ``confusion``)."""
    predictor = Predictor.open(source, which=which, device=device,
                               batch_size=batch_size)
    cfg = predictor.cfg
    if cfg is None:
        raise DataError(f"{source}: a merged export carries no run config to score "
                        "with; evaluate the run directory (or an adapter export)")
    records = data.read_records(data_file, required=data.required_columns(
        cfg.model.task, cfg.data))
    if cfg.model.task != "classification":
        dataset = data.encode_for_task(records, predictor.tokenizer,
                                       task=cfg.model.task, cfg=cfg.data,
                                       source=data_file)
        return {"records": len(records), **evaluate(
            predictor.model, dataset, task=cfg.model.task,
            batch_size=predictor.batch_size, device=predictor.device,
            pad_id=int(predictor.tokenizer.pad_token_id))}
    truth = data.label_ids(records, column=cfg.data.label_column,
                           labels=cfg.data.labels, source=data_file)
    texts = [str(r[cfg.data.text_column]) for r in records]
    probs = predictor.all_probabilities(texts, progress=True)
    pred = probs.argmax(-1).tolist()
    picked = probs[torch.arange(len(truth)), torch.tensor(truth)]
    loss = float(-picked.clamp(min=1e-12).log().mean())
    k = len(cfg.data.labels)
    return {"records": len(records), "loss": loss,
            **metrics.classification_report(truth, pred, labels=list(
                cfg.data.labels)),
            "confusion": metrics.confusion_matrix(truth, pred, num_classes=k),
            "labels": list(cfg.data.labels)}


def report_lines(result: dict[str, Any]) -> list[str]:
    """The evaluation as text: headline, then a per-class table."""
    if "accuracy" not in result:
        return [f"{result['records']} records: loss {result['loss']:.4f}, perplexity "
                f"{result['perplexity']:.2f}"]
    lines = [f"{result['records']} records: loss {result['loss']:.4f}, accuracy "
             f"{result['accuracy']:.3f}, macro-F1 {result['macro-f1']:.3f}",
             f"{'class':<28} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>8}"]
    support = [sum(row) for row in result["confusion"]]
    for name, n in zip(result["labels"], support, strict=True):
        cells = [result.get(f"{k}-{name}", math.nan) for k in
                 ("precision", "recall", "f1")]
        lines.append(f"{name[:28]:<28} " + " ".join(
            f"{'-' if math.isnan(v) else format(v, '.3f'):>{w}}"
            for v, w in zip(cells, (9, 7, 6), strict=True)) + f" {n:>8}")
    return lines
