"""The report's figures, as PNG bytes, from the rows of a run's ``metrics.jsonl``.

Each function takes the per-round rows (``round`` > 0; the quality plot also takes
round 0, the adapter before training) and returns one PNG. Matplotlib runs on its
Agg backend: no display, no GUI toolkit.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font-cache chatter
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Row = Mapping[str, Any]
SIZE = (7.2, 3.6)
COLORS = {"accepted": "#2e7d32", "rejected": "#c62828", "declined": "#ef6c00",
          "failed": "#6a1b9a", "late": "#9e9e9e"}


MARKERS = "osD^v<>phX*P"


def short(node: str) -> str:
    """A node id as the plots label it: its last 6 digits."""
    return f"…{node[-6:]}" if len(node) > 7 else node


def site_label(node: str, sites: Mapping[str, str]) -> str:
    """``p3 …123456``: the simulated partition (as the log names it) and the node
    id's tail; a deployed node: the id's tail only."""
    return f"{sites[node]} {short(node)}" if node in sites else short(node)


def site_order(node: str, sites: Mapping[str, str]) -> tuple[int, int, str]:
    """Simulated sites by partition number (p2 before p10), then node ids."""
    site = sites.get(node, "")
    return (0, int(site[1:]), node) if site[1:].isdigit() else (1, 0, node)


def _sites(rows: Sequence[Row]) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in rows:
        out.update(r.get("site_by_node") or {})
    return out


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _rounds_axis(ax: Any, rounds: Sequence[int]) -> None:
    ax.set_xlabel("round")
    if rounds:
        step = max(1, math.ceil(len(rounds) / 12))
        ax.set_xticks(list(rounds)[::step])
    ax.grid(alpha=0.3)


def _num(row: Row, key: str) -> float:
    v = row.get(key)
    return float(v) if isinstance(v, int | float) else math.nan


def _max_total(row: Row) -> float:
    vals = [v for v in (row.get("epsilon_total_by_node") or {}).values()
            if v is not None]
    return max(vals) if vals else math.nan


def quality(rows: Sequence[Row], *, best: int = 0) -> bytes:
    """Global eval loss (left axis) and accuracy/macro-F1 or perplexity (right);
    ``best`` (> 0) marks the best round with a vertical line."""
    fig, ax = plt.subplots(figsize=SIZE)
    rounds = [int(r["round"]) for r in rows]
    if best:
        ax.axvline(best, color="#6a1b9a", linestyle=":", linewidth=1.5,
                   label=f"best round ({best})")
    ax.plot(rounds, [_num(r, "eval_loss") for r in rows], "o-", color="#1565c0",
            label="eval loss")
    ax.set_ylabel("eval loss (held-out set)")
    _rounds_axis(ax, rounds)
    right = ax.twinx()
    if any("eval_accuracy" in r for r in rows):
        right.plot(rounds, [_num(r, "eval_accuracy") for r in rows], "s--",
                   color="#2e7d32", label="accuracy")
        right.plot(rounds, [_num(r, "eval_macro_f1") for r in rows], "^--",
                   color="#ef6c00", label="macro-F1")
        right.set_ylim(0, 1)
        right.set_ylabel("accuracy / macro-F1")
    elif any("eval_perplexity" in r for r in rows):
        right.plot(rounds, [_num(r, "eval_perplexity") for r in rows], "s--",
                   color="#2e7d32", label="perplexity")
        right.set_ylabel("perplexity")
    if any("retention_perplexity" in r for r in rows):
        right.plot(rounds, [_num(r, "retention_perplexity") for r in rows], "D:",
                   color="#c62828", label="retention perplexity (general text)")
        right.set_ylabel("perplexity")
    lines = ax.get_lines() + right.get_lines()
    ax.legend(lines, [str(ln.get_label()) for ln in lines], loc="upper left",
              bbox_to_anchor=(1.12, 1.0), borderaxespad=0.0, fontsize=8)
    ax.set_title("Global adapter on the held-out set (round 0 = before training)")
    return _png(fig)


def privacy(rows: Sequence[Row], *, target: float | None,
            budget: float | None) -> bytes:
    """Each site's epsilon spent in this run, by round, against the target (and,
    where the run sets one, the sites' ledger totals against their budget)."""
    fig, ax = plt.subplots(figsize=SIZE)
    rounds = [int(r["round"]) for r in rows]
    sites = _sites(rows)
    nodes = sorted({n for r in rows for n in (r.get("epsilon_by_node") or {})},
                   key=lambda n: site_order(n, sites))
    # Sites of one size spend the same epsilon: their lines coincide. A marker of
    # its own and a small sideways offset keep every site visible.
    width = 0.3 if len(nodes) > 1 else 0.0
    for i, node in enumerate(nodes):
        ys = [(r.get("epsilon_by_node") or {}).get(node, math.nan) for r in rows]
        dx = width * (i / (len(nodes) - 1) - 0.5) if len(nodes) > 1 else 0.0
        ax.plot([x + dx for x in rounds], [math.nan if y is None else y for y in ys],
                marker=MARKERS[i % len(MARKERS)], ls="-", ms=5,
                label=site_label(node, sites), alpha=0.85)
    if target is not None:
        ax.axhline(target, color="#c62828", ls="--", label=f"target ε={target:g}")
    if budget:
        ax.plot(rounds, [_max_total(r) for r in rows], "k:",
                label="max ledger total")
        ax.axhline(budget, color="k", ls="-.", label=f"site budget ε={budget:g}")
    if not nodes:
        ax.text(0.5, 0.5, "DP off: no epsilon was spent or reported", ha="center",
                va="center", transform=ax.transAxes, color="#c62828", fontsize=12)
    ax.set_ylabel("ε spent (cumulative)")
    ax.set_ylim(0, max(ax.get_ylim()[1], (budget or target or 0) * 1.35, 1.0))
    _rounds_axis(ax, rounds)
    if nodes or target is not None:  # beside the axes, never over a point
        ax.legend(fontsize=7, ncol=1 + len(nodes) // 12, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title("Privacy: ε per site (partition, node id) against the target")
    return _png(fig)


def _bar_pair(ax: Any, rows: Sequence[Row], bars: Sequence[tuple[str, str, str]],
              *, scale: float = 1.0) -> list[float]:
    """Two bars per round, side by side: (metrics key, label, colour) each."""
    rounds, width, heights = [int(r["round"]) for r in rows], 0.4, []
    for offset, (key, label, color) in zip((-width / 2, width / 2), bars,
                                           strict=True):
        vals = [_num(r, key) * scale for r in rows]
        ax.bar([x + offset for x in rounds], vals, width, label=label, color=color)
        heights += [v for v in vals if not math.isnan(v)]
    _rounds_axis(ax, rounds)
    return heights


def communication(rows: Sequence[Row]) -> bytes:
    """Bytes received from and sent to the sites per round (as on the wire)."""
    fig, ax = plt.subplots(figsize=SIZE)
    heights = _bar_pair(ax, rows, [("bytes_received", "from sites (up)", "#1565c0"),
                                   ("bytes_sent", "to sites (down)", "#90caf9")],
                        scale=1e-6)
    ax.set_ylabel("MB per round (all sites)")
    ax.set_ylim(0, max([*heights, 1e-3]) * 1.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)
    ax.set_title("Communication per round")
    return _png(fig)


def timing(rows: Sequence[Row]) -> bytes:
    """Round wall time next to the sum of the sites' local training times."""
    fig, ax = plt.subplots(figsize=SIZE)
    rounds = [int(r["round"]) for r in rows]
    _bar_pair(ax, rows, [("round_seconds", "round wall time", "#455a64"),
                         ("client_train_seconds_sum",
                          "sum of the sites' training times", "#b0bec5")])
    ax.plot(rounds, [_num(r, "eval_seconds") for r in rows], "o-", color="#ef6c00",
            label="central evaluation")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)
    ax.set_title("Time per round")
    return _png(fig)


def participation_counts(row: Row) -> dict[str, int]:
    """Sampled sites of one round by outcome (they add up to ``clients_sampled``)."""
    failed = int(row.get("clients_failed") or 0)
    declined = int(row.get("clients_declined") or 0)
    return {"accepted": int(row.get("clients_replied") or 0),
            "rejected": int(row.get("clients_rejected") or 0),
            "declined": declined, "failed": max(0, failed - declined),
            "late": int(row.get("clients_late") or 0)}


def participation(rows: Sequence[Row]) -> bytes:
    """Stacked bars: per round, the sampled sites that were accepted, rejected,
    declined (privacy budget), failed, or late."""
    fig, ax = plt.subplots(figsize=SIZE)
    rounds = [int(r["round"]) for r in rows]
    bottom = [0] * len(rows)
    counts = [participation_counts(r) for r in rows]
    for kind, color in COLORS.items():
        vals = [c[kind] for c in counts]
        ax.bar(rounds, vals, 0.6, bottom=bottom, label=kind, color=color)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("sites sampled")
    _rounds_axis(ax, rounds)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max(bottom, default=1) * 1.3 or 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)
    ax.set_title("Participation per round")
    return _png(fig)


def confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], *,
              title: str) -> bytes:
    """The confusion matrix (rows: true class, columns: predicted), each row shaded
    by its share so rare classes read as clearly as common ones."""
    k = len(labels)
    side = min(11.0, 2.5 + 0.42 * k)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    shares = [[c / max(sum(row), 1) for c in row] for row in matrix]
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for t in range(k):
        for p in range(k):
            if matrix[t][p]:
                ax.text(p, t, str(matrix[t][p]), ha="center", va="center",
                        fontsize=7 if k > 10 else 9,
                        color="white" if shares[t][p] > 0.5 else "#222")
    names = [n if len(n) <= 18 else n[:17] + "…" for n in labels]
    ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _png(fig)
