"""``fedtune client``: every site input is checked before the daemon connects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.client.node.daemon import ClientOptions, supernode_command
from fedtune.common import keys
from fedtune.common.errors import FedtuneError
from fedtune.simulations.cli import main


@pytest.fixture
def site(tmp_path: Path, review_files: tuple[Path, Path]) -> dict:
    keys.create_ca(tmp_path / "certs")
    key, _ = keys.create_node_key(tmp_path / "keys", "h1")
    return {"superlink": "127.0.0.1:9092", "data_path": review_files[0],
            "ledger_dir": tmp_path / "ledger", "ca_cert": tmp_path / "certs/ca.crt",
            "node_key": key, "device": "cpu", "state_dir": tmp_path / "state"}


def test_node_config_carries_paths_not_data(site: dict) -> None:
    argv, env = supernode_command(ClientOptions(**site))
    assert argv[0].endswith("flower-supernode")
    node_config = argv[argv.index("--node-config") + 1]
    assert f'data-path="{site["data_path"].resolve()}"' in node_config
    assert 'device="cpu"' in node_config and "ledger-dir=" in node_config
    assert "--insecure" not in argv and "--auth-supernode-private-key" in argv
    assert site["ledger_dir"].is_dir() and env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert "good" not in " ".join(argv)  # no review text on the command line
    assert "lora-rank" not in node_config
    argv, _ = supernode_command(ClientOptions(**{**site, "lora_rank": 4}))
    assert argv[argv.index("--node-config") + 1].endswith(" lora-rank=4")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD = {
    "missing data": (lambda t: {"data_path": t / "none.jsonl"}, "no such file"),
    "bad json": (lambda t: {"data_path": _write(t / "b.jsonl", "{oops\n")},
                 "not valid JSON"),
    "empty data": (lambda t: {"data_path": _write(t / "e.csv", "")},
                   "the file is empty"),
    "ledger is a file": (lambda t: {"ledger_dir": _write(t / "f", "x") / "sub"},
                         "--ledger-dir .* is not a writable directory"),
    "missing ca": (lambda t: {"ca_cert": t / "none.crt"}, "ask the operator"),
    "no ca": (lambda t: {"ca_cert": None}, "--ca-cert and --key are required"),
    "wrong key": (lambda t: {"node_key": t / "certs/ca.crt"},
                  "not an unencrypted OpenSSH private key"),
    "bad device": (lambda t: {"device": "tpu"}, "is not a device|use auto, cpu"),
    "public clientappio": (lambda t: {"clientappio_address": "0.0.0.0:9094"},
                           "must be a loopback address"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_site_inputs_are_named(site: dict, tmp_path: Path, case: str) -> None:
    change, match = BAD[case]
    with pytest.raises(FedtuneError, match=match):
        supernode_command(ClientOptions(**{**site, **change(tmp_path)}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_refused(site: dict) -> None:
    with pytest.raises(FedtuneError, match="no CUDA device is visible"):
        supernode_command(ClientOptions(**{**site, "device": "cuda"}))


def test_cli_exits_2_naming_the_file(site: dict, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    code = main(["client", "--superlink", "127.0.0.1:9092", "--data",
                 str(tmp_path / "absent.jsonl"), "--ledger-dir", str(tmp_path / "l"),
                 "--ca-cert", str(site["ca_cert"]), "--key", str(site["node_key"])])
    assert code == 2
    assert "absent.jsonl: no such file" in capsys.readouterr().err
