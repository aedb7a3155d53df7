"""``cryptoplane keys`` against the real server: every subcommand, --json and tables,
the token from the environment, and one-line errors with exit status 1."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner
from realserver import RealServer

from cryptoplane.cli.keys import keys


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with RealServer(tmp_path_factory.mktemp("srv")) as s:
        yield {"CRYPTOPLANE_SERVER": s.url, "CRYPTOPLANE_TOKEN": s.token()}


def run(env: dict[str, str], *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(keys, list(args), env=env)
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def test_lifecycle(env: dict[str, str]) -> None:
    out = json.loads(run(env, "create", "k", "--json", "--deletion-allowed"))
    assert out["name"] == "k" and out["deletion_allowed"] is True
    assert "latest_version" in run(env, "read", "k")  # a table
    assert json.loads(run(env, "list", "--json"))["keys"] == ["k"]
    assert json.loads(run(env, "rotate", "k", "--json"))["latest_version"] == 2
    cfg = json.loads(run(env, "config", "k", "--min-decryption-version", "2", "--json"))
    assert cfg["min_decryption_version"] == 2
    assert json.loads(run(env, "trim", "k", "--min-version", "2",
                          "--json"))["min_available_version"] == 2
    assert "deleted k" in run(env, "delete", "k")
    assert env["CRYPTOPLANE_TOKEN"] not in run(env, "list")


def test_export_public_prints_pem(env: dict[str, str]) -> None:
    run(env, "create", "sig", "--type", "ecdsa-p256")
    pem = run(env, "export-public", "sig")
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert json.loads(run(env, "export-public", "sig", "--version", "1",
                          "--json"))["version"] == 1
    run(env, "create", "sym")
    assert "no public key" in run(env, "export-public", "sym", code=1)


def test_errors_are_one_line(env: dict[str, str]) -> None:
    out = run(env, "read", "missing", code=1)
    assert out.strip().count("\n") == 0 and "KeyNotFound" in out
    bad = dict(env, CRYPTOPLANE_TOKEN="cpt_0000000000000000_nope")
    out = run(bad, "list", code=1)
    assert "Unauthorized" in out and "Traceback" not in out
    out = run(dict(env, CRYPTOPLANE_SERVER="tcp://127.0.0.1:1"), "list", "--timeout", "2",
              code=1)
    assert "ConnectionLost" in out
    assert "nothing to change" in run(env, "config", "x", code=1)
