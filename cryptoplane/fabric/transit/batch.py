"""Batches, as Vault's ``batch_input``: one key, many items, one result or typed error
per item, in order; one bad item fails alone.

The key is found once per batch (a missing key fails the whole batch, as in Vault).
Encrypt and decrypt have loops of their own for the common item (bytes in, maybe bytes
aad, nothing else): nonces drawn from the OS in one call for the whole batch, the blob
built by two concatenations around ``plane.encrypt``. Every other item takes the
general path of the single operation (``ops``). Every item is audited
(``record_use``) like a single call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ...exceptions import CryptoplaneError, InvalidRequest
from ...plane import Plane
from . import blobs, ops
from .keyring import Ring
from .source import KeySource

MAX_ITEMS = 1 << 20

# per op: the item's fields (the first required unless _REQUIRED says otherwise)
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
_NO_VERSION = bytes(4)  # version 0: the general path refuses it as malformed
_INPUT = {"encrypt": "plaintext", "decrypt": "ciphertext", "rewrap": "ciphertext"}

# how one item runs: (plane, ring, item fields, a random nonce) -> (result, version)
Runner = Callable[[Plane, Ring, dict[str, Any], bytes], tuple[Any, int]]
_RUN: dict[str, Runner] = {
    "encrypt": lambda p, r, i, n: ops.encrypt(p, r, random12=n, **i),
    "decrypt": lambda p, r, i, n: ops.decrypt(p, r, **i),
    "rewrap": lambda p, r, i, n: ops.rewrap(p, r, random12=n, **i),
    "sign": lambda p, r, i, n: ops.sign(p, r, **i),
    "verify": lambda p, r, i, n: ops.verify(p, r, **i),
    "hmac": lambda p, r, i, n: ops.hmac(p, r, **i),
    "verify_hmac": lambda p, r, i, n: ops.verify_hmac(p, r, **i),
}


def check(op: str, items: object) -> None:
    """Whole-batch errors, before the key is looked up."""
    if op not in FIELDS:
        raise InvalidRequest(f"batch op must be one of {', '.join(FIELDS)}, not {op!r}")
    if not isinstance(items, list):
        raise InvalidRequest("batch items must be a list")
    if len(items) > MAX_ITEMS:
        raise InvalidRequest(f"a batch holds at most {MAX_ITEMS} items")


def _fields(op: str, item: object) -> dict[str, Any]:
    if type(item) is not dict:
        raise InvalidRequest(f"each batch item must be a dict, not {type(item).__name__}")
    extra = item.keys() - set(FIELDS[op])
    if extra:
        raise InvalidRequest(f"unknown {op} item fields: {', '.join(sorted(map(str, extra)))}")
    for f in _REQUIRED.get(op, FIELDS[op][:1]):
        if f not in item:
            raise InvalidRequest(f"{op} item needs {f!r}")
    return item


def _audited_size(op: str, item: dict[str, Any], result: Any) -> int:
    """Bytes of data the item carried (plaintext for encrypt/decrypt, as singles do)."""
    if op == "decrypt":
        return len(result)
    x = item.get(_INPUT.get(op, "data"))
    n = len(x) if isinstance(x, (bytes, bytearray, memoryview)) else 0
    return max(0, n - blobs.CIPHERTEXT_OVERHEAD) if op == "rewrap" else n


def _typed(e: Exception) -> Exception:
    """The item's error as a typed one: ours pass through; a ValueError or TypeError
    (a library, or a wrong argument, meeting a malformed item) becomes InvalidRequest."""
    if isinstance(e, CryptoplaneError):
        return e
    return InvalidRequest(f"{type(e).__name__}: {e}")


def run(plane: Plane, source: KeySource, ring: Ring, op: str, items: list[Any],
        principal: str = "") -> list[Any]:
    if op == "encrypt" and ring.fast is not None:
        return _encrypt(plane, source, ring, items, principal)
    if op == "decrypt" and ring.fast is not None:
        return _decrypt(plane, source, ring, items, principal)
    nonces = os.urandom(12 * len(items)) if op in ("encrypt", "rewrap") else b""
    return [_one(plane, source, ring, op, item, nonces[12 * i:12 * i + 12], principal)
            for i, item in enumerate(items)]


def _one(plane: Plane, source: KeySource, ring: Ring, op: str, item: Any,
         nonce: bytes, principal: str) -> Any:
    try:
        fields = _fields(op, item)
        result, v = _RUN[op](plane, ring, fields, nonce)
    except (CryptoplaneError, ValueError, TypeError) as e:
        return _typed(e)
    source.record_use(ring.tenant, ring.name, v, op, _audited_size(op, fields, result),
                      principal)
    return result


def _plain(item: Any) -> bool:
    """An item the fast loops take: a dict of the data and, maybe, bytes aad."""
    if type(item) is not dict:
        return False
    n = len(item)
    return n == 1 or (n == 2 and type(item.get("aad")) is bytes)


def _encrypt(plane: Plane, source: KeySource, ring: Ring, items: list[Any],
             principal: str) -> list[Any]:
    ver = ring.fast
    assert ver is not None and ver.aead is not None
    key, header, v = ver.aead, ver.ct_header, ver.number
    enc = plane.encrypt
    record = source.record_use
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
            record(tenant, name, v, "encrypt", len(pt), principal)
        else:
            append(_one(plane, source, ring, "encrypt", item, n, principal))
    return out


def _decrypt(plane: Plane, source: KeySource, ring: Ring, items: list[Any],
             principal: str) -> list[Any]:
    dec = plane.decrypt
    record = source.record_use
    tenant, name = ring.tenant, ring.name
    magic = blobs.CIPHERTEXT_MAGIC
    last_v, key = 0, None
    out: list[Any] = []
    append = out.append
    for item in items:
        ct = item.get("ciphertext") if _plain(item) else None
        if (type(ct) is bytes and blobs.CIPHERTEXT_OVERHEAD <= len(ct) <= blobs.MAX_REQUEST
                and ct[0] == magic and ct[1:5] != _NO_VERSION):
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
            record(tenant, name, v, "decrypt", len(pt), principal)
        else:
            append(_one(plane, source, ring, "decrypt", item, b"", principal))
    return out
