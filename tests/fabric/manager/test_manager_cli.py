"""``cryptoplane quota ...`` and ``cryptoplane fabric status`` against a real manager
process; ``cryptoplane manager`` making its signing key; errors as exit statuses."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from managerkit import CLI, ManagerProc, start_manager, tokens

from cryptoplane.cli.main import cli
from cryptoplane.fabric.capability import public_key_from_b64, verify_grant
from cryptoplane.fabric.manager.client import ManagerClient
from cryptoplane.fabric.manager.protocol import Registration

RSA = "rsa2048"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[ManagerProc, dict[str, str], dict[str, str]]]:
    """A manager on SQLite with one server of 1,000 RSA-2048 signs/s registered."""
    url = f"sqlite://{tmp_path / 'ks.db'}"
    tok = tokens(url)
    m = start_manager(url, tmp_path, lease=30.0)

    async def register() -> dict[str, str]:
        c = await ManagerClient.connect(m.url, token=tok["server"])
        try:
            r = await c.register(Registration("s1", "tcp://127.0.0.1:9", {
                RSA: {"ops": 1000.0, "bytes": 0.0}, "aead": {"ops": 1e5, "bytes": 1e9}}))
            return r.manager_keys
        finally:
            await c.close()

    keys = asyncio.run(register())
    yield m, tok, keys
    m.stop()


def run(*args: str, token: str | None = None, manager: str = "") -> Result:
    argv = list(args)
    if manager:
        argv += ["--manager", manager]
    env = {"CRYPTOPLANE_TOKEN": token} if token else {}
    return CliRunner().invoke(cli, argv, env=env, catch_exceptions=False)


def test_quota_request_list_release_status(
        pool: tuple[ManagerProc, dict[str, str], dict[str, str]]) -> None:
    m, tok, keys = pool
    url = m.manager_url
    # --json: the answer as the manager gave it; its token verifies
    r = run("quota", "request", "--quota", f"{RSA}=300", "--ttl", "120", "--json",
            token=tok["a"], manager=url)
    assert r.exit_code == 0, r.output
    answer = json.loads(r.stdout)
    assert answer["granted"] and answer["grant"]["quota"][RSA]["ops"] == 300
    pub = {k: public_key_from_b64(v) for k, v in keys.items()}
    assert verify_grant(answer["token"], pub, server_id="s1", tenant="a").grant_id == \
        answer["grant"]["grant_id"]
    first = answer["grant"]["grant_id"]

    # the readable form, two classes in one --quota
    r = run("quota", "request", "--quota", f"{RSA}=200,aead=1000:1e6", "--label", "web",
            "--token", tok["a"], manager=url)
    assert r.exit_code == 0, r.output
    assert "grant g-" in r.stdout and "token: cpg1." in r.stdout
    assert "server s1  tcp://127.0.0.1:9" in r.stdout

    # refused: what is left, exit 3
    r = run("quota", "request", "--quota", f"{RSA}=900", token=tok["b"], manager=url)
    assert r.exit_code == 3
    assert "refused" in r.stderr and f"left {RSA}: 500 ops/s" in r.stderr
    r = run("quota", "request", "-q", f"{RSA}=900", "--json", token=tok["b"], manager=url)
    assert r.exit_code == 3 and json.loads(r.stdout)["left"][RSA]["ops"] == 500

    # list, release
    r = run("quota", "list", "--json", token=tok["a"], manager=url)
    listed = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(listed) == 2 and {g["tenant"] for g in listed} == {"a"}
    assert run("quota", "list", token=tok["b"], manager=url).stdout == ""
    r = run("quota", "release", first, token=tok["a"], manager=url)
    assert r.exit_code == 0 and f"released {first}" in r.stdout
    r = run("quota", "list", token=tok["a"], manager=url)
    assert first not in r.stdout and "web" in r.stdout

    # status: JSON and the table
    r = run("fabric", "status", "--json", token=tok["admin"], manager=url)
    status = json.loads(r.stdout)
    assert [s["server_id"] for s in status["servers"]] == ["s1"]
    assert status["granted"][RSA]["ops"] == 200 and status["left"][RSA]["ops"] == 800
    r = run("fabric", "status", token=tok["admin"], manager=url)
    assert r.exit_code == 0, r.output
    for text in ("s1", "tcp://127.0.0.1:9", RSA, "1000 ops/s", "800 ops/s", "web"):
        assert text in r.stdout, (text, r.stdout)

    # a control plane (admin) asks for a tenant; the tenant sees it as its own
    r = run("quota", "request", "-q", f"{RSA}=50", "--tenant", "b", "--json",
            token=tok["admin"], manager=url)
    assert r.exit_code == 0 and json.loads(r.stdout)["grant"]["tenant"] == "b"
    r = run("quota", "list", "--json", token=tok["b"], manager=url)
    assert [json.loads(line)["quota"][RSA]["ops"] for line in r.stdout.splitlines()] == [50]
    r = run("quota", "request", "-q", f"{RSA}=50", "--tenant", "b", token=tok["a"],
            manager=url)
    assert r.exit_code == 2 and "admin scope" in r.stderr

    # revoke is an operator's
    gid = listed[1]["grant_id"] if listed[0]["grant_id"] == first else listed[0]["grant_id"]
    r = run("quota", "revoke", gid, token=tok["a"], manager=url)
    assert r.exit_code == 2 and "outside the credential's scopes" in r.stderr
    r = run("quota", "revoke", gid, token=tok["admin"], manager=url)
    assert r.exit_code == 0 and f"revoked {gid}" in r.stdout
    # again: nothing changes (a repeat after a lost answer is safe); unknown: exit 1
    assert run("quota", "revoke", gid, token=tok["admin"], manager=url).exit_code == 0
    r = run("quota", "revoke", "g-unknown", token=tok["admin"], manager=url)
    assert r.exit_code == 1 and "no grant g-unknown" in r.stderr


def test_cli_errors_are_exit_statuses(
        pool: tuple[ManagerProc, dict[str, str], dict[str, str]]) -> None:
    m, tok, _ = pool
    # a real subprocess: the entry point, the environment variables
    env = {**os.environ, "CRYPTOPLANE_MANAGER": m.manager_url,
           "CRYPTOPLANE_TOKEN": "cpt_0123456789abcdef_wrong"}
    p = subprocess.run([*CLI, "fabric", "status"], env=env, capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"manager://127.0.0.1:{s.getsockname()[1]}"
    r = run("quota", "list", "--timeout", "2", token=tok["a"], manager=dead)
    assert r.exit_code == 1 and "cannot reach the manager" in r.stderr
    r = run("quota", "request", "--quota", "nonsense", token=tok["a"], manager=m.manager_url)
    assert r.exit_code == 2 and "CLASS=OPS" in r.stderr
    r = run("quota", "request", "--quota", "nope=5", token=tok["a"], manager=m.manager_url)
    assert r.exit_code == 2 and "unknown algorithm class" in r.stderr
    r = run("quota", "renew", "g-unknown", token=tok["a"], manager=m.manager_url)
    assert r.exit_code == 1 and "grant not found" in r.stderr


def test_manager_makes_its_signing_key(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'ks.db'}"
    key = tmp_path / "new" / "signing.pem"
    key.parent.mkdir()
    m = start_manager(url, tmp_path, signing_key=key, extra=["--json"])
    try:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert "created signing key" in m.log_text()
        assert m.key_id
    finally:
        assert m.stop() == 0
    # the second start reads it: the same key id
    m2 = start_manager(url, tmp_path, signing_key=key, name="again")
    try:
        assert m2.key_id == m.key_id
        assert "created signing key" not in m2.log_text()
    finally:
        m2.stop()
    p = subprocess.run([*CLI, "manager", "--store", url, "--signing-key", str(key),
                        "--listen", "tcp://256.0.0.1:1"], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
