"""The framing of ciphertexts, signatures and HMAC tags, and fuzzing of every parser
and every operation that takes a blob: arbitrary bytes end in a value or a typed error."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transitkit import TENANT

from cryptoplane.exceptions import CryptoplaneError, InvalidRequest, KeyRejected
from cryptoplane.fabric.transit import (
    CIPHERTEXT_OVERHEAD,
    Transit,
    ciphertext_version,
    pack_ciphertext,
    pack_signature,
    pack_tag,
    parse_ciphertext,
    parse_signature,
    parse_tag,
)


def test_ciphertext_layout_is_magic_version_nonce_sealed() -> None:
    blob = pack_ciphertext(7, b"N" * 12, b"C" * 20)
    assert blob == b"\xc7" + struct.pack(">I", 7) + b"N" * 12 + b"C" * 20
    v, nonce, sealed = parse_ciphertext(blob)
    assert (v, nonce, bytes(sealed)) == (7, b"N" * 12, b"C" * 20)
    assert ciphertext_version(bytearray(blob)) == 7
    assert CIPHERTEXT_OVERHEAD == 33


def test_signature_and_tag_layouts() -> None:
    assert pack_signature(2, b"sig") == b"\xc5\x00\x00\x00\x02sig"
    assert parse_signature(memoryview(b"\xc5\x00\x00\x00\x02sig")) == (2, b"sig")
    assert pack_tag(3, b"t" * 32) == b"\xc6\x00\x00\x00\x03" + b"t" * 32
    assert parse_tag(pack_tag(3, b"t" * 32)) == (3, b"t" * 32)


@pytest.mark.parametrize("blob", [
    b"", b"\xc7", b"\xc7" + bytes(32),                     # short; version 0
    b"\xc5" + struct.pack(">I", 1) + bytes(40),            # a signature's magic
    "text", None, 12,                                       # not bytes
])
def test_bad_ciphertexts_are_invalid_requests(blob: object) -> None:
    with pytest.raises(InvalidRequest):
        parse_ciphertext(blob)


@pytest.mark.parametrize("parse", [parse_signature, parse_tag])
def test_bad_signature_and_tag_framing(parse: object) -> None:
    for blob in (b"", b"\xc5\x00\x00\x00\x01", b"\x00\x00\x00\x00\x01x", b"\xc5" + bytes(5),
                 b"\xc6" + bytes(5)):
        with pytest.raises(InvalidRequest):
            parse(blob)  # type: ignore[operator]


def test_version_limits() -> None:
    with pytest.raises(InvalidRequest):
        pack_ciphertext(0, bytes(12), b"")
    with pytest.raises(InvalidRequest):
        pack_ciphertext(1 << 32, bytes(12), b"")
    with pytest.raises(InvalidRequest):
        pack_ciphertext(1, bytes(11), b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_parsers_never_crash(blob: bytes) -> None:
    for parse in (parse_ciphertext, parse_signature, parse_tag):
        with contextlib.suppress(InvalidRequest):
            parse(blob)


_prefixed = st.one_of(
    st.binary(max_size=120),
    st.tuples(st.sampled_from([b"\xc7", b"\xc5", b"\xc6"]),
              st.integers(0, 3).map(lambda v: struct.pack(">I", v)),
              st.binary(max_size=100)).map(b"".join),
)


@settings(max_examples=150, deadline=None)
@given(blob=_prefixed)
def test_operations_on_arbitrary_blobs_end_in_typed_errors(ring: Transit, blob: bytes) -> None:
    calls: list[Callable[[], object]] = [
        lambda: ring.decrypt(TENANT, "aes256-gcm96", blob),
        lambda: ring.decrypt(TENANT, "chacha20-poly1305", blob),
        lambda: ring.rewrap(TENANT, "aes256-gcm96", blob),
        lambda: ring.verify(TENANT, "ecdsa-p256", b"m", blob),
        lambda: ring.verify(TENANT, "ed25519", b"m", blob),
        lambda: ring.verify(TENANT, "rsa-2048", b"m", blob, padding="pkcs1v15"),
        lambda: ring.verify_hmac(TENANT, "hmac", b"m", blob),
    ]
    for call in calls:
        try:
            out = call()
        except CryptoplaneError:
            continue
        # a random blob that happens to be accepted: only a False verification
        assert out is False
    for op, field in (("decrypt", "ciphertext"), ("verify_hmac", "tag")):
        name = "aes256-gcm96" if op == "decrypt" else "hmac"
        item = {field: blob, "data": b"m"} if op == "verify_hmac" else {field: blob}
        (res,) = ring.batch(TENANT, op, name, [item])
        assert isinstance(res, CryptoplaneError) or res is False


@settings(max_examples=40, deadline=None)
@given(blob=st.one_of(st.binary(max_size=600), st.binary(min_size=512, max_size=700)))
def test_arbitrary_import_blobs_are_invalid_requests(ring: Transit, blob: bytes) -> None:
    with contextlib.suppress(KeyRejected):  # an unwrap that works but holds no key
        try:
            ring.import_key(TENANT, "fuzz", "aes256-gcm96", blob)
        except InvalidRequest:
            return
    raise AssertionError("an arbitrary blob imported")  # pragma: no cover


@settings(max_examples=100, deadline=None)
@given(pt=st.binary(max_size=300), aad=st.binary(max_size=40),
       kt=st.sampled_from(["aes256-gcm96", "chacha20-poly1305"]))
def test_round_trips(ring: Transit, pt: bytes, aad: bytes, kt: str) -> None:
    blob = ring.encrypt(TENANT, kt, pt, aad=aad)
    assert ring.decrypt(TENANT, kt, blob, aad=aad) == pt
    assert ring.decrypt_batch(TENANT, kt, [{"ciphertext": blob, "aad": aad}]) == [pt]


_values = st.one_of(st.binary(max_size=40), st.integers(-2, 3), st.none(), st.text(max_size=8),
                    st.booleans(), st.sampled_from(["sha256", "sha512", "pss", "pkcs1v15"]))
_item = st.one_of(
    st.dictionaries(st.sampled_from(["plaintext", "ciphertext", "data", "signature", "tag",
                                     "aad", "context", "nonce", "version", "hash",
                                     "prehashed", "padding", "algorithm", "junk"]),
                    _values, max_size=4),
    _values)
_OPS = {"encrypt": "aes256-gcm96", "decrypt": "chacha20-poly1305", "rewrap": "aes256-gcm96",
        "sign": "ecdsa-p256", "verify": "ed25519", "hmac": "hmac", "verify_hmac": "hmac"}


@settings(max_examples=150, deadline=None)
@given(op=st.sampled_from(sorted(_OPS)), items=st.lists(_item, max_size=6))
def test_arbitrary_batch_items_end_in_values_or_typed_errors(ring: Transit, op: str,
                                                            items: list[object]) -> None:
    out = ring.batch(TENANT, op, _OPS[op], items)  # type: ignore[arg-type]
    assert len(out) == len(items)
    for res in out:
        assert isinstance(res, (bytes, bool, CryptoplaneError)), res
