"""A sans-I/O NBD server connection: bytes in, events out; replies out as bytes.

In the manner of h11: ``ServerConnection`` never touches a socket. Feed it what arrived
(``receive_data``, or ``get_buffer``/``buffer_updated`` for a zero-copy transport), pull
events with ``next_event`` until ``NEED_DATA``, and answer each with the method that
encodes the reply. Malformed input that can be answered becomes an event carrying the
NBD error to send (``OptionError``, ``CommandError``); input after which the stream can no
longer be trusted raises ``ProtocolError`` and the connection must be closed.

Memory is bounded whatever the client sends: a fixed receive buffer, option data capped
at ``MAX_OPTION_DATA`` (bigger options are skipped without being stored), at most
``max_options`` options, and one WRITE payload of at most ``max_payload`` bytes at a
time, received into its own buffer. Buffers are anonymous mappings whose pages cost
nothing until data lands in them, and a payload's buffer is only asked for (``allocate``)
once its first byte has arrived: a header announcing 32 MiB, then silence, holds nothing.
When ``allocate`` says no (the server's memory budget is spent), ``next_event`` returns
``NEED_DATA`` and ``memory_wanted`` says how much is waited for; the caller stops
reading and asks again once memory is given back.
"""

from __future__ import annotations

import enum
import mmap
from collections.abc import Callable
from typing import Any, Final

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.nbd import protocol as P
from cryptoplane.nbd.protocol import (  # the codec's events
    Abort,
    CommandError,
    Disconnect,
    Event,
    ExportInfo,
    ExportName,
    Flush,
    InfoRequest,
    ListExports,
    OptionError,
    Read,
    StartTLS,
    StructuredReplies,
    Trim,
    Write,
    WriteZeroes,
)


class ProtocolError(InvalidRequest):
    """The peer broke the NBD protocol; the connection cannot continue."""


class State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    AWAIT_TLS = "await-tls"
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


class NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


RECV_BUFFER = 256 * 1024
# WRITE payloads up to this size are parsed out of the receive buffer; bigger ones are
# received straight into their own buffer (no copy of the bulk of the data)
SMALL_WRITE = 64 * 1024
MAX_SPARE = 4  # recycled payload buffers kept (each at most max_payload bytes)
# what is received with a big WRITE's header (and copied out of the receive buffer): its
# payload's first bytes, which are what asks for the payload's buffer
PROBE = 4096
MAX_OPTIONS = 32  # as nbdkit: a client that needs more is looping

_WRITE_FLAGS = P.CMD_FLAG_FUA
_ZERO_FLAGS = P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE
_TLS_EXEMPT = (P.OPT_STARTTLS, P.OPT_ABORT)


def anonymous(n: int) -> mmap.mmap:
    """``n`` bytes of anonymous private memory, no page touched yet."""
    return mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class ServerConnection:
    """The server side of one NBD connection (fixed newstyle)."""

    def __init__(self, *, tls_available: bool = False, tls_required: bool = False,
                 structured_replies: bool = True, max_options: int = MAX_OPTIONS,
                 allocate: Callable[[int], Any] | None = None) -> None:
        """``allocate(n)``: a writable buffer of ``n`` bytes for a WRITE payload, or None
        when there is no memory for it now (default: an unaccounted anonymous mapping)."""
        if tls_required and not tls_available:
            raise InvalidRequest("TLS cannot be required without being available")
        if max_options < 1:
            raise InvalidRequest("max_options must be at least 1")
        self.max_options = max_options
        self._options = 0
        self._allocate: Callable[[int], Any] = allocate or anonymous
        self.tls_available = tls_available
        self.tls_required = tls_required
        self.allow_structured = structured_replies
        self.tls_active = False
        self.structured = False
        self.no_zeroes = False
        self.state = State.CLIENT_FLAGS
        self.export: ExportInfo | None = None
        # pages a client never fills are never touched: an idle connection costs one
        self._buf = anonymous(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._backlog = bytearray()  # receive_data() input not yet in the buffer
        self._skip = 0  # payload bytes to discard (refused option or refused WRITE)
        self._after_skip: Event | None = None
        self._payload: Any = None  # the buffer of a big WRITE being received
        self._want: tuple[int, int, int, bool] | None = None  # (length, cookie, offset,
        # fua) of a big WRITE whose payload has no buffer yet
        self._starved = False  # ``allocate`` said no for ``_want``
        self._payload_have = 0
        self._payload_req: tuple[int, int, bool] = (0, 0, False)
        self._error: str | None = None
        self._spare: list[Any] = []  # payload buffers given back by ``recycle``
        self._header_only = False  # ask for one request header next (see get_buffer)

    # ---- input ----------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the transport should put the next bytes it receives (never empty)."""
        if self._payload is not None:
            return memoryview(self._payload)[self._payload_have:]
        if self._start == self._end:
            self._start = self._end = 0
            if self._header_only or self._want is not None:
                # After a big WRITE the next request is likely one too: take just its
                # header and its payload's first bytes, so that the rest lands in its
                # own buffer rather than here, to be copied out (nbdcopy's 256 KiB
                # writes had 54% of each copied).
                self._header_only = False
                return self._view[:P.REQUEST.size + PROBE]
        elif self._end == len(self._buf) or self._start > len(self._buf) // 2:
            n = self._end - self._start
            self._buf.move(0, self._start, n)
            self._start, self._end = 0, n
        if self._end == len(self._buf):
            # a parseable unit always fits the buffer: the caller stopped pulling events
            raise self._fail("receive buffer full: events were not consumed")
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last ``get_buffer`` view."""
        if self._payload is not None:
            self._payload_have += nbytes
        else:
            self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Queue received bytes (copied); ``next_event`` parses them."""
        self._backlog += data

    def _pull_backlog(self) -> bool:
        if not self._backlog:
            return False
        buf = self.get_buffer()
        n = min(len(buf), len(self._backlog))
        buf[:n] = self._backlog[:n]
        del self._backlog[:n]
        self.buffer_updated(n)
        return True

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed."""
        return self._end - self._start + len(self._backlog)

    @property
    def receiving(self) -> bool:
        """Part of a request or option has arrived, not all of it."""
        return (self._end > self._start or self._payload is not None
                or self._want is not None or self._skip > 0)

    @property
    def memory_wanted(self) -> int:
        """Bytes of a WRITE payload that ``allocate`` could not give yet, else 0."""
        return self._want[0] if self._starved and self._want is not None else 0

    def drop_spares(self) -> None:
        """Forget the recycled payload buffers (the server wants the memory back)."""
        self._spare.clear()

    @property
    def memory_in_use(self) -> int:
        """Bytes the codec holds for input (bounded, except what ``receive_data`` queued)."""
        payload = len(self._payload) if self._payload is not None else 0
        spare = sum(len(b) for b in self._spare)
        return len(self._buf) + payload + spare + len(self._backlog)

    def _fail(self, message: str) -> ProtocolError:
        self.state = State.ERROR
        self._error = message
        return ProtocolError(message)

    # ---- events ---------------------------------------------------------------------

    def next_event(self) -> Event | NeedData:
        """The next event, or ``NEED_DATA``; raises only ``ProtocolError``."""
        if self.state is State.TRANSMISSION and not self._backlog:
            return self._parse_request()  # the hot path: one call per request
        while True:
            ev = self._parse()
            if ev is not NEED_DATA or not self._pull_backlog():
                return ev

    def _parse(self) -> Event | NeedData:
        state = self.state
        if state is State.TRANSMISSION:
            return self._parse_request()
        if state is State.ERROR:
            raise ProtocolError(self._error or "the connection failed")
        if state is State.CLOSED:
            self._start = self._end  # nothing after DISC or ABORT matters
            return NEED_DATA
        if state is State.AWAIT_TLS:
            if self._end > self._start:
                raise self._fail("data arrived before the TLS handshake")
            return NEED_DATA
        if state is State.CLIENT_FLAGS:
            if self._end - self._start < 4:
                return NEED_DATA
            (flags,) = P.CLIENT_FLAGS.unpack_from(self._buf, self._start)
            self._start += 4
            if not flags & P.CLIENT_FIXED_NEWSTYLE:
                raise self._fail("the client does not speak fixed newstyle NBD")
            if flags & ~P.KNOWN_CLIENT_FLAGS:
                raise self._fail(f"unknown client flags {flags:#x}")
            self.no_zeroes = bool(flags & P.CLIENT_NO_ZEROES)
            self.state = State.OPTIONS
            return self._parse()
        return self._parse_option()

    def _take_skip(self) -> bool:
        """Discard skipped bytes; True when the skip is over."""
        n = min(self._skip, self._end - self._start)
        self._start += n
        self._skip -= n
        return self._skip == 0

    def _parse_option(self) -> Event | NeedData:
        if self._skip:
            if not self._take_skip():
                return NEED_DATA
            ev, self._after_skip = self._after_skip, None
            assert ev is not None
            return ev
        avail = self._end - self._start
        if avail < P.OPTION_HEADER.size:
            return NEED_DATA
        magic, option, length = P.OPTION_HEADER.unpack_from(self._buf, self._start)
        if magic != P.IHAVEOPT:
            raise self._fail("bad option magic")
        if self._options >= self.max_options:
            raise self._fail(f"more than {self.max_options} options")
        if length > P.MAX_OPTION_DATA:
            if option == P.OPT_EXPORT_NAME:
                raise self._fail("export name too long")
            self._start += P.OPTION_HEADER.size
            self._options += 1
            self._skip = length
            self._after_skip = OptionError(option, P.REP_ERR_TOO_BIG,
                                           f"option data of {length} bytes is too big")
            return self._parse_option()
        if avail < P.OPTION_HEADER.size + length:
            return NEED_DATA
        begin = self._start + P.OPTION_HEADER.size
        data = bytes(self._view[begin:begin + length])
        self._start = begin + length
        self._options += 1
        return self._decode_option(option, data)

    def _decode_option(self, option: int, data: bytes) -> Event:
        if self.tls_required and not self.tls_active and option not in _TLS_EXEMPT:
            if option == P.OPT_EXPORT_NAME:
                raise self._fail("EXPORT_NAME before TLS on a TLS-only server")
            return OptionError(option, P.REP_ERR_TLS_REQD, "TLS is required")
        if option == P.OPT_EXPORT_NAME:
            try:
                return ExportName(data.decode("utf-8"))
            except UnicodeDecodeError:
                raise self._fail("export name is not UTF-8") from None
        if option == P.OPT_ABORT:
            return Abort()
        if option in (P.OPT_INFO, P.OPT_GO):
            return self._decode_info(option, data)
        if option not in (P.OPT_LIST, P.OPT_STARTTLS, P.OPT_STRUCTURED_REPLY):
            return OptionError(option, P.REP_ERR_UNSUP, f"option {option} is not supported")
        if data:
            return OptionError(option, P.REP_ERR_INVALID, "this option takes no data")
        if option == P.OPT_LIST:
            return ListExports()
        if option == P.OPT_STARTTLS:
            if not self.tls_available:
                return OptionError(option, P.REP_ERR_POLICY, "TLS is not configured")
            if self.tls_active:
                return OptionError(option, P.REP_ERR_INVALID, "TLS is already active")
            return StartTLS()
        if not self.allow_structured:
            return OptionError(option, P.REP_ERR_UNSUP, "structured replies are disabled")
        if self.structured:
            return OptionError(option, P.REP_ERR_INVALID, "structured replies already on")
        return StructuredReplies()

    def _decode_info(self, option: int, data: bytes) -> Event:
        if len(data) < 6:
            return OptionError(option, P.REP_ERR_INVALID, "option data too short")
        namelen = int.from_bytes(data[:4], "big")
        if namelen > len(data) - 6 or namelen > P.MAX_NAME:
            return OptionError(option, P.REP_ERR_INVALID, "bad export name length")
        count = int.from_bytes(data[4 + namelen:6 + namelen], "big")
        if len(data) != 6 + namelen + 2 * count:
            return OptionError(option, P.REP_ERR_INVALID, "bad information request list")
        try:
            name = data[4:4 + namelen].decode("utf-8")
        except UnicodeDecodeError:
            return OptionError(option, P.REP_ERR_INVALID, "export name is not UTF-8")
        base = 6 + namelen
        reqs = tuple(int.from_bytes(data[base + 2 * i:base + 2 * i + 2], "big")
                     for i in range(count))
        return InfoRequest(name, reqs, option == P.OPT_GO)

    def _parse_request(self) -> Event | NeedData:
        if self._payload is not None:
            if self._payload_have < len(self._payload):
                return NEED_DATA
            payload, self._payload = self._payload, None
            cookie, offset, fua = self._payload_req
            self._header_only = True
            # a view: compares equal to the bytes it holds, as a small WRITE's do
            return Write(cookie, offset, memoryview(payload), fua)
        if self._want is not None:
            return self._take_payload()
        if self._skip:
            if not self._take_skip():
                return NEED_DATA
            ev, self._after_skip = self._after_skip, None
            assert ev is not None
            return ev
        start = self._start
        avail = self._end - start
        if avail < 28:
            return NEED_DATA
        magic, flags, kind, cookie, offset, length = P.REQUEST.unpack_from(self._buf, start)
        if magic != P.REQUEST_MAGIC:
            raise self._fail("bad request magic")
        export = self.export
        assert export is not None
        if kind == P.CMD_WRITE:
            if length > export.max_payload:
                raise self._fail(f"WRITE of {length} bytes is over the {export.max_payload} "
                                 "byte limit")
            small = length <= SMALL_WRITE
            if small and avail < 28 + length:
                return NEED_DATA
            self._start = start + 28
            err = self._check(flags, _WRITE_FLAGS, offset, length, True)
            if err is not None:
                self._skip = length
                self._after_skip = CommandError(cookie, err[0], err[1])
                return self._parse_request()
            fua = bool(flags & P.CMD_FLAG_FUA)
            if small:
                self._start += length
                return Write(cookie, offset, bytes(self._view[start + 28:self._start]), fua)
            self._want = (length, cookie, offset, fua)
            return self._take_payload()
        self._start = start + 28
        if kind == P.CMD_READ:
            if length > export.max_payload:
                return CommandError(cookie, P.EINVAL, "read larger than the maximum")
            err = self._check(flags, 0, offset, length, False)
            return Read(cookie, offset, length) if err is None else CommandError(cookie, *err)
        if kind == P.CMD_FLUSH:
            if flags:
                return CommandError(cookie, P.EINVAL, "FLUSH takes no flags")
            return Flush(cookie)
        if kind == P.CMD_TRIM:
            err = self._check(flags, _WRITE_FLAGS, offset, length, True)
            if err is not None:
                return CommandError(cookie, *err)
            return Trim(cookie, offset, length, bool(flags & P.CMD_FLAG_FUA))
        if kind == P.CMD_WRITE_ZEROES:
            err = self._check(flags, _ZERO_FLAGS, offset, length, True)
            if err is not None:
                return CommandError(cookie, *err)
            return WriteZeroes(cookie, offset, length, bool(flags & P.CMD_FLAG_FUA),
                               bool(flags & P.CMD_FLAG_NO_HOLE))
        if kind == P.CMD_DISC:
            self.state = State.CLOSED
            return Disconnect()
        return CommandError(cookie, P.EINVAL, f"command {kind} is not supported")

    def _take_payload(self) -> Event | NeedData:
        """Give the announced WRITE payload a buffer, once its first byte is here."""
        assert self._want is not None
        length, cookie, offset, fua = self._want
        have = min(length, self._end - self._start)
        if have == 0:
            return NEED_DATA
        payload = self._payload_buffer(length)
        if payload is None:
            self._starved = True
            return NEED_DATA
        self._want, self._starved = None, False
        payload[:have] = self._view[self._start:self._start + have]
        self._start += have
        self._payload, self._payload_have = payload, have
        self._payload_req = (cookie, offset, fua)
        return self._parse_request()

    def _payload_buffer(self, length: int) -> Any:
        for i, spare in enumerate(self._spare):
            if len(spare) == length:
                return self._spare.pop(i)
        return self._allocate(length)

    def recycle(self, payload: bytes | memoryview) -> bool:
        """Give back a big WRITE's payload once the device is done with it: the next
        WRITE of that size is received into it (no new allocation, no page faults).
        True when it was kept."""
        if (isinstance(payload, memoryview) and len(payload) > SMALL_WRITE
                and len(self._spare) < MAX_SPARE):
            self._spare.append(payload.obj)
            return True
        return False

    def _check(self, flags: int, allowed: int, offset: int, length: int,
               writes: bool) -> tuple[int, str] | None:
        export = self.export
        assert export is not None
        if flags & ~allowed:
            return P.EINVAL, f"unsupported command flags {flags:#x}"
        if writes and export.read_only:
            return P.EPERM, "the export is read-only"
        if length == 0:
            return P.EINVAL, "zero-length request"
        if offset + length > export.size:
            return (P.ENOSPC if writes else P.EINVAL), "request beyond the end of the export"
        mask = export.min_block - 1
        if (offset | length) & mask:
            return P.EINVAL, f"request not aligned to {export.min_block} bytes"
        return None

    # ---- output: negotiation ----------------------------------------------------------

    def greeting(self) -> bytes:
        """The server's first bytes."""
        return P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT,
                               P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)

    @staticmethod
    def _rep(option: int, kind: int, data: bytes = b"") -> bytes:
        return P.OPTION_REPLY.pack(P.REPLY_MAGIC, option, kind, len(data)) + data

    def option_error(self, option: int, code: int, message: str = "") -> bytes:
        """An NBD_REP_ERR_* reply to ``option``."""
        self._expect(State.OPTIONS)
        if not code & P.REP_FLAG_ERROR:
            raise InvalidRequest(f"{code:#x} is not an option error code")
        return self._rep(option, code, message.encode("utf-8")[:1024])

    def ack(self, event: Abort | StartTLS | StructuredReplies) -> bytes:
        """Accept ABORT (then close), STARTTLS (then handshake) or STRUCTURED_REPLY."""
        self._expect(State.OPTIONS)
        if isinstance(event, Abort):
            self.state = State.CLOSED
            return self._rep(P.OPT_ABORT, P.REP_ACK)
        if isinstance(event, StartTLS):
            if self.buffered:
                # bytes sent in the clear before the handshake must never be read as if
                # they came through TLS (the STARTTLS injection attack)
                raise self._fail("data was sent after STARTTLS before the TLS handshake")
            self.state = State.AWAIT_TLS
            return self._rep(P.OPT_STARTTLS, P.REP_ACK)
        self.structured = True
        return self._rep(P.OPT_STRUCTURED_REPLY, P.REP_ACK)

    def tls_established(self) -> None:
        """The TLS handshake after STARTTLS succeeded: negotiation goes on inside it."""
        self._expect(State.AWAIT_TLS)
        self.tls_active = True
        self.structured = False  # the spec: state negotiated in the clear is forgotten
        self.state = State.OPTIONS

    def list_reply(self, names: list[str]) -> bytes:
        """NBD_REP_SERVER for each export, then NBD_REP_ACK."""
        self._expect(State.OPTIONS)
        parts = []
        for name in names:
            raw = name.encode("utf-8")
            parts.append(self._rep(P.OPT_LIST, P.REP_SERVER, len(raw).to_bytes(4, "big") + raw))
        parts.append(self._rep(P.OPT_LIST, P.REP_ACK))
        return b"".join(parts)

    def info_reply(self, event: InfoRequest, export: ExportInfo) -> bytes:
        """Describe ``export``; for GO, transmission starts once this is sent."""
        self._expect(State.OPTIONS)
        opt = P.OPT_GO if event.go else P.OPT_INFO
        parts = [self._rep(opt, P.REP_INFO,
                           P.INFO_EXPORT_BODY.pack(P.INFO_EXPORT, export.size, export.flags))]
        asked_sizes = P.INFO_BLOCK_SIZE in event.requests
        parts.append(self._rep(opt, P.REP_INFO, P.INFO_BLOCK_SIZE_BODY.pack(
            P.INFO_BLOCK_SIZE, export.min_block, export.preferred_block, export.max_payload)))
        if P.INFO_NAME in event.requests:
            parts.append(self._rep(opt, P.REP_INFO, P.INFO_NAME.to_bytes(2, "big")
                                   + export.name.encode("utf-8")))
        if P.INFO_DESCRIPTION in event.requests and export.description:
            parts.append(self._rep(opt, P.REP_INFO, P.INFO_DESCRIPTION.to_bytes(2, "big")
                                   + export.description.encode("utf-8")[:4096]))
        if not event.go and not asked_sizes and export.min_block > 1:
            parts.append(self._rep(opt, P.REP_ERR_BLOCK_SIZE_REQD,
                                   b"request NBD_INFO_BLOCK_SIZE to use this export"))
            return b"".join(parts)
        parts.append(self._rep(opt, P.REP_ACK))
        if event.go:
            self._enter_transmission(export)
        return b"".join(parts)

    def export_name_reply(self, export: ExportInfo) -> bytes:
        """The answer to EXPORT_NAME; transmission starts once this is sent."""
        self._expect(State.OPTIONS)
        self._enter_transmission(export)
        reply = P.EXPORT_NAME_REPLY.pack(export.size, export.flags)
        return reply if self.no_zeroes else reply + bytes(124)

    def _enter_transmission(self, export: ExportInfo) -> None:
        self.export = export
        self.state = State.TRANSMISSION

    def _expect(self, state: State) -> None:
        if self.state is not state:
            raise ProtocolError(f"cannot send that in state {self.state.value}")

    # ---- output: transmission ---------------------------------------------------------

    def reply(self, cookie: int) -> bytes:
        """Success of a request without data."""
        if self.structured:
            return P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                           P.REPLY_TYPE_NONE, cookie, 0)
        return P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie)

    @property
    def read_header_size(self) -> int:
        """Bytes ``pack_read_header`` writes."""
        return P.OFFSET_DATA_HEAD.size if self.structured else P.SIMPLE_REPLY.size

    def pack_read_header(self, buf: Any, cookie: int, offset: int, length: int) -> None:
        """Write ``read_reply_header`` at the start of ``buf`` (so header and data can go
        out as one buffer, the data read in right behind the header)."""
        if self.structured:
            P.OFFSET_DATA_HEAD.pack_into(buf, 0, P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                         P.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset)
        else:
            P.SIMPLE_REPLY.pack_into(buf, 0, P.SIMPLE_REPLY_MAGIC, 0, cookie)

    def read_reply_header(self, cookie: int, offset: int, length: int) -> bytes:
        """What precedes the ``length`` bytes of a successful READ at ``offset``."""
        if self.structured:
            return P.OFFSET_DATA_HEAD.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                           P.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length,
                                           offset)
        return P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie)

    def error_reply(self, cookie: int, error: int, message: str = "") -> bytes:
        """Failure of a request with an NBD errno (``protocol.EIO``...)."""
        if not 0 < error < 1 << 32:
            raise InvalidRequest("an error reply needs a non-zero errno")
        if self.structured:
            msg = message.encode("utf-8")[:4096]
            return (P.STRUCTURED_REPLY.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                            P.REPLY_TYPE_ERROR, cookie, 6 + len(msg))
                    + P.ERROR_CHUNK_BODY.pack(error, len(msg)) + msg)
        return P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, error, cookie)


__all__ = [
    "MAX_OPTIONS", "MAX_SPARE", "NEED_DATA", "PROBE", "RECV_BUFFER", "SMALL_WRITE", "Abort",
    "CommandError", "Disconnect", "Event", "ExportInfo", "ExportName", "Flush",
    "InfoRequest", "ListExports", "NeedData", "OptionError", "ProtocolError", "Read",
    "ServerConnection", "StartTLS", "State", "StructuredReplies", "Trim", "Write",
    "WriteZeroes", "anonymous",
]
