"""A site's privacy ledger: every release it made from one dataset, on disk.

One JSON file per dataset, named by a fingerprint of its records, in the site's
ledger directory. Each release (:mod:`fedtune.client.releases`: a DP-SGD round,
the class histogram, the decision calibration, a personalisation) appends one
entry (the Opacus accountant's ``(noise multiplier, sample rate, steps)`` segment,
its kind, and which run, round and Flower message it answered) *before* the reply
leaves the site. Epsilon
is recomputed from all entries of all runs, so spending accumulates across rounds,
runs and daemon restarts. Updates are atomic (write, fsync, rename) and serialized
by an exclusive ``flock`` on a side file, so concurrent runs on one ledger lose
nothing; an entry for a message already charged is not charged again. A file that
cannot be read is reported and left untouched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.common.accounting import Segment, epsilon_spent
from fedtune.common.errors import PrivacyBudgetExhausted, PrivacyError

FORMAT = "fedtune-privacy-ledger/1"


@dataclass(frozen=True)
class Budget:
    """A site's total (epsilon, delta) for one dataset; epsilon inf = unlimited."""

    epsilon: float = math.inf
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or not 0 < self.delta < 1:
            raise PrivacyError(f"privacy budget needs epsilon > 0 and 0 < delta < 1, "
                               f"got ({self.epsilon}, {self.delta})")


def fingerprint(records: Sequence[Mapping[str, Any]]) -> str:
    """sha256 over the records' canonical JSON: the same data, the same ledger."""
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps(rec, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


class PrivacyLedger:
    """The ledger file of one dataset in ``directory``."""

    def __init__(self, directory: Path, dataset: str, *, records: int = 0,
                 accountant: str = "rdp") -> None:
        self.path = Path(directory) / f"{dataset[:32]}.json"
        self.dataset, self.records, self.accountant = dataset, records, accountant

    # --- file access -----------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict[str, Any]:
        """The ledger document (an empty one if the file does not exist yet)."""
        if not self.path.exists():
            return {"format": FORMAT, "dataset": self.dataset,
                    "records": self.records, "accountant": self.accountant,
                    "entries": []}
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            if doc.get("format") != FORMAT or not isinstance(doc.get("entries"), list):
                raise ValueError(f"not a {FORMAT} document")
            for e in doc["entries"]:
                float(e["sigma"]), float(e["sample_rate"]), int(e["steps"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise PrivacyError(
                f"privacy ledger {self.path} is unreadable or corrupt ({err}). It was "
                "left untouched and this site will not train on this dataset until it "
                "is restored from a backup; deleting it would forget past spending"
            ) from None
        return dict(doc)

    def _write(self, doc: Mapping[str, Any]) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # --- accounting ------------------------------------------------------------
    @staticmethod
    def history(doc: Mapping[str, Any]) -> list[Segment]:
        return [(float(e["sigma"]), float(e["sample_rate"]), int(e["steps"]))
                for e in doc["entries"]]

    def spent(self, delta: float) -> float:
        """Epsilon at ``delta`` of everything charged so far."""
        return epsilon_spent(self.history(self.read()), delta=delta,
                             accountant=self.accountant)

    def check(self, segment: Segment, budget: Budget,
              doc: Mapping[str, Any] | None = None, *,
              extra: Sequence[Segment] = ()) -> float:
        """Epsilon after ``segment``; raises if that would exceed the budget.

        ``doc``: the ledger already read (under the lock), else it is read here.
        ``extra``: releases that come with this one (a class histogram).
        """
        after = epsilon_spent([*self.history(doc or self.read()), *extra, segment],
                              delta=budget.delta, accountant=self.accountant)
        if after > budget.epsilon + 1e-9:
            raise PrivacyBudgetExhausted(
                f"this round would raise epsilon to {after:.3f} > the site's budget "
                f"{budget.epsilon:g} (delta {budget.delta:g}) on dataset "
                f"{self.dataset[:12]}; the site declines the round")
        return after

    def charge(self, segment: Segment, budget: Budget, *, run: str, round_: int,
               message: str, kind: str = "round", run_name: str = "") -> float:
        """Record one release (once per ``message``) and return the epsilon spent;
        ``kind``: what was released (:data:`fedtune.client.releases.KINDS`);
        ``run_name``: the operator's name for the run (its run directory's)."""
        with self._locked():
            doc = self.read()
            if any(e.get("message") == message for e in doc["entries"]):
                return epsilon_spent(self.history(doc), delta=budget.delta,
                                     accountant=self.accountant)
            after = self.check(segment, budget, doc)  # re-checked under the lock
            doc["entries"].append({
                "run": run, "run_name": run_name, "kind": kind, "round": round_,
                "message": message,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "sigma": segment[0], "sample_rate": segment[1], "steps": segment[2],
                "delta": budget.delta, "epsilon_after": after})
            doc["budget"] = {"epsilon": None if math.isinf(budget.epsilon)
                             else budget.epsilon, "delta": budget.delta}
            doc["records"] = self.records or doc.get("records", 0)
            self._write(doc)
            return after


def kind_of(entry: Mapping[str, Any]) -> str:
    """An entry's release kind (entries written before kinds were recorded: from
    the message suffix the releases always carried)."""
    if entry.get("kind"):
        return str(entry["kind"])
    tail = str(entry.get("message", "")).rsplit("/", 1)
    return tail[1] if len(tail) == 2 else "round"


def summarize(directory: Path) -> list[dict[str, Any]]:
    """One line per dataset ledger in ``directory`` (``fedtune privacy show``),
    with its runs: each run's id and name, its releases by kind and its epsilon
    (the run's releases composed), in the order they were first charged."""
    rows = []
    for path in sorted(Path(directory).glob("*.json")):
        ledger = PrivacyLedger(path.parent, path.stem)
        doc = ledger.read()
        budget = doc.get("budget") or {}
        delta = float(budget.get("delta") or 1e-5)
        accountant = str(doc.get("accountant", "rdp"))
        eps = epsilon_spent(ledger.history(doc), delta=delta, accountant=accountant)
        runs: dict[str, dict[str, Any]] = {}
        for e in doc["entries"]:
            run = runs.setdefault(str(e["run"]), {
                "run": str(e["run"]), "name": e.get("run_name") or "",
                "releases": {}, "segments": [], "last": e.get("time", "")})
            run["name"] = run["name"] or e.get("run_name") or ""
            kind = kind_of(e)
            run["releases"][kind] = run["releases"].get(kind, 0) + 1
            run["segments"].append((float(e["sigma"]), float(e["sample_rate"]),
                                    int(e["steps"])))
            run["last"] = e.get("time", run["last"])
        for run in runs.values():
            run["epsilon"] = epsilon_spent(run.pop("segments"), delta=delta,
                                           accountant=accountant)
        limit = budget.get("epsilon")
        rows.append({"dataset": path.stem, "records": doc.get("records", 0),
                     "runs": list(runs.values()), "releases": len(doc["entries"]),
                     "delta": delta, "epsilon": eps, "budget": limit,
                     "remaining": None if limit is None else max(0.0, limit - eps)})
    return rows
