"""The simulation's Ray engine and console, without starting Ray (the cluster
itself: tests/integration/test_ray_cluster.py)."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from fedtune.common import config
from fedtune.common.deployment import DETAIL
from fedtune.common.errors import FedtuneError
from fedtune.simulations import console, engine


def _fed(**values: object) -> config.FederationConfig:
    return config.from_dict({"federation": values}).federation


def test_sites_fit_per_node_and_gpus_bound_them() -> None:
    nodes = [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 4.0}]
    assert engine.pool_size(nodes, cpus=1, gpus=0) == 20
    assert engine.pool_size(nodes, cpus=3, gpus=0) == 6
    assert engine.pool_size(nodes, cpus=1, gpus=0.5) == 4  # GPU-less node: none


def test_a_gpu_per_site_on_a_cluster_without_gpus_is_refused_quoting_it() -> None:
    # Prepare
    nodes = [{"CPU": 8.0, "memory": 4 * 2**30}]
    cluster = engine.Cluster(address="10.0.0.1:6379", nodes=1, concurrent_sites=0,
                             resources={"CPU": 8.0, "memory": 4 * 2**30})
    # Execute / Assert
    with pytest.raises(FedtuneError, match=r"federation.client_gpus=0.5 asks a GPU "
                       r"for every site, but the Ray cluster at 10.0.0.1:6379: 1 "
                       r"node, 8 CPUs, 0 GPUs, 4.0 GiB memory has none; set "
                       r"federation.client_gpus=0"):
        engine.check_resources(_fed(client_gpus=0.5), cluster, nodes)
    with pytest.raises(FedtuneError, match=r"no node of the Ray cluster at "
                       r"10.0.0.1:6379.*client_cpus=16.*the largest node has 8 CPUs"):
        engine.check_resources(_fed(client_cpus=16), cluster, nodes)


def test_an_address_nobody_listens_on_fails_in_seconds() -> None:
    # Prepare: a free loopback port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    # Execute / Assert
    with pytest.raises(FedtuneError, match=rf"no Ray cluster reachable at "
                       rf"127.0.0.1:{port} .*`ray start --head --port {port}`"):
        engine.check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - started < engine.CONNECT_TIMEOUT + 1


def test_a_listening_address_passes_the_check() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        assert engine.check_reachable(address) == address


@pytest.mark.parametrize("address", ["10.0.0.1", "http://head:6379", "head:port"])
def test_a_malformed_ray_address_is_a_config_error(address: str) -> None:
    with pytest.raises(config.ConfigError, match=r"ray_address: .* is not a Ray "
                       r"cluster's address; write HOST:PORT"):
        _fed(ray_address=address)


def test_the_actors_env_carries_fedtunes_settings(monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE", "/data/cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SECRET_TOKEN", "x")
    env = engine.actor_env({"FEDTUNE_SHARED_FEATURES": "/tmp/f"})
    assert env["FEDTUNE_CACHE"] == "/data/cache" and env["HF_HUB_OFFLINE"] == "1"
    assert env["FEDTUNE_SHARED_FEATURES"] == "/tmp/f" and "PYTHONPATH" in env
    assert "SECRET_TOKEN" not in env


def test_site_output_goes_to_the_log_and_each_warning_once(tmp_path: Path) -> None:
    # Prepare
    echoed: list[str] = []
    sink = engine._SitesLog(tmp_path / "sites.log", echo=echoed.append)
    line = "2026-12-03 10:00:0{} WARNING fedtune.client: site {} has {} records"
    # Execute: the same warning from three sites, and INFO lines
    for i in range(3):
        sink({"pid": 100 + i, "ip": "127.0.0.1", "actor_name": "ClientAppActor",
              "lines": [line.format(i, i, 10 * i), "\x1b[32mINFO\x1b[0m trained"]})
    sink.close()
    # Assert
    text = (tmp_path / "sites.log").read_text()
    assert text.count("WARNING") == 3 and text.count("INFO trained") == 3
    assert "\x1b" not in text
    assert len(echoed) == 1 and "(ClientAppActor pid=100, 127.0.0.1)" in echoed[0]


def test_the_terminal_keeps_rounds_and_warnings_not_details() -> None:
    keep = console._Terminal().filter

    def rec(name: str, level: int, msg: str, **extra: object) -> logging.LogRecord:
        r = logging.LogRecord(name, level, __file__, 1, msg, None, None)
        r.__dict__.update(extra)
        return r

    assert keep(rec("fedtune.server.runtime.recorder", logging.INFO, "round 1/2 | ..."))
    assert not keep(rec("fedtune.server.runtime.recorder", logging.INFO, "by site",
                        **DETAIL))
    assert not keep(rec("flwr", logging.INFO, "configure_train: Sampled 5 nodes"))
    assert keep(rec("flwr", logging.WARNING, "something the user must see"))
    assert not keep(rec("flwr", logging.WARNING, "fraction_evaluate is set to 0.0."
                        " Federated evaluation will be skipped."))
