"""The client, the Remote engine and ``cryptoplane keys`` over TLS 1.3: a token inside
TLS, and mutual TLS whose client certificate names the tenant (no token)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from certs import Pki, make_pki
from click.testing import CliRunner
from realserver import RealServer

import cryptoplane as cp
from cryptoplane.cli.keys import keys
from cryptoplane.fabric import Client
from cryptoplane.fabric.auth import client_ssl_context, server_ssl_context
from cryptoplane.fabric.errors import ConnectionLost


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RealServer, Pki]]:
    folder = tmp_path_factory.mktemp("tls")
    pki = make_pki(folder)
    ctx = server_ssl_context(pki.server_cert, pki.server_key, client_ca=pki.ca_cert)
    with RealServer(folder, tls=ctx) as s:
        yield s, pki


def test_token_over_tls(tls: tuple[RealServer, Pki]) -> None:
    server, pki = tls
    assert server.url.startswith("tls://")
    with Client(server.url, token=server.token(), ssl=client_ssl_context(pki.ca_cert)) as c:
        c.create_key("t", "aes256-gcm96")
        assert c.decrypt("t", c.encrypt("t", b"x")) == b"x"


def test_mutual_tls_names_the_tenant(tls: tuple[RealServer, Pki]) -> None:
    server, pki = tls
    ctx = client_ssl_context(pki.ca_cert, certfile=pki.client_a_cert,
                             keyfile=pki.client_a_key)
    with Client(server.url, ssl=ctx) as c:
        assert c.capabilities["tenant"] == "tenant-a"
    remote = cp.Remote(server.url, ssl=ctx)
    with cp.Plane(engines=["inline", remote]) as plane, cp.Plane(["inline"]) as local:
        k = cp.Key.generate("ed25519")
        plane.session(k, engine=remote.name)
        assert plane.run(cp.Sign(k, b"m")) == local.run(cp.Sign(k, b"m"))


def test_an_untrusted_server_certificate_is_refused(tls: tuple[RealServer, Pki],
                                                    tmp_path: Path) -> None:
    server, _ = tls
    other = make_pki(tmp_path)
    with pytest.raises(ConnectionLost):
        Client(server.url, token=server.token(), ssl=client_ssl_context(other.ca_cert),
               timeout=5)


def test_keys_cli_with_client_certificates(tls: tuple[RealServer, Pki]) -> None:
    server, pki = tls
    result = CliRunner().invoke(keys, [
        "create", "cli-tls", "--server", server.url, "--ca", str(pki.ca_cert), "--cert",
        str(pki.client_a_cert), "--key", str(pki.client_a_key), "--json"], env={})
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["name"] == "cli-tls"
