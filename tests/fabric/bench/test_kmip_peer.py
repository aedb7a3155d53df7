"""The PyKMIP peer that ``cryptoplane remote-speed`` compares with: its server starts on
loopback (TLS, client certificates), its client creates an AES-256 key and an RSA-2048
key pair and times encrypts and signs, and everything is gone afterwards. Runs under CI
(there a missing PyKMIP is a failure: scripts/setup.sh installs it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import unavailable

from cryptoplane.yardstick import kmip_peer


@pytest.mark.timeout(60)
def test_kmip_peer_measures_encrypts_and_signs() -> None:
    try:
        python = kmip_peer.kmip_python()
    except kmip_peer.KmipUnavailable as exc:
        unavailable(str(exc))
    got = kmip_peer.measure(duration=0.3, python=python, samples=20)
    assert got.encrypt_count > 0 and got.encrypt_ops_s > 0
    assert got.sign_count > 0 and got.sign_ops_s > 0
    assert 0 < got.encrypt_p50_ms <= got.encrypt_p99_ms
    assert 0 < got.sign_p50_ms <= got.sign_p99_ms
    assert got.pykmip and got.cryptography


@pytest.mark.timeout(60)
def test_kmip_server_is_stopped_and_its_folder_removed() -> None:
    try:
        python = kmip_peer.kmip_python()
    except kmip_peer.KmipUnavailable as exc:
        unavailable(str(exc))
    with kmip_peer.kmip_server(python) as server:
        folder = Path(server["dir"])
        pid = int((folder / "ready").read_text())
        assert folder.is_dir()
    assert not folder.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
