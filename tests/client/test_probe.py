"""The daemon's own look at the SuperLink address: the cause of a failure in one
line, and which failures no retry can fix (real sockets on 127.0.0.1)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune.client.node import probe, supervisor
from fedtune.common import keys


def _listen(tls: ssl.SSLContext | None) -> tuple[str, socket.socket]:
    """A loopback server that accepts (and, with ``tls``, handshakes) for the
    test's duration; returns its address and the listening socket."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                if tls is not None:
                    with tls.wrap_socket(conn, server_side=True) as s:
                        s.recv(1)
                else:  # a plain-text service answers the TLS hello with text
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{srv.getsockname()[1]}", srv


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("pki")
    keys.create_ca(root / "ca")
    keys.create_server_cert(root / "ca", root / "ca", names=["127.0.0.1"])
    keys.create_ca(root / "other")
    yield {"ca": root / "ca" / "ca.crt", "other": root / "other" / "ca.crt",
           "cert": root / "ca" / "server.crt", "key": root / "ca" / "server.key"}


def _tls_server(pki: dict[str, Path], alpn: str = "h2") -> tuple[str, socket.socket]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["cert"], pki["key"])
    ctx.set_alpn_protocols([alpn])
    return _listen(ctx)


def test_a_refused_port_is_named_and_may_be_retried() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    found = probe.probe(f"127.0.0.1:{port}", ca_cert=None)
    assert not found.ok and not found.fatal
    assert "connection refused" in found.cause and "fedtune server" in found.fix
    assert found.words(f"127.0.0.1:{port}").startswith(
        f"cannot reach the SuperLink at 127.0.0.1:{port}: connection refused")


def test_tls_mistakes_are_configuration_errors(pki: dict[str, Path]) -> None:
    address, srv = _tls_server(pki)
    try:
        # Execute / Assert: the right CA passes; another CA, a name the
        # certificate does not hold, and a port without TLS are fatal
        assert probe.probe(address, ca_cert=pki["ca"]).ok
        wrong_ca = probe.probe(address, ca_cert=pki["other"])
        assert wrong_ca.fatal and "not signed by --ca-cert" in wrong_ca.cause
        assert "(ca.crt) the operator gave you" in wrong_ca.fix
        port = address.rsplit(":", 1)[1]
        wrong_san = probe.probe(f"localhost:{port}", ca_cert=pki["ca"])
        assert wrong_san.fatal and "not valid for localhost" in wrong_san.cause
        assert "--san localhost" in wrong_san.fix
    finally:
        srv.close()
    plain, srv = _listen(None)
    try:
        found = probe.probe(plain, ca_cert=pki["ca"])
        assert found.fatal and "does not speak TLS" in found.cause
    finally:
        srv.close()
    http1, srv = _tls_server(pki, alpn="http/1.1")
    try:
        found = probe.probe(http1, ca_cert=pki["ca"])
        assert found.fatal and "not gRPC" in found.cause
    finally:
        srv.close()


def test_the_supervisor_reads_flowers_lines(tmp_path: Path) -> None:
    # Prepare: a supervisor whose probe finds a refused port, then a bad CA
    answers = [probe.Probe(False, "connection refused", "Check it")] * 10 + [
        probe.Probe(False, "TLS: not signed", "Use ca.crt", fatal=True)]
    sup = supervisor.Supervisor(worker_argv=[], supernode_argv=[], env={},
                                socket=tmp_path / "s", address="10.0.0.9:9092",
                                probe=lambda: answers.pop(0))
    # Execute: Flower's retry line ten times, its node id, then a TLS failure
    for _ in range(10):
        sup.read("WARNING :   Connection attempt failed, retrying in 8.62 seconds\n")
    assert sup.attempts == 10 and not sup.connected and sup.fatal is None
    sup.read("INFO :      SuperNode ID: 6757660932042078854\n")
    assert sup.connected and sup.attempts == 0
    sup.read("E0000 ssl_transport_security.cc: Handshake failed BAD_SIGNATURE\n")
    # Assert: the fatal cause names the address; nothing else was read
    assert sup.fatal == ("cannot reach the SuperLink at 10.0.0.9:9092: TLS: not "
                         "signed. Use ca.crt")
    sup.read("INFO : some other line\n")
    assert not answers
