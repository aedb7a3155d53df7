"""TLS for the NBD server: who may connect, and the encrypted transport after STARTTLS.

Two ways to authenticate clients, as nbdkit and qemu-nbd offer them:

- **X.509**: the server's certificate and key, and with ``verify_peer`` a CA that every
  client's certificate must chain to (a client without one fails the handshake).
  This is the standard library's ``ssl`` module, under asyncio's own TLS transport.
- **TLS-PSK**: a file of ``username:hexkey`` lines (nbdkit's ``--tls-psk``, gnutls's
  ``psktool`` format). Python 3.11's ``ssl`` has no PSK API (3.13 added it), so this
  path runs TLS in pyOpenSSL (PyCA's OpenSSL binding) over memory BIOs, with a small
  asyncio transport of our own (``_PSKTransport``). pyOpenSSL does not wrap OpenSSL's
  PSK callback, so the callback is installed through ``cryptography``'s OpenSSL binding
  (PyCA, the library pyOpenSSL itself is built on), which exposes
  ``SSL_CTX_set_psk_server_callback`` for this use. OpenSSL does the whole protocol;
  this module only moves bytes and looks up keys.

Key material never appears in a repr, a log line or an exception message: the PSK
table's repr lists user names only, and malformed files are reported by line number.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from cryptoplane.exceptions import InvalidRequest

log = logging.getLogger("cryptoplane.nbd")

MAX_PSK_BYTES = 512  # OpenSSL's PSK_MAX_PSK_LEN; psktool allows up to 512 too
MAX_IDENTITY_BYTES = 128  # OpenSSL's PSK_MAX_IDENTITY_LEN is 256; gnutls's usernames 128
_PSK_READ = 256 * 1024  # ciphertext taken from OpenSSL per call
HANDSHAKE_TIMEOUT = 60.0  # seconds, as asyncio's own TLS handshakes get
# TLS 1.2 clients get forward secrecy only (no plain-PSK suites); TLS 1.3 always has it
_PSK_TLS12_CIPHERS = b"ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:" \
                     b"ECDHE-PSK-AES128-CBC-SHA256"


class TLSConfigError(InvalidRequest):
    """A TLS option or file the server cannot use (the message never holds a key)."""


class TLSHandshakeError(ConnectionError):
    """A client failed the TLS handshake (unknown user, wrong key, no certificate)."""


# ---- X.509 ------------------------------------------------------------------------------


def certificate_context(cert: str | Path, key: str | Path, *, ca: str | Path | None = None,
                        verify_peer: bool = False) -> ssl.SSLContext:
    """The server context for certificates; with ``verify_peer``, only clients whose
    certificate chains to ``ca`` complete the handshake."""
    if verify_peer and ca is None:
        raise TLSConfigError("verifying client certificates needs a CA file (--tls-ca)")
    if ca is not None and not verify_peer:
        raise TLSConfigError("a CA file (--tls-ca) is used only with --tls-verify-peer")
    # not create_default_context: with CLIENT_AUTH it trusts the system's CAs, and any
    # client certificate a public CA signed would then be let in
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"cannot load the server certificate {cert} and its key "
                             f"{key}: {_reason(exc)}") from None
    if verify_peer:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(f"cannot load the CA certificates {ca}: "
                                 f"{_reason(exc)}") from None
        if not ctx.get_ca_certs():
            raise TLSConfigError(f"{ca} holds no CA certificate")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.__class__.__name__
    if isinstance(exc, OSError):
        return exc.strerror or exc.__class__.__name__
    return exc.__class__.__name__


# ---- TLS-PSK keys -------------------------------------------------------------------------


class PSKTable:
    """User names and their pre-shared keys; its repr names the users only."""

    __slots__ = ("_keys",)

    def __init__(self, keys: dict[str, bytes]) -> None:
        if not keys:
            raise TLSConfigError("a PSK table needs at least one user")
        for user, key in keys.items():
            _check_user(user, "")
            if not 0 < len(key) <= MAX_PSK_BYTES:
                raise TLSConfigError(f"the key of PSK user {user!r} must be 1 to "
                                     f"{MAX_PSK_BYTES} bytes")
        self._keys = dict(keys)

    @property
    def users(self) -> list[str]:
        return sorted(self._keys)

    def key(self, user: str) -> bytes | None:
        """The key of ``user``, or None for an unknown user."""
        return self._keys.get(user)

    def __repr__(self) -> str:
        return f"PSKTable(users={self.users!r})"

    def __reduce__(self) -> Any:  # no pickling: that would carry the keys anywhere
        raise TypeError("a PSKTable is not picklable")


def _check_user(user: str, where: str) -> None:
    if not user:
        raise TLSConfigError(f"{where}an empty PSK user name")
    if len(user.encode("utf-8")) > MAX_IDENTITY_BYTES:
        raise TLSConfigError(f"{where}PSK user name over {MAX_IDENTITY_BYTES} bytes")
    if any(c.isspace() or not c.isprintable() for c in user):
        raise TLSConfigError(f"{where}a PSK user name with spaces or control characters")


def parse_psk(text: str, *, source: str = "the PSK file") -> PSKTable:
    """Parse nbdkit's PSK format: one ``username:hexkey`` per line (blank lines and
    ``#`` comments allowed). Errors name the line, never its key."""
    keys: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {number}: "
        user, sep, hexkey = line.partition(":")
        if not sep:
            raise TLSConfigError(f"{where}expected username:hexkey")
        _check_user(user, where)
        if user in keys:
            raise TLSConfigError(f"{where}PSK user {user!r} appears twice")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            raise TLSConfigError(f"{where}the key of {user!r} is not an even number of "
                                 "hexadecimal digits") from None
        if not 0 < len(key) <= MAX_PSK_BYTES:
            raise TLSConfigError(f"{where}the key of {user!r} must be 1 to "
                                 f"{MAX_PSK_BYTES} bytes")
        keys[user] = key
    if not keys:
        raise TLSConfigError(f"{source} holds no username:hexkey line")
    return PSKTable(keys)


def load_psk_file(path: str | Path) -> PSKTable:
    """Read and parse a PSK file (see ``parse_psk``)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read the PSK file {path}: {_reason(exc)}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TLSConfigError(f"the PSK file {path} is not UTF-8 text") from None
    return parse_psk(text, source=f"the PSK file {path}")


# ---- TLS-PSK contexts and transport ------------------------------------------------------


class PSKContext:
    """A server TLS context authenticating clients by pre-shared key (pyOpenSSL)."""

    def __init__(self, table: PSKTable) -> None:
        try:
            from cryptography.hazmat.bindings.openssl.binding import Binding
            from OpenSSL import SSL
        except ImportError as exc:  # a broken install: the dependency is declared
            raise TLSConfigError(f"TLS-PSK needs pyOpenSSL: {exc}") from None
        lib, ffi = Binding.lib, Binding.ffi
        if not getattr(lib, "Cryptography_HAS_PSK", False):
            raise TLSConfigError("this OpenSSL build has no TLS-PSK")
        self.table = table
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(_PSK_TLS12_CIPHERS)
        # OpenSSL's TLS 1.3 use of this callback assumes a SHA-256 suite, as gnutls's
        # external PSKs do; AES-128-GCM-SHA256 is in the default TLS 1.3 list

        def on_psk(_ssl: Any, identity: Any, psk: Any, max_len: int) -> int:
            # an unknown user or any failure returns 0: the handshake fails
            if identity == ffi.NULL:
                return 0
            try:
                user = ffi.string(identity).decode("utf-8")
            except UnicodeDecodeError:
                return 0
            key = table.key(user)
            if key is None or len(key) > max_len:
                log.info("TLS-PSK: unknown user %r", user)
                return 0
            ffi.memmove(psk, key, len(key))
            return len(key)

        # kept on self: OpenSSL holds only a raw pointer to it
        self._callback = ffi.callback(
            "unsigned int (*)(SSL *, const char *, unsigned char *, unsigned int)",
            on_psk, error=0)
        lib.SSL_CTX_set_psk_server_callback(ctx._context, self._callback)
        self._ssl = SSL
        self._context = ctx

    def __repr__(self) -> str:
        return f"PSKContext({self.table!r})"

    async def start_tls(self, transport: asyncio.Transport,
                        protocol: asyncio.BaseProtocol) -> asyncio.Transport:
        """Run the server side of the handshake on ``transport`` (whose reading the
        caller paused), then hand ``protocol`` the decrypted stream."""
        loop = asyncio.get_running_loop()
        conn = self._ssl.Connection(self._context, None)
        conn.set_accept_state()
        tls = _PSKTransport(transport, conn, self._ssl, loop)
        try:
            await asyncio.wait_for(tls.handshake(), HANDSHAKE_TIMEOUT)
        except TimeoutError:
            transport.abort()
            raise TLSHandshakeError("the TLS-PSK handshake timed out") from None
        tls.attach(protocol)
        return tls


ServerTLS = ssl.SSLContext | PSKContext
"""What the server takes as its TLS configuration."""


async def start_tls(transport: asyncio.Transport, protocol: asyncio.BaseProtocol,
                    tls: ServerTLS) -> asyncio.Transport | None:
    """The server side of STARTTLS: the encrypted transport now feeding ``protocol``,
    or None if the connection closed meanwhile. A failed handshake raises
    ``ssl.SSLError`` or ``ConnectionError`` (or ``TimeoutError``) and closes the
    transport without calling ``protocol.connection_lost``, as asyncio's does."""
    if isinstance(tls, PSKContext):
        return await tls.start_tls(transport, protocol)
    loop = asyncio.get_running_loop()
    return await loop.start_tls(transport, protocol, tls, server_side=True)


class _PSKTransport(asyncio.Transport):
    """The plaintext side of a pyOpenSSL connection over a stream transport. It is the
    raw transport's protocol too (``data_received`` etc.), to keep the pair in one
    object; flow control and write-buffer figures are the raw transport's."""

    def __init__(self, raw: asyncio.Transport, conn: Any, SSL: Any,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._raw = raw
        self._conn = conn
        self._SSL = SSL
        self._loop = loop
        self._app: asyncio.BaseProtocol | None = None
        self._waiter: asyncio.Future[None] | None = loop.create_future()
        self._closing = False
        self._paused = False  # by the application
        self._lost = False
        self._raw_protocol = _RawSide(self)
        raw.set_protocol(self._raw_protocol)
        raw.resume_reading()

    # ---- handshake ------------------------------------------------------------------

    async def handshake(self) -> None:
        assert self._waiter is not None
        await self._waiter

    def attach(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol
        if self._lost:  # lost between the handshake and now: the protocol still hears it
            self._loop.call_soon(protocol.connection_lost, None)
            return
        # records that came with the handshake's last flight wait in OpenSSL's buffer
        self._loop.call_soon(self._deliver)

    def _handshake_step(self) -> None:
        waiter = self._waiter
        assert waiter is not None
        try:
            self._conn.do_handshake()
        except self._SSL.WantReadError:
            self._flush()
            return
        except self._SSL.Error as exc:
            self._flush()  # the alert, so the client learns why
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(TLSHandshakeError(f"TLS-PSK handshake failed: "
                                                       f"{_ssl_error_text(exc)}"))
            self._raw.close()
            return
        self._flush()
        self._waiter = None
        if not waiter.done():
            waiter.set_result(None)

    # ---- from the raw transport -------------------------------------------------------

    def _data(self, data: bytes) -> None:
        if self._closing:
            return
        self._conn.bio_write(data)
        if self._waiter is not None:
            self._handshake_step()
        else:
            self._deliver()

    def _deliver(self) -> None:
        """Decrypt what OpenSSL holds and hand it to the application."""
        app = self._app
        if app is None or self._closing:
            return
        SSL = self._SSL
        buffered = isinstance(app, asyncio.BufferedProtocol)
        try:
            while not self._paused and not self._closing:
                if buffered:
                    assert isinstance(app, asyncio.BufferedProtocol)
                    buf = app.get_buffer(-1)
                    n = self._conn.recv_into(buf)
                    app.buffer_updated(n)
                else:
                    cast(asyncio.Protocol, app).data_received(self._conn.recv(_PSK_READ))
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:  # the client's close_notify
            self._flush()
            if not cast(asyncio.Protocol, app).eof_received():
                self.close()
            return
        except SSL.Error as exc:
            log.info("TLS-PSK connection failed: %s", _ssl_error_text(exc))
            self.abort()
            return
        self._flush()  # TLS 1.3 may answer (key updates)

    def _eof(self) -> bool:
        if self._waiter is not None:
            return False
        app = self._app
        return app is not None and bool(cast(asyncio.Protocol, app).eof_received())

    def _connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(TLSHandshakeError("the client closed the connection "
                                                   "during the TLS handshake"))
        if not self._lost:
            self._lost = True
            if self._app is not None:
                self._app.connection_lost(exc)

    def _pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def _resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    def _flush(self) -> None:
        """Send what OpenSSL wrote to its memory BIO."""
        out = []
        while True:
            try:
                out.append(self._conn.bio_read(_PSK_READ))
            except self._SSL.WantReadError:
                break
        if out and not self._raw.is_closing():
            self._raw.writelines(out)

    # ---- asyncio.Transport, for the application --------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writelines((data,))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        if self._closing:
            return
        try:
            for data in list_of_data:
                if len(data):
                    self._conn.sendall(data)
        except self._SSL.Error as exc:
            log.info("TLS-PSK write failed: %s", _ssl_error_text(exc))
            self.abort()
            return
        self._flush()

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(self._SSL.Error):
            self._conn.shutdown()  # close_notify
        self._flush()
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        self._raw.abort()

    def pause_reading(self) -> None:
        self._paused = True
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self._raw.resume_reading()
        self._loop.call_soon(self._deliver)  # what was decrypted before the pause

    def is_reading(self) -> bool:
        return not self._paused and self._raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None,
                                low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._app is not None
        return self._app

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._conn
        if name == "cipher":
            return self._conn.get_cipher_name()
        return self._raw.get_extra_info(name, default)


class _RawSide(asyncio.Protocol):
    """The raw transport's protocol: forwards to the ``_PSKTransport``."""

    def __init__(self, tls: _PSKTransport) -> None:
        self._tls = tls

    def data_received(self, data: bytes) -> None:
        self._tls._data(data)

    def eof_received(self) -> bool | None:
        return self._tls._eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self._tls._connection_lost(exc)

    def pause_writing(self) -> None:
        self._tls._pause_writing()

    def resume_writing(self) -> None:
        self._tls._resume_writing()


def _ssl_error_text(exc: BaseException) -> str:
    """pyOpenSSL's error as OpenSSL's reason strings (never data)."""
    parts: list[str] = []
    for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else []:
        if isinstance(item, tuple) and item:
            parts.append(str(item[-1]))
    return ", ".join(parts) or exc.__class__.__name__


# ---- policy helpers ------------------------------------------------------------------------


def is_loopback(host: str, resolve: Callable[..., Any] = socket.getaddrinfo) -> bool:
    """Whether every address ``host`` names is a loopback one ("" and 0.0.0.0 are not)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = resolve(host, None)
    except (OSError, UnicodeError):
        return False
    addrs = {info[4][0] for info in infos}
    try:
        return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                                   for a in addrs)
    except ValueError:
        return False
