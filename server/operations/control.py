"""The operator's side: named deployments, ``fedtune run``, ``fedtune status``, node
registration. Each step is a call of Flower's own ``flwr`` CLI against the SuperLink's
Control API, with its connection settings kept under ``$FEDTUNE_HOME/flwr``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from fedtune.common import deployment
from fedtune.common.config import (
    PAST_STOP,
    RESUME,
    RUN_PATH,
    SITE_LABELS,
    RunConfig,
    site_labels_value,
    to_run_config,
)
from fedtune.common.errors import DeploymentError

logger = logging.getLogger(__name__)
_DUPLICATE = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:[A-Z]+:")
_ROUND = re.compile(r"\[ROUND (\d+)/(\d+)\]")
_RUN_DIR = re.compile(r"run directory: (\S+)")
_EPSILON = re.compile(r"(?:eps max|epsilon max) (\d+\.\d+)")
LABELS_FILE = "fedtune-sites.json"  # beside Flower's config.toml: node labels


def home() -> Path:
    """fedtune's per-user state: ``$FEDTUNE_HOME`` or ``~/.fedtune``."""
    return Path(os.environ.get("FEDTUNE_HOME", "~/.fedtune")).expanduser()


def _flwr_home() -> Path:
    return home() / "flwr"


def _config_path() -> Path:
    return _flwr_home() / "config.toml"


def _read_config() -> dict[str, Any]:
    path = _config_path()
    if not path.is_file():
        return {"superlink": {}}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, OSError) as err:
        raise DeploymentError(f"{path} is not valid TOML ({err}); fix or delete it "
                              "and add the deployments again") from None


def add_deployment(name: str, *, control: str, ca_cert: Path | None,
                   insecure: bool = False) -> None:
    """Remember how to reach a SuperLink's Control API under ``name``."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise DeploymentError(f"deployment name {name!r}: use letters, digits, - or _")
    deployment.split_address(control, what="--control")
    entry: dict[str, Any] = {"address": control}
    if insecure:
        logger.warning("deployment %s: Control API without TLS (--insecure)", name)
        entry["insecure"] = True
    elif ca_cert is None or not ca_cert.is_file():
        raise DeploymentError(f"--ca-cert {ca_cert}: the federation's CA certificate "
                              "is required (or --insecure for a test SuperLink)")
    else:
        entry["root-certificates"] = str(ca_cert.resolve())
    doc = _read_config()
    doc.setdefault("superlink", {})[name] = entry
    doc["superlink"].setdefault("default", name)
    _flwr_home().mkdir(parents=True, exist_ok=True)
    _config_path().write_text(tomli_w.dumps(doc))


def deployments() -> dict[str, dict[str, Any]]:
    """Named deployments and their settings."""
    return {k: v for k, v in _read_config().get("superlink", {}).items()
            if isinstance(v, dict)}


def _check_name(name: str) -> None:
    if name not in deployments():
        raise DeploymentError(
            f"unknown deployment {name!r}; add it with `fedtune deployment add {name} "
            "--control HOST:PORT --ca-cert ca.crt` (known: "
            f"{sorted(deployments()) or 'none'})")


def _flwr(args: Sequence[str], *, name: str, json_out: bool = True) -> Any:
    """Run ``flwr ARGS NAME`` and return its JSON answer (or raise with its words)."""
    _check_name(name)
    argv = [deployment.executable("flwr"), *args, name]
    if json_out:
        argv += ["--format", "json"]
    env = deployment.flower_env(home=_flwr_home())
    proc = subprocess.run(argv, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    out = proc.stdout.strip()
    if json_out:
        start = out.find("{")
        try:
            answer = json.loads(out[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            answer = {}
        if proc.returncode == 0 and answer.get("success", False):
            return answer
        reason = answer.get("error-message") or (proc.stderr or out)[-600:]
        raise DeploymentError(f"`flwr {' '.join(args)}` on deployment {name!r} "
                              f"failed: {reason.strip()}")
    return proc


def register_node(public_key: Path, *, name: str, label: str | None = None) -> int:
    """Register a hospital's public key with the SuperLink; returns its node id.
    ``label`` names the site in every run's logs, metrics and report, and in
    ``fedtune status`` (kept in ``$FEDTUNE_HOME/flwr/fedtune-sites.json``)."""
    from fedtune.common import keys

    keys.check_public_key(public_key)
    args = ["supernode", "register", str(public_key.resolve())]
    answer = _flwr(args + (["--name", label] if label else []), name=name)
    node_id = int(answer["node-id"])
    if label:
        doc = _read_labels()
        doc.setdefault(name, {})[str(node_id)] = label
        path = _flwr_home() / LABELS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return node_id


def _read_labels() -> dict[str, dict[str, str]]:
    path = _flwr_home() / LABELS_FILE
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DeploymentError(f"{path} is not valid JSON ({err}); fix it, or delete "
                              "it and register the nodes' labels again") from None
    return {str(k): {str(n): str(v) for n, v in vals.items()}
            for k, vals in doc.items() if isinstance(vals, dict)}


def labels(name: str) -> dict[str, str]:
    """The labels registered on deployment ``name``, by node id."""
    return _read_labels().get(name, {})


def unregister_node(node_id: int, *, name: str) -> None:
    """Remove a node: its key no longer authenticates."""
    _flwr(["supernode", "unregister", str(node_id)], name=name)


def nodes(name: str) -> list[dict[str, Any]]:
    """The SuperLink's nodes (id, status, online since ...)."""
    return list(_flwr(["supernode", "list"], name=name).get("nodes", []))


def runs(name: str) -> list[dict[str, Any]]:
    """The SuperLink's runs, newest first."""
    found = list(_flwr(["list"], name=name).get("runs", []))
    return sorted(found, key=lambda r: str(r.get("pending-at", "")), reverse=True)


def write_app(cfg: RunConfig, dest: Path, *, run_path: Path | None,
              resume: bool = False, past_stop: bool = False,
              site_labels: dict[str, str] | None = None) -> Path:
    """A Flower App directory: just a pyproject.toml whose components are fedtune's
    installed apps and whose config is this run's flat run_config."""
    flat: dict[str, Any] = dict(to_run_config(cfg))
    if run_path is not None:
        flat[RUN_PATH] = str(run_path)
    if resume:
        flat[RESUME] = True
    if past_stop:
        flat[PAST_STOP] = True
    if site_labels:
        flat[SITE_LABELS] = site_labels_value(site_labels)
    from importlib.metadata import version

    doc = {"build-system": {"requires": ["hatchling"],
                            "build-backend": "hatchling.build"},
           "project": {"name": "fedtune-run", "version": version("fedtune"),
                       "dependencies": []},
           "tool": {"flwr": {"app": {
               "publisher": "fedtune",
               "components": {"serverapp": "fedtune.server.runtime.app:app",
                              "clientapp": "fedtune.client.node.forwarder:app"},
               "config": flat}}}}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(tomli_w.dumps(doc))
    return dest


def submit(cfg: RunConfig, *, name: str, run_path: Path | None,
           resume: bool = False, past_stop: bool = False) -> int:
    """Start a run on the deployment; returns Flower's run id. ``resume``
    continues ``run_path`` (a directory on the server host) from its saved state."""
    with tempfile.TemporaryDirectory(prefix="fedtune-app-") as tmp:
        app_dir = write_app(cfg, Path(tmp), run_path=run_path, resume=resume,
                            site_labels=labels(name),
                            past_stop=past_stop)
        answer = _flwr(["run", str(app_dir)], name=name)
    return int(answer["run-id"])


BENIGN = deployment.FLOWER_NOISE  # they stay in `flwr log RUN_ID`
_RAISED = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exhausted)): (.*)")
_FLOWER_EXIT = ("Exit Code:", "For more information, visit:")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def operator_lines(lines: Iterable[str]) -> Iterator[str]:
    """The run's log as the operator's terminal shows it: Flower's duplicate and
    benign lines dropped, and a ServerApp's failure as one line (its error, which
    names the problem and the fix) instead of a traceback and Flower's exit-code
    text. The full log stays in ``flwr log RUN_ID``."""
    in_trace = in_exit = failed = False
    for line in lines:
        plain = _ANSI.sub("", line)
        if _FLOWER_EXIT[0] in plain:  # Flower's exit-code text, to its link
            in_exit = True
        if _DUPLICATE.match(plain) or any(b in plain for b in BENIGN):
            continue
        if plain.startswith("Traceback (most recent call last)"):
            in_trace = True
            continue
        if in_trace:
            raised = _RAISED.match(plain)
            if raised:
                in_trace = False
                if not failed:
                    failed = True
                    yield (f"the run failed: {raised.group(1)}: "
                           f"{raised.group(2).strip()}\n")
            continue
        if in_exit:
            in_exit = _FLOWER_EXIT[1] not in plain
            continue
        if "raised an exception" in plain or "failed with exception" in plain:
            continue
        yield line


def stream(run_id: int, *, name: str) -> str:
    """Print the run's log as it happens (:func:`operator_lines`); return its
    final Flower status."""
    _check_name(name)
    argv = [deployment.executable("flwr"), "log", str(run_id), name, "--stream"]
    env = deployment.flower_env(home=_flwr_home())
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in operator_lines(proc.stdout):
            sys.stdout.write(line)
            sys.stdout.flush()
    return run_status(run_id, name=name)


def run_status(run_id: int, *, name: str) -> str:
    """Flower's status of one run, e.g. ``finished:completed``."""
    found = _flwr(["list", "--run-id", str(run_id)], name=name).get("runs", [])
    return str(found[0]["status"]) if found else "unknown"


def progress(run_id: int, *, name: str) -> dict[str, Any]:
    """What the run's log says: the last round started and the rounds planned,
    the run directory, and the sites' max epsilon so far (each site's ledger
    total for this run: the round lines, then the calibration's and the
    personalisation's)."""
    proc = _flwr(["log", str(run_id), "--show"], name=name, json_out=False)
    text = proc.stdout if isinstance(proc, subprocess.CompletedProcess) else ""
    rounds = _ROUND.findall(text)
    where = _RUN_DIR.findall(text)
    eps = _EPSILON.findall(text)
    last, total = (int(rounds[-1][0]), int(rounds[-1][1])) if rounds else (0, 0)
    return {"round": last, "rounds": total, "run_dir": where[-1] if where else None,
            "epsilon": float(eps[-1]) if eps else None}


def run_line(run: dict[str, Any], *, name: str) -> str:
    """One run as ``fedtune status`` shows it: a failed run says so."""
    rid = int(run["run-id"])
    status = str(run.get("status", ""))
    line = f"  {rid}  {status:<20} {float(run.get('elapsed', 0)):.0f} s"
    if not status.startswith(("running", "finished")):
        return line
    got = progress(rid, name=name)
    where = got["run_dir"] or ("no run directory (the run failed before the "
                               "server made one)")
    at = f"round {got['round']}/{got['rounds']}"
    if status.startswith("finished:") and status != "finished:completed":
        at = f"FAILED at {at}" if got["round"] else "FAILED before round 1"
    eps = "" if got["epsilon"] is None else f"  ε max {got['epsilon']:.3f}"
    return f"{line}  {at}{eps}  {where}"


def status_text(name: str) -> str:
    """Nodes (by their labels) and runs of a deployment, as the operator reads
    them."""
    _check_name(name)
    lines = [f"deployment {name}: {deployments()[name]['address']}"]
    node_list = nodes(name)
    named = labels(name)
    online = [n for n in node_list if n.get("status") == "online"]
    lines.append(f"nodes: {len(online)} online of {len(node_list)} registered")
    for n in node_list:
        label = named.get(str(n.get("node-id")), "-")
        lines.append(f"  {n.get('node-id')}  {n.get('status'):<10} "
                     f"online since {n.get('online-at')}  {label}")
    run_list = runs(name)
    lines.append(f"runs: {len(run_list)}")
    lines += [run_line(r, name=name) for r in run_list[:5]]
    return "\n".join(lines)
