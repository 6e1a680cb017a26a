"""TLS material for a local cluster's NATS server: a private CA and a server certificate.

``lscale up --tls`` generates them once into the state directory (keys mode 0600) and reuses
them; clients trust the CA through ``LSCALE_NATS_TLS_CA``. Compose and real deployments pass
given files instead (:class:`shared.natsserver.ServerTls`, ``LSCALE_NATS_TLS_*``).

ECDSA P-256 keys and SHA-256 signatures: the default of current TLS stacks, accepted by Go's
crypto/tls (nats-server) and Python's ssl.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from shared.natsserver import ServerTls

CA_DAYS = 3650
SERVER_DAYS = 825  # the longest validity Apple/Chrome accept for a server certificate


@dataclass(frozen=True)
class LocalTls:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server-key.pem"

    def server_tls(self) -> ServerTls:
        return ServerTls(cert_file=str(self.server_cert), key_file=str(self.server_key))

    def exists(self) -> bool:
        return all(p.is_file() for p in (self.ca_cert, self.ca_key, self.server_cert,
                                         self.server_key))


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def ensure_local_tls(root: str | Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                     rotate: bool = False) -> LocalTls:
    """The CA and server certificate under ``root``; generated when missing (or rotated)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    material = LocalTls(Path(root))
    if material.exists() and not rotate:
        return material
    material.root.mkdir(parents=True, exist_ok=True)
    os.chmod(material.root, 0o700)
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(minutes=5)  # tolerate a little clock skew

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lscale local NATS CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    _write(material.ca_key, pem_key(ca_key), private=True)
    _write(material.server_key, pem_key(server_key), private=True)
    _write(material.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(material.server_cert, server_cert.public_bytes(serialization.Encoding.PEM),
           private=False)
    return material
