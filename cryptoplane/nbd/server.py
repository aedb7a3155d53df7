"""The NBD server: asyncio (uvloop) transport around the sans-I/O codec.

Each export is one shared ``BlockDevice`` object: every connection to an export calls
the same device, which is what makes ``NBD_FLAG_CAN_MULTI_CONN`` honest — a FLUSH on any
connection calls ``device.flush()``, which must make every write completed through that
device durable, whichever connection (thread) issued it (``FileDevice`` fdatasyncs the
one shared descriptor). A WRITE reaches the device only once its whole payload arrived.

Small requests run inline on the event loop (a thread hop costs more than a 4 KiB
read); big ones run on worker threads (``cryptoplane/offload.py``: one per core,
completions handed back in batches) so the loop keeps receiving while the device
(decryption, for a volume) works without the GIL. Every request parsed from one receive
is handled before the replies go out together; on a device that takes batches (a
``Volume``: ``preadinto_many``, ``pwrite_many``) the small reads, or writes, of one receive
run in one device call (one native call for their sectors: per request, the Python around
a 4 KiB request cost several times its cipher), a read after a write (or the other way
round) ending the batch before it, so that order is kept. The replies go out in one
``os.writev`` while the
transport has nothing queued (it copies without the GIL, which uvloop's ``writelines``
holds), else through the transport. Per connection the number
and bytes of requests in flight are bounded: past the bound the connection stops
reading until replies drain.

What clients may make the server hold is bounded by ``limits.Limits``: the number of
connections, the time to negotiate, the time a connection may stall, and a memory
budget (``limits.Budget``) that every payload and reply buffer is charged to. A request
that finds no room waits, its connection no longer read, until memory is given back.

Listening, the event loop, signals and the background-thread server for tests live in
``cryptoplane.nbd.runner``, which makes the ``Server`` and its ``Connection`` objects.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, cast

from cryptoplane.exceptions import CryptoplaneError, InvalidRequest
from cryptoplane.nbd import codec as C
from cryptoplane.nbd import protocol as P
from cryptoplane.nbd.blockdev import BlockDevice
from cryptoplane.nbd.exports import INLINE_LIMIT, Export, errno_of, run_batch, trim
from cryptoplane.nbd.limits import Budget, Limits, ReplyBuffer, Watchdog
from cryptoplane.nbd.tls import ServerTLS, start_tls
from cryptoplane.offload import Offloader

log = logging.getLogger("cryptoplane.nbd")

MAX_INFLIGHT = 64  # requests handed to the pool, per connection
MAX_INFLIGHT_BYTES = 128 * 1024 * 1024
SHUTDOWN_GRACE = 10.0  # seconds in-flight requests get at shutdown
POOL_BYTES = 64 * 1024 * 1024  # read buffers kept for reuse, per server
POOL_MIN = 16 * 1024  # smaller buffers are cheaper to allocate than to track
# bigger read buffers are not kept: a few 32 MiB reads would pin their memory for good
POOL_MAX_BUFFER = 4 * 1024 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16
WRITE_HIGH_WATER = 4 * 1024 * 1024  # replies queued before the client counts as slow
BATCH_BYTES = 4 * 1024 * 1024  # read data gathered before replies are handed over


class Connection(asyncio.BufferedProtocol):
    """One client's connection: the codec's events handled, the replies sent."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.codec = C.ServerConnection(tls_available=server.tls is not None,
                                        tls_required=server.tls is not None,
                                        max_options=server.limits.max_options,
                                        allocate=server.budget.payload)
        self.held: C.Event | None = None  # an event waiting for memory for its reply
        self.starved = False  # waiting for the budget: not reading
        self.activity = 0  # bumped by every receive and completion (for the timeouts)
        self.mark: tuple[int, int] = (-1, -1)  # (activity, queued) at the last sweep
        self.quiet_since = server.loop.time()  # and since when they have not changed
        self.born = self.quiet_since
        self.transport: asyncio.Transport | None = None
        self.device: BlockDevice | None = None
        self.inline_limit = INLINE_LIMIT
        self.inflight = 0
        self.inflight_bytes = 0
        self.read_paused = False  # by us, for backpressure or shutdown
        self.write_paused = False  # by the transport: the client does not read replies
        self.closing = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.batch_bytes = 0  # read data gathered in the current batch
        # read buffers handed to the transport, with where they end in the byte stream
        self.sent: collections.deque[tuple[int, bytearray]] = collections.deque()
        self.written = 0  # bytes handed to the transport so far
        self.replies: list[Any] = []  # of offloaded requests completed, not yet sent
        self.fd = -1  # the socket, for writes that bypass the transport (``_send``)
        # a device that takes a receive's requests in one call (a ``Volume``): the small
        # reads and writes parsed from one receive wait here, with their places in the
        # replies, until the batch ends (``_flush``)
        self.many = False
        self.reads: list[tuple[int, int, memoryview, int]] = []  # cookie, offset, data, at
        self.writes: list[tuple[C.Write, int]] = []  # the WRITE, its reply's place

    # ---- transport callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but they are one
        self.transport = transport = cast(asyncio.Transport, transport)
        if len(self.server.connections) >= self.server.limits.max_connections:
            self.server.refuse()
            self.closing = True
            transport.abort()  # before the greeting: the client reads EOF
            return
        self.server.connections.add(self)
        if self.server.stopping:
            transport.close()
            return
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_HIGH_WATER // 4)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # bigger kernel buffers: fewer partial writes and wake-ups per 256 KiB reply
            # (the kernel caps these at net.core.[rw]mem_max)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            with contextlib.suppress(OSError, AttributeError, ValueError):
                self.fd = sock.fileno()
        transport.write(self.codec.greeting())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.held = None
        self.server.budget.cancel(self._memory_freed)
        self.codec.drop_spares()
        if self in self.server.connections:
            self.server.connections.discard(self)
            self.server.connection_gone()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.codec.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.codec.buffer_updated(nbytes)
        self.activity += 1
        self._drain()

    def eof_received(self) -> bool | None:
        # a half-received WRITE is simply never applied; in-flight replies are dropped
        self.closing = True
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()
        self._drain()

    # ---- request handling -------------------------------------------------------------

    def _blocked(self) -> bool:
        return (self.write_paused or self.starved or self.inflight >= MAX_INFLIGHT
                or self.inflight_bytes >= MAX_INFLIGHT_BYTES)

    def _starve(self) -> None:
        """No memory for the next request: stop reading until some is given back."""
        self.starved = True
        self.server.budget.wait(self._memory_freed)

    def _memory_freed(self) -> None:
        self.starved = False
        if not self.closing:
            self._drain()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        want_pause = self._blocked() or self.closing or self.server.stopping
        if want_pause and not self.read_paused:
            t.pause_reading()
            self.read_paused = True
        elif not want_pause and self.read_paused:
            t.resume_reading()
            self.read_paused = False

    def _buffer(self, size: int) -> bytearray | None:
        """A reply buffer charged to the budget (None: no room now)."""
        spare = self.server.free.get(size)
        if spare:
            self.server.free_bytes -= size
            return spare.pop()
        return self.server.budget.reply(size)

    def _send(self, out: list[Any]) -> None:
        """Hand replies to the transport, noting where each big read buffer ends; when
        the transport has nothing queued, write what the socket takes at once first."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.codec.tls_active:
            t.writelines(out)
            return  # the TLS layer's queue counts other bytes: no reuse there
        if self.fd >= 0 and len(out) <= IOV_MAX and not t.get_write_buffer_size():
            out = self._write_now(out)
            if not out:
                return
        t.writelines(out)
        pos = self.written
        for item in out:
            pos += len(item)
            if len(item) >= POOL_MIN and type(item) is ReplyBuffer:
                self.sent.append((pos, item))
        self.written = pos
        if len(self.sent) > 1024:  # a client that reads nothing: stop tracking
            self.sent.clear()

    def _write_now(self, out: list[Any]) -> list[Any]:
        """Write ``out`` to the socket directly, as far as it takes it without blocking,
        and return what is left for the transport. Why: uvloop's ``writelines`` copies
        into the socket with the GIL held (~40 µs per 256 KiB reply here), and the worker
        threads stalled behind it; ``os.writev`` releases the GIL for the copy. Done only
        while the transport has nothing queued, so the stream keeps its order."""
        try:
            n = os.writev(self.fd, out)
        except OSError:  # full (EAGAIN), or broken: the transport deals with either
            return out
        for i, item in enumerate(out):
            size = len(item)
            if n < size:  # a partly written buffer is left to the garbage collector
                return [memoryview(item)[n:], *out[i + 1:]] if n else out[i:]
            n -= size
            if size >= POOL_MIN and type(item) is ReplyBuffer:
                self._recycle(item)
        return []

    def _reclaim(self) -> None:
        """Take back read buffers the transport has finished with. The stream is sent in
        order and the transport's write buffer size counts every byte it still has to
        send (uvloop counts libuv's queue too), so a buffer ending before
        ``written - queued`` is no longer read by anyone."""
        t = self.transport
        if t is None:
            return
        done = self.written - t.get_write_buffer_size()
        sent = self.sent
        while sent and sent[0][0] <= done:
            self._recycle(sent.popleft()[1])

    def _recycle(self, buf: bytearray) -> None:
        server = self.server
        if (type(buf) is ReplyBuffer and len(buf) <= POOL_MAX_BUFFER
                and server.free_bytes + len(buf) <= server.pool_bytes):
            server.free.setdefault(len(buf), []).append(buf)
            server.free_bytes += len(buf)

    def _drain(self) -> None:
        out: list[Any] = []
        codec = self.codec
        if self.sent:
            self._reclaim()
        if self.transport is None:
            return
        more = True
        while more:
            more = False
            self.batch_bytes = 0
            try:
                while not self.closing and not self._blocked():
                    if self.held is None:
                        ev = codec.next_event()
                    else:
                        ev, self.held = self.held, None
                    if type(ev) is C.Read and ev.length <= self.inline_limit:
                        if not self._read_inline(ev, out):  # the hot path, first
                            break
                        if self.batch_bytes < BATCH_BYTES:
                            continue
                    elif isinstance(ev, C.NeedData):
                        if codec.memory_wanted:
                            self._starve()
                        break
                    elif not self._handle(ev, out):
                        break
                    if self.batch_bytes >= BATCH_BYTES:
                        # bounded memory: send what is read so far, and go on only if
                        # the transport has not asked us to pause
                        more = True
                        break
            except C.ProtocolError as exc:
                log.info("closing an NBD connection: %s", exc)
                self.closing = True
            if self.reads or self.writes:
                self._flush(out)
            if out:
                self._send(out)
                out = []
        if self.closing and self.inflight == 0:
            self._close()
        else:
            self._update_reading()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _read_inline(self, ev: C.Read, out: list[Any]) -> bool:
        """False when there is no memory for the reply yet (``ev`` is held)."""
        codec = self.codec
        assert self.device is not None
        # header and data in one buffer: one item per reply for writelines
        head = codec.read_header_size
        size = head + ev.length
        buf = self._buffer(size) if size >= POOL_MIN else bytearray(size)
        if buf is None:
            self.held = ev
            self._starve()
            return False
        codec.pack_read_header(buf, ev.cookie, ev.offset, ev.length)
        self.batch_bytes += size
        if self.many:
            if self.writes:  # what was written before is read back
                self._flush(out)
            self.reads.append((ev.cookie, ev.offset, memoryview(buf)[head:], len(out)))
            out.append(buf)
            return True
        try:
            self.device.preadinto(ev.offset, memoryview(buf)[head:])
        except Exception as exc:
            out.append(codec.error_reply(ev.cookie, errno_of(exc), "read failed"))
        else:
            out.append(buf)
        return True

    def _flush(self, out: list[Any]) -> None:
        """Run the batched reads, or writes, in one device call (``exports.run_batch``)."""
        reads, writes, self.reads, self.writes = self.reads, self.writes, [], []
        assert self.device is not None
        run_batch(self.device, self.codec, reads, writes, out)

    def _use(self, export: Export) -> None:
        self.device, self.inline_limit = export.device, export.inline_limit
        self.many = hasattr(export.device, "preadinto_many") and hasattr(
            export.device, "pwrite_many")

    def _handle(self, ev: C.Event, out: list[Any]) -> bool:
        """Handle one event; False stops the batch."""
        codec = self.codec
        t = type(ev)
        dev = self.device
        if self.reads or self.writes:  # what is batched so far runs before the others
            if isinstance(ev, C.Write) and len(ev.data) <= self.inline_limit:
                if self.reads:  # joins the writes batched so far
                    self._flush(out)
            elif t is not C.Read or self.writes:  # a read joins the reads
                self._flush(out)
        if t is C.Read:
            assert isinstance(ev, C.Read)
            if ev.length <= self.inline_limit:
                return self._read_inline(ev, out)
            head = codec.read_header_size
            buf = self._buffer(head + ev.length)
            if buf is None:
                self.held = ev
                self._starve()
                return False
            codec.pack_read_header(buf, ev.cookie, ev.offset, ev.length)
            self._offload(ev.cookie, ev.length, self._read_job, ev.offset, buf, head)
            return True
        if t is C.Write:
            assert isinstance(ev, C.Write) and dev is not None
            if self.many and len(ev.data) <= self.inline_limit:
                self.writes.append((ev, len(out)))
                out.append(codec.reply(ev.cookie))
                if ev.fua:  # durable before its reply: the batch ends here
                    self._flush(out)
            elif len(ev.data) <= self.inline_limit:
                try:
                    dev.pwrite(ev.offset, ev.data, fua=ev.fua)
                except Exception as exc:
                    out.append(codec.error_reply(ev.cookie, errno_of(exc), "write failed"))
                else:
                    out.append(codec.reply(ev.cookie))
                codec.recycle(ev.data)
            else:
                self._offload(ev.cookie, len(ev.data), self._reply_of,
                              functools.partial(dev.pwrite, fua=ev.fua), ev.offset, ev.data,
                              payload=ev.data)
            return True
        if t is C.Flush:
            assert isinstance(ev, C.Flush) and dev is not None
            self._offload(ev.cookie, 0, self._reply_of, dev.flush)
            return True
        if t is C.Trim:
            assert isinstance(ev, C.Trim) and dev is not None
            self._offload(ev.cookie, 0, self._reply_of, trim, dev, ev.offset, ev.length,
                          ev.fua)
            return True
        if t is C.WriteZeroes:
            assert isinstance(ev, C.WriteZeroes) and dev is not None
            self._offload(ev.cookie, 0, self._reply_of,
                          functools.partial(dev.write_zeroes, fua=ev.fua), ev.offset, ev.length)
            return True
        if t is C.CommandError:
            assert isinstance(ev, C.CommandError)
            out.append(codec.error_reply(ev.cookie, ev.error, ev.message))
            return True
        if t is C.Disconnect:
            self.closing = True
            return False
        return self._negotiate(ev, out)

    def _negotiate(self, ev: C.Event, out: list[Any]) -> bool:
        codec = self.codec
        server = self.server
        if isinstance(ev, C.OptionError):
            out.append(codec.option_error(ev.option, ev.code, ev.message))
        elif isinstance(ev, C.ListExports):
            out.append(codec.list_reply(list(server.exports)))
        elif isinstance(ev, C.StructuredReplies):
            out.append(codec.ack(ev))
        elif isinstance(ev, C.Abort):
            out.append(codec.ack(ev))
            self.closing = True
            return False
        elif isinstance(ev, C.StartTLS):
            out.append(codec.ack(ev))
            assert self.transport is not None
            self.transport.writelines(out)
            out.clear()
            # nothing may be read in the clear between the ACK and the handshake
            self.transport.pause_reading()
            self.read_paused = True
            server.spawn(self._start_tls())
            return False
        elif isinstance(ev, C.InfoRequest | C.ExportName):
            export = server.lookup(ev.name)
            if server.stopping:
                if isinstance(ev, C.ExportName):
                    raise C.ProtocolError("shutting down")
                out.append(codec.option_error(P.OPT_GO if ev.go else P.OPT_INFO,
                                              P.REP_ERR_SHUTDOWN, "the server is stopping"))
            elif export is None:
                if isinstance(ev, C.ExportName):
                    raise C.ProtocolError(f"no export named {ev.name!r}")
                out.append(codec.option_error(P.OPT_GO if ev.go else P.OPT_INFO,
                                              P.REP_ERR_UNKNOWN, f"no export named {ev.name!r}"))
            elif isinstance(ev, C.ExportName):
                out.append(codec.export_name_reply(export.info))
                self._use(export)
            else:
                out.append(codec.info_reply(ev, export.info))
                if codec.state is C.State.TRANSMISSION:
                    self._use(export)
        return True

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.server.tls is not None
        try:
            new = await start_tls(self.transport, self, self.server.tls)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("TLS handshake failed: %s", exc)
            self.closing = True
            self._close()
            # the TLS layer took the transport's callbacks and will not report the loss
            self.connection_lost(exc)
            return
        if new is None:
            return
        self.transport = new
        self.read_paused = False
        self.codec.tls_established()
        self._drain()

    # ---- the thread pool ----------------------------------------------------------------

    def _offload(self, cookie: int, nbytes: int, job: Callable[..., list[Any]],
                 *args: Any, payload: bytes | memoryview | None = None) -> None:
        self.inflight += 1
        self.inflight_bytes += nbytes
        self.idle.clear()
        self.server.offloader.submit(job, (cookie, *args), self, (nbytes, payload))

    def completed(self, token: tuple[int, bytes | memoryview | None],
                  result: list[Any] | None, error: BaseException | None) -> None:
        """An offloaded request is done (on the loop's thread); its reply goes out with
        the others of the same batch in ``settle``."""
        nbytes, payload = token
        self.inflight -= 1
        self.inflight_bytes -= nbytes
        self.activity += 1
        if error is not None:  # the jobs turn device errors into replies
            log.error("NBD request job failed", exc_info=error)
            self.closing = True
        elif result is not None:
            self.replies.extend(result)
        if payload is not None:
            self.codec.recycle(payload)

    def settle(self) -> None:
        """After a batch of completions: send their replies at once, read on."""
        if self.replies:
            out, self.replies = self.replies, []
            t = self.transport
            if t is not None and not t.is_closing():
                self._send(out)
        if self.inflight == 0:
            self.idle.set()
        if self.closing:
            if self.inflight == 0:
                self._close()
        else:
            self._drain()

    def _read_job(self, cookie: int, offset: int, buf: bytearray, head: int) -> list[Any]:
        assert self.device is not None
        try:
            self.device.preadinto(offset, memoryview(buf)[head:])
        except Exception as exc:
            return [self.codec.error_reply(cookie, errno_of(exc), "read failed")]
        return [buf]

    def _reply_of(self, cookie: int, fn: Callable[..., object], *args: Any) -> list[Any]:
        try:
            fn(*args)
        except Exception as exc:
            return [self.codec.error_reply(cookie, errno_of(exc), "request failed")]
        return [self.codec.reply(cookie)]

    # ---- shutdown -------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Stop reading; requests already received are finished."""
        if self.codec.state is not C.State.TRANSMISSION:
            self.closing = True
        self._update_reading()
        if self.closing and self.inflight == 0:
            self._close()


class Server:
    """What the connections of one server share: its exports, worker threads, memory
    budget, reusable buffers and watchdog."""

    def __init__(self, exports: dict[str, BlockDevice], *, tls: ServerTLS | None,
                 read_only: bool, inline_limit: int | None, workers: int,
                 limits: Limits | None = None) -> None:
        if not exports:
            raise InvalidRequest("serve needs at least one export")
        self.exports = {name: Export(name, dev, read_only=read_only,
                                     inline_limit=inline_limit)
                        for name, dev in exports.items()}
        self.tls = tls
        self.loop = asyncio.get_running_loop()
        self.offloader = Offloader(self.loop, workers)
        # for the rare blocking call outside a connection (the flush at shutdown)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, "cryptoplane-nbd-admin")
        self.connections: set[Connection] = set()
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.free: dict[int, list[bytearray]] = {}  # read buffers for reuse, by size
        self.free_bytes = 0
        self.limits = limits = limits or Limits()
        self.budget = Budget(limits.memory_budget, self.loop)
        self.budget.on_pressure = self.drop_caches
        self.pool_bytes = min(POOL_BYTES, limits.memory_budget // 4)
        self.watchdog = Watchdog(self.loop, limits, self.connections)

    def lookup(self, name: str) -> Export | None:
        if name == "" and name not in self.exports:
            return next(iter(self.exports.values()))  # qemu's default export name
        return self.exports.get(name)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def drop_caches(self) -> None:
        """Let go of the buffers kept for reuse (the budget is short)."""
        self.free.clear()
        self.free_bytes = 0
        for conn in self.connections:
            conn.codec.drop_spares()

    def refuse(self) -> None:
        self.watchdog.refuse()

    def connection_gone(self) -> None:
        if not self.connections:
            # nobody to reuse them: give the cached buffers' memory back
            self.drop_caches()
        self.watchdog.trim_soon()

    async def shutdown(self) -> None:
        self.stopping = True
        self.watchdog.stop()
        for conn in list(self.connections):
            conn.begin_shutdown()
        busy = [c.idle.wait() for c in self.connections if c.inflight]
        if busy:
            _, pending = await asyncio.wait([asyncio.ensure_future(b) for b in busy],
                                            timeout=SHUTDOWN_GRACE)
            if pending:
                log.warning("%d NBD connections still busy at shutdown", len(pending))
        for export in self.exports.values():
            if not export.info.read_only:
                try:
                    await self.loop.run_in_executor(self.pool, export.device.flush)
                except (OSError, CryptoplaneError) as exc:
                    log.error("flushing export %r failed: %s", export.name, exc)
        for conn in list(self.connections):
            conn.closing = True
            conn._close()
        self.offloader.shutdown()
        self.pool.shutdown(wait=True)
