"""The fabric's wire protocol, sans-I/O: bytes in, frames out; frames in, bytes out.

In the manner of h11 (and of ``nbd/codec.py``): nothing here touches a socket, so the
server, the client and the fuzz tests drive the same code. ``docs/wire-protocol.md`` is
the specification; this module is its one implementation and keeps its numbers.

A frame is a 24-byte big-endian header, a key reference and a payload::

    u32 length   bytes after this field: 20 + key_len + payload
    u8  version  1
    u8  type     FrameType
    u16 flags    Flag
    u64 id       request id, chosen by the client, echoed by every answer to it
    u16 op       Op
    u16 status   Status (0 in requests)
    u16 key_len  length of the key reference (UTF-8 key name), <= MAX_KEY_REF
    u16 reserved 0

Payloads of data operations are fields: ``u8 tag, u32 length, bytes``, each tag at most
once (``Field``); control operations carry one JSON field. A BATCH payload is ``u32
count`` then per item ``u32 length, fields``; its answer, BATCH_RESPONSE, is ``u32
count`` then per item ``u16 status, u32 length, fields``.

Memory is bounded whatever the peer sends: a header announcing more than ``max_frame``
raises ``ProtocolError`` before anything of it is stored, and received pieces are joined
once, when the whole frame is there (never re-copied per piece).
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any, Final

from .. import exceptions as base
from . import errors as fe
from .errors import ProtocolError

VERSION: Final = 1
HEADER: Final = struct.Struct("!IBBHQHHHH")
HEADER_SIZE: Final = HEADER.size  # 24
_AFTER_LENGTH: Final = HEADER_SIZE - 4  # what ``length`` counts besides key and payload

MAX_PAYLOAD: Final = 32 * 1024 * 1024  # Vault's request cap
MAX_FRAME: Final = HEADER_SIZE + 256 + MAX_PAYLOAD
MAX_KEY_REF: Final = 256
MAX_BATCH: Final = 10_000
MAX_JSON: Final = 64 * 1024
# before a connection has authenticated it may send only this much per frame
MAX_UNAUTHENTICATED_FRAME: Final = 16 * 1024


class FrameType(enum.IntEnum):
    HELLO = 1           # client -> server: JSON {versions, token?, client?}
    WELCOME = 2         # server -> client: JSON {version, server, tenant, limits, ops...}
    REQUEST = 3
    RESPONSE = 4
    BATCH = 5
    BATCH_RESPONSE = 6
    DATA = 7            # a piece of a streamed payload, either way; END marks the last
    GOAWAY = 8          # server -> client: draining, send nothing new on this connection
    PING = 9
    PONG = 10
    EVENT = 11          # manager -> client: JSON, id 0: something about its grants changed


class Flag(enum.IntFlag):
    NONE = 0
    END = 1             # DATA: the last piece of the stream


class Op(enum.IntEnum):
    # data operations (payload: fields)
    ENCRYPT = 16
    DECRYPT = 17
    REWRAP = 18
    DATAKEY = 19
    SIGN = 20
    VERIFY = 21
    HMAC = 22
    VERIFY_HMAC = 23
    DIGEST = 24
    RANDOM = 25
    # offload sessions: the caller's own key, held in the server's memory for the
    # connection (virtio-crypto's sessions); the raw plane operations on it
    SESSION_OPEN = 32
    SESSION_CLOSE = 33
    RAW_ENCRYPT = 40
    RAW_DECRYPT = 41
    RAW_SIGN = 42
    RAW_VERIFY = 43
    RAW_MAC = 44
    RAW_VERIFY_MAC = 45
    # key management (payload: a JSON field both ways)
    KEY_CREATE = 64
    KEY_IMPORT = 65
    KEY_LIST = 66
    KEY_READ = 67
    KEY_ROTATE = 68
    KEY_CONFIG = 69
    KEY_TRIM = 70
    KEY_DELETE = 71
    KEY_EXPORT = 72
    WRAPPING_KEY = 73
    # bulk: REQUEST opens the stream, DATA frames carry it both ways
    ENCRYPT_STREAM = 96
    DECRYPT_STREAM = 97
    # operator (admin scope)
    TENANT_LIMITS = 112
    # a crypto server under a manager: the connection's grant (capability token)
    GRANT_PRESENT = 113
    # the manager (docs/fabric-manager.md): servers
    SERVER_REGISTER = 128
    SERVER_HEARTBEAT = 129
    SERVER_LEAVE = 130
    # the manager: quotas and grants
    GRANT_REQUEST = 136
    GRANT_RENEW = 137
    GRANT_RELEASE = 138
    GRANT_LIST = 139
    GRANT_REVOKE = 140
    FABRIC_STATUS = 141
    WATCH = 142


class Field(enum.IntEnum):
    DATA = 1            # plaintext / message / input
    CIPHERTEXT = 2
    AAD = 3
    CONTEXT = 4         # key derivation context (derived keys)
    NONCE = 5
    SIGNATURE = 6
    MAC = 7
    VERSION = 8         # u32
    HASH = 9            # ASCII: sha256, sha384, sha512
    PADDING = 10        # ASCII: pss, pkcs1v15
    PREHASHED = 11      # u8 0/1
    LENGTH = 12         # u32: random bytes, data key bits
    VALID = 13          # u8 0/1: verify answers
    PLAINTEXT = 14      # data key in the clear
    WRAPPED = 15        # data key wrapped by the named key
    JSON = 16           # UTF-8 JSON object: control arguments and answers
    MESSAGE = 17        # UTF-8 error text
    RETRY_AFTER = 18    # u32 milliseconds (THROTTLED, BUSY, SHUTTING_DOWN)
    ALGORITHM = 19      # ASCII: digest algorithm; plane algorithm of a session
    SESSION = 20        # u32: an offload session of this connection
    KEY = 21            # key material (SESSION_OPEN): raw symmetric, PKCS#8/SPKI DER
    TAG_SIZE = 22       # u32: MAC tag size (RAW_MAC), 0 = the algorithm's full size


_FIELD_TAGS: Final = frozenset(int(f) for f in Field)


class Status(enum.IntEnum):
    OK = 0
    INVALID_REQUEST = 1
    KEY_REJECTED = 2
    NOT_SUPPORTED = 3
    AUTHENTICATION_FAILED = 4
    INVALID_SIGNATURE = 5
    QUOTA_EXCEEDED = 6
    BUSY = 7
    ENGINE_FAILED = 8
    TIMEOUT = 9
    THROTTLED = 10
    UNAUTHORIZED = 11
    FORBIDDEN = 12
    KEY_NOT_FOUND = 13
    KEY_EXISTS = 14
    KEY_VERSION_REJECTED = 15
    POLICY_VIOLATION = 16
    PROTOCOL_ERROR = 17
    SHUTTING_DOWN = 18
    CONNECTION_LOST = 19  # never sent: what a client reports for an unanswered request
    INTERNAL = 20


# one exception class per status, both ways; order matters for status_for: subclasses
# before their bases (Throttled is a QuotaExceeded, KeyVersionRejected a KeyRejected...)
_ERRORS: Final[tuple[tuple[Status, type[BaseException]], ...]] = (
    (Status.THROTTLED, fe.Throttled),
    (Status.KEY_VERSION_REJECTED, fe.KeyVersionRejected),
    (Status.POLICY_VIOLATION, fe.PolicyViolation),
    (Status.PROTOCOL_ERROR, fe.ProtocolError),
    (Status.CONNECTION_LOST, fe.ConnectionLost),
    (Status.INTERNAL, fe.ServerError),
    (Status.UNAUTHORIZED, fe.Unauthorized),
    (Status.FORBIDDEN, fe.Forbidden),
    (Status.KEY_NOT_FOUND, fe.KeyNotFound),
    (Status.KEY_EXISTS, fe.KeyExists),
    (Status.SHUTTING_DOWN, fe.ShuttingDown),
    (Status.INVALID_REQUEST, base.InvalidRequest),
    (Status.KEY_REJECTED, base.KeyRejected),
    (Status.NOT_SUPPORTED, base.NotSupported),
    (Status.AUTHENTICATION_FAILED, base.AuthenticationFailed),
    (Status.INVALID_SIGNATURE, base.InvalidSignature),
    (Status.QUOTA_EXCEEDED, base.QuotaExceeded),
    (Status.BUSY, base.Busy),
    (Status.ENGINE_FAILED, base.EngineFailed),
    (Status.TIMEOUT, base.Timeout),

)
_CLASS_OF: Final = {status: cls for status, cls in _ERRORS}
# statuses after which the request certainly did not run: safe to send again anywhere
RETRYABLE: Final = frozenset({Status.THROTTLED, Status.BUSY, Status.SHUTTING_DOWN})


def status_for(exc: BaseException) -> Status:
    """The wire status of an exception (INTERNAL for anything the plane did not mean)."""
    for status, cls in _ERRORS:
        if isinstance(exc, cls):
            return status
    return Status.INTERNAL


def error_for(status: int, message: str = "", retry_after: float = 0.0) -> BaseException:
    """The exception a client raises for an error status: the class ``status_for`` maps
    from, so a remote failure raises what the same failure raises locally."""
    try:
        cls = _CLASS_OF[Status(status)]
    except ValueError:
        return fe.ServerError(f"unknown status {status}: {message}")
    text = message or Status(status).name.lower().replace("_", " ")
    if cls is fe.Throttled:
        return fe.Throttled(text, retry_after=retry_after)
    return cls(text)


class Frame:
    """One decoded frame. ``key`` is the raw key reference (UTF-8 bytes)."""

    __slots__ = ("flags", "id", "key", "op", "payload", "status", "type")

    def __init__(self, type: int, flags: int, id: int, op: int, status: int, key: bytes,
                 payload: bytes) -> None:
        self.type = type
        self.flags = flags
        self.id = id
        self.op = op
        self.status = status
        self.key = key
        self.payload = payload

    def __repr__(self) -> str:  # never the payload: it may be plaintext
        return (f"Frame(type={self.type}, id={self.id}, op={self.op}, status={self.status},"
                f" key_len={len(self.key)}, payload_len={len(self.payload)})")


_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from


def encode_frame(type: int, id: int, *, op: int = 0, status: int = 0, key: bytes = b"",
                 payload: bytes = b"", flags: int = 0) -> bytes:
    """One frame's bytes. Refuses what a decoder would refuse (sizes, key length)."""
    klen = len(key)
    if klen > MAX_KEY_REF:
        raise base.InvalidRequest(f"key reference longer than {MAX_KEY_REF} bytes")
    length = _AFTER_LENGTH + klen + len(payload)
    if length + 4 > MAX_FRAME:
        raise base.InvalidRequest(f"frame of {length + 4} bytes exceeds {MAX_FRAME}")
    return b"".join((_pack_header(length, VERSION, type, flags, id, op, status, klen, 0),
                     key, payload))


def header_bytes(type: int, id: int, op: int, status: int, key_len: int, body_len: int,
                 flags: int = 0) -> bytes:
    """Only the header, for writers that send key and payload as separate buffers
    (``writelines`` / ``writev``: a big payload is never copied into a frame)."""
    return _pack_header(_AFTER_LENGTH + key_len + body_len, VERSION, type, flags, id, op,
                        status, key_len, 0)


class FrameDecoder:
    """Splits a byte stream into frames. ``feed`` returns the frames completed by what
    arrived; a violation raises ``ProtocolError`` (the connection must then be closed:
    after a bad length nothing later can be trusted)."""

    __slots__ = ("_chunks", "_need", "_size", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._chunks: list[bytes] = []
        self._size = 0
        self._need = 0  # bytes the frame being received needs in all; 0: not known yet

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete (what a slow peer costs us)."""
        return self._size

    def feed(self, data: bytes) -> list[Frame]:
        if not data:
            return []
        if self._chunks:
            self._chunks.append(data)
            self._size += len(data)
            if self._size < (self._need or 4):
                return []
            data = b"".join(self._chunks)
            self._chunks = []
            self._size = 0
        frames: list[Frame] = []
        end = len(data)
        pos = 0
        max_frame = self.max_frame
        unpack = _unpack_header
        while True:
            left = end - pos
            if left < HEADER_SIZE:
                if left >= 4:
                    self._check_length(int.from_bytes(data[pos:pos + 4], "big"), max_frame)
                break
            length, version, ftype, flags, fid, op, status, klen, _ = unpack(data, pos)
            total = length + 4
            if total > left:
                self._check_length(length, max_frame)
                self._check_header(version, ftype, klen, length)
                break
            self._check_header(version, ftype, klen, length)
            if total > max_frame:
                raise ProtocolError(f"frame of {total} bytes exceeds the limit of {max_frame}")
            kstart = pos + HEADER_SIZE
            pstart = kstart + klen
            pos += total
            frames.append(Frame(ftype, flags, fid, op, status, data[kstart:pstart],
                                data[pstart:pos]))
        if pos < end:
            rest = data[pos:]
            self._chunks = [rest]
            self._size = len(rest)
            self._need = (int.from_bytes(rest[:4], "big") + 4) if len(rest) >= 4 else 0
        else:
            self._need = 0
        return frames

    @staticmethod
    def _check_length(length: int, max_frame: int) -> None:
        if length + 4 > max_frame:
            raise ProtocolError(f"frame of {length + 4} bytes exceeds the limit of {max_frame}")
        if length < _AFTER_LENGTH:
            raise ProtocolError(f"frame length {length} is shorter than a header")

    @staticmethod
    def _check_header(version: int, ftype: int, klen: int, length: int) -> None:
        if version != VERSION:
            raise ProtocolError(f"unsupported protocol version {version}")
        if not 1 <= ftype <= 11:
            raise ProtocolError(f"unknown frame type {ftype}")
        if klen > MAX_KEY_REF:
            raise ProtocolError(f"key reference of {klen} bytes exceeds {MAX_KEY_REF}")
        if _AFTER_LENGTH + klen > length:
            raise ProtocolError("key reference runs past the end of the frame")


# -- fields ---------------------------------------------------------------------------

_FIELD_HEAD: Final = struct.Struct("!BI")
_pack_field = _FIELD_HEAD.pack
_unpack_field = _FIELD_HEAD.unpack_from
_U32: Final = struct.Struct("!I")
_U16_U32: Final = struct.Struct("!HI")


def encode_fields(fields: dict[int, bytes]) -> bytes:
    """``{tag: value}`` as ``u8 tag, u32 length, value`` runs, in the dict's order."""
    parts: list[bytes] = []
    for tag, value in fields.items():
        parts.append(_pack_field(tag, len(value)))
        parts.append(value)
    return b"".join(parts)


def decode_fields(buf: bytes, start: int = 0, end: int | None = None) -> dict[int, bytes]:
    """The fields of ``buf[start:end]``. Unknown tags, repeated tags and lengths that run
    past the end are ``InvalidRequest`` (the item is refused; the stream stays usable,
    since the frame's own length was sound)."""
    if end is None:
        end = len(buf)
    out: dict[int, bytes] = {}
    pos = start
    while pos < end:
        if end - pos < 5:
            raise base.InvalidRequest("truncated field header")
        tag, length = _unpack_field(buf, pos)
        pos += 5
        if tag not in _FIELD_TAGS:
            raise base.InvalidRequest(f"unknown field tag {tag}")
        if tag in out:
            raise base.InvalidRequest(f"field {Field(tag).name} given twice")
        if length > end - pos:
            raise base.InvalidRequest(f"field {Field(tag).name} runs past the end")
        out[tag] = buf[pos:pos + length]
        pos += length
    return out


def u32(value: int) -> bytes:
    return _U32.pack(value)


def get_u32(fields: dict[int, bytes], tag: int, default: int | None = None) -> int:
    raw = fields.get(tag)
    if raw is None:
        if default is None:
            raise base.InvalidRequest(f"missing field {Field(tag).name}")
        return default
    if len(raw) != 4:
        raise base.InvalidRequest(f"field {Field(tag).name} must be 4 bytes")
    return int(_U32.unpack(raw)[0])


def get_text(fields: dict[int, bytes], tag: int, default: str | None = None) -> str:
    raw = fields.get(tag)
    if raw is None:
        if default is None:
            raise base.InvalidRequest(f"missing field {Field(tag).name}")
        return default
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise base.InvalidRequest(f"field {Field(tag).name} must be ASCII") from None


def get_flag(fields: dict[int, bytes], tag: int) -> bool:
    raw = fields.get(tag)
    if raw is None:
        return False
    if raw not in (b"\x00", b"\x01"):
        raise base.InvalidRequest(f"field {Field(tag).name} must be one byte, 0 or 1")
    return raw == b"\x01"


def json_field(obj: dict[str, Any]) -> bytes:
    """A control payload: one JSON field."""
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return _pack_field(Field.JSON, len(raw)) + raw


def get_json(fields: dict[int, bytes]) -> dict[str, Any]:
    raw = fields.get(Field.JSON)
    if raw is None:
        return {}
    if len(raw) > MAX_JSON:
        raise base.InvalidRequest(f"JSON field longer than {MAX_JSON} bytes")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise base.InvalidRequest("JSON field is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise base.InvalidRequest("JSON field must be an object")
    return obj


def error_fields(message: str, retry_after: float = 0.0) -> bytes:
    """The payload of an error answer: its message and, if any, when to retry."""
    raw = message.encode()[:1024]
    out = _pack_field(Field.MESSAGE, len(raw)) + raw
    if retry_after > 0:
        out += _pack_field(Field.RETRY_AFTER, 4) + u32(min(int(retry_after * 1000) + 1,
                                                           0xFFFFFFFF))
    return out


def error_from(status: int, payload: bytes) -> BaseException:
    """The exception an error answer stands for (a malformed one still yields its status)."""
    try:
        fields = decode_fields(payload)
        message = fields.get(Field.MESSAGE, b"").decode("utf-8", "replace")
        retry_ms = get_u32(fields, Field.RETRY_AFTER, 0)
    except base.InvalidRequest:
        message, retry_ms = "", 0
    return error_for(status, message, retry_ms / 1000)


# -- batches --------------------------------------------------------------------------


def encode_batch(items: list[bytes]) -> bytes:
    """A BATCH payload from each item's encoded fields."""
    if len(items) > MAX_BATCH:
        raise base.InvalidRequest(f"batch of {len(items)} items exceeds {MAX_BATCH}")
    parts = [_U32.pack(len(items))]
    pack = _U32.pack
    for item in items:
        parts.append(pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def decode_batch(payload: bytes) -> list[bytes]:
    """Each item's raw fields; a count or length that does not add up is ``ProtocolError``
    (the whole batch is refused: its items cannot be told apart)."""
    if len(payload) < 4:
        raise ProtocolError("batch payload shorter than its count")
    (count,) = _U32.unpack_from(payload, 0)
    if count > MAX_BATCH:
        raise ProtocolError(f"batch of {count} items exceeds {MAX_BATCH}")
    # each item needs at least its 4-byte length: reject impossible counts before looping
    if 4 + 4 * count > len(payload):
        raise ProtocolError("batch count larger than its payload")
    items: list[bytes] = []
    pos = 4
    end = len(payload)
    unpack = _U32.unpack_from
    for _ in range(count):
        if end - pos < 4:
            raise ProtocolError("batch item header runs past the end")
        (length,) = unpack(payload, pos)
        pos += 4
        if length > end - pos:
            raise ProtocolError("batch item runs past the end")
        items.append(payload[pos:pos + length])
        pos += length
    if pos != end:
        raise ProtocolError("trailing bytes after the last batch item")
    return items


def encode_batch_response(results: list[tuple[int, bytes]]) -> bytes:
    parts = [_U32.pack(len(results))]
    pack = _U16_U32.pack
    for status, fields in results:
        parts.append(pack(status, len(fields)))
        parts.append(fields)
    return b"".join(parts)


def decode_batch_response(payload: bytes) -> list[tuple[int, bytes]]:
    if len(payload) < 4:
        raise ProtocolError("batch response shorter than its count")
    (count,) = _U32.unpack_from(payload, 0)
    if count > MAX_BATCH or 4 + 6 * count > len(payload):
        raise ProtocolError("batch response count does not fit its payload")
    out: list[tuple[int, bytes]] = []
    pos = 4
    end = len(payload)
    unpack = _U16_U32.unpack_from
    for _ in range(count):
        if end - pos < 6:
            raise ProtocolError("batch result header runs past the end")
        status, length = unpack(payload, pos)
        pos += 6
        if length > end - pos:
            raise ProtocolError("batch result runs past the end")
        out.append((status, payload[pos:pos + length]))
        pos += length
    if pos != end:
        raise ProtocolError("trailing bytes after the last batch result")
    return out


# -- handshake ------------------------------------------------------------------------


def encode_json_frame(type: int, obj: dict[str, Any], id: int = 0, status: int = 0) -> bytes:
    return encode_frame(type, id, status=status, payload=json_field(obj))


def decode_json_payload(payload: bytes) -> dict[str, Any]:
    try:
        return get_json(decode_fields(payload))
    except base.InvalidRequest as e:
        raise ProtocolError(f"bad control payload: {e}") from None
