from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

import cryptoplane as cp
from cryptoplane.cli.main import cli
from cryptoplane.cli.stats import UnixHTTPConnection
from cryptoplane.requests import Encrypt
from cryptoplane.telemetry import stats_server
from cryptoplane.telemetry.stats_server import StatsServer, serve_stats

MATERIAL = bytes(range(0x50, 0x70))


@pytest.fixture(scope="module")
def plane() -> Iterator[cp.Plane]:
    with cp.Plane() as p:
        key = cp.Key("aes-256-gcm", MATERIAL)
        ct = p.encrypt(key, b"x" * 64, nonce=bytes(12))
        with pytest.raises(cp.AuthenticationFailed):
            p.decrypt(key, ct[:-1] + bytes([ct[-1] ^ 1]), nonce=bytes(12))
        p.limit(client="tenant-a", ops=1000)
        p.run(Encrypt(key, bytes(128 * 1024), nonce=bytes(11) + b"\1"), client="tenant-a")
        yield p


@pytest.fixture
def server(plane: cp.Plane, tmp_path: Path) -> Iterator[StatsServer]:
    with serve_stats(plane, tmp_path / "s.sock") as srv:
        yield srv


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, ["stats", *args])


def without_rates(stats: dict[str, Any]) -> dict[str, Any]:
    """Drop what moves by itself on an idle plane: the balancer's moving averages."""
    out = json.loads(json.dumps(stats))
    for e in out["engines"].values():
        e.pop("rates", None)
    return out  # type: ignore[no-any-return]


def test_table(server: StatsServer) -> None:
    result = invoke("--socket", server.path)
    assert result.exit_code == 0, result.output
    for text in ("engines", "inline", "aes-256-gcm", "AuthenticationFailed", "tenant-a",
                 "1,000/s", "latency", "scheduler", "failovers"):
        assert text in result.output, text


def test_json_is_plane_stats(server: StatsServer, plane: cp.Plane) -> None:
    result = invoke("--socket", server.path, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert without_rates(got) == without_rates(plane.stats())
    assert MATERIAL.hex() not in result.output


def test_prometheus_parses(server: StatsServer, plane: cp.Plane) -> None:
    result = invoke("--socket", server.path, "--prometheus")
    assert result.exit_code == 0, result.output
    fams = {f.name: f for f in text_string_to_metric_families(result.output)}
    requests = sum(s.value for s in fams["cryptoplane_requests"].samples
                   if s.labels["algorithm"] == "aes-256-gcm" and s.labels["op"] == "encrypt")
    assert requests == plane.stats()["algorithms"]["aes-256-gcm"]["encrypt"]["requests"] == 2
    assert MATERIAL.hex() not in result.output


def test_http_routes_and_content_types(server: StatsServer) -> None:
    for route, status, ctype in (("/metrics", 200, "text/plain"),
                                 ("/stats?x=1", 200, "application/json"),
                                 ("/", 404, "text/plain"), ("/secrets", 404, "text/plain")):
        conn = UnixHTTPConnection(server.path, timeout=5)
        try:
            conn.request("GET", route)
            resp = conn.getresponse()
            resp.read()
        finally:
            conn.close()
        assert (resp.status, resp.getheader("Content-Type", "").split(";")[0]) == \
            (status, ctype), route


def test_socket_mode_and_close_unlinks(plane: cp.Plane, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    srv = StatsServer(plane, path)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    srv.close()
    assert not path.exists()
    srv.close()  # twice is harmless


def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    result = invoke("--socket", str(tmp_path / "nothing.sock"))
    assert result.exit_code == 1
    assert "no stats socket at" in result.output


def test_stale_socket(plane: cp.Plane, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # bound, never listening, closed: what a crashed server leaves
    dead.close()
    result = invoke("--socket", str(path))
    assert result.exit_code == 1 and "refused" in result.output
    with StatsServer(plane, path):  # a stale socket is replaced
        assert invoke("--socket", str(path), "--json").exit_code == 0


def test_refuses_live_socket_and_other_files(plane: cp.Plane, server: StatsServer,
                                             tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="another process is serving"):
        StatsServer(plane, server.path)
    assert invoke("--socket", server.path, "--json").exit_code == 0  # still served
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        StatsServer(plane, regular)
    assert regular.read_text() == "keep me"


def test_usage_errors() -> None:
    assert invoke().exit_code == 2
    assert invoke("--demo", "--json", "--prometheus").exit_code == 2


def test_demo_json() -> None:
    result = invoke("--demo", "--seconds", "0.5", "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert {"aes-256-gcm", "aes-256-xts", "ecdsa-p256-sha256"} <= set(stats["algorithms"])
    assert stats["algorithms"]["aes-256-gcm"]["decrypt"]["errors"]["AuthenticationFailed"] > 0
    assert stats["limits"]["tenant-a"]["ops_per_s"] > 0
    assert stats["clients"]["tenant-a"]["requests"] > 0
    assert stats["latency"]


def test_demo_table_and_prometheus() -> None:
    result = invoke("--demo", "--seconds", "0.2")
    assert result.exit_code == 0, result.output
    assert "errors by type" in result.output and "tenant-a" in result.output
    result = invoke("--demo", "--seconds", "0.2", "--prometheus")
    assert result.exit_code == 0, result.output
    names = {f.name for f in text_string_to_metric_families(result.output)}
    assert {"cryptoplane_requests", "cryptoplane_request_duration_seconds"} <= names


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_clients_hanging_up_early_are_not_errors(server: StatsServer,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """A scraper that hangs up before its answer (or halfway through its request) makes
    the server print nothing, and it goes on serving."""
    requests = [b"GET /stats HTTP/1.0\r\n\r\n", b"GET /metrics HTTP/1.0\r\n\r\n", b"GET /st"]
    for i in range(30):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(server.path)
        s.sendall(requests[i % 3])
        s.close()  # before the answer: the server's write meets a closed socket
    wait_for(lambda: server.connections >= 30)
    assert invoke("--socket", server.path, "--json").exit_code == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err


def test_deadline_is_for_the_whole_request(plane: cp.Plane, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends a byte at a time, each well within a per-read timeout, is cut
    off at the request deadline all the same."""
    monkeypatch.setattr(stats_server._Server, "request_deadline", 0.5)
    with StatsServer(plane, tmp_path / "s.sock") as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.path)
        s.settimeout(0.1)
        closed = False
        give_up = time.monotonic() + 20.0  # 40x the deadline: never reached unless broken
        try:
            while not closed and time.monotonic() < give_up:
                try:
                    s.sendall(b"G")
                    closed = s.recv(1) == b""
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
        finally:
            s.close()
        assert closed, "a trickling client held its connection past the deadline"
        assert invoke("--socket", srv.path, "--json").exit_code == 0
