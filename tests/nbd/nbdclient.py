"""A tiny NBD client for tests: encoders for what a client sends, decoders for what a
server sends, and a blocking socket client built on them (the oracle for the codec's
round trips and the tool for misbehaving on purpose)."""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass

import wire as P


def client_flags(no_zeroes: bool = True) -> bytes:
    return P.CLIENT_FLAGS.pack(P.CLIENT_FIXED_NEWSTYLE | (P.CLIENT_NO_ZEROES if no_zeroes
                                                         else 0))


def option(opt: int, data: bytes = b"") -> bytes:
    return P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data


def info_data(name: str, requests: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests))


def request(kind: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
            payload: bytes = b"") -> bytes:
    return P.REQUEST.pack(P.REQUEST_MAGIC, flags, kind, cookie, offset, length) + payload


@dataclass
class OptionReply:
    option: int
    kind: int
    data: bytes


def parse_option_replies(buf: bytes) -> list[OptionReply]:
    out = []
    pos = 0
    while pos < len(buf):
        magic, opt, kind, length = P.OPTION_REPLY.unpack_from(buf, pos)
        assert magic == P.REPLY_MAGIC
        pos += P.OPTION_REPLY.size
        out.append(OptionReply(opt, kind, buf[pos:pos + length]))
        pos += length
    assert pos == len(buf)
    return out


@dataclass
class Reply:
    cookie: int
    error: int
    data: bytes = b""
    message: bytes = b""
    offset: int | None = None


def parse_reply(buf: bytes, read_length: int = 0) -> tuple[Reply, int]:
    """One simple reply (with ``read_length`` data bytes) or one structured chunk."""
    (magic,) = struct.unpack_from(">I", buf)
    if magic == P.SIMPLE_REPLY_MAGIC:
        _, error, cookie = P.SIMPLE_REPLY.unpack_from(buf)
        end = 16 + (read_length if error == 0 else 0)
        return Reply(cookie, error, buf[16:end]), end
    assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
    _, flags, kind, cookie, length = P.STRUCTURED_REPLY.unpack_from(buf)
    body = buf[20:20 + length]
    assert flags & P.REPLY_FLAG_DONE
    if kind == P.REPLY_TYPE_NONE:
        return Reply(cookie, 0), 20
    if kind == P.REPLY_TYPE_OFFSET_DATA:
        (offset,) = struct.unpack_from(">Q", body)
        return Reply(cookie, 0, body[8:], offset=offset), 20 + length
    assert kind == P.REPLY_TYPE_ERROR
    error, mlen = P.ERROR_CHUNK_BODY.unpack_from(body)
    return Reply(cookie, error, message=body[6:6 + mlen]), 20 + length


class Client:
    """A blocking raw client over a Unix socket (tests only)."""

    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        greeting = self.recv_exact(18)
        magic, ihaveopt, _ = P.GREETING.unpack(greeting)
        assert (magic, ihaveopt) == (P.NBDMAGIC, P.IHAVEOPT)
        self.sock.sendall(client_flags())

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def option(self, opt: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option and read replies up to ACK or an error."""
        self.sock.sendall(option(opt, data))
        out = []
        while True:
            head = self.recv_exact(P.OPTION_REPLY.size)
            _, o, kind, length = P.OPTION_REPLY.unpack(head)
            out.append(OptionReply(o, kind, self.recv_exact(length)))
            if kind != P.REP_INFO and kind != P.REP_SERVER:
                return out

    def starttls(self, context: ssl.SSLContext) -> None:
        [rep] = self.option(P.OPT_STARTTLS)
        assert rep.kind == P.REP_ACK, rep
        assert isinstance(self.sock, socket.socket)
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def go(self, name: str) -> tuple[int, int]:
        """GO: (size, transmission flags)."""
        reps = self.option(P.OPT_GO, info_data(name, (P.INFO_BLOCK_SIZE,)))
        assert reps[-1].kind == P.REP_ACK, reps
        for r in reps:
            if r.kind == P.REP_INFO and r.data[:2] == b"\0\0":
                _, size, flags = P.INFO_EXPORT_BODY.unpack(r.data)
                return size, flags
        raise AssertionError("no NBD_INFO_EXPORT")

    def command(self, kind: int, cookie: int, offset: int = 0, length: int = 0,
                flags: int = 0, payload: bytes = b"") -> Reply:
        self.sock.sendall(request(kind, cookie, offset, length, flags, payload))
        head = self.recv_exact(16)
        (_, error, got) = P.SIMPLE_REPLY.unpack(head)
        data = self.recv_exact(length) if kind == P.CMD_READ and error == 0 else b""
        return Reply(got, error, data)

    def close(self) -> None:
        self.sock.close()
