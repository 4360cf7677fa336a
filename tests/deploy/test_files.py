"""deploy/ holds no Python, so check what it would run against fedtune's own CLI."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from fedtune.simulations.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _parses(argv: list[str]) -> None:
    build_parser().parse_args(argv)  # SystemExit(2) on an unknown flag


def test_compose_publishes_only_the_fleet_api() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    services = compose["services"]
    published = {name: svc.get("ports", []) for name, svc in services.items()}
    assert published.pop("superlink") == ["9092:9092"]
    assert not any(published.values())
    assert services["operator"]["network_mode"] == "service:superlink"
    for name in ("hospital-1", "hospital-2", "hospital-3"):
        _parses(["client", *services[name]["command"]])
        assert f"/keys/{name}.key" in services[name]["command"]
    for svc in services.values():
        dockerfile = svc.get("build", {}).get("dockerfile")
        if dockerfile:
            assert (DEPLOY.parent / dockerfile).is_file()


def test_dockerfile_commands_parse() -> None:
    text = (DEPLOY / "docker" / "server.Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*?\])$", text.replace("\\\n", ""),
                               re.M | re.S).group(1))  # type: ignore[union-attr]
    _parses(cmd)
    assert cmd[cmd.index("--control-address") + 1].startswith("127.0.0.1:")


def test_systemd_units_use_real_flags() -> None:
    env = dict(line.split("=", 1) for line in
               (DEPLOY / "systemd" / "client.env").read_text().splitlines()
               if line and not line.startswith("#"))
    for unit, sub in (("fedtune-client.service", "client"),
                      ("fedtune-server.service", "server")):
        text = (DEPLOY / "systemd" / unit).read_text().replace("\\\n", " ")
        exec_start = re.search(r"^ExecStart=(.*)$", text, re.M)
        assert exec_start is not None
        argv = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)],
                                  exec_start.group(1)))
        assert argv[0].endswith("/fedtune") and argv[1] == sub
        _parses(argv[1:])
        assert "RestartPreventExitStatus=2" in text
