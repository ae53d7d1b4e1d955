"""A small certificate authority for mutual TLS between agents, hive and broker.

One CA signs a server certificate for the broker, a client certificate for
the hive and one client certificate per agent, whose common name is the
agent id: Mosquitto's ``use_identity_as_username`` then makes it the MQTT
user name, and the ACL (``contrib/mosquitto/``) keeps each agent to its own
topics. Keys are EC P-256, written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from immune import topics
from immune.errors import ConfigError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
#: The common name, hence the MQTT user name, of the hive's certificate.
HIVE_NAME = "immune-hive"
CA_DAYS = 3650
LEAF_DAYS = 825


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "IMMUNE"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def create_ca(directory: Path, name: str = "IMMUNE CA") -> Path:
    """Make ``ca.pem`` and ``ca.key`` in ``directory``; returns the cert path.

    Raises:
        ConfigError: a CA already exists there (it is never overwritten).
    """
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() or key_path.exists():
        msg = f"a CA already exists in {directory}; remove it or choose another --dir"
        raise ConfigError(msg)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    cert = (
        _builder(subject, subject, CA_DAYS)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key(
            (directory / CA_KEY).read_bytes(), password=None
        )
    except FileNotFoundError:
        msg = f"no CA in {directory}; create one with: immune pki ca --dir {directory}"
        raise ConfigError(msg) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{directory / CA_KEY} is not an EC private key")
    return cert, key


def issue(
    directory: Path,
    common_name: str,
    *,
    server_names: list[str] | None = None,
    basename: str | None = None,
) -> tuple[Path, Path]:
    """Issue a certificate signed by the CA in ``directory``.

    Args:
        common_name: the subject; for a client, its MQTT user name.
        server_names: host names or IP addresses for a server certificate
            (the broker); None makes a client certificate.
        basename: the file names' stem (``<basename>.pem``, ``.key``).

    Returns:
        The paths of the certificate and of its key.
    """
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH
        if server_names
        else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        _builder(_name(common_name), ca_cert.subject, LEAF_DAYS)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in server_names]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    stem = basename or common_name
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue_agent(directory: Path, agent_id: str) -> tuple[Path, Path]:
    """An agent's client certificate, its common name the agent id.

    Raises:
        ConfigError: the id cannot be used in an MQTT topic.
    """
    if not topics.is_valid_agent_id(agent_id) or agent_id == HIVE_NAME:
        msg = (
            f"agent id {agent_id!r} must be letters, digits and ._:- (not {HIVE_NAME})"
        )
        raise ConfigError(msg)
    return issue(directory, agent_id, basename=f"agent-{agent_id}")
