"""Real TLS 1.3 handshakes over loopback with the contexts ``auth`` makes."""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from certs import Pki, make_pki  # tests/fabric/conftest.py puts tests/fabric on the path

from cryptoplane.fabric.auth import Authenticator, client_ssl_context, server_ssl_context
from cryptoplane.fabric.errors import Unauthorized


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Outcome:
    peercert: dict[str, Any] | None = None
    version: str | None = None
    server_error: BaseException | None = None
    client_error: BaseException | None = None
    received: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
              hostname: str = "localhost") -> Outcome:
    """One connection: the server handshakes, sends b"hello" and closes; the client
    handshakes and reads. Under TLS 1.3 a client learns that its certificate was refused
    only when it reads (the server verifies it after the client's Finished), so the
    client's verdict is what it could read."""
    out = Outcome()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(5)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                out.peercert = tls.getpeercert()
                out.version = tls.version()
                tls.sendall(b"hello")
        except (ssl.SSLError, OSError) as e:
            out.server_error = e
        finally:
            conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with (socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
              client_ctx.wrap_socket(raw, server_hostname=hostname) as tls):
            while chunk := tls.recv(100):
                out.received += chunk
    except (ssl.SSLError, OSError) as e:
        out.client_error = e
    finally:
        t.join(10)
        listener.close()
    return out


def client(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    return client_ssl_context(pki.ca_cert, certfile=cert, keyfile=key)


def test_trusted_client_certificate_maps_to_its_tenant(pki: Pki) -> None:
    server = server_ssl_context(pki.server_cert, pki.server_key, client_ca=pki.ca_cert,
                                require_client_cert=True)
    auth = Authenticator(_NoTokens())
    for tenant, cert, key in (("tenant-a", pki.client_a_cert, pki.client_a_key),
                              ("tenant-b", pki.client_b_cert, pki.client_b_key)):
        out = handshake(server, client(pki, cert, key))
        assert out.server_error is None and out.client_error is None
        assert out.version == "TLSv1.3" and out.received == b"hello"
        principal = auth.from_certificate(out.peercert)
        assert principal.tenant == tenant
        assert principal.label == f"{tenant}/cert:{pki.clients[tenant].serial_hex}"


def test_certificate_of_an_untrusted_ca_is_refused(pki: Pki) -> None:
    server = server_ssl_context(pki.server_cert, pki.server_key, client_ca=pki.ca_cert,
                                require_client_cert=True)
    out = handshake(server, client(pki, pki.untrusted_client_cert, pki.untrusted_client_key))
    assert isinstance(out.server_error, ssl.SSLError)
    assert out.peercert is None and out.received == b""
    assert out.client_error is not None


def test_untrusted_certificate_refused_even_when_optional(pki: Pki) -> None:
    server = server_ssl_context(pki.server_cert, pki.server_key, client_ca=pki.ca_cert,
                                require_client_cert=False)
    out = handshake(server, client(pki, pki.untrusted_client_cert, pki.untrusted_client_key))
    assert isinstance(out.server_error, ssl.SSLError) and out.received == b""


def test_no_certificate_refused_when_required(pki: Pki) -> None:
    server = server_ssl_context(pki.server_cert, pki.server_key, client_ca=pki.ca_cert,
                                require_client_cert=True)
    out = handshake(server, client(pki))
    assert isinstance(out.server_error, ssl.SSLError)
    assert out.received == b"" and out.client_error is not None


def test_no_certificate_accepted_when_optional_but_names_no_tenant(pki: Pki) -> None:
    # tokens are accepted too: the handshake completes, and the server asks for one
    server = server_ssl_context(pki.server_cert, pki.server_key, client_ca=pki.ca_cert,
                                require_client_cert=False)
    out = handshake(server, client(pki))
    assert out.server_error is None and out.received == b"hello"
    assert not out.peercert
    with pytest.raises(Unauthorized):
        Authenticator(_NoTokens()).from_certificate(out.peercert)


def test_certificate_without_cn_is_unauthorized(pki: Pki) -> None:
    nocn = pki.issue_client(None)
    server = server_ssl_context(pki.server_cert, pki.server_key, client_ca=pki.ca_cert,
                                require_client_cert=True)
    out = handshake(server, client(pki, nocn.cert, nocn.key))
    assert out.server_error is None  # a valid certificate...
    with pytest.raises(Unauthorized):  # ...that names no tenant
        Authenticator(_NoTokens()).from_certificate(out.peercert)


def test_server_only_tls(pki: Pki) -> None:
    server = server_ssl_context(pki.server_cert, pki.server_key)
    assert server.verify_mode == ssl.CERT_NONE
    out = handshake(server, client(pki), hostname="127.0.0.1")  # SAN IP
    assert out.server_error is None and out.received == b"hello"


def test_client_checks_the_server_name_and_ca(pki: Pki) -> None:
    server = server_ssl_context(pki.server_cert, pki.server_key)
    out = handshake(server, client(pki), hostname="not-the-server.example")
    assert isinstance(out.client_error, ssl.SSLCertVerificationError)
    wrong_ca = client_ssl_context(pki.untrusted_ca_cert)
    out = handshake(server, wrong_ca)
    assert isinstance(out.client_error, ssl.SSLCertVerificationError)


def test_tls_1_2_is_refused(pki: Pki) -> None:
    server = server_ssl_context(pki.server_cert, pki.server_key)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(pki.ca_cert)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    out = handshake(server, old)
    assert isinstance(out.server_error, ssl.SSLError)
    assert isinstance(out.client_error, ssl.SSLError)


def test_contexts_are_tls_1_3_only(pki: Pki) -> None:
    s = server_ssl_context(pki.server_cert, pki.server_key, client_ca=pki.ca_cert,
                           require_client_cert=False)
    c = client(pki)
    for ctx in (s, c):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert s.verify_mode == ssl.CERT_OPTIONAL
    assert c.verify_mode == ssl.CERT_REQUIRED and c.check_hostname
    with pytest.raises(ValueError):
        server_ssl_context(pki.server_cert, pki.server_key, require_client_cert=True)


class _NoTokens:
    def check_token(self, secret: str) -> Any:
        raise Unauthorized("no tokens here")
