"""The site's one privacy release API: every release under DP goes through
:class:`Releases`.

A release is one Gaussian mechanism (or a run of DP-SGD steps) on the site's
records, of one :data:`KINDS`: a DP-SGD round, a noise share (a round under
distributed noise: one full-batch step whose noise the sites pool under
SecAgg+), the class histogram, the decision calibration's counts, a
personalisation. Each goes the same way:

1. :meth:`Releases.check` refuses it before anything is computed: DP off under a
   privacy budget, a noise below the site policy's floor, or a budget the ledger
   cannot afford with it (and whatever comes with it);
2. the caller computes and noises what it releases;
3. :meth:`Releases.charge` books it once, in the run's privacy state and in the
   site's persistent ledger (with the run's id and name, its kind and the Flower
   message: a message retried is not charged twice), before the reply exists;
4. :meth:`Releases.metrics` returns the epsilons the reply carries: this run's
   (the composition of every release the run made here) and the ledger's total
   over every run. These are the only epsilons the operator sees: the round lines,
   the summary, metrics.jsonl, the report and ``fedtune status`` all show them.

Pure bookkeeping: the accounting is :mod:`fedtune.common.accounting`, the ledger
file :mod:`fedtune.client.ledger`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedtune.client.ledger import Budget, PrivacyLedger
from fedtune.common import records
from fedtune.common.accounting import Segment, epsilon_spent
from fedtune.common.config import PrivacyConfig
from fedtune.common.errors import PrivacyBudgetExhausted

ROUND, SHARE, HISTOGRAM, CALIBRATION, PERSONALISATION = (
    "round", "noise-share", "histogram", "calibration", "personalisation")
KINDS = (ROUND, SHARE, HISTOGRAM, CALIBRATION, PERSONALISATION)


@dataclass(frozen=True)
class Book:
    """A site's persistent ledger and its budget (deployment, or a simulation with
    ``privacy.ledger_dir``)."""

    ledger: PrivacyLedger
    budget: Budget


@dataclass
class Releases:
    """The releases one Flower message makes on a site.

    ``history``: the run's privacy state's segments (appended to in place: the
    run's composition); ``book``: the site's ledger (None in a simulation without
    one); ``run``/``run_name``: the operator's run id and name, as the ledger
    records them; ``check_noise``: the site policy's look at DP-SGD noise.
    """

    privacy: PrivacyConfig
    history: list[Segment]
    book: Book | None
    run: str
    round_: int
    message: str
    run_name: str = ""
    check_noise: Callable[[list[float]], None] | None = None

    def check(self, kind: str, *segments: Segment,
              noise: Sequence[float] = ()) -> None:
        """Refuse ``segments`` (one release of ``kind``, and what comes with it)
        before anything is computed; ``noise``: DP-SGD noise multipliers for the
        site policy's floor."""
        if kind not in KINDS:
            raise ValueError(f"unknown release kind {kind!r}")
        if not self.privacy.enabled:
            if self.book and math.isfinite(self.book.budget.epsilon):
                raise PrivacyBudgetExhausted(
                    f"DP is off for this run but the site has a privacy budget: a "
                    f"non-private {kind} would spend an unbounded epsilon")
            return
        if noise and self.check_noise is not None:
            self.check_noise(list(noise))
        real = [s for s in segments if s[2] > 0]
        if self.book and real:
            self.book.ledger.check(real[-1], self.book.budget, extra=real[:-1])

    def charge(self, kind: str, segment: Segment) -> None:
        """Book one release (nothing when DP is off or it took no step)."""
        if not self.privacy.enabled or segment[2] <= 0:
            return
        self.history.append(segment)
        if self.book:
            # Charged before the reply exists: a crash after this over-counts, never
            # under-counts; a retried message is not charged twice.
            self.book.ledger.charge(
                segment, self.book.budget, run=self.run, round_=self.round_,
                message=(self.message if kind in (ROUND, SHARE)
                         else f"{self.message}/{kind}"),
                kind=kind, run_name=self.run_name)

    def epsilon(self) -> float:
        """This run's epsilon on this site: every release it made here."""
        return epsilon_spent(self.history, delta=self.privacy.target_delta,
                             accountant=self.privacy.accountant)

    def metrics(self) -> dict[str, float]:
        """The reply's epsilons (empty when DP is off: no epsilon key at all means
        not private): this run's, and the ledger's total over every run (this
        run's where the site keeps no ledger)."""
        if not self.privacy.enabled:
            return {}
        eps = self.epsilon()
        total = (self.book.ledger.spent(self.book.budget.delta) if self.book
                 else eps)
        return {records.EPSILON: eps, records.EPSILON_TOTAL: total,
                records.DELTA: self.privacy.target_delta}
