"""Misbehaving clients, failing devices, TLS, shutdown: the server keeps its promises."""

from __future__ import annotations

import datetime
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any

import nbdclient as nc
import pytest
import wire as P

from cryptoplane.nbd.blockdev import FileDevice
from cryptoplane.nbd.runner import ServerThread


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        for _ in range(1000):
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    return False


def still_serving(path: str, data: bytes) -> None:
    c = nc.Client(path)
    c.go("disk")
    reply = c.command(P.CMD_READ, 9, 0, 1 << 20)
    assert (reply.error, reply.data) == (0, data[:1 << 20])
    c.close()


@pytest.mark.parametrize("length", [4096, 1 << 20])
def test_disconnect_mid_write_applies_nothing(image: tuple[Path, bytes], sockdir: str,
                                              length: int) -> None:
    path, data = image
    sock = f"{sockdir}/s"
    with FileDevice(path) as dev, ServerThread({"disk": dev}, socket_path=sock):
        c = nc.Client(sock)
        c.go("disk")
        c.sock.sendall(nc.request(P.CMD_WRITE, 1, 0, length) + b"\xff" * (length // 2))
        c.close()
        time.sleep(0.2)
        still_serving(sock, data)
    assert path.read_bytes() == data


@pytest.mark.parametrize("garbage", [b"\0" * 28, b"GET / HTTP/1.1\r\n\r\n" * 4,
                                     struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, 1, 1, 0,
                                                 64 << 20)])
def test_garbage_after_handshake_closes_that_connection(image: tuple[Path, bytes],
                                                        sockdir: str, garbage: bytes) -> None:
    path, data = image
    sock = f"{sockdir}/s"
    with FileDevice(path) as dev, ServerThread({"disk": dev}, socket_path=sock):
        bystander = nc.Client(sock)
        bystander.go("disk")
        c = nc.Client(sock)
        c.go("disk")
        c.sock.sendall(garbage)
        assert closed_by_server(c.sock)
        c.close()
        reply = bystander.command(P.CMD_READ, 1, 4096, 4096)
        assert (reply.error, reply.data) == (0, data[4096:8192])
        bystander.close()
        still_serving(sock, data)
    assert path.read_bytes() == data


def test_garbage_in_handshake(image: tuple[Path, bytes], sockdir: str) -> None:
    path, data = image
    sock = f"{sockdir}/s"
    with FileDevice(path) as dev, ServerThread({"disk": dev}, socket_path=sock):
        for junk in (b"\xff\xff\xff\xff", b"\0\0\0\1" + b"\x55" * 100):
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.sendall(junk)
            assert closed_by_server(s)
            s.close()
        c = nc.Client(sock)
        replies = c.option(0x1234, b"abc")
        assert replies[0].kind == P.REP_ERR_UNSUP
        replies = c.option(P.OPT_GO, nc.info_data("nope"))
        assert replies[0].kind == P.REP_ERR_UNKNOWN
        c.close()
        still_serving(sock, data)


def test_abort_and_disconnect_close_cleanly(image: tuple[Path, bytes], sockdir: str) -> None:
    path, _ = image
    sock = f"{sockdir}/s"
    with FileDevice(path) as dev, ServerThread({"disk": dev}, socket_path=sock):
        c = nc.Client(sock)
        assert c.option(P.OPT_ABORT)[0].kind == P.REP_ACK
        assert closed_by_server(c.sock)
        c = nc.Client(sock)
        c.go("disk")
        c.sock.sendall(nc.request(P.CMD_DISC, 1))
        assert closed_by_server(c.sock)


def test_pipelined_requests_beyond_the_inflight_bound(image: tuple[Path, bytes],
                                                      sockdir: str) -> None:
    # 300 big reads sent before reading any reply: the server pauses and resumes reading
    path, data = image
    sock = f"{sockdir}/s"
    with FileDevice(path) as dev, ServerThread({"disk": dev}, socket_path=sock,
                                               inline_limit=0):
        c = nc.Client(sock)
        c.go("disk")
        n, size = 300, 128 * 1024
        reqs = b"".join(nc.request(P.CMD_READ, i, (i * size) % (16 << 20), size)
                        for i in range(n))
        sender = threading.Thread(target=c.sock.sendall, args=(reqs,))
        sender.start()
        seen = {}
        for _ in range(n):
            _, err, cookie = P.SIMPLE_REPLY.unpack(c.recv_exact(16))
            assert err == 0
            seen[cookie] = c.recv_exact(size)
        sender.join(10)
        assert sorted(seen) == list(range(n))
        for i, got in seen.items():
            off = (i * size) % (16 << 20)
            assert got == data[off:off + size]
        c.close()


@pytest.mark.parametrize("inline_limit", [0, None], ids=["offloaded", "inline"])
def test_a_slow_reader_gets_every_reply_whole(image: tuple[Path, bytes], sockdir: str,
                                              monkeypatch: pytest.MonkeyPatch,
                                              inline_limit: int | None) -> None:
    """Replies are written straight to the socket while the transport has nothing
    queued; what the socket does not take goes to the transport. A client that reads
    late and in small pieces makes both happen (partial writes, full socket), and must
    still get every reply whole, in one piece each, with the right data: no reused read
    buffer overwritten before it was sent."""
    import os

    import cryptoplane.nbd.server as server_mod

    real_writev = os.writev
    partial = [0, 0]  # writes the socket took in part, writes it refused (full)

    def counting_writev(fd: int, buffers: Any) -> int:
        try:
            n = real_writev(fd, buffers)
        except BlockingIOError:
            partial[1] += 1
            raise
        if n < sum(len(b) for b in buffers):
            partial[0] += 1
        return n

    monkeypatch.setattr(server_mod.os, "writev", counting_writev)
    # and read buffers are reused: a pool that never hands one back costs a fresh,
    # zero-filled 196 KiB allocation per reply (it went unnoticed once)
    reused = [0]
    real_buffer = server_mod.Connection._buffer

    def counting_buffer(self: Any, size: int) -> Any:
        spares = sum(len(v) for v in self.server.free.values())
        buf = real_buffer(self, size)
        reused[0] += sum(len(v) for v in self.server.free.values()) < spares
        return buf

    monkeypatch.setattr(server_mod.Connection, "_buffer", counting_buffer)
    path, data = image
    sock = f"{sockdir}/s"
    with FileDevice(path) as dev, ServerThread({"disk": dev}, socket_path=sock,
                                               inline_limit=inline_limit):
        c = nc.Client(sock)
        c.go("disk")
        n, size = 200, 196 * 1024
        reqs = b"".join(nc.request(P.CMD_READ, i, (i * 7919 * 4096) % ((16 << 20) - size),
                                   size) for i in range(n))
        sender = threading.Thread(target=c.sock.sendall, args=(reqs,))
        sender.start()
        time.sleep(0.5)  # let the socket fill up
        seen = {}
        for _ in range(n):
            _, err, cookie = P.SIMPLE_REPLY.unpack(c.recv_exact(16))
            assert err == 0
            seen[cookie] = b"".join(c.recv_exact(4096) for _ in range(size // 4096))
        sender.join(10)
        assert sorted(seen) == list(range(n))
        for i, got in seen.items():
            off = (i * 7919 * 4096) % ((16 << 20) - size)
            assert got == data[off:off + size], f"reply {i} differs"
        c.close()
    assert partial[0] + partial[1] > 0, "the socket never filled: the test tests nothing"
    assert reused[0] > 0, "no read buffer was ever reused"


class FailingDevice(FileDevice):
    def preadinto(self, offset: int, buf: Any) -> None:
        if offset == 0:
            raise OSError(5, "injected")
        super().preadinto(offset, buf)


class CountingDevice(FileDevice):
    flushes = 0

    def flush(self) -> None:
        type(self).flushes += 1
        super().flush()


def test_device_errors_become_eio(image: tuple[Path, bytes], sockdir: str) -> None:
    path, data = image
    sock = f"{sockdir}/s"
    with FailingDevice(path) as dev, ServerThread({"disk": dev}, socket_path=sock):
        c = nc.Client(sock)
        c.go("disk")
        assert c.command(P.CMD_READ, 1, 0, 4096).error == P.EIO
        assert c.command(P.CMD_READ, 2, 4096, 4096).data == data[4096:8192]
        c.close()


def test_shutdown_finishes_and_flushes(image: tuple[Path, bytes], sockdir: str) -> None:
    path, _ = image
    sock = f"{sockdir}/s"
    CountingDevice.flushes = 0
    with CountingDevice(path) as dev:
        server = ServerThread({"disk": dev}, socket_path=sock)
        with server:
            c = nc.Client(sock)
            c.go("disk")
            assert c.command(P.CMD_WRITE, 1, 0, 4096, payload=b"\x42" * 4096).error == 0
        assert CountingDevice.flushes >= 1
        assert closed_by_server(c.sock)  # type: ignore[arg-type]
        assert not Path(sock).exists()
    assert path.read_bytes()[:4096] == b"\x42" * 4096


def make_cert(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_starttls(image: tuple[Path, bytes], tmp_path: Path, sockdir: str) -> None:
    path, data = image
    cert, key = make_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    sock = f"{sockdir}/s"
    with FileDevice(path) as dev, ServerThread({"disk": dev}, socket_path=sock,
                                               tls=server_ctx) as s:
        assert s.url.startswith("nbds+unix://")
        c = nc.Client(sock)
        assert c.option(P.OPT_LIST)[0].kind == P.REP_ERR_TLS_REQD
        c.starttls(client_ctx)
        names = [r.data[4:] for r in c.option(P.OPT_LIST) if r.kind == P.REP_SERVER]
        assert names == [b"disk"]
        c.go("disk")
        assert c.command(P.CMD_WRITE, 1, 8192, 8192, payload=b"t" * 8192).error == 0
        assert c.command(P.CMD_READ, 2, 0, 1 << 20).data == data[:8192] + b"t" * 8192 + \
            data[16384:1 << 20]
        c.close()
        still_plain = nc.Client(sock)
        [refused] = still_plain.option(P.OPT_GO, nc.info_data("disk", (P.INFO_BLOCK_SIZE,)))
        # NBD_REP_ERR_TLS_REQD is 2^31 + 5 in proto.md, whatever either side calls it
        assert (refused.option, refused.kind) == (7, 0x80000005), refused
        still_plain.close()


def test_libnbd_over_tls(image: tuple[Path, bytes], tmp_path: Path, sockdir: str) -> None:
    import subprocess

    from nbdtools import nbdsh, tool

    nbdcopy = tool("nbdcopy")
    path, data = image
    cert, key = make_cert(tmp_path)
    (tmp_path / "ca-cert.pem").write_bytes(cert.read_bytes())  # gnutls's directory layout
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    with FileDevice(path) as dev, ServerThread({"disk": dev}, socket_path=f"{sockdir}/s",
                                               tls=server_ctx) as s:
        url = f"{s.url}&tls-certificates={tmp_path}&tls-hostname=localhost"
        res = subprocess.run([nbdcopy, url, str(tmp_path / "out.img")], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        # libnbd says this (ENOTSUP) only when GO is answered NBD_REP_ERR_TLS_REQD
        plain = nbdsh("-c", "try:\n"
                      f"    h.connect_uri({s.url.replace('nbds+', 'nbd+')!r})\n"
                      "except nbd.Error as e:\n"
                      "    print('refused:', e.errno, e.string)\n")
        assert plain.returncode == 0, plain.stderr
        assert "refused: ENOTSUP" in plain.stdout, plain.stdout
        assert "server requires TLS encryption first" in plain.stdout, plain.stdout
    assert (tmp_path / "out.img").read_bytes() == data


def test_socket_path_safety(image: tuple[Path, bytes], sockdir: str) -> None:
    from cryptoplane.exceptions import InvalidRequest

    path, _ = image
    regular = Path(sockdir) / "file"
    regular.write_bytes(b"keep me")
    with FileDevice(path) as dev:
        with pytest.raises(InvalidRequest), ServerThread({"disk": dev},
                                                         socket_path=str(regular)):
            pass
        assert regular.read_bytes() == b"keep me"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(f"{sockdir}/s")  # bound, never listening: what a dead server leaves
        stale.close()
        with ServerThread({"disk": dev}, socket_path=f"{sockdir}/s"), \
                pytest.raises(InvalidRequest), \
                ServerThread({"disk": dev}, socket_path=f"{sockdir}/s"):
            pass


def test_every_command_through_the_server(image: tuple[Path, bytes], sockdir: str) -> None:
    path, data = image
    sock = f"{sockdir}/s"
    CountingDevice.flushes = 0
    with CountingDevice(path) as dev, ServerThread({"disk": dev}, socket_path=sock):
        c = nc.Client(sock)
        c.go("disk")
        assert c.command(P.CMD_WRITE, 1, 8192, 4096, P.CMD_FLAG_FUA, b"w" * 4096).error == 0
        assert c.command(P.CMD_WRITE_ZEROES, 2, 0, 8192).error == 0
        assert c.command(P.CMD_WRITE_ZEROES, 3, 1 << 20, 1 << 20, P.CMD_FLAG_FUA).error == 0
        assert c.command(P.CMD_TRIM, 4, 4 << 20, 4096, P.CMD_FLAG_FUA).error == 0
        flushes = CountingDevice.flushes
        assert c.command(P.CMD_FLUSH, 5).error == 0
        assert CountingDevice.flushes == flushes + 1
        assert c.command(P.CMD_READ, 6, 0, 12288).data == bytes(8192) + b"w" * 4096
        assert c.command(P.CMD_READ, 7, 0, 4096, P.CMD_FLAG_FUA).error == P.EINVAL
        assert c.command(P.CMD_READ, 8, 16 << 20, 4096).error == P.EINVAL
        assert c.command(P.CMD_WRITE, 9, 100, 4096, 0, b"u" * 4096).error == P.EINVAL
        assert c.command(P.CMD_READ, 10, 0, 4096).error == 0  # still in step
        c.close()
    got = path.read_bytes()
    assert got[1 << 20:2 << 20] == bytes(1 << 20)
    assert got[12288:1 << 20] == data[12288:1 << 20] and got[2 << 20:] == data[2 << 20:]
