"""``fedtune server``: secure by default, loud when not, Control API kept private."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.common import keys
from fedtune.common.errors import DeploymentError, KeyMaterialError
from fedtune.server.operations.daemon import ServerOptions, superlink_command
from fedtune.server.rundir import RUNS_DIR_ENV
from fedtune.simulations.cli import main


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    keys.create_ca(tmp_path / "certs")
    keys.create_server_cert(tmp_path / "certs", tmp_path / "certs",
                            names=["127.0.0.1"])
    return tmp_path / "certs"


def test_secure_command(certs: Path, tmp_path: Path) -> None:
    argv, env = superlink_command(ServerOptions(certs=certs,
                                                state_dir=tmp_path / "state"))
    assert argv[0].endswith("flower-superlink")
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation",
                 "--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"):
        assert flag in argv
    assert "--insecure" not in argv
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--database") + 1] == str(
        (tmp_path / "state" / "superlink.db").resolve())
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert Path(env[RUNS_DIR_ENV]).is_dir()


def test_insecure_needs_the_flag_and_is_marked(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="pass --insecure explicitly"):
        superlink_command(ServerOptions(certs=None, state_dir=tmp_path))
    argv, env = superlink_command(ServerOptions(certs=None, insecure=True,
                                                state_dir=tmp_path))
    assert "--insecure" in argv and "--enable-supernode-auth" not in argv
    assert env["FEDTUNE_INSECURE"] == "1"  # the ServerApp warns every round


@pytest.mark.parametrize(("options", "match"), [
    ({"control_address": "0.0.0.0:9093"}, "not a loopback or private address"),
    ({"control_address": "8.8.8.8:9093"}, "not a loopback or private address"),
    ({"control_address": "localhost"}, "is not HOST:PORT"),
    ({"fleet_address": "127.0.0.1:9093"}, "must differ"),
])
def test_bad_addresses(certs: Path, tmp_path: Path, options: dict, match: str
                       ) -> None:
    with pytest.raises(DeploymentError, match=match):
        superlink_command(ServerOptions(certs=certs, state_dir=tmp_path, **options))


def test_missing_certificates_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture
                                     ) -> None:
    code = main(["server", "--certs", str(tmp_path / "nope"), "--state-dir",
                 str(tmp_path / "s")])
    assert code == 2
    assert "missing TLS file(s)" in capsys.readouterr().err


def test_a_corrupt_server_certificate_is_named_as_such(certs: Path, tmp_path: Path
                                                       ) -> None:
    (certs / "server.crt").write_text("not a certificate")
    with pytest.raises(KeyMaterialError, match="it should be the server certificate: "
                       "sign one with `fedtune keys server"):
        superlink_command(ServerOptions(certs=certs, state_dir=tmp_path / "s"))
