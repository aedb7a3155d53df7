"""Batches, as Vault's ``batch_input``: one key, many items, one result or typed error
per item, in order; one bad item fails alone.

The key is found once per batch (a missing key fails the whole batch, as in Vault).
Encrypt and decrypt have loops of their own for the common item (bytes in, no
per-item options): nonces drawn from the OS in one call for the batch, the blob built by
two concatenations around ``plane.encrypt``. Every other item takes the general path of
the single operation. Every item is audited (``record_use``) like a single call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...exceptions import CryptoplaneError, InvalidRequest
from . import blobs
from .keyring import Ring

if TYPE_CHECKING:
    from .service import Transit

MAX_ITEMS = 1 << 20

# per op: the item's fields, the first required; and how to run one item
FIELDS: dict[str, tuple[str, ...]] = {
    "encrypt": ("plaintext", "aad", "context", "nonce", "version"),
    "decrypt": ("ciphertext", "aad", "context"),
    "rewrap": ("ciphertext", "aad", "context"),
    "sign": ("data", "version", "hash", "prehashed", "padding"),
    "verify": ("data", "signature", "hash", "prehashed", "padding"),
    "hmac": ("data", "version", "algorithm"),
    "verify_hmac": ("data", "tag", "algorithm"),
}
_REQUIRED = {"verify": ("data", "signature"), "verify_hmac": ("data", "tag")}

Runner = Callable[["Transit", Ring, dict[str, Any], bytes], tuple[Any, int, int]]


def _fields(op: str, item: object) -> dict[str, Any]:
    if type(item) is not dict:
        raise InvalidRequest(f"each batch item must be a dict, not {type(item).__name__}")
    fields = FIELDS[op]
    extra = item.keys() - set(fields)
    if extra:
        raise InvalidRequest(f"unknown {op} item fields: {', '.join(sorted(map(str, extra)))}")
    for f in _REQUIRED.get(op, fields[:1]):
        if f not in item:
            raise InvalidRequest(f"{op} item needs {f!r}")
    return item


def _size(x: Any) -> int:
    return len(x) if isinstance(x, (bytes, bytearray, memoryview)) else 0


# each returns (result, version, bytes audited); n: a fresh random nonce for encrypts
_RUN: dict[str, Runner] = {
    "encrypt": lambda t, r, i, n: (*t._encrypt(
        r, i["plaintext"], i.get("aad", b""), i.get("context"), i.get("nonce"),
        i.get("version"), n), _size(i["plaintext"])),
    "decrypt": lambda t, r, i, n: _with_size(t._decrypt(
        r, i["ciphertext"], i.get("aad", b""), i.get("context"))),
    "rewrap": lambda t, r, i, n: (*t._rewrap(
        r, i["ciphertext"], i.get("aad", b""), i.get("context"), n),
        max(0, _size(i["ciphertext"]) - blobs.CIPHERTEXT_OVERHEAD)),
    "sign": lambda t, r, i, n: (*t._sign(
        r, i["data"], i.get("version"), i.get("hash"), i.get("prehashed", False),
        i.get("padding", "pss")), _size(i["data"])),
    "verify": lambda t, r, i, n: (*t._verify(
        r, i["data"], i["signature"], i.get("hash"), i.get("prehashed", False),
        i.get("padding", "pss")), _size(i["data"])),
    "hmac": lambda t, r, i, n: (*t._hmac(
        r, i["data"], i.get("version"), i.get("algorithm", "sha256")), _size(i["data"])),
    "verify_hmac": lambda t, r, i, n: (*t._verify_hmac(
        r, i["data"], i["tag"], i.get("algorithm", "sha256")), _size(i["data"])),
}


def _with_size(res: tuple[bytes, int]) -> tuple[bytes, int, int]:
    return res[0], res[1], len(res[0])


def _typed(e: Exception) -> Exception:
    """The item's error as a typed one: ours pass through; a ValueError or TypeError
    from a library meeting a malformed item becomes ``InvalidRequest``."""
    if isinstance(e, CryptoplaneError):
        return e
    return InvalidRequest(f"{type(e).__name__}: {e}")


def run(t: Transit, tenant: str, op: str, name: str, items: list[dict[str, Any]]) -> list[Any]:
    if op not in FIELDS:
        raise InvalidRequest(f"batch op must be one of {', '.join(FIELDS)}, not {op!r}")
    if not isinstance(items, list):
        raise InvalidRequest("batch items must be a list")
    if len(items) > MAX_ITEMS:
        raise InvalidRequest(f"a batch holds at most {MAX_ITEMS} items")
    ring = t.ring(tenant, name)
    if op == "encrypt" and ring.fast is not None:
        return _encrypt(t, ring, items)
    if op == "decrypt" and ring.fast is not None:
        return _decrypt(t, ring, items)
    nonces = os.urandom(12 * len(items)) if op in ("encrypt", "rewrap") else b""
    return _general(t, ring, op, items, nonces)


def _one(t: Transit, ring: Ring, op: str, item: Any, nonce: bytes) -> Any:
    try:
        result, v, nbytes = _RUN[op](t, ring, _fields(op, item), nonce)
    except (CryptoplaneError, ValueError, TypeError) as e:
        return _typed(e)
    t.source.record_use(ring.tenant, ring.name, v, op, nbytes)
    return result


def _general(t: Transit, ring: Ring, op: str, items: list[Any], nonces: bytes) -> list[Any]:
    out: list[Any] = []
    for i, item in enumerate(items):
        out.append(_one(t, ring, op, item, nonces[12 * i:12 * i + 12]))
    return out


def _plain(item: Any) -> bool:
    """An item the fast loops take: a dict of bytes data and, maybe, bytes aad."""
    if type(item) is not dict:
        return False
    n = len(item)
    return n == 1 or (n == 2 and type(item.get("aad")) is bytes)


def _encrypt(t: Transit, ring: Ring, items: list[Any]) -> list[Any]:
    ver = ring.fast
    assert ver is not None and ver.aead is not None
    key, header, v = ver.aead, ver.ct_header, ver.number
    enc = t.plane.encrypt
    record = t.source.record_use
    tenant, name = ring.tenant, ring.name
    nonces = os.urandom(12 * len(items))  # one system call for the whole batch
    out: list[Any] = []
    append = out.append
    for i, item in enumerate(items):
        n = nonces[12 * i:12 * i + 12]
        pt = item.get("plaintext") if _plain(item) else None
        if type(pt) is bytes and len(pt) <= blobs.MAX_REQUEST:
            try:
                append(header + n + enc(key, pt, n, item.get("aad", b"")))
            except CryptoplaneError as e:
                append(e)
                continue
            record(tenant, name, v, "encrypt", len(pt))
        else:
            append(_one(t, ring, "encrypt", item, n))
    return out


def _decrypt(t: Transit, ring: Ring, items: list[Any]) -> list[Any]:
    dec = t.plane.decrypt
    record = t.source.record_use
    tenant, name = ring.tenant, ring.name
    magic = blobs.CIPHERTEXT_MAGIC
    last_v, key = 0, None
    out: list[Any] = []
    append = out.append
    for item in items:
        ct = item.get("ciphertext") if _plain(item) else None
        if type(ct) is bytes and len(ct) >= blobs.CIPHERTEXT_OVERHEAD and ct[0] == magic:
            try:
                v = int.from_bytes(ct[1:5], "big")
                if v != last_v:  # batches are mostly one version: check it once
                    key = ring.for_check(v).aead
                    last_v = v
                pt = dec(key, ct[17:], ct[5:17], item.get("aad", b""))  # type: ignore[arg-type]
            except CryptoplaneError as e:
                append(e)
                continue
            append(pt)
            record(tenant, name, v, "decrypt", len(pt))
        else:
            append(_one(t, ring, "decrypt", item, b""))
    return out
