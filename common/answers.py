"""A causal LM judged by what it answers: greedy answers to the held-out prompts,
scored by exact match on the whole answer and on each of its fields.

``data.answer_pattern`` is a regular expression with named groups that reads the
fields out of an answer, e.g. for the drug-review SFT data
``The review is (?P<sentiment>\\w+); the condition is (?P<condition>[^.]+)``: an
answer scores ``answer_sentiment`` when its sentiment equals the reference's
(case and surrounding space ignored), whatever else it says. Without a pattern
only ``answer_exact`` (the whole answer, normalised) is scored. This is how
FlowerTune's leaderboards judge federated SFT: by a task score beside perplexity.
Pure torch + transformers (no Flower): the server's evaluation and the bench use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedtune.common.errors import DataError

EXACT = "answer_exact"
PREFIX = "answer_"


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold().rstrip(".")


def fields(pattern: str, text: str) -> dict[str, str] | None:
    """The pattern's named groups in ``text`` (matched ignoring case, on the text's
    words joined by single spaces; the fields normalised); None: no match."""
    match = re.search(pattern, " ".join(text.split()), re.IGNORECASE)
    if match is None:
        return None
    return {k: _norm(v or "") for k, v in match.groupdict().items()}


def check_pattern(pattern: str, references: Sequence[str], *, source: str) -> None:
    """Refuse a ``data.answer_pattern`` that reads none of the held-out answers
    (every field score would be 0 whatever the model learns), quoting the
    pattern and one answer."""
    if pattern and references and not any(fields(pattern, r) is not None
                                          for r in references):
        raise DataError(
            f"data.answer_pattern {pattern!r} matches none of the {len(references)} "
            f"held-out answers in {source} (one of them: {references[0][:120]!r}); "
            "fix the pattern (its named groups read the fields out of an answer) "
            "or leave it empty to score exact match only",
            public="data.answer_pattern matches none of the held-out answers")


def score(answers: Sequence[str], references: Sequence[str], *, pattern: str = ""
          ) -> dict[str, float]:
    """The share of answers equal to their reference (``answer_exact``) and, with
    ``pattern``, the share whose each field equals the reference's
    (``answer_<field>``); a reference the pattern cannot read is left out of
    the field scores."""
    n = len(references)
    if not n:
        return {}
    out = {EXACT: sum(_norm(a) == _norm(r) for a, r in zip(
        answers, references, strict=True)) / n}
    if not pattern:
        return out
    names = list(re.compile(pattern).groupindex)
    hits = dict.fromkeys(names, 0)
    readable = 0
    for a, r in zip(answers, references, strict=True):
        want = fields(pattern, r)
        if want is None:
            continue
        readable += 1
        got = fields(pattern, a) or {}
        for name in names:
            hits[name] += int(got.get(name) == want[name])
    if readable:
        out.update({f"{PREFIX}{name}": hits[name] / readable for name in names})
    return out


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *,
             max_new_tokens: int, batch_size: int, device: torch.device,
             max_prompt_tokens: int = 0) -> list[str]:
    """Greedy answers, in order: each prompt + newline (the SFT format), left-padded
    in batches, at most ``max_new_tokens`` new tokens, stopping at EOS; prompts
    longer than ``max_prompt_tokens`` (0: no cut) lose their start, as in
    training."""
    gen: Any = model
    was_training = model.training
    model.eval()
    pad = int(tokenizer.pad_token_id)
    out: list[str] = []
    try:
        for i in range(0, len(prompts), max(1, batch_size)):
            ids = [tokenizer(p + "\n", add_special_tokens=False)["input_ids"]
                   for p in prompts[i:i + batch_size]]
            if max_prompt_tokens:
                ids = [x[-max_prompt_tokens:] for x in ids]
            width = max(len(x) for x in ids)
            batch = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for j, x in enumerate(ids):  # left padding: every answer starts at width
                batch[j, width - len(x):] = torch.tensor(x)
                mask[j, width - len(x):] = 1
            new = gen.generate(input_ids=batch.to(device),
                               attention_mask=mask.to(device),
                               max_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=pad)[:, width:]
            out += [str(tokenizer.decode(row, skip_special_tokens=True)).strip()
                    for row in new]
    finally:
        model.train(was_training)
    return out


def words(row: Mapping[str, Any]) -> str:
    """A metrics line's answer scores in words, e.g. ``exact 0.12, sentiment 0.56,
    condition 0.31`` ("" without)."""
    return ", ".join(f"{k[len('eval_' + PREFIX):]} {v:.2f}" for k, v in row.items()
                     if k.startswith("eval_" + PREFIX) and isinstance(v, int | float))
