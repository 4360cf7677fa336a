"""Certificates and node keys: permissions, SANs, and the wrong kinds of key."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedtune.common import keys
from fedtune.common.errors import KeyMaterialError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_server_and_node_material(tmp_path: Path) -> None:
    # Execute
    keys.create_ca(tmp_path)
    keys.create_server_cert(tmp_path, tmp_path, names=["127.0.0.1", "link.example"])
    private, public = keys.create_node_key(tmp_path / "nodes", "hospital-a")
    # Assert: private keys are 0600, the server cert is signed by the CA with SANs
    for key in (tmp_path / "ca.key", tmp_path / "server.key", private):
        assert _mode(key) == 0o600
    ca = keys.load_ca_cert(tmp_path / "ca.crt")
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["link.example"]
    assert keys.check_node_private_key(private).curve.name == "secp384r1"
    assert keys.check_public_key(public).startswith(b"ecdsa-sha2-nistp384 ")


def test_private_keys_are_never_overwritten(tmp_path: Path) -> None:
    keys.create_node_key(tmp_path, "a")
    before = (tmp_path / "a.key").read_bytes()
    with pytest.raises(KeyMaterialError, match="already exists; private keys are"):
        keys.create_node_key(tmp_path, "a")
    assert (tmp_path / "a.key").read_bytes() == before


def test_server_cert_needs_names_and_a_ca(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match="at least one name"):
        keys.create_server_cert(tmp_path, tmp_path, names=[])
    with pytest.raises(KeyMaterialError, match="fedtune keys ca"):
        keys.create_server_cert(tmp_path, tmp_path, names=["x"])


def test_wrong_node_keys_are_named(tmp_path: Path) -> None:
    ed = tmp_path / "ed.key"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    ed.chmod(0o600)
    with pytest.raises(KeyMaterialError, match="Ed25519PrivateKey key; Flower node"):
        keys.check_node_private_key(ed)
    pem = tmp_path / "pem.key"
    pem.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(KeyMaterialError, match="not an unencrypted OpenSSH"):
        keys.check_node_private_key(pem)
    with pytest.raises(KeyMaterialError, match="not found: create one"):
        keys.check_node_private_key(tmp_path / "missing.key")
    private, _ = keys.create_node_key(tmp_path, "loose")
    private.chmod(0o644)
    with pytest.raises(KeyMaterialError, match="readable by other users"):
        keys.check_node_private_key(private)


def test_bad_ca_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match="ask the operator"):
        keys.load_ca_cert(tmp_path / "none.crt")
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate")
    with pytest.raises(KeyMaterialError, match="not a PEM certificate"):
        keys.load_ca_cert(junk)
