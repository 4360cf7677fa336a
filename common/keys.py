"""Certificates and node keys for a deployment (no Flower imports).

A federation needs three kinds of key material:

* a certificate authority (CA) the operator keeps; its certificate is given to every
  hospital so that its daemon can check it talks to the real server;
* a TLS certificate for the SuperLink, signed by the CA, whose subject alternative
  names (SANs) list every host name and IP address the server is reached at;
* one EC P-384 key pair per hospital (OpenSSH format, as Flower's SuperNode
  authentication expects); the public half is registered with the SuperLink.

Private keys are written with mode 0600 and never overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.common.errors import KeyMaterialError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
NODE_CURVE = ec.SECP384R1()
_NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the start; refuse to overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyMaterialError(f"{path} already exists; private keys are never "
                        "overwritten. Move it away first to replace it.") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_ca(out_dir: Path, *, name: str = "fedtune CA", days: int = 3650) -> Path:
    """Write ``ca.crt`` and ``ca.key`` (0600) into ``out_dir``; return the cert path."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, encipher_only=False,
                decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write_private(out_dir / CA_KEY, _pem_key(key))
    _write_public(out_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return out_dir / CA_CERT


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for item in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(item)))
        except ValueError:
            entries.append(x509.DNSName(item))
    return x509.SubjectAlternativeName(entries)


def create_server_cert(ca_dir: Path, out_dir: Path, *, names: Sequence[str],
                       days: int = 825) -> Path:
    """Sign a SuperLink certificate valid for ``names`` (host names and IPs)."""
    if not names:
        raise KeyMaterialError("a server certificate needs at least one name: pass the "
                        "host names/IPs hospitals and the operator use (--san)")
    ca_cert = load_ca_cert(ca_dir / CA_CERT)
    try:
        ca_key = serialization.load_pem_private_key(
            (ca_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyMaterialError(
            f"CA key {ca_dir / CA_KEY} not found: create the CA first "
            "with `fedtune keys ca`") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KeyMaterialError(f"{ca_dir / CA_KEY} is not an EC private key")
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(names[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(out_dir / SERVER_KEY, _pem_key(key))
    _write_public(out_dir / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return out_dir / SERVER_CERT


def create_node_key(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (0600, OpenSSH) and ``NAME.pub`` for one hospital."""
    if not name or "/" in name or name.startswith("."):
        raise KeyMaterialError(
            f"bad node name {name!r}: use letters, digits, '-' or '_'")
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write_private(out_dir / f"{name}.key", private)
    _write_public(out_dir / f"{name}.pub", public + f" fedtune-{name}\n".encode())
    return out_dir / f"{name}.key", out_dir / f"{name}.pub"


def load_ca_cert(path: Path) -> x509.Certificate:
    """Load the federation's PEM CA certificate, or explain what is wrong."""
    return load_cert(path, what="federation CA certificate",
                     fix="ask the operator for the federation's ca.crt (created by "
                     "`fedtune keys ca`)")


def load_cert(path: Path, *, what: str, fix: str) -> x509.Certificate:
    """Load a PEM certificate that should be ``what``, or say what is wrong."""
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise KeyMaterialError(f"{what} {path} not found: {fix}") from None
    except (ValueError, OSError) as err:
        raise KeyMaterialError(
            f"{path} is not a PEM certificate ({err}); it should be the {what}: "
            f"{fix}") from None
    return cert


def check_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The node key must be an unencrypted OpenSSH EC key on a NIST curve."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyMaterialError(f"node private key {path} not found: create one with "
                        "`fedtune keys node NAME`") from None
    except OSError as err:
        raise KeyMaterialError(f"cannot read node private key {path}: {err}") from None
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyMaterialError(
            f"{path} is not an unencrypted OpenSSH private key ({err}); "
            "create one with `fedtune keys node NAME`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or \
            key.curve.name not in _NIST_CURVES:
        kind = getattr(getattr(key, "curve", None), "name", type(key).__name__)
        raise KeyMaterialError(
            f"{path} holds a {kind} key; Flower node authentication needs "
            "an EC key on a NIST curve (P-384): `fedtune keys node NAME`")
    if os.name == "posix" and Path(path).stat().st_mode & 0o077:
        raise KeyMaterialError(f"{path} is readable by other users "
                        f"(mode {Path(path).stat().st_mode & 0o777:o}); "
                        f"run `chmod 600 {path}`")
    return key


def check_public_key(path: Path) -> bytes:
    """An OpenSSH EC public key on a NIST curve, as `flwr supernode register` wants."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise KeyMaterialError(f"public key {path} not found") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise KeyMaterialError(f"{path} is not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or \
            key.curve.name not in _NIST_CURVES:
        raise KeyMaterialError(
            f"{path} is not an EC public key on a NIST curve; use the "
            "NAME.pub written by `fedtune keys node NAME`")
    return Path(path).read_bytes()
