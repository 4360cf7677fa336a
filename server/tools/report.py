"""``fedtune report RUN_DIR``: the operator's report of a run, as text and HTML.

Reads only what the run directory holds (``config.yaml``, ``metrics.jsonl``), so it
works on a finished, a running or a crashed run, on the server host or a copy. The
text summary goes to stdout; ``OUT/index.html`` is one self-contained page (the PNG
plots are embedded as data URIs: no script, no external file or address), and the
same PNGs are written beside it.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedtune.common import adapters, answers, planning
from fedtune.common.errors import FedtuneError
from fedtune.server import rundir
from fedtune.server.runtime import calibrate, personalize
from fedtune.server.runtime.selection import STOPPED
from fedtune.server.runtime.stats import failed_sites, site_label
from fedtune.server.tools import plots
from fedtune.server.tools.runs import (
    Row,
    Run,
    best_round,
    calibration,
    fig,
    load_run,
    mb,
)


def _answers_line(last: Mapping[str, Any], initial: Mapping[str, Any] | None
                  ) -> str:
    """A causal LM's answers after training, beside the zero-shot ones (round 0)."""
    words = answers.words(last)
    if not words:
        return ""
    zero = answers.words(initial or {})
    return f", answers {words}" + (f" (zero-shot, round 0: {zero})" if zero else "")


def round_table(run: Run) -> tuple[list[str], list[list[str]]]:
    """Per round: global eval metrics, participation, bytes, time, epsilon."""
    classification = run.cfg.model.task == "classification"
    quality = ["acc", "macro-F1"] if classification else ["perplexity", "answers"]
    head = ["round", "eval loss", *quality, "accepted/sampled", "rejected",
            "declined", "failed", "late", "MB up", "MB down", "round s",
            "train s (sum)", "ε max", "noise ρ max"]
    body = []
    best = best_round(run)
    for r in ([run.initial] if run.initial else []) + run.rows:
        q = ([fig(r.get("eval_accuracy"), ".3f"), fig(r.get("eval_macro_f1"), ".3f")
              + (" COLLAPSED" if r.get("eval_collapse") else "")]
             if classification else [fig(r.get("eval_perplexity"), ".2f"),
                                     answers.words(r) or "-"])
        if r["round"] == 0:
            body.append(["0 (start)", fig(r.get("eval_loss")), *q] + ["-"] * 11)
            continue
        mark = " (best)" if r["round"] == best else ""
        c = plots.participation_counts(r)
        body.append([f"{r['round']}{mark}", fig(r.get("eval_loss")), *q,
                     f"{c['accepted']}/{r.get('clients_sampled', 0)}",
                     str(c["rejected"]), str(c["declined"]), str(c["failed"]),
                     str(c["late"]), mb(r.get("bytes_received")),
                     mb(r.get("bytes_sent")), fig(r.get("round_seconds"), ".1f"),
                     fig(r.get("client_train_seconds_sum"), ".1f"),
                     fig(r.get("epsilon_max"), ".3f"), fig(r.get("rho_max"), ".3f")])
    return head, body


def class_table(run: Run) -> tuple[list[str], list[list[str]]]:
    """Per class, on the last evaluated round: precision, recall, F1 (a class the
    model never predicts has F1 0 - the signature of a DP collapse)."""
    rows: list[Row] = [run.initial or {}, *run.rows]
    last: Row = next((r for r in reversed(rows) if "eval_macro_f1" in r), {})
    head = ["class", "precision", "recall", "F1"]
    cal = calibration(run)
    tuned: Mapping[str, Any] = cal["eval"] if cal else {}
    if cal:
        head += ["calibrated precision", "recall", "F1"]
    body = []
    for label in run.cfg.data.labels:
        key = label.replace("-", "_")
        if f"eval_recall_{key}" not in last and f"eval_f1_{key}" not in last:
            continue  # absent from the test set
        body.append([label, *(fig(last.get(f"eval_{m}_{key}"), ".3f")
                              for m in ("precision", "recall", "f1")),
                     *((fig(tuned.get(f"{m}-{label}"), ".3f")
                        for m in ("precision", "recall", "f1")) if cal else ())])
    return head, body


def site_table(run: Run) -> tuple[list[str], list[list[str]]]:
    """Per site (node id): epsilon of this run against the target, the ledger's
    total, and the rounds it took part in, declined, failed or was rejected."""
    nodes: dict[str, dict[str, Any]] = {}

    def node(n: str) -> dict[str, Any]:
        return nodes.setdefault(n, {"eps": None, "total": None, "ok": 0,
                                    "declined": 0, "failed": 0, "rejected": [],
                                    "why": ""})

    for r in run.rows:
        for n in r.get("nodes_replied") or []:
            node(n)["ok"] += 1
        for n in r.get("nodes_declined") or []:
            node(n)["declined"] += 1
            node(n)["why"] = (r.get("nodes_declined_why") or {}).get(n, "")
        for n in set(r.get("nodes_failed") or []) - set(r.get("nodes_declined") or []):
            node(n)["failed"] += 1
        for n, why in (r.get("nodes_rejected") or {}).items():
            node(n)["rejected"].append(f"r{r['round']}: {why}")
        for n, eps in (r.get("epsilon_by_node") or {}).items():
            node(n)["eps"] = eps
        for n, eps in (r.get("epsilon_total_by_node") or {}).items():
            node(n)["total"] = eps
    target = run.cfg.privacy.target_epsilon if run.cfg.privacy.enabled else None
    dp: dict[str, Mapping[str, float]] = {}
    weight: dict[str, float] = {}
    sites: dict[str, str] = {}
    for r in run.rows:  # the last round each site trained in
        dp.update(r.get("dp_by_node") or {})
        weight.update(r.get("weight_by_node") or {})
        sites.update(r.get("site_by_node") or {})
    head = ["site (node id)" if sites else "node", "records", "σ", "q", "steps",
            "noise ρ", "weight", "ε this run", "of target", "ledger total",
            "accepted", "declined", "failed", "rejected (why)"]
    body = [[f"{sites[n]} ({n})" if n in sites else n,
             fig(dp.get(n, {}).get("records"), ".0f"),
             fig(dp.get(n, {}).get("sigma"), ".3f"),
             fig(dp.get(n, {}).get("sample_rate"), ".4f"),
             fig(dp.get(n, {}).get("steps"), ".0f"),
             fig(dp.get(n, {}).get("rho"), ".3f"),
             fig(weight.get(n), ".3f"), fig(s["eps"], ".3f"),
             f"{100 * s['eps'] / target:.0f} %" if target and s["eps"] else "-",
             fig(s["total"], ".3f"), str(s["ok"]),
             f"{s['declined']} ({s['why']})" if s["why"] else str(s["declined"]),
             str(s["failed"]), "; ".join(s["rejected"]) or "-"]
            for n, s in sorted(nodes.items(),
                               key=lambda kv: plots.site_order(kv[0], sites))]
    return head, body


def headline(run: Run) -> list[str]:
    """What the run was and its outcome, one fact per line."""
    cfg, last = run.cfg, (run.rows[-1] if run.rows else {})
    fed = cfg.federation
    out = [f"run: {run.path}",
           f"model: {cfg.model.name_or_path} ({cfg.model.task}), trains "
           f"{adapters.describe(cfg)}; strategy {fed.strategy}, "
           f"compression {fed.compression}",
           f"rounds: {len(run.rows)} of {fed.num_rounds} done"
           + ("" if len(run.rows) >= fed.num_rounds else
              f" (stopped early: {last[STOPPED]})" if last.get(STOPPED) else
              " (unfinished: `fedtune simulate --resume RUN_DIR` continues it)")]
    if last.get("best_round"):
        out.append(f"best round: {last['best_round']} by {last['selection_metric']} "
                   f"({fig(last.get('best_value'))}; RUN_DIR/best), chosen on the "
                   "central evaluation set, so its figure there is optimistic")
    names = {n: m for r in run.rows for n, m in (r.get("site_by_node") or {}).items()}
    declined = sorted({n for r in run.rows for n in r.get("nodes_declined") or ()})
    if cfg.privacy.enabled:
        who = ("every site" if not declined else "every site that trained ("
               + ", ".join(site_label(names, n) for n in declined) + " declined)")
        pooled = cfg.privacy.noise == "distributed"  # its rounds: noise shares
        releases = " + ".join({"round": "noise shares" if pooled else "rounds",
                               "noise-share": "noise shares"}.get(k, k) for k in
                              last.get("epsilon_releases") or ["round"])
        how = ("DP-SGD" if cfg.privacy.noise != "distributed" else
               f"distributed noise (one full-batch DP step a round, its noise pooled "
               f"under SecAgg+; up to {cfg.privacy.max_dropped_or_colluding} sites "
               f"may drop out or collude)")
        out.append(f"privacy: {how} on {who}, target "
                   f"ε={cfg.privacy.target_epsilon:g} "
                   f"δ={cfg.privacy.target_delta:g} per site over the run; spent: "
                   f"max ε {fig(last.get('epsilon_max'), '.3f')} (the {releases}: "
                   "what the sites' ledgers hold for this run)")
    else:
        out.append("WARNING: DP is OFF (privacy.enabled=false): the updates of this "
                   "run are not differentially private")
    refused = {n: why for r in run.rows
               for n, why in (r.get("nodes_declined_why") or {}).items()
               if why.startswith("site policy")}
    if refused:
        out.append("WARNING: declined by their own site policy: " + "; ".join(
            f"{site_label(names, n)}: {why}"
            for n, why in sorted(refused.items())))
    if last.get("eval_collapse"):
        out.append(f"WARNING: COLLAPSED in round {last['round']}: the global model "
                   f"{last['eval_collapse']}; under DP this means the noise drowned "
                   "the signal (`fedtune plan` says what would help)")
    if last.get("rho_max") is not None:
        task = run.cfg.model.task
        words = planning.verdict(last["rho_max"], task)
        agg = last.get("rho_aggregate")
        federation = ("" if agg is None else
                      f"; the aggregate's ρ {agg:.3f}: {planning.verdict(agg, task)}")
        out.append(f"DP noise: round noise ratio ρ max {last['rho_max']:.3f} "
                   f"({words} on its own{federation}; ρ = σ·√dims / (batch·√steps), "
                   "the noise over the signal of a site's round)")
    if last:
        quality = (f"accuracy {fig(last.get('eval_accuracy'), '.3f')}, macro-F1 "
                   f"{fig(last.get('eval_macro_f1'), '.3f')}"
                   if cfg.model.task == "classification" else
                   f"perplexity {fig(last.get('eval_perplexity'), '.2f')}"
                   + _answers_line(last, run.initial))
        total = sum((r.get("bytes_received") or 0) + (r.get("bytes_sent") or 0)
                    for r in run.rows)
        out.append(f"final (round {last['round']}): eval loss "
                   f"{fig(last.get('eval_loss'))}, {quality}; {total / 1e6:.1f} MB "
                   "exchanged in all")
    cal = calibration(run)
    if cal:
        ev, balanced = cal["eval"], cal["candidates"][0]["test"]
        out.append(f"decision calibration (round {cal['round']}, validation "
                   f"{cal.get('release', 'counts')} of {cal['sites']} sites under "
                   f"DP): strength {cal['strength']:g}"
                   f" of the logit adjustment τ={cal['logit_adjustment']:g}, "
                   f"decisions at τ={cal['effective_adjustment']:g}: accuracy "
                   f"{fig(ev.get('accuracy'), '.3f')}, macro-F1 "
                   f"{fig(ev.get('macro-f1'), '.3f')} (balanced, strength 0: "
                   f"{fig(balanced.get('macro-f1'), '.3f')})")
    base = run.initial or {}
    if base.get("head_init") == "labels" and base.get("eval_macro_f1") is not None:
        out.append(f"zero-shot (round 0: the head from the label "
                   f"{base.get('head_init_from', 'names')}' embeddings, no privacy "
                   f"spent): accuracy {fig(base.get('eval_accuracy'), '.3f')}, "
                   f"macro-F1 {fig(base.get('eval_macro_f1'), '.3f')}")
    if base.get("retention_perplexity") is not None and last.get(
            "retention_perplexity") is not None:
        before, after = base["retention_perplexity"], last["retention_perplexity"]
        out.append(f"{'WARNING: ' if after > 1.1 * before else ''}retention "
                   f"(general text, {cfg.data.retention_source}): perplexity "
                   f"{before:.2f} before training, {after:.2f} after round "
                   f"{last['round']} ({after / before - 1:+.1%})"
                   + ("; fine-tuning damaged general ability" if after > 1.1 * before
                      else ""))
    if base.get("baseline_majority_macro_f1") is not None:
        out.append("majority-class baseline (always the held-out set's most frequent "
                   "class): accuracy "
                   f"{fig(base.get('baseline_majority_accuracy'), '.3f')}, macro-F1 "
                   f"{fig(base.get('baseline_majority_macro_f1'), '.3f')}")
    personal = run.personal or {}
    mean = personal.get("mean") or {}
    if mean:
        key = "macro-f1" if "macro-f1" in mean["global"] else "eval-loss"
        eps = personal.get("epsilon")
        out.append(f"personalisation ({len(personal['sites'])} sites, local "
                   f"fine-tuning{f', ε {eps:g} more each' if eps else ''}): mean "
                   f"{key} on the sites' own held-out records "
                   f"{mean['global'][key]:.3f} global -> "
                   f"{mean['personalised'][key]:.3f} personalised")
    failed = failed_sites(((r["round"], r.get("nodes_failed_why") or {})
                           for r in run.rows),
                          {k: v for r in run.rows
                           for k, v in (r.get("site_by_node") or {}).items()})
    if failed:
        out.append(f"failed sites: {failed}")
    by_node = last.get("epsilon_by_node") or {}
    if by_node:
        out.append(f"epsilon per site: {len(by_node)} sites, "
                   f"{min(by_node.values()):.3f} to {max(by_node.values()):.3f} "
                   f"(δ={cfg.privacy.target_delta:g})")
    logs = log_files(run)
    if logs:
        out.append("logs (what the terminal did not show): " + ", ".join(
            f"{p} ({LOG_WORDS[p.name]})" for p in logs))
    return out


LOG_WORDS = {rundir.RUN_LOG: "every line of the run: each round's per-site "
             "details, Flower's own", rundir.SITES_LOG: "the sites' output",
             rundir.PLAN_FILE: "every site's plan"}


def log_files(run: Run) -> list[Path]:
    """The run's logs and full plan, where the run wrote them."""
    logs = run.path / rundir.LOG_DIR
    found = [logs / rundir.RUN_LOG, logs / rundir.SITES_LOG,
             run.path / rundir.PLAN_FILE]
    return [p for p in found if p.is_file()] if logs.is_dir() else []


def _text_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
              for r in body]
    return "\n".join(lines)


def text_summary(run: Run) -> str:
    """The report as plain text (what `fedtune report` prints)."""
    parts = ["\n".join(headline(run)), "Per round:", _text_table(*round_table(run)),
             "Per site:", _text_table(*site_table(run))]
    classes = class_table(run)
    if classes[1]:
        parts += ["Per class (last round):", _text_table(*classes)]
    cal = calibration(run)
    if cal:
        parts.append("\n".join(calibrate.table_lines(dict(cal))))
    if run.personal and run.personal.get("sites"):
        parts.append("\n".join(personalize.table_lines(dict(run.personal))))
    return "\n\n".join(parts) + "\n"


FIGURES: dict[str, tuple[str, Callable[[Run], bytes]]] = {
    "quality": ("Global eval loss, accuracy and macro-F1 per round",
                lambda run: plots.quality(([run.initial] if run.initial else [])
                                          + run.rows, best=best_round(run))),
    "privacy": ("ε spent per site against the target", lambda run: plots.privacy(
        run.rows, target=(run.cfg.privacy.target_epsilon
                          if run.cfg.privacy.enabled else None),
        budget=run.cfg.privacy.budget_epsilon or None)),
    "communication": ("Bytes per round", lambda run: plots.communication(run.rows)),
    "timing": ("Round wall time and site training time",
               lambda run: plots.timing(run.rows)),
    "participation": ("Sites that took part, declined, failed or were rejected",
                      lambda run: plots.participation(run.rows)),
}

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;
color:#222}h1{font-size:1.5em}table{border-collapse:collapse;font-size:.85em;
margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2}td:first-child{text-align:left}.warn{background:#ffebee;
border-left:5px solid #c62828;padding:.6em 1em}figure{margin:1.5em 0}
img{max-width:100%;border:1px solid #ddd}ul.facts{line-height:1.6}"""


def _html_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r)
                   + "</tr>" for r in body)
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + f"</tr>{rows}</table>")


def _personal_html(run: Run) -> str:
    """The personalisation table (global vs personalised, per site)."""
    if not run.personal or not run.personal.get("sites"):
        return ""
    sites = run.personal["sites"]
    keys = list(next(iter(sites.values()))["global"])
    head = ["site", "records", *(f"{k} global → personalised" for k in keys), "ε"]
    body = [[f"{s.get('site', '')} {node}".strip(), str(s["records"]),
             *(f"{s['global'][k]:.4f} → {s['personalised'][k]:.4f}" for k in keys),
             fig(s.get("epsilon"), ".3f")] for node, s in sorted(sites.items())]
    return (f"<h2>Personalisation</h2><p>{html.escape(run.personal['method'])}, "
            f"from round {run.personal['round']}; the personalised adapters stay "
            f"on the sites.</p>{_html_table(head, body)}")


def _logs_html(run: Run) -> str:
    """Links to the run's logs (absolute: the page may be written elsewhere)."""
    logs = log_files(run)
    if not logs:
        return ""
    items = "".join(f"<li><a href=\"{html.escape(p.resolve().as_uri())}\">"
                    f"{html.escape(p.name)}</a>: {html.escape(LOG_WORDS[p.name])}"
                    "</li>" for p in logs)
    return f"<h2>Logs</h2><ul>{items}</ul>"


def render_html(run: Run, pngs: Mapping[str, bytes]) -> str:
    """The self-contained page: facts, figures (data URIs) and both tables."""
    facts = "".join(
        f"<li class=warn>{html.escape(f)}</li>" if f.startswith("WARNING") else
        f"<li>{html.escape(f)}</li>" for f in headline(run))
    figures = "".join(
        f"<figure><img alt=\"{html.escape(FIGURES[name][0])}\" src=\"data:image/png;"
        f"base64,{base64.b64encode(png).decode('ascii')}\"><figcaption>"
        f"{html.escape(FIGURES[name][0])}</figcaption></figure>"
        for name, png in pngs.items())
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>fedtune "
            f"report: {html.escape(run.path.name)}</title><style>{CSS}</style>"
            f"</head><body><h1>fedtune report: {html.escape(run.path.name)}</h1>"
            f"<ul class=facts>{facts}</ul>{figures}<h2>Per round</h2>"
            f"{_html_table(*round_table(run))}<h2>Per class (last round)</h2>"
            f"{_html_table(*class_table(run))}{_personal_html(run)}<h2>Per site</h2>"
            f"{_html_table(*site_table(run))}<p>Node ids are Flower's; the plots "
            "label each by its last 6 digits (a simulated site: by its partition). "
            "ε this run is the site's own accountant over this run; the ledger "
            f"total covers every run on the site's data.</p>{_logs_html(run)}"
            "</body></html>")


def write_report(run_dir: str | Path, out: str | Path | None = None
                 ) -> tuple[Path, str]:
    """Write ``OUT/index.html`` and ``OUT/<figure>.png`` (``OUT`` defaults to
    ``RUN_DIR/report``); returns the page's path and the text summary."""
    run = load_run(run_dir)
    if not run.rows and run.initial is None:
        raise FedtuneError(f"{run.path}/metrics.jsonl has no rounds yet; run the "
                           "report again once round 0 is recorded")
    target = Path(out) if out else run.path / rundir.REPORT_DIR
    target.mkdir(parents=True, exist_ok=True)
    pngs = {name: make(run) for name, (_, make) in FIGURES.items()}
    for name, png in pngs.items():
        (target / f"{name}.png").write_bytes(png)
    page = target / rundir.REPORT_PAGE
    page.write_text(render_html(run, pngs), encoding="utf-8")
    return page, text_summary(run)
