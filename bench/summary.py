"""The headline ratio of every benchmark, read from a results folder.

    python bench/summary.py [DIR]        # default bench/results; bench/run_all uses it

Reads whichever of the six result files exist (full or ``-quick``) and prints one
line per benchmark; a missing file is reported as missing.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from harness import RESULTS


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    for stem in (name, f"{name}-quick"):
        path = folder / f"{stem}.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def dp(d: dict[str, Any]) -> str:
    parts = []
    for r in d["results"]:
        if r["mode"] == d["default_mode"] and r["ratio"]:
            parts.append(f"{r['model'].split()[0]} L={r['seq_len']}: {r['ratio']:.2f}x")
    best = set(d["fastest_correct_mode"].values())
    return (f"DP step / non-DP step ({d['default_mode']}): " + ", ".join(parts)
            + f"; fastest correct mode: {', '.join(sorted(best))}")


def comm(d: dict[str, Any]) -> str:
    return "bytes sent / full model: " + ", ".join(
        f"{r['model'].split()[0]} {r['variant']} "
        f"{100 * r['payload_over_full_model']:.3f} %"
        for r in d["results"] if r["variant"] in ("fp32 adapter", "int8 delta",
                                                  "FFA + int8"))


def framework(d: dict[str, Any]) -> str:
    return "round wall / sum of site training: " + ", ".join(
        f"{r['mode']} {r['median_ratio_after_round1']:.2f}" for r in d["results"])


def utility(d: dict[str, Any]) -> str:
    h = (d.get("headline_federated_dp8_over_best_central_nonprivate")
         or d.get("headline_federated_dp8_over_central_nonprivate"))
    curve = ", ".join(f"{r['setting'][:3]} ε={r['epsilon_target']:g} acc "
                      f"{r['accuracy']:.3f}/F1 {r['macro_f1']:.3f}"
                      for r in d["results"])
    head = (f"federated DP(8) / best centralized non-private: macro-F1 "
            f"{h['macro_f1_ratio']:.3f}, accuracy {h['accuracy_ratio']:.3f}; "
            if h else "")
    return head + curve


def repeats(d: dict[str, Any]) -> str:
    """The default's spread over repeated runs (bench/repeats.py), then each
    stabiliser's."""
    arms = {a["arm"]: a for a in d["arms"]}
    first = arms.get("default") or next(iter(arms.values()))

    def words(a: dict[str, Any]) -> str:
        sd = "-" if a["sd"] is None else f"{a['sd']:.4f}"
        ratio = "-" if a["ratio"] is None else f"{a['ratio']:.3f}"
        return f"mean {a['mean']:.4f} sd {sd} n {a['n']} ratio {ratio}"

    others = "; ".join(f"{k}: {words(a)}" for k, a in arms.items() if a is not first)
    return words(first) + (f" (arms: {others})" if others else "")


def scale(d: dict[str, Any]) -> str:
    return ("peak memory " + ", ".join(
        f"{r['clients']} sites {r['peak_pss_mib']:.0f} MiB / {r['median_round_s']:.1f}"
        " s per round" for r in d["results"])
        + f"; largest / smallest {d['memory_growth_largest_over_smallest']:.2f}")


def deploy(d: dict[str, Any]) -> str:
    cold, warm = d["deployed"][0], d["deployed"][-1]
    thin = d.get("thin_start", {}).get("wall_s", math.nan)
    return (f"overhead per round {cold['median_overhead_s']:.2f} s without the site "
            f"worker, {warm['median_overhead_s']:.2f} s with it; model loads "
            f"{cold.get('model_loads', '?')} -> {warm.get('model_loads', '?')}; "
            f"ClientApp start {d['cold_start']['wall_s']:.2f} -> {thin:.2f} s")


def sft(d: dict[str, Any]) -> str:
    """The instruct scenario's best DP row (bench/sft_map.py, full scale) against
    the same method without DP."""
    full = [r for r in d["rows"] if "@" not in r["method"]]
    dp = [r for r in full if r["dp"]]
    if not dp:
        return "no DP row"
    best = max(dp, key=lambda r: r["exact_match_mean"])
    nodp = next((r for r in full if r["method"] == best["method"] and not r["dp"]),
                None)
    ratio = (f"{best['exact_match_mean'] / nodp['exact_match_mean']:.3f}"
             if nodp and nodp["exact_match_mean"] else "-")
    return (f"dp exact {best['exact_match_mean']:.3f} ({best['method']}, "
            f"{best['runs']} runs) nodp exact "
            f"{nodp['exact_match_mean'] if nodp else float('nan'):.3f} ratio {ratio}")


def pooled(d: dict[str, Any]) -> str:
    """Local against distributed noise on the head (bench/pooled_noise.py)."""
    head = {r["noise"]: r for r in d["rows"] if r["recipe"] == "head"
            and (r["noise"] == "distributed" or not r.get("secagg"))}
    if not {"local", "distributed"} <= set(head):
        return "a local or a distributed head row is missing"
    loc, dist = head["local"], head["distributed"]
    return (f"head macro-F1 local {loc['macro_f1_mean']:.3f} distributed "
            f"{dist['macro_f1_mean']:.3f} ({dist['runs']} runs); aggregate rho "
            f"{loc['aggregate_rho']:.4f} -> {dist['aggregate_rho']:.4f}")


BENCHES = {"dp_overhead": dp, "communication": comm, "framework_overhead": framework,
           "privacy_utility": utility, "scale": scale, "deploy_overhead": deploy}


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    for name, line in BENCHES.items():
        d = _load(folder, name)
        text = line(d) if d else "missing (its script did not run or failed)"
        device = f" [{d['device']}]" if d else ""
        print(f"{name:>18}: {text}{device}")
    # many full runs: read from the committed results when OUT has none
    d = _load(folder, "privacy_utility_repeats") or _load(RESULTS,
                                                        "privacy_utility_repeats")
    print("privacy_utility repeats: " + (repeats(d) if d else "missing (run "
                                         "bench/repeats.py)"))
    d = _load(folder, "sft_map") or _load(RESULTS, "sft_map")
    print("sft: " + (sft(d) if d else "missing (run bench/sft_map.py)"))
    d = _load(folder, "pooled_noise") or _load(RESULTS, "pooled_noise")
    print("pooled: " + (pooled(d) if d else "missing (run bench/pooled_noise.py)"))


if __name__ == "__main__":
    main()
