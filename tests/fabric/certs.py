"""Test certificates: a throwaway PKI made with ``cryptography``, for TLS tests.

    from certs import make_pki    # tests/fabric/conftest.py puts tests/fabric on sys.path

    pki = make_pki(tmp_path)
    server_ssl_context(pki.server_cert, pki.server_key, client_ca=pki.ca_cert, ...)
    client_ssl_context(pki.ca_cert, certfile=pki.client_a_cert, keyfile=pki.client_a_key)

What it makes: a CA; a server certificate for 127.0.0.1 and localhost (SAN IP and DNS);
client certificates whose CN is a tenant name ("tenant-a", "tenant-b"); and a second,
untrusted CA with a client certificate for "tenant-a" signed by it (an impostor). EC
P-256 keys throughout: a whole PKI costs a few milliseconds. Files are PEM; keys are
unencrypted PKCS#8.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TENANTS = ("tenant-a", "tenant-b")


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as files, plus the certificate itself."""

    cert: Path
    key: Path
    certificate: x509.Certificate

    @property
    def serial_hex(self) -> str:
        """The serial as ``getpeercert()['serialNumber']`` writes it: upper-case hex,
        whole bytes (so an odd number of digits gets a leading 0)."""
        digits = f"{self.certificate.serial_number:X}"
        return digits.zfill(len(digits) + len(digits) % 2)


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_a_cert: Path
    client_a_key: Path
    client_b_cert: Path
    client_b_key: Path
    untrusted_ca_cert: Path
    untrusted_client_cert: Path  # CN "tenant-a", signed by the untrusted CA
    untrusted_client_key: Path
    # tenant -> its client certificate (the trusted ones)
    clients: dict[str, Issued] = field(default_factory=dict)

    def issue_client(self, common_name: str | None, *, days: int = 1,
                     name: str | None = None) -> Issued:
        """Another client certificate from the trusted CA (``common_name`` None: a
        subject with no CN, which the server must refuse)."""
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        return _client(self.directory, name or f"client-{common_name or 'nocn'}",
                       common_name, ca, ca_key, days=days)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str | None, org: str = "cryptoplane tests") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
    if common_name is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _write(directory: Path, stem: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _builder(subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # clock skew
            .not_valid_after(now + dt.timedelta(days=days)))


def _ca(directory: Path, stem: str, common_name: str
        ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path, Path]:
    key = _key()
    name = _name(common_name)
    cert = (_builder(name, name, key.public_key(), 30)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = _write(directory, stem, cert, key)
    return cert, key, cert_path, key_path


def _leaf(issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey,
          subject: x509.Name, key: ec.EllipticCurvePrivateKey, days: int,
          usage: x509.ObjectIdentifier) -> x509.CertificateBuilder:
    return (_builder(subject, issuer.subject, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_key.public_key()), critical=False))


def _client(directory: Path, stem: str, common_name: str | None, ca: x509.Certificate,
            ca_key: ec.EllipticCurvePrivateKey, *, days: int = 1) -> Issued:
    key = _key()
    cert = _leaf(ca, ca_key, _name(common_name), key, days,
                 ExtendedKeyUsageOID.CLIENT_AUTH).sign(ca_key, hashes.SHA256())
    cert_path, key_path = _write(directory, stem, cert, key)
    return Issued(cert_path, key_path, cert)


def make_pki(tmp_path: Path) -> Pki:
    """A fresh PKI under ``tmp_path`` (which must exist)."""
    directory = Path(tmp_path)
    ca, ca_key, ca_cert_path, ca_key_path = _ca(directory, "ca", "cryptoplane test CA")

    server_key = _key()
    server = (_leaf(ca, ca_key, _name("localhost"), server_key, 1,
                    ExtendedKeyUsageOID.SERVER_AUTH)
              .add_extension(x509.SubjectAlternativeName([
                  x509.DNSName("localhost"),
                  x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                  x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    server_cert_path, server_key_path = _write(directory, "server", server, server_key)

    clients = {t: _client(directory, f"client-{t}", t, ca, ca_key) for t in TENANTS}

    rogue, rogue_key, rogue_cert_path, _ = _ca(directory, "untrusted-ca",
                                               "cryptoplane test CA")  # same name, other key
    impostor = _client(directory, "untrusted-client", TENANTS[0], rogue, rogue_key)

    return Pki(
        directory=directory,
        ca_cert=ca_cert_path, ca_key=ca_key_path,
        server_cert=server_cert_path, server_key=server_key_path,
        client_a_cert=clients["tenant-a"].cert, client_a_key=clients["tenant-a"].key,
        client_b_cert=clients["tenant-b"].cert, client_b_key=clients["tenant-b"].key,
        untrusted_ca_cert=rogue_cert_path,
        untrusted_client_cert=impostor.cert, untrusted_client_key=impostor.key,
        clients=clients,
    )


__all__ = ["TENANTS", "Issued", "Pki", "make_pki"]
