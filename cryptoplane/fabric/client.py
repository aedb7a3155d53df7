"""The fabric client: every wire operation (docs/wire-protocol.md, section 4) as a method,
asyncio (``AsyncClient``) or synchronous (``Client``).

    async with await AsyncClient.connect("tcp://127.0.0.1:7300", token=token) as c:
        blob = await c.encrypt("orders", b"secret")
        assert await c.decrypt("orders", blob) == b"secret"

Many requests are in flight at once on each connection (``asyncio.gather`` them): they
are pipelined, answered in any order and matched by id. Errors raise the same exception
classes as the local plane (``codec.error_from``). THROTTLED and BUSY answers are sent
again after their RETRY_AFTER until the request's deadline (``timeout=``, default the
client's), which ends it with ``Timeout``. A request whose connection dies is sent again
on another connection only when repeating it cannot change the outcome (decrypt, verify,
HMAC, digest, sign, reads, raw offload ops); anything else ends with ``ConnectionLost``.
``pool.py`` keeps the connections; ``client_streams.py`` the streamed operations;
``client_sync.py`` the synchronous ``Client``.
"""

from __future__ import annotations

import asyncio
import base64
import ssl as ssl_module
import struct
from collections.abc import (
    AsyncIterator,
    Callable,
)
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import InvalidRequest
from . import codec
from .client_streams import StreamSource, run_stream
from .codec import Field, Frame, FrameType, Op, Status
from .connection_client import Call, SessionSpec, read_field
from .errors import ProtocolError
from .placement import DEFAULT_THRESHOLD, Placement
from .pool import SILENCE, Pool

if TYPE_CHECKING:
    from .manager.protocol import Grant

# repeating these cannot change what they answer (wire protocol, section 5)
SAFE_OPS: Final = frozenset({
    Op.DECRYPT, Op.SIGN, Op.VERIFY, Op.HMAC, Op.VERIFY_HMAC, Op.DIGEST,
    Op.KEY_LIST, Op.KEY_READ, Op.KEY_EXPORT, Op.WRAPPING_KEY,
    Op.SESSION_OPEN, Op.RAW_ENCRYPT, Op.RAW_DECRYPT, Op.RAW_SIGN, Op.RAW_VERIFY,
    Op.RAW_MAC, Op.RAW_VERIFY_MAC,
})
_RAW_OPS: Final = {"encrypt": Op.RAW_ENCRYPT, "decrypt": Op.RAW_DECRYPT,
                   "sign": Op.RAW_SIGN, "verify": Op.RAW_VERIFY, "mac": Op.RAW_MAC,
                   "verify_mac": Op.RAW_VERIFY_MAC}
_BATCH_OPS: Final = {"encrypt": Op.ENCRYPT, "decrypt": Op.DECRYPT, "rewrap": Op.REWRAP,
                     "sign": Op.SIGN, "verify": Op.VERIFY, "hmac": Op.HMAC,
                     "verify_hmac": Op.VERIFY_HMAC, "datakey": Op.DATAKEY}
_U32_FIELDS: Final = frozenset({Field.VERSION, Field.LENGTH, Field.RETRY_AFTER,
                                Field.SESSION, Field.TAG_SIZE})


def _key(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > codec.MAX_KEY_REF:
        raise InvalidRequest(f"key name longer than {codec.MAX_KEY_REF} bytes")
    return raw


def field_value(tag: int, value: object) -> bytes:
    """A Python value as a field's bytes: bytes as they are, int as u32 (or u8 for
    flags), bool as u8, str as UTF-8."""
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, int):
        return codec.u32(value) if tag in _U32_FIELDS else bytes([value])
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidRequest(f"field {Field(tag).name} cannot be {type(value).__name__}")


def item_fields(item: dict[str, object]) -> bytes:
    """A batch item (``{"data": b"...", "aad": b"..."}``, names of ``codec.Field``)."""
    out: dict[int, bytes] = {}
    for name, value in item.items():
        try:
            tag = Field[name.upper()]
        except KeyError:
            raise InvalidRequest(f"unknown field {name!r} in a batch item") from None
        if value is not None:
            out[tag] = field_value(tag, value)
    return codec.encode_fields(out)


def _cipher_fields(tag: int, payload: bytes, aad: bytes, context: bytes | None
                   ) -> dict[int, bytes]:
    """What encrypt, decrypt and rewrap send: the payload, its AAD and derivation
    context (each only when given)."""
    f: dict[int, bytes] = {tag: payload}
    if aad:
        f[Field.AAD] = aad
    if context is not None:
        f[Field.CONTEXT] = context
    return f


def answer_fields(frame: Frame) -> dict[int, bytes]:
    """The fields of an answer, raising its error for an error status."""
    if frame.status != Status.OK:
        raise codec.error_from(frame.status, frame.payload)
    try:
        return codec.decode_fields(frame.payload)
    except InvalidRequest as e:
        raise ProtocolError(f"malformed answer: {e}") from None


def result_of(op: int, fields: dict[int, bytes]) -> object:
    """What a data operation's method returns, from its answer's fields."""
    if op in (Op.ENCRYPT, Op.REWRAP):
        return fields.get(Field.CIPHERTEXT, b"")
    if op in (Op.DECRYPT, Op.DIGEST, Op.RANDOM, Op.RAW_ENCRYPT, Op.RAW_DECRYPT):
        return fields.get(Field.DATA, b"")
    if op in (Op.SIGN, Op.RAW_SIGN):
        return fields.get(Field.SIGNATURE, b"")
    if op in (Op.HMAC, Op.RAW_MAC):
        return fields.get(Field.MAC, b"")
    if op in (Op.VERIFY, Op.VERIFY_HMAC):
        return fields.get(Field.VALID, b"\x00") == b"\x01"
    if op == Op.DATAKEY:
        return fields.get(Field.PLAINTEXT), fields.get(Field.WRAPPED, b"")
    return fields


_RESULT_TAG: Final = {
    Op.ENCRYPT: Field.CIPHERTEXT, Op.REWRAP: Field.CIPHERTEXT, Op.DECRYPT: Field.DATA,
    Op.DIGEST: Field.DATA, Op.RANDOM: Field.DATA, Op.SIGN: Field.SIGNATURE,
    Op.HMAC: Field.MAC,
}
_pack_field = struct.Struct("!BI").pack


def _decoder(op: int) -> Callable[[Frame], Any]:
    tag = _RESULT_TAG.get(Op(op))
    if tag is not None:
        def one(frame: Frame) -> Any:
            if frame.status:
                raise codec.error_from(frame.status, frame.payload)
            return read_field(frame.payload, tag)
        return one

    def decode(frame: Frame) -> Any:
        return result_of(op, answer_fields(frame))
    return decode


_DECODERS: Final = {op: _decoder(op) for op in Op}


class AsyncClient:
    """A pipelined asyncio client over a small pool of connections. Make one with
    ``await AsyncClient.connect(...)``; ``close()`` (or ``async with``) when done."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._sessions: dict[int, SessionSpec] = {}
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, url: str | list[str], *, token: str | None = None,
                      ssl: ssl_module.SSLContext | None = None, connections: int = 2,
                      timeout: float = 30.0, name: str = "",
                      silence: float = SILENCE,
                      placement: str | Placement = "least-loaded",
                      threshold: int = DEFAULT_THRESHOLD,
                      big: list[str] | None = None) -> AsyncClient:
        """Connect to one server or several (``connections`` to each) and complete the
        handshake on at least one; ``Unauthorized`` for a bad token, ``ConnectionLost``
        when no server answers within ``timeout``. A server that says nothing for
        ``silence`` seconds while it owes answers is sent a PING, and its connection is
        cut after as long again (its safe requests go elsewhere). ``placement``: which
        server each request goes to (``placement.py``: ``least-loaded``,
        ``round-robin``, ``size-split`` with ``threshold`` and ``big``, ``fail-over``
        in URL order)."""
        urls = [url] if isinstance(url, str) else list(url)
        pool = Pool(urls, token=token, ssl=ssl, connections=connections, timeout=timeout,
                    name=name, silence=silence, placement=placement, threshold=threshold,
                    big=big)
        await pool.start()
        return cls(pool)

    @property
    def grant(self) -> Grant | None:
        """A managed client's grant as last received (None for a plain client;
        ``granted.connect_managed`` makes a managed one)."""
        return getattr(self._pool, "grant", None)

    @property
    def pool(self) -> Pool:
        return self._pool

    def per_server_counts(self) -> dict[str, dict[str, Any]]:
        """Per server: calls sent, answered, in flight, measured service time."""
        return self._pool.per_server_counts()

    @property
    def capabilities(self) -> dict[str, Any]:
        """The server's WELCOME: version, server, tenant, ops, key_types, limits."""
        return dict(self._pool.info)

    @property
    def live_connections(self) -> int:
        """Connections open, welcomed and not draining."""
        return sum(1 for c in self._pool.conns if c.usable)

    @property
    def counters(self) -> dict[str, int]:
        """Sends, retries, THROTTLED and BUSY answers, lost requests, timeouts,
        reconnects, GOAWAYs, grant tokens refused (GRANT_PRESENT)."""
        return dict(self._pool.counters)

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the core --------------------------------------------------------------------------

    def _send(self, ftype: int, op: int, key: bytes, payload: bytes, safe: bool,
              timeout: float | None, session: SessionSpec | None = None,
              decode: Callable[[Frame], Any] | None = None,
              nbytes: int = -1) -> asyncio.Future[Any]:
        """Send one call; its future gets the answer frame, or ``decode(frame)`` (run in
        the completion: no coroutine of ours in between), or the error."""
        fut: asyncio.Future[Any] = self._loop.create_future()

        def done(frame: Frame | None, error: BaseException | None) -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            elif decode is None:
                fut.set_result(frame)
            else:
                try:
                    fut.set_result(decode(frame))  # type: ignore[arg-type]
                except Exception as e:
                    fut.set_exception(e)

        deadline = self._loop.time() + (self._pool.timeout if timeout is None else timeout)
        call = Call(ftype, op, key, payload, safe, done, deadline, session)
        if nbytes >= 0:
            call.nbytes = nbytes
        self._pool.submit(call)
        return fut

    async def request(self, op: int, key: str = "", fields: dict[int, bytes] | None = None,
                      *, timeout: float | None = None, safe: bool | None = None
                      ) -> dict[int, bytes]:
        """One REQUEST frame: ``fields`` (``{codec.Field: bytes}``) in, the answer's
        fields out; an error status raises its exception."""
        payload = codec.encode_fields(fields or {})
        frame = await self._send(FrameType.REQUEST, op, _key(key), payload,
                                 op in SAFE_OPS if safe is None else safe, timeout)
        return answer_fields(frame)

    def _data(self, op: Op, key: str, fields: dict[int, bytes],
              timeout: float | None) -> asyncio.Future[Any]:
        data = fields.get(Field.DATA)
        if data is None:
            data = fields.get(Field.CIPHERTEXT, b"")
        return self._send(FrameType.REQUEST, op, _key(key), codec.encode_fields(fields),
                          op in SAFE_OPS, timeout, None, _DECODERS[op], len(data))

    async def _control(self, op: Op, key: str = "", obj: dict[str, Any] | None = None,
                       timeout: float | None = None) -> dict[str, Any]:
        frame = await self._send(FrameType.REQUEST, op, _key(key),
                                 codec.json_field(obj or {}), op in SAFE_OPS, timeout)
        return codec.get_json(answer_fields(frame))

    # -- data operations -------------------------------------------------------------------

    async def encrypt(self, key: str, plaintext: bytes, *, aad: bytes = b"",
                      context: bytes | None = None, version: int | None = None,
                      timeout: float | None = None) -> bytes:
        if not aad and context is None and version is None:  # the common case, directly
            return await self._send(  # type: ignore[no-any-return]
                FrameType.REQUEST, Op.ENCRYPT, _key(key),
                _pack_field(Field.DATA, len(plaintext)) + plaintext, False, timeout, None,
                _DECODERS[Op.ENCRYPT], len(plaintext))
        f = _cipher_fields(Field.DATA, plaintext, aad, context)
        if version is not None:
            f[Field.VERSION] = codec.u32(version)
        return await self._data(Op.ENCRYPT, key, f, timeout)  # type: ignore[no-any-return]

    async def decrypt(self, key: str, ciphertext: bytes, *, aad: bytes = b"",
                      context: bytes | None = None, timeout: float | None = None) -> bytes:
        f = _cipher_fields(Field.CIPHERTEXT, ciphertext, aad, context)
        return await self._data(Op.DECRYPT, key, f, timeout)  # type: ignore[no-any-return]

    async def rewrap(self, key: str, ciphertext: bytes, *, aad: bytes = b"",
                     context: bytes | None = None, timeout: float | None = None) -> bytes:
        f = _cipher_fields(Field.CIPHERTEXT, ciphertext, aad, context)
        return await self._data(Op.REWRAP, key, f, timeout)  # type: ignore[no-any-return]

    async def datakey(self, key: str, *, bits: int = 256, plaintext: bool = True,
                      context: bytes | None = None, timeout: float | None = None
                      ) -> tuple[bytes | None, bytes]:
        """(the data key in the clear, or None when ``plaintext=False``; it wrapped)."""
        f: dict[int, bytes] = {Field.LENGTH: codec.u32(bits)}
        if not plaintext:
            f[Field.PLAINTEXT] = b"\x00"
        if context is not None:
            f[Field.CONTEXT] = context
        return await self._data(Op.DATAKEY, key, f, timeout)  # type: ignore[no-any-return]

    @staticmethod
    def _sign_fields(data: bytes, hash: str, prehashed: bool, padding: str | None,
                     version: int | None = None) -> dict[int, bytes]:
        f: dict[int, bytes] = {Field.DATA: data}
        if version is not None:
            f[Field.VERSION] = codec.u32(version)
        if hash != "sha256":
            f[Field.HASH] = hash.encode()
        if prehashed:
            f[Field.PREHASHED] = b"\x01"
        if padding is not None and padding != "pss":
            f[Field.PADDING] = padding.encode()
        return f

    async def sign(self, key: str, data: bytes, *, hash: str = "sha256",
                   prehashed: bool = False, padding: str = "pss", version: int | None = None,
                   timeout: float | None = None) -> bytes:
        f = self._sign_fields(data, hash, prehashed, padding, version)
        return await self._data(Op.SIGN, key, f, timeout)  # type: ignore[no-any-return]

    async def verify(self, key: str, data: bytes, signature: bytes, *, hash: str = "sha256",
                     prehashed: bool = False, padding: str = "pss",
                     timeout: float | None = None) -> bool:
        f = self._sign_fields(data, hash, prehashed, padding)
        f[Field.SIGNATURE] = signature
        return await self._data(Op.VERIFY, key, f, timeout)  # type: ignore[no-any-return]

    async def hmac(self, key: str, data: bytes, *, algorithm: str | None = None,
                   version: int | None = None, timeout: float | None = None) -> bytes:
        f: dict[int, bytes] = {Field.DATA: data}
        if version is not None:
            f[Field.VERSION] = codec.u32(version)
        if algorithm is not None:
            f[Field.ALGORITHM] = algorithm.encode()
        return await self._data(Op.HMAC, key, f, timeout)  # type: ignore[no-any-return]

    async def verify_hmac(self, key: str, data: bytes, mac: bytes, *,
                          algorithm: str | None = None, timeout: float | None = None) -> bool:
        f: dict[int, bytes] = {Field.DATA: data, Field.MAC: mac}
        if algorithm is not None:
            f[Field.ALGORITHM] = algorithm.encode()
        return await self._data(Op.VERIFY_HMAC, key, f, timeout)  # type: ignore[no-any-return]

    async def digest(self, data: bytes, algorithm: str = "sha256", *,
                     timeout: float | None = None) -> bytes:
        f: dict[int, bytes] = {Field.DATA: data, Field.ALGORITHM: algorithm.encode()}
        return await self._data(Op.DIGEST, "", f, timeout)  # type: ignore[no-any-return]

    async def random(self, n: int, *, timeout: float | None = None) -> bytes:
        f: dict[int, bytes] = {Field.LENGTH: codec.u32(n)}
        return await self._data(Op.RANDOM, "", f, timeout)  # type: ignore[no-any-return]

    async def batch(self, op: str, key: str, items: list[dict[str, object]], *,
                    timeout: float | None = None) -> list[object | BaseException]:
        """One BATCH of ``op`` (encrypt, decrypt, rewrap, sign, verify, hmac,
        verify_hmac, datakey) on ``key``: per item, what the single method returns, or
        the item's own error (one bad item fails only itself). Items name their fields
        as ``codec.Field`` does, lower case: ``{"data": b"..", "aad": b".."}``. More
        items than the server's ``max_batch`` go as several batches at once."""
        try:
            wire_op = _BATCH_OPS[op]
        except KeyError:
            raise InvalidRequest(f"no batch of {op!r} (batches: "
                                 f"{', '.join(_BATCH_OPS)})") from None
        limit = int((self._pool.info.get("limits") or {}).get("max_batch")
                    or codec.MAX_BATCH)
        limit = max(1, min(limit, codec.MAX_BATCH))
        if len(items) <= limit:
            return await self._batch(wire_op, key, items, timeout)
        # more items than one BATCH may carry: several, in flight together, in order
        parts = await asyncio.gather(*(self._batch(wire_op, key, items[i:i + limit],
                                                   timeout)
                                       for i in range(0, len(items), limit)))
        return [r for part in parts for r in part]

    async def _batch(self, wire_op: Op, key: str, items: list[dict[str, object]],
                     timeout: float | None) -> list[object | BaseException]:
        payload = codec.encode_batch([item_fields(i) for i in items])
        frame = await self._send(FrameType.BATCH, wire_op, _key(key), payload,
                                 wire_op in SAFE_OPS, timeout)
        if frame.type != FrameType.BATCH_RESPONSE:
            answer_fields(frame)  # a whole-batch error raises here
            raise ProtocolError("a batch was answered by a plain RESPONSE")
        out: list[object | BaseException] = []
        for status, raw in codec.decode_batch_response(frame.payload):
            if status != Status.OK:
                out.append(codec.error_from(status, raw))
                continue
            try:
                out.append(result_of(wire_op, codec.decode_fields(raw)))
            except InvalidRequest as e:
                out.append(ProtocolError(f"malformed batch result: {e}"))
        if len(out) != len(items):
            raise ProtocolError(f"{len(items)} items answered by {len(out)} results")
        return out

    # -- key management --------------------------------------------------------------------

    async def create_key(self, name: str, type: str, *, timeout: float | None = None,
                         **policy: Any) -> dict[str, Any]:
        """A new key: ``type`` as WELCOME's ``key_types`` lists; ``policy``: exportable,
        deletion_allowed, derived, convergent."""
        return await self._control(Op.KEY_CREATE, name, {"type": type, **policy}, timeout)

    async def import_key(self, name: str, type: str, *, wrapped: bytes | None = None,
                         material: bytes | None = None, **policy: Any) -> dict[str, Any]:
        """BYOK: ``wrapped`` as ``wrapping_key()`` asks (RSA-OAEP(ephemeral) ||
        AES-KWP(ephemeral, material)), or ``material`` to have it wrapped here."""
        if (wrapped is None) == (material is None):
            raise InvalidRequest("import_key needs exactly one of wrapped= or material=")
        if material is not None:
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import padding, rsa
            from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
            pub = serialization.load_pem_public_key(await self.wrapping_key())
            if not isinstance(pub, rsa.RSAPublicKey):
                raise InvalidRequest("the server's wrapping key is not an RSA key")
            import os
            ephemeral = os.urandom(32)
            oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
            wrapped = pub.encrypt(ephemeral, oaep) + aes_key_wrap_with_padding(
                ephemeral, material)
        assert wrapped is not None
        obj = {"type": type, "wrapped": base64.b64encode(wrapped).decode(), **policy}
        return await self._control(Op.KEY_IMPORT, name, obj)

    async def wrapping_key(self) -> bytes:
        """The server's RSA-4096 public key (PEM) to wrap imports with."""
        return str((await self._control(Op.WRAPPING_KEY))["public_key"]).encode()

    async def list_keys(self) -> list[str]:
        return list((await self._control(Op.KEY_LIST)).get("keys", []))

    async def read_key(self, name: str) -> dict[str, Any]:
        return await self._control(Op.KEY_READ, name)

    async def rotate_key(self, name: str) -> dict[str, Any]:
        return await self._control(Op.KEY_ROTATE, name)

    async def config_key(self, name: str, *, timeout: float | None = None,
                         **changes: Any) -> dict[str, Any]:
        return await self._control(Op.KEY_CONFIG, name, changes, timeout)

    async def trim_key(self, name: str, min_version: int) -> dict[str, Any]:
        return await self._control(Op.KEY_TRIM, name, {"min_version": min_version})

    async def delete_key(self, name: str) -> None:
        await self._control(Op.KEY_DELETE, name)

    async def export_key(self, name: str, version: int | None = None) -> dict[str, Any]:
        """``{"keys": {"n": base64 material}}`` (exportable keys only)."""
        return await self._control(Op.KEY_EXPORT, name,
                                   {"version": version} if version is not None else {})

    async def set_tenant_limits(self, tenant: str, ops: float | None = None,
                                bytes: float | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {"tenant": tenant}
        if ops is not None:
            obj["ops_per_s"] = ops
        if bytes is not None:
            obj["bytes_per_s"] = bytes
        return await self._control(Op.TENANT_LIMITS, "", obj)

    # -- streams ---------------------------------------------------------------------------

    def encrypt_stream(self, key: str, source: StreamSource, *,
                       context: bytes | None = None) -> AsyncIterator[bytes]:
        """The ciphertext of ``source`` as it comes (bulk.py's format), with at most a
        window of pieces sent ahead of what the caller has taken. Never repeated: a lost
        connection raises ``ConnectionLost``."""
        return run_stream(self._pool, Op.ENCRYPT_STREAM, _key(key), source, context)

    def decrypt_stream(self, key: str, source: StreamSource, *,
                       context: bytes | None = None) -> AsyncIterator[bytes]:
        return run_stream(self._pool, Op.DECRYPT_STREAM, _key(key), source, context)

    # -- offload sessions --------------------------------------------------------------------

    async def open_session(self, algorithm: str, key_material: bytes) -> int:
        """A handle for raw operations with the caller's own key (plane algorithm name;
        raw symmetric bytes, PKCS#8 or SPKI DER). The key goes to each connection once,
        when a raw operation first needs it there, and again after a reconnect."""
        spec = SessionSpec(algorithm, bytes(key_material))
        handle = len(self._sessions) + 1
        self._sessions[handle] = spec
        return handle

    async def close_session(self, session: int) -> None:
        spec = self._sessions.pop(session, None)
        if spec is not None:
            self._pool.drop_session(spec)

    async def raw(self, op: str | int, session: int, fields: dict[int, bytes], *,
                  timeout: float | None = None) -> dict[int, bytes]:
        """A raw offload op (``encrypt``, ``decrypt``, ``sign``, ``verify``, ``mac``,
        ``verify_mac`` or its ``Op``) on a session: fields in, fields out."""
        wire_op = _RAW_OPS[op] if isinstance(op, str) else Op(op)
        spec = self._sessions.get(session)
        if spec is None:
            raise InvalidRequest(f"no session {session} on this client")
        frame = await self._send(FrameType.REQUEST, wire_op, b"",
                                 codec.encode_fields(fields), True, timeout, spec)
        return answer_fields(frame)

    def submit_call(self, call: Call) -> None:
        """For engines on this client's loop: send a prepared ``Call``."""
        self._pool.submit(call)
