"""Why the SuperLink does not answer, in one line: the daemon's own look at the
address before (and while) Flower's SuperNode retries it.

Flower's SuperNode says only ``Connection attempt failed, retrying in 8.62
seconds`` and, for a certificate signed by another CA, a TLS dump and exit code 1.
:func:`probe` connects itself: the name resolves, the port accepts, the TLS
handshake verifies the server's certificate against ``--ca-cert`` and its names
against the address, and the server speaks HTTP/2 (gRPC). A TLS failure is a
configuration error no retry can fix (:attr:`Probe.fatal`: the daemon exits with
status 2, which the shipped systemd unit does not restart); a refused or silent
port may be a server not started yet.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from fedtune.common import deployment

HOSTNAME_MISMATCH = 62  # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH


@dataclass(frozen=True)
class Probe:
    """What connecting to the SuperLink found."""

    ok: bool
    cause: str = ""
    fix: str = ""
    fatal: bool = False  # no retry fixes it: a configuration error

    def words(self, address: str) -> str:
        """One line for the site's log: the address, the cause, the fix."""
        if self.ok:
            return f"the SuperLink at {address} answers"
        return f"cannot reach the SuperLink at {address}: {self.cause}. {self.fix}"


def probe(address: str, *, ca_cert: Path | None, timeout: float = 5.0) -> Probe:
    """Connect to ``address`` as the SuperNode will (``ca_cert`` None: without
    TLS, ``--insecure``)."""
    host, port = deployment.split_address(address, what="--superlink")
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror:
        return Probe(False, f"the host name {host!r} does not resolve",
                     "Check the host in --superlink (and this machine's DNS)")
    except ConnectionRefusedError:
        return Probe(False, f"connection refused (nothing listens on port {port})",
                     "Check that the server runs (`fedtune server`) and that "
                     "--superlink names its Fleet API port (9092 by default)")
    except TimeoutError:
        return Probe(False, f"no answer within {timeout:g} s",
                     f"Check the host, and that the firewalls let this site reach "
                     f"{host} on port {port}")
    except OSError as err:
        return Probe(False, err.strerror or str(err),
                     "Check this machine's network and the host in --superlink")
    if ca_cert is None:
        sock.close()
        return Probe(True)
    return _handshake(sock, host=host, ca_cert=ca_cert, timeout=timeout)


def _handshake(sock: socket.socket, *, host: str, ca_cert: Path,
               timeout: float) -> Probe:
    try:
        context = ssl.create_default_context(cafile=str(ca_cert))
    except (ssl.SSLError, OSError) as err:
        sock.close()
        return Probe(False, f"--ca-cert {ca_cert} cannot be used ({err})",
                     "Give the federation's ca.crt from the operator", fatal=True)
    context.set_alpn_protocols(["h2"])
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            tls.settimeout(timeout)
            alpn = tls.selected_alpn_protocol()
    except ssl.SSLCertVerificationError as err:
        if err.verify_code == HOSTNAME_MISMATCH:
            return Probe(False, f"TLS: the server's certificate is not valid for "
                         f"{host} (wrong SAN: {err.verify_message})",
                         f"Connect to a name the certificate holds, or have the "
                         f"operator re-issue it with `fedtune keys server --san "
                         f"{host}`", fatal=True)
        return Probe(False, f"TLS: the server's certificate is not signed by "
                     f"--ca-cert {ca_cert} ({err.verify_message})",
                     "Use the federation's CA certificate (ca.crt) the operator "
                     "gave you", fatal=True)
    except ssl.SSLError as err:
        return Probe(False, f"TLS handshake failed ({err.reason or err}): the port "
                     "does not speak TLS", "Check the port in --superlink (the Fleet "
                     "API, 9092 by default); a server started with --insecure "
                     "needs --insecure here too", fatal=True)
    except OSError as err:
        return Probe(False, f"the TLS handshake broke off ({err})",
                     "Check the port in --superlink (the Fleet API, 9092 by "
                     "default)")
    if alpn != "h2":
        return Probe(False, "the port speaks TLS but not gRPC (HTTP/2): a wrong "
                     "service", "Check the port in --superlink: the Fleet API (9092 "
                     "by default), not the Control API", fatal=True)
    return Probe(True)
