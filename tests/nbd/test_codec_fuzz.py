"""Fuzzing the NBD codec with hypothesis: whatever bytes arrive, split wherever, the codec
yields events or raises ProtocolError, and its memory stays bounded."""

from __future__ import annotations

import os

import nbdclient as nc
import wire as P
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptoplane.nbd.codec import (
    MAX_SPARE,
    NEED_DATA,
    RECV_BUFFER,
    Abort,
    CommandError,
    Disconnect,
    ExportInfo,
    ExportName,
    Flush,
    InfoRequest,
    ListExports,
    OptionError,
    ProtocolError,
    Read,
    ServerConnection,
    StartTLS,
    State,
    StructuredReplies,
    Trim,
    Write,
    WriteZeroes,
)

EXPORT = ExportInfo("disk", size=1 << 20, min_block=1, max_payload=1 << 20)
BOUND = RECV_BUFFER + (1 + MAX_SPARE) * EXPORT.max_payload
FUZZ = settings(max_examples=int(os.environ.get("NBD_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def respond(conn: ServerConnection, ev: object) -> bytes:
    """Answer an event the way the server does (so the state machine moves on)."""
    if isinstance(ev, OptionError):
        return conn.option_error(ev.option, ev.code, ev.message)
    if isinstance(ev, ListExports):
        return conn.list_reply(["disk", "other"])
    if isinstance(ev, StructuredReplies | Abort):
        return conn.ack(ev)
    if isinstance(ev, StartTLS):
        out = conn.ack(ev)
        conn.tls_established()  # as if the handshake succeeded
        return out
    if isinstance(ev, InfoRequest):
        return conn.info_reply(ev, EXPORT)
    if isinstance(ev, ExportName):
        return conn.export_name_reply(EXPORT)
    if isinstance(ev, Read):
        return conn.read_reply_header(ev.cookie, ev.offset, ev.length)
    if isinstance(ev, Write):
        conn.recycle(ev.data)  # as the server does once the device wrote it
    if isinstance(ev, Write | Flush | Trim | WriteZeroes):
        return conn.reply(ev.cookie)
    if isinstance(ev, CommandError):
        return conn.error_reply(ev.cookie, ev.error, ev.message)
    assert isinstance(ev, Disconnect)
    return b""


def pump(conn: ServerConnection, chunks: list[bytes], zero_copy: bool) -> list[object]:
    seen: list[object] = []
    for chunk in chunks:
        if zero_copy:
            pos = 0
            while pos < len(chunk):
                buf = conn.get_buffer()
                n = min(len(buf), len(chunk) - pos)
                buf[:n] = chunk[pos:pos + n]
                conn.buffer_updated(n)
                pos += n
                seen += drain(conn)
        else:
            conn.receive_data(chunk)
            seen += drain(conn)
        assert conn.memory_in_use <= BOUND + (0 if zero_copy else len(chunk))
    return seen


def drain(conn: ServerConnection) -> list[object]:
    seen = []
    for _ in range(100_000):
        ev = conn.next_event()
        if ev is NEED_DATA:
            return seen
        respond(conn, ev)
        seen.append(ev)
    raise AssertionError("the codec produced events without end")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def run_stream(tls: bool, data: bytes, cuts: list[int], zero_copy: bool) -> None:
    conn = ServerConnection(tls_available=tls)
    try:
        pump(conn, split(data, cuts), zero_copy)
    except ProtocolError:
        assert conn.state is State.ERROR


@FUZZ
@given(st.booleans(), st.binary(max_size=2000), st.lists(st.integers(0, 4000), max_size=8),
       st.booleans())
def test_arbitrary_bytes(tls: bool, data: bytes, cuts: list[int], zero_copy: bool) -> None:
    run_stream(tls, data, cuts, zero_copy)


_names = st.text(max_size=8)
_options = st.one_of(
    st.builds(lambda n: nc.option(P.OPT_EXPORT_NAME, n.encode()), _names),
    st.builds(lambda n, r, go: nc.option(P.OPT_GO if go else P.OPT_INFO, nc.info_data(n, r)),
              _names, st.lists(st.integers(0, 5), max_size=4).map(tuple), st.booleans()),
    st.sampled_from([nc.option(P.OPT_LIST), nc.option(P.OPT_STRUCTURED_REPLY),
                     nc.option(P.OPT_STARTTLS), nc.option(P.OPT_ABORT), nc.option(4)]),
    st.builds(lambda o, d: nc.option(o, d), st.integers(0, 2**32 - 1), st.binary(max_size=40)),
    st.binary(max_size=40),
)
_sizes = st.sampled_from([0, 1, 512, 4096, 65536, 65537, 200_000, 1 << 20, (1 << 20) + 1,
                          2**32 - 1])
_requests = st.one_of(
    st.builds(lambda k, c, o, n, f: nc.request(k, c, o, n, f),
              st.sampled_from([0, 2, 3, 4, 5, 6, 7, 99]), st.integers(0, 2**64 - 1),
              st.sampled_from([0, 512, (1 << 20) - 512, 1 << 20, 2**64 - 1]), _sizes,
              st.sampled_from([0, 1, 2, 16, 0xFFFF])),
    st.builds(lambda c, o, n, f, frac: nc.request(1, c, o, n, f, bytes(int(min(n, 300_000)
                                                                            * frac))),
              st.integers(0, 2**64 - 1), st.sampled_from([0, 4096, (1 << 20) - 4096]),
              _sizes, st.sampled_from([0, 1, 4]), st.sampled_from([1.0, 1.0, 0.5, 0.0])),
    st.binary(max_size=64),
)


@FUZZ
@given(st.booleans(), st.lists(_options, max_size=6), st.lists(_requests, max_size=8),
       st.lists(st.integers(0, 10**6), max_size=8), st.booleans())
def test_structured_streams(tls: bool, options: list[bytes], requests: list[bytes],
                            cuts: list[int], zero_copy: bool) -> None:
    go = nc.option(P.OPT_GO, nc.info_data("disk", (3,)))
    data = nc.client_flags() + b"".join(options) + go + b"".join(requests)
    run_stream(tls, data, cuts, zero_copy)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, (1 << 20) // 512 - 1).map(lambda b: b * 512),
       st.binary(min_size=1, max_size=4096), st.booleans(), st.booleans())
def test_write_read_round_trip(cookie: int, offset: int, payload: bytes, fua: bool,
                               structured: bool) -> None:
    conn = ServerConnection()
    conn.receive_data(nc.client_flags())
    if structured:
        conn.receive_data(nc.option(P.OPT_STRUCTURED_REPLY))
    conn.receive_data(nc.option(P.OPT_GO, nc.info_data("disk")))
    drain(conn)
    length = min(len(payload), EXPORT.size - offset)
    payload = payload[:length]
    conn.receive_data(nc.request(P.CMD_WRITE, cookie, offset, length,
                                 P.CMD_FLAG_FUA if fua else 0, payload)
                      + nc.request(P.CMD_READ, cookie, offset, length))
    write, read = conn.next_event(), conn.next_event()
    assert write == Write(cookie, offset, payload, fua)
    assert read == Read(cookie, offset, length)
    reply, _ = nc.parse_reply(conn.read_reply_header(cookie, offset, length) + payload,
                                 length)
    assert (reply.cookie, reply.error, reply.data) == (cookie, 0, payload)
    err, _ = nc.parse_reply(conn.error_reply(cookie, P.EIO, "x"))
    assert (err.cookie, err.error) == (cookie, P.EIO)


def test_byte_by_byte_handshake_and_commands() -> None:
    data = (nc.client_flags() + nc.option(P.OPT_LIST) + nc.option(P.OPT_GO, nc.info_data("disk"))
            + nc.request(P.CMD_WRITE, 1, 0, 3, 0, b"abc") + nc.request(P.CMD_DISC, 2))
    conn = ServerConnection()
    seen = pump(conn, [bytes([b]) for b in data], zero_copy=False)
    assert [type(e) for e in seen] == [ListExports, InfoRequest, Write, Disconnect]
