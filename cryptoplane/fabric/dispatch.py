"""The op table: wire fields in, ``Transit`` calls, wire fields out.

``OPS`` maps each wire op (``codec.Op``) to an ``OpSpec``: its names (for token scopes and
metrics), whether it names a key, where it runs (on the event loop, on a crypto worker,
on an admin worker), and its handler. A handler takes the service, the caller's tenant,
the key name and the request's fields, and returns the answer's encoded fields, or
raises the typed error the answer's status names (``codec.status_for``). The connection
finds an op with one dict lookup; nothing here touches a socket.

Blob versions: transit's ciphertexts, signatures and MAC tags carry their key version as
a u32 at bytes 1..4 (``transit/blobs.py``), the very bytes of the VERSION field; answers
copy them from the blob rather than parse and repack.

Batches (``run_batch``): each item is what a REQUEST of the op carries. The ops transit
batches (encrypt, decrypt, rewrap, sign, verify, hmac, verify_hmac) go to
``Transit.batch`` as one call (the key found once, nonces drawn in bulk); the others
run item by item. An item that does not parse fails alone (INVALID_REQUEST).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from ..exceptions import CryptoplaneError, InvalidRequest
from . import codec as C
from .codec import Field, Op

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger("cryptoplane.fabric")

INLINE: Final = 0   # on the event loop: costs less than a hop to a thread
WORKER: Final = 1   # crypto workers: signatures, big payloads
ADMIN: Final = 2    # admin workers: the keystore's database, key generation

# payloads at least this big go to a worker whatever the op (their work releases the GIL)
BIG: Final = 256 * 1024

Fields = dict[int, bytes]
Handler = Callable[["Service", str, str, Fields, str], bytes]

_FH: Final = struct.Struct("!BI")
_fh = _FH.pack
_U32: Final = struct.Struct("!I")
_VERSION_HEAD: Final = _fh(Field.VERSION, 4)
VALID_TRUE: Final = _fh(Field.VALID, 1) + b"\x01"
VALID_FALSE: Final = _fh(Field.VALID, 1) + b"\x00"


def field(tag: int, value: bytes) -> bytes:
    return _fh(tag, len(value)) + value


def _blob_answer(tag: int, blob: bytes) -> bytes:
    """A blob field and the VERSION field copied from the blob's bytes 1..4."""
    return b"".join((_fh(tag, len(blob)), blob, _VERSION_HEAD, blob[1:5]))


def _required(f: Fields, tag: int) -> bytes:
    v = f.get(tag)
    if v is None:
        raise InvalidRequest(f"missing field {Field(tag).name}")
    return v


def _version(f: Fields) -> int | None:
    raw = f.get(Field.VERSION)
    if raw is None:
        return None
    return C.get_u32(f, Field.VERSION)


def _hash(f: Fields) -> str | None:
    return C.get_text(f, Field.HASH) if Field.HASH in f else None


# -- data operations --------------------------------------------------------------------

def _encrypt(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    blob = s.transit.encrypt(tenant, name, _required(f, Field.DATA),
                             aad=f.get(Field.AAD, b""), context=f.get(Field.CONTEXT),
                             version=_version(f), principal=who)
    return _blob_answer(Field.CIPHERTEXT, blob)


def _decrypt(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    pt = s.transit.decrypt(tenant, name, _required(f, Field.CIPHERTEXT),
                           aad=f.get(Field.AAD, b""), context=f.get(Field.CONTEXT),
                           principal=who)
    return field(Field.DATA, pt)


def _rewrap(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    blob = s.transit.rewrap(tenant, name, _required(f, Field.CIPHERTEXT),
                            aad=f.get(Field.AAD, b""), context=f.get(Field.CONTEXT),
                            principal=who)
    return _blob_answer(Field.CIPHERTEXT, blob)


def _datakey(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    bits = C.get_u32(f, Field.LENGTH, 256)
    want = f.get(Field.PLAINTEXT)
    if want is not None and want != b"\x00":
        raise InvalidRequest("PLAINTEXT in a DATAKEY request may only be u8 0 (none)")
    key, blob = s.transit.datakey(tenant, name, bits=bits, plaintext=want is None,
                                  context=f.get(Field.CONTEXT), principal=who)
    head = field(Field.PLAINTEXT, key) if key is not None else b""
    return head + _blob_answer(Field.WRAPPED, blob)


def _sign(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    sig = s.transit.sign(tenant, name, _required(f, Field.DATA), version=_version(f),
                         hash=_hash(f), prehashed=C.get_flag(f, Field.PREHASHED),
                         padding=C.get_text(f, Field.PADDING, "pss"), principal=who)
    return _blob_answer(Field.SIGNATURE, sig)


def _verify(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    ok = s.transit.verify(tenant, name, _required(f, Field.DATA),
                          _required(f, Field.SIGNATURE), hash=_hash(f),
                          prehashed=C.get_flag(f, Field.PREHASHED),
                          padding=C.get_text(f, Field.PADDING, "pss"), principal=who)
    return VALID_TRUE if ok else VALID_FALSE


def _hmac(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    tag = s.transit.hmac(tenant, name, _required(f, Field.DATA), version=_version(f),
                         algorithm=C.get_text(f, Field.ALGORITHM, "sha256"),
                         principal=who)
    return _blob_answer(Field.MAC, tag)


def _verify_hmac(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    ok = s.transit.verify_hmac(tenant, name, _required(f, Field.DATA),
                               _required(f, Field.MAC),
                               algorithm=C.get_text(f, Field.ALGORITHM, "sha256"),
                               principal=who)
    return VALID_TRUE if ok else VALID_FALSE


def _digest(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    out = s.transit.digest(C.get_text(f, Field.ALGORITHM, "sha256"), _required(f, Field.DATA))
    return field(Field.DATA, out)


def _random(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    return field(Field.DATA, s.transit.random(C.get_u32(f, Field.LENGTH)))


# -- key management (JSON both ways) ------------------------------------------------------

_POLICY_FLAGS: Final = ("exportable", "deletion_allowed", "derived", "convergent",
                        "auto_rotate_period")


def _json(f: Fields) -> dict[str, Any]:
    return C.get_json(f)


def _policy_args(j: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    unknown = set(j) - {"type", *_POLICY_FLAGS, *extra}
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    if not isinstance(j.get("type"), str):
        raise InvalidRequest("the key's \"type\" (a string) is required")
    return {k: j[k] for k in _POLICY_FLAGS if k in j}


def _key_create(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    j = _json(f)
    args = _policy_args(j)
    return C.json_field(s.transit.create_key(tenant, name, j["type"], **args))


def _key_import(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    j = _json(f)
    args = _policy_args(j, ("wrapped",))
    raw = j.get("wrapped")
    if not isinstance(raw, str):
        raise InvalidRequest("\"wrapped\" (base64) is required")
    try:
        wrapped = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("\"wrapped\" is not valid base64") from None
    return C.json_field(s.transit.import_key(tenant, name, j["type"], wrapped, **args))


def _key_list(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    return C.json_field({"keys": s.transit.list_keys(tenant)})


def _key_read(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    return C.json_field(s.transit.read_key(tenant, name))


def _key_rotate(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    return C.json_field(s.transit.rotate(tenant, name))


def _key_config(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    return C.json_field(s.transit.config(tenant, name, **_json(f)))


def _key_trim(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    j = _json(f)
    if set(j) != {"min_version"}:
        raise InvalidRequest("KEY_TRIM takes {\"min_version\": n}")
    return C.json_field(s.transit.trim(tenant, name, j["min_version"]))


def _key_delete(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    s.transit.delete(tenant, name)
    return C.json_field({})


def _key_export(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    j = _json(f)
    if set(j) - {"version"}:
        raise InvalidRequest("KEY_EXPORT takes only \"version\"")
    out = s.transit.export(tenant, name, j.get("version"), principal=who)
    keys = {str(v): base64.b64encode(m).decode() for v, m in out["keys"].items()}
    return C.json_field({"name": out["name"], "type": out["type"], "keys": keys})


def _wrapping_key(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    return C.json_field({"public_key": s.transit.wrapping_key(tenant).decode()})


def _tenant_limits(s: Service, tenant: str, name: str, f: Fields, who: str) -> bytes:
    j = _json(f)
    if set(j) - {"tenant", "ops_per_s", "bytes_per_s"}:
        raise InvalidRequest("TENANT_LIMITS takes tenant, ops_per_s, bytes_per_s")
    target = j.get("tenant")
    if not isinstance(target, str):
        raise InvalidRequest("TENANT_LIMITS needs \"tenant\"")
    rates = []
    for k in ("ops_per_s", "bytes_per_s"):
        v = j.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise InvalidRequest(f"{k} must be a number")
        rates.append(v)
    return C.json_field(s.set_tenant_limits(target, rates[0], rates[1]))


# -- the table ------------------------------------------------------------------------------

class OpSpec(NamedTuple):
    op: int
    name: str            # metrics and logs: the op's lowercase name
    scope: str           # what a token's op scopes must allow
    keyed: bool          # names a key in the frame's key reference
    where: int           # INLINE, WORKER or ADMIN
    run: Handler | None  # None: the connection handles it (sessions, streams)
    batch: str | None    # Transit.batch's name for the op; None: item by item
    answer: Callable[[Any], bytes] | None  # a Transit.batch result as answer fields


def _spec(op: Op, where: int, run: Handler | None, *, keyed: bool = True,
          scope: str | None = None, batch: str | None = None,
          answer: Callable[[Any], bytes] | None = None) -> OpSpec:
    name = op.name.lower()
    return OpSpec(int(op), name, scope or name, keyed, where, run, batch, answer)


def _valid(ok: Any) -> bytes:
    return VALID_TRUE if ok else VALID_FALSE


OPS: Final[dict[int, OpSpec]] = {s.op: s for s in (
    _spec(Op.ENCRYPT, INLINE, _encrypt, batch="encrypt",
          answer=lambda b: _blob_answer(Field.CIPHERTEXT, b)),
    _spec(Op.DECRYPT, INLINE, _decrypt, batch="decrypt",
          answer=lambda pt: field(Field.DATA, pt)),
    _spec(Op.REWRAP, INLINE, _rewrap, batch="rewrap",
          answer=lambda b: _blob_answer(Field.CIPHERTEXT, b)),
    _spec(Op.DATAKEY, INLINE, _datakey),
    _spec(Op.SIGN, WORKER, _sign, batch="sign",
          answer=lambda b: _blob_answer(Field.SIGNATURE, b)),
    _spec(Op.VERIFY, WORKER, _verify, batch="verify", answer=_valid),
    _spec(Op.HMAC, INLINE, _hmac, batch="hmac", answer=lambda b: _blob_answer(Field.MAC, b)),
    _spec(Op.VERIFY_HMAC, INLINE, _verify_hmac, batch="verify_hmac", answer=_valid),
    _spec(Op.DIGEST, INLINE, _digest, keyed=False),
    _spec(Op.RANDOM, INLINE, _random, keyed=False),
    _spec(Op.SESSION_OPEN, INLINE, None, keyed=False, scope="session"),
    _spec(Op.SESSION_CLOSE, INLINE, None, keyed=False, scope="session"),
    *(_spec(op, INLINE, None, keyed=False, scope="session")
      for op in (Op.RAW_ENCRYPT, Op.RAW_DECRYPT, Op.RAW_SIGN, Op.RAW_VERIFY, Op.RAW_MAC,
                 Op.RAW_VERIFY_MAC)),
    _spec(Op.KEY_CREATE, ADMIN, _key_create),
    _spec(Op.KEY_IMPORT, ADMIN, _key_import),
    _spec(Op.KEY_LIST, ADMIN, _key_list, keyed=False),
    _spec(Op.KEY_READ, ADMIN, _key_read),
    _spec(Op.KEY_ROTATE, ADMIN, _key_rotate),
    _spec(Op.KEY_CONFIG, ADMIN, _key_config),
    _spec(Op.KEY_TRIM, ADMIN, _key_trim),
    _spec(Op.KEY_DELETE, ADMIN, _key_delete),
    _spec(Op.KEY_EXPORT, ADMIN, _key_export),
    _spec(Op.WRAPPING_KEY, ADMIN, _wrapping_key, keyed=False),
    _spec(Op.ENCRYPT_STREAM, INLINE, None, scope="encrypt"),
    _spec(Op.DECRYPT_STREAM, INLINE, None, scope="decrypt"),
    _spec(Op.TENANT_LIMITS, ADMIN, _tenant_limits, keyed=False, scope="admin"),
)}

DATA_OPS: Final = frozenset(int(op) for op in Op if 16 <= op <= 25)
SESSION_OPS: Final = frozenset(int(op) for op in Op if 32 <= op <= 45)
STREAM_OPS: Final = frozenset({int(Op.ENCRYPT_STREAM), int(Op.DECRYPT_STREAM)})
# what WELCOME lists: the scope names a token may be given
SCOPES: Final = sorted({s.scope for s in OPS.values()})


# -- errors ---------------------------------------------------------------------------------

def error_answer(exc: BaseException) -> tuple[int, bytes]:
    """(status, payload) of an error answer. Our typed errors keep their message (they
    never carry secrets); a library's ValueError or TypeError meeting bad input is
    INVALID_REQUEST; anything else is INTERNAL, logged, its text withheld."""
    if isinstance(exc, CryptoplaneError):
        status = C.status_for(exc)
        return status, C.error_fields(str(exc), getattr(exc, "retry_after", 0.0))
    if isinstance(exc, ValueError | TypeError | OverflowError):
        return C.Status.INVALID_REQUEST, C.error_fields(f"{type(exc).__name__}: {exc}")
    log.error("request failed unexpectedly", exc_info=exc)
    return C.Status.INTERNAL, C.error_fields("internal server error")


# -- batches --------------------------------------------------------------------------------

_ITEM_KEYS: Final[dict[str, tuple[tuple[int, str], ...]]] = {
    "encrypt": ((Field.DATA, "plaintext"), (Field.AAD, "aad"), (Field.CONTEXT, "context")),
    "decrypt": ((Field.CIPHERTEXT, "ciphertext"), (Field.AAD, "aad"),
                (Field.CONTEXT, "context")),
    "rewrap": ((Field.CIPHERTEXT, "ciphertext"), (Field.AAD, "aad"),
               (Field.CONTEXT, "context")),
    "sign": ((Field.DATA, "data"),),
    "verify": ((Field.DATA, "data"), (Field.SIGNATURE, "signature")),
    "hmac": ((Field.DATA, "data"),),
    "verify_hmac": ((Field.DATA, "data"), (Field.MAC, "tag")),
}
# the one-field item every fast loop takes: {plaintext} / {ciphertext}
_FIRST: Final = {op: keys[0] for op, keys in _ITEM_KEYS.items()}


def _item(op: str, f: Fields) -> dict[str, Any]:
    """A Transit.batch item from an item's fields."""
    item: dict[str, Any] = {name: f[tag] for tag, name in _ITEM_KEYS[op] if tag in f}
    if op in ("encrypt", "sign", "hmac") and Field.VERSION in f:
        item["version"] = C.get_u32(f, Field.VERSION)
    if op in ("sign", "verify"):
        if Field.HASH in f:
            item["hash"] = C.get_text(f, Field.HASH)
        if Field.PREHASHED in f:
            item["prehashed"] = C.get_flag(f, Field.PREHASHED)
        if Field.PADDING in f:
            item["padding"] = C.get_text(f, Field.PADDING)
    elif op in ("hmac", "verify_hmac") and Field.ALGORITHM in f:
        item["algorithm"] = C.get_text(f, Field.ALGORITHM)
    return item


def run_batch(s: Service, tenant: str, spec: OpSpec, name: str, raw: list[bytes],
              who: str = "") -> bytes:
    """A BATCH_RESPONSE payload: each item's status and answer fields, in order. Raises
    only what fails the whole batch (the key missing, a malformed item list)."""
    if spec.op == Op.ENCRYPT:
        fast = _encrypt_items(s, tenant, name, raw, who)
        if fast is not None:
            return fast
    results: list[tuple[int, bytes]] = [(0, b"")] * len(raw)
    if spec.batch is None:
        if spec.run is None:
            raise InvalidRequest(f"{spec.name} cannot be batched")
        if spec.keyed:
            s.transit.ring(tenant, name)  # a missing key fails the whole batch
        run = spec.run
        for i, item in enumerate(raw):
            try:
                results[i] = (0, run(s, tenant, name, C.decode_fields(item), who))
            except Exception as e:
                results[i] = error_answer(e)
        return C.encode_batch_response(results)
    op = spec.batch
    tag, first = _FIRST[op]
    head = _fh(tag, 0)[:1]
    items: list[dict[str, Any]] = []
    where: list[int] = []
    for i, item in enumerate(raw):
        # the common item, one field and nothing else, without the field parser
        if item[:1] == head and len(item) >= 5 and _U32.unpack_from(item, 1)[0] == len(item) - 5:
            items.append({first: item[5:]})
            where.append(i)
            continue
        try:
            items.append(_item(op, C.decode_fields(item)))
        except Exception as e:
            results[i] = error_answer(e)
            continue
        where.append(i)
    if not items:
        s.transit.ring(tenant, name)
        return C.encode_batch_response(results)
    answer = spec.answer
    assert answer is not None
    done = s.transit.batch(tenant, op, name, items, principal=who)
    for i, out in zip(where, done, strict=True):
        if isinstance(out, BaseException):
            results[i] = error_answer(out)
        else:
            try:
                results[i] = (0, answer(out))
            except Exception as e:
                results[i] = error_answer(e)
    return C.encode_batch_response(results)


_ITEM_HEAD: Final = struct.Struct("!HIBI")  # status, length; the CIPHERTEXT field's head
_VERSION_FIELD: Final = _fh(Field.VERSION, 4)


def _encrypt_items(s: Service, tenant: str, name: str, raw: list[bytes],
                   who: str) -> bytes | None:
    """An ENCRYPT batch under a plain AEAD key, answered straight into one buffer: the
    key's version found once, nonces drawn in one call, each item of one DATA field
    sealed and packed with one struct. Items of another shape go through
    ``Transit.encrypt`` one by one. None: the key is not a plain AEAD key (derived, or
    no such key: ``Transit.batch`` decides what to answer)."""
    try:
        ver = s.transit.ring(tenant, name).fast
    except CryptoplaneError:
        return None
    if ver is None or ver.aead is None:
        return None
    key, header, number = ver.aead, ver.ct_header, ver.number
    tail = _VERSION_FIELD + number.to_bytes(4, "big")
    enc = s.plane.encrypt
    record = s.transit.source.record_use
    nonces = os.urandom(12 * len(raw))
    pack = _ITEM_HEAD.pack
    unpack = _U32.unpack_from
    parts: list[bytes] = [_U32.pack(len(raw))]
    append = parts.append
    for i, item in enumerate(raw):
        n = len(item) - 5
        if n >= 0 and item[0] == 1 and unpack(item, 1)[0] == n:
            nonce = nonces[12 * i:12 * i + 12]
            try:
                ct = enc(key, item[5:], nonce, b"")
            except CryptoplaneError as e:
                status, answer = error_answer(e)
            else:
                record(tenant, name, number, "encrypt", n, who)
                m = len(ct) + 17
                append(pack(0, m + 14, Field.CIPHERTEXT, m))
                append(header)
                append(nonce)
                append(ct)
                append(tail)
                continue
        else:
            try:
                status, answer = 0, _encrypt(s, tenant, name, C.decode_fields(item), who)
            except Exception as e:
                status, answer = error_answer(e)
        append(_U16_U32.pack(status, len(answer)))
        append(answer)
    return b"".join(parts)


_U16_U32: Final = struct.Struct("!HI")
