"""The sans-I/O NBD codec alone: negotiation, commands, replies, limits."""

from __future__ import annotations

import struct

import nbdclient as nc
import pytest
import wire as P

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.nbd.codec import (
    NEED_DATA,
    PROBE,
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

EXPORT = ExportInfo("disk", size=1 << 20, min_block=512, preferred_block=4096)


def events(conn: ServerConnection) -> list[object]:
    out = []
    for _ in range(10_000):
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
    raise AssertionError("too many events")


def negotiated(structured: bool = False, export: ExportInfo = EXPORT) -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(nc.client_flags())
    if structured:
        conn.receive_data(nc.option(P.OPT_STRUCTURED_REPLY))
        [ev] = events(conn)
        assert isinstance(ev, StructuredReplies)
        conn.ack(ev)
    conn.receive_data(nc.option(P.OPT_GO, nc.info_data("disk")))
    [ev] = events(conn)
    assert isinstance(ev, InfoRequest)
    conn.info_reply(ev, export)
    assert conn.state is State.TRANSMISSION
    return conn


def test_greeting_known_answer() -> None:
    assert ServerConnection().greeting() == b"NBDMAGICIHAVEOPT\x00\x03"


@pytest.mark.parametrize("flags", [0, 2, 4, 0x80000001])
def test_client_flags_must_be_fixed_newstyle_and_known(flags: int) -> None:
    conn = ServerConnection()
    conn.receive_data(struct.pack(">I", flags))
    with pytest.raises(ProtocolError):
        conn.next_event()
    with pytest.raises(ProtocolError):  # a failed connection stays failed
        conn.next_event()


def test_protocol_error_is_an_invalid_request() -> None:
    assert issubclass(ProtocolError, InvalidRequest)


@pytest.mark.parametrize(("opt", "data", "event"), [
    (P.OPT_EXPORT_NAME, b"disk", ExportName("disk")),
    (P.OPT_ABORT, b"", Abort()),
    (P.OPT_LIST, b"", ListExports()),
    (P.OPT_STRUCTURED_REPLY, b"", StructuredReplies()),
    (P.OPT_INFO, nc.info_data("n\u00e9", (1, 3)), InfoRequest("n\u00e9", (1, 3), False)),
    (P.OPT_GO, nc.info_data("", ()), InfoRequest("", (), True)),
])
def test_option_round_trip(opt: int, data: bytes, event: object) -> None:
    conn = ServerConnection()
    conn.receive_data(nc.client_flags() + nc.option(opt, data))
    assert events(conn) == [event]


@pytest.mark.parametrize(("opt", "data", "code"), [
    (P.OPT_LIST, b"x", P.REP_ERR_INVALID),
    (P.OPT_STRUCTURED_REPLY, b"x", P.REP_ERR_INVALID),
    (P.OPT_STARTTLS, b"", P.REP_ERR_POLICY),  # no TLS configured
    (P.OPT_GO, b"\0\0", P.REP_ERR_INVALID),
    (P.OPT_GO, b"\0\0\0\x09ab\0\0", P.REP_ERR_INVALID),  # name length past the end
    (P.OPT_INFO, nc.info_data("a", (3,)) + b"\0", P.REP_ERR_INVALID),
    (P.OPT_INFO, b"\0\0\0\x02\xff\xfe\0\0", P.REP_ERR_INVALID),  # not UTF-8
    (4, b"", P.REP_ERR_UNSUP),  # PEEK_EXPORT
    (0xDEAD, b"abc", P.REP_ERR_UNSUP),
])
def test_bad_options_get_error_replies(opt: int, data: bytes, code: int) -> None:
    conn = ServerConnection()
    conn.receive_data(nc.client_flags() + nc.option(opt, data))
    [ev] = events(conn)
    assert isinstance(ev, OptionError) and (ev.option, ev.code) == (opt, code)
    [rep] = nc.parse_option_replies(conn.option_error(ev.option, ev.code, ev.message))
    assert (rep.option, rep.kind, rep.data) == (opt, code, ev.message.encode())
    assert conn.state is State.OPTIONS  # negotiation goes on


def test_oversized_option_is_skipped_not_stored() -> None:
    conn = ServerConnection()
    conn.receive_data(nc.client_flags() + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_LIST,
                                                               100 << 20))
    assert events(conn) == []
    for _ in range(100):  # 100 MiB of junk, 1 MiB at a time; memory stays bounded
        conn.receive_data(bytes(1 << 20))
        evs = events(conn)
        assert conn.buffered < 2 << 20
    assert [type(e) for e in evs] == [OptionError] and evs[0].code == P.REP_ERR_TOO_BIG
    conn.receive_data(nc.option(P.OPT_LIST))
    assert events(conn) == [ListExports()]


def test_list_reply_known_answer() -> None:
    conn = ServerConnection()
    conn.receive_data(nc.client_flags())
    events(conn)
    reps = nc.parse_option_replies(conn.list_reply(["a", "bb"]))
    assert [(r.kind, r.data) for r in reps] == [
        (P.REP_SERVER, b"\0\0\0\x01a"), (P.REP_SERVER, b"\0\0\0\x02bb"), (P.REP_ACK, b"")]


def test_info_reply_describes_the_export() -> None:
    conn = ServerConnection()
    conn.receive_data(nc.client_flags() + nc.option(P.OPT_INFO, nc.info_data("disk", (1, 2, 3))))
    [ev] = events(conn)
    export = ExportInfo("disk", 1 << 30, read_only=True, min_block=4096, description="d")
    reps = nc.parse_option_replies(conn.info_reply(ev, export))
    infos = {r.data[:2]: r.data[2:] for r in reps if r.kind == P.REP_INFO}
    size, flags = struct.unpack(">QH", infos[b"\0\0"])
    assert size == 1 << 30
    assert flags & P.TF_READ_ONLY and flags & P.TF_CAN_MULTI_CONN and flags & P.TF_HAS_FLAGS
    assert struct.unpack(">III", infos[b"\0\3"]) == (4096, 4096, 32 << 20)
    assert infos[b"\0\1"] == b"disk" and infos[b"\0\2"] == b"d"
    assert reps[-1].kind == P.REP_ACK
    assert conn.state is State.OPTIONS  # INFO does not start transmission


def test_info_without_block_size_request_is_refused_for_aligned_exports() -> None:
    conn = ServerConnection()
    conn.receive_data(nc.client_flags() + nc.option(P.OPT_INFO, nc.info_data("disk")))
    [ev] = events(conn)
    reps = nc.parse_option_replies(conn.info_reply(ev, EXPORT))
    assert reps[-1].kind == P.REP_ERR_BLOCK_SIZE_REQD


def test_export_name_reply_with_and_without_zeroes() -> None:
    for no_zeroes, size in ((True, 10), (False, 134)):
        conn = ServerConnection()
        conn.receive_data(nc.client_flags(no_zeroes) + nc.option(P.OPT_EXPORT_NAME, b"disk"))
        events(conn)
        reply = conn.export_name_reply(EXPORT)
        assert len(reply) == size
        assert struct.unpack_from(">QH", reply) == (EXPORT.size, EXPORT.flags)
        assert conn.state is State.TRANSMISSION


def test_export_info_validates_block_sizes() -> None:
    with pytest.raises(InvalidRequest):
        ExportInfo("x", 1, min_block=3)
    with pytest.raises(InvalidRequest):
        ExportInfo("x", 1, min_block=4096, preferred_block=512)
    with pytest.raises(InvalidRequest):
        ExportInfo("x", 1, max_payload=64 << 20)


def test_tls_required_refuses_options_until_starttls() -> None:
    conn = ServerConnection(tls_available=True, tls_required=True)
    conn.receive_data(nc.client_flags() + nc.option(P.OPT_LIST) + nc.option(P.OPT_STARTTLS))
    err, start = events(conn)
    assert isinstance(err, OptionError) and err.code == P.REP_ERR_TLS_REQD
    conn.option_error(err.option, err.code)
    assert isinstance(start, StartTLS)
    [rep] = nc.parse_option_replies(conn.ack(start))
    assert rep.kind == P.REP_ACK and conn.state is State.AWAIT_TLS
    conn.tls_established()
    conn.receive_data(nc.option(P.OPT_LIST))
    assert events(conn) == [ListExports()]


def test_tls_required_closes_on_export_name() -> None:
    conn = ServerConnection(tls_available=True, tls_required=True)
    conn.receive_data(nc.client_flags() + nc.option(P.OPT_EXPORT_NAME, b"x"))
    with pytest.raises(ProtocolError):
        events(conn)


def test_bytes_pipelined_after_starttls_are_refused() -> None:
    # plaintext injected before the handshake must never be read as protected data
    conn = ServerConnection(tls_available=True)
    conn.receive_data(nc.client_flags() + nc.option(P.OPT_STARTTLS) + nc.option(P.OPT_LIST))
    ev = conn.next_event()
    assert isinstance(ev, StartTLS)
    with pytest.raises(ProtocolError):
        conn.ack(ev)


@pytest.mark.parametrize("structured", [False, True])
def test_command_round_trips(structured: bool) -> None:
    conn = negotiated(structured)
    payload = bytes(range(256)) * 4
    conn.receive_data(
        nc.request(P.CMD_READ, 1, 512, 4096)
        + nc.request(P.CMD_WRITE, 2, 1024, len(payload), P.CMD_FLAG_FUA, payload)
        + nc.request(P.CMD_FLUSH, 3)
        + nc.request(P.CMD_TRIM, 4, 0, 8192)
        + nc.request(P.CMD_WRITE_ZEROES, 5, 4096, 512, P.CMD_FLAG_NO_HOLE)
        + nc.request(P.CMD_DISC, 6))
    assert events(conn) == [Read(1, 512, 4096), Write(2, 1024, payload, True), Flush(3),
                            Trim(4, 0, 8192, False), WriteZeroes(5, 4096, 512, False, True),
                            Disconnect()]
    assert conn.state is State.CLOSED
    data = b"x" * 4096
    reply, used = nc.parse_reply(conn.read_reply_header(7, 512, 4096) + data, 4096)
    assert (reply.cookie, reply.error, reply.data) == (7, 0, data)
    assert used == len(conn.read_reply_header(7, 512, 4096)) + 4096
    assert reply.offset == (512 if structured else None)
    reply, _ = nc.parse_reply(conn.reply(2**64 - 1))
    assert (reply.cookie, reply.error) == (2**64 - 1, 0)
    reply, _ = nc.parse_reply(conn.error_reply(9, P.EIO, "boom"))
    assert (reply.cookie, reply.error) == (9, P.EIO)
    assert reply.message == (b"boom" if structured else b"")


@pytest.mark.parametrize(("req", "error"), [
    (nc.request(P.CMD_READ, 1, 1 << 20, 512), P.EINVAL),  # past the end
    (nc.request(P.CMD_READ, 1, 0, 100), P.EINVAL),  # unaligned
    (nc.request(P.CMD_READ, 1, 0, 0), P.EINVAL),
    (nc.request(P.CMD_READ, 1, 0, 64 << 20), P.EINVAL),  # over the maximum
    (nc.request(P.CMD_READ, 1, 0, 512, P.CMD_FLAG_FUA), P.EINVAL),
    (nc.request(P.CMD_FLUSH, 1, 0, 0, P.CMD_FLAG_FUA), P.EINVAL),
    (nc.request(P.CMD_WRITE_ZEROES, 1, 0, 512, P.CMD_FLAG_FAST_ZERO), P.EINVAL),
    (nc.request(P.CMD_WRITE, 1, (1 << 20) - 512, 1024, 0, bytes(1024)), P.ENOSPC),
    (nc.request(P.CMD_BLOCK_STATUS, 1, 0, 512), P.EINVAL),
    (nc.request(P.CMD_CACHE, 1, 0, 512), P.EINVAL),
])
def test_bad_requests_get_error_replies(req: bytes, error: int) -> None:
    conn = negotiated()
    conn.receive_data(req + nc.request(P.CMD_FLUSH, 2))
    assert events(conn) == [CommandError(1, error, events_message(conn, req)), Flush(2)]


def events_message(conn: ServerConnection, req: bytes) -> str:
    """The message the codec gives (only the errno and cookie are on the wire)."""
    probe = negotiated()
    probe.receive_data(req)
    ev = probe.next_event()
    assert isinstance(ev, CommandError)
    return ev.message


def test_read_only_export_refuses_writes_with_eperm() -> None:
    conn = negotiated(export=ExportInfo("disk", 1 << 20, read_only=True))
    conn.receive_data(nc.request(P.CMD_WRITE, 1, 0, 4096, 0, bytes(4096))
                      + nc.request(P.CMD_TRIM, 2, 0, 4096)
                      + nc.request(P.CMD_WRITE_ZEROES, 3, 0, 4096)
                      + nc.request(P.CMD_READ, 4, 0, 4096))
    evs = events(conn)
    assert [(e.cookie, e.error) for e in evs[:3]] == [(1, P.EPERM), (2, P.EPERM),
                                                       (3, P.EPERM)]
    assert evs[3] == Read(4, 0, 4096)


def test_big_write_is_received_in_place() -> None:
    conn = negotiated()
    payload = bytes(range(256)) * 4096  # 1 MiB, over the small-write threshold
    conn.receive_data(nc.request(P.CMD_WRITE, 5, 0, len(payload)))
    assert conn.next_event() is NEED_DATA
    pos = 0
    for _ in range(1000):
        buf = conn.get_buffer()
        n = min(len(buf), len(payload) - pos, 300_000)
        buf[:n] = payload[pos:pos + n]
        conn.buffer_updated(n)
        pos += n
        ev = conn.next_event()
        if ev is not NEED_DATA:
            break
    assert ev == Write(5, 0, payload, False) and isinstance(ev.data, memoryview)


def test_after_a_big_write_only_a_header_is_asked_for() -> None:
    """A transport fills whatever get_buffer offers. After a big WRITE the codec offers
    one request header, so a following big WRITE's payload goes straight into its own
    buffer instead of into the receive buffer (to be copied out). Whatever comes next,
    every byte still parses the same way."""
    conn = negotiated()
    payload = bytes(range(256)) * 1024  # 256 KiB, over the small-write threshold
    recv_size = len(conn.get_buffer())
    stream = b"".join([nc.request(P.CMD_WRITE, 1, 0, len(payload)), payload,
                       nc.request(P.CMD_WRITE, 2, 0, len(payload)), payload,
                       nc.request(P.CMD_READ, 3, 0, 4096)])
    pos, got, offered = 0, [], []
    for _ in range(100):
        buf = conn.get_buffer()
        offered.append(len(buf))
        n = min(len(buf), len(stream) - pos)
        buf[:n] = stream[pos:pos + n]
        conn.buffer_updated(n)
        pos += n
        while (ev := conn.next_event()) is not NEED_DATA:
            got.append(ev)
        if pos == len(stream):
            break
    assert got == [Write(1, 0, payload, False), Write(2, 0, payload, False),
                   Read(3, 0, 4096)]
    # the first read took header 1 and most of payload 1 (copied out), the next its
    # last 28 bytes; then header 2 and the first PROBE bytes of payload 2 (which ask for
    # its buffer), then the rest of payload 2, in place
    assert offered[:4] == [recv_size, 28, 28 + PROBE, len(payload) - PROBE], offered


def test_incomplete_write_is_never_an_event() -> None:
    conn = negotiated()
    conn.receive_data(nc.request(P.CMD_WRITE, 1, 0, 4096) + bytes(4095))
    assert events(conn) == []
    conn = negotiated()
    conn.receive_data(nc.request(P.CMD_WRITE, 2, 0, 1 << 20) + bytes((1 << 20) - 1))
    assert events(conn) == []


def test_write_over_the_limit_is_fatal() -> None:
    conn = negotiated()
    conn.receive_data(nc.request(P.CMD_WRITE, 1, 0, (32 << 20) + 512))
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_bad_magic_is_fatal() -> None:
    conn = negotiated()
    conn.receive_data(b"\0" * 28)
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_replies_only_in_the_right_state() -> None:
    conn = ServerConnection()
    with pytest.raises(ProtocolError):
        conn.list_reply([])
    with pytest.raises(ProtocolError):
        conn.tls_established()


def test_the_servers_wire_values_are_the_documents() -> None:
    """Every value the tests speak is typed in from proto.md (tests/nbd/wire.py); the
    server's own module must say the same, or it speaks another protocol."""
    import wire

    from cryptoplane.nbd import protocol

    names = [n for n in dir(wire) if n.isupper()]
    assert len(names) > 50
    for name in names:
        theirs, ours = getattr(protocol, name), getattr(wire, name)
        if hasattr(ours, "format"):
            assert (theirs.format, theirs.size) == (ours.format, ours.size), name
        else:
            assert theirs == ours, name
    assert wire.REP_ERR_TLS_REQD == 0x80000005  # 2^31 + 5
