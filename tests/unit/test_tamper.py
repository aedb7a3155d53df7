"""Acceptance: tampered ciphertext, tag, AAD or nonce never yields plaintext; the error is
typed.

Property tests (hypothesis) over the AEADs, CBC (which is unauthenticated, and says so),
signatures and HMAC. Each tampering is checked on the plane's fast path
(``plane.decrypt``) and on the request path (``plane.run(cp.Decrypt(...))``): both must
end in the same typed error and neither may ever return.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cryptoplane as cp

AEADS = ["aes-128-gcm", "aes-256-gcm", "chacha20-poly1305"]
SIGNERS = ["rsa-pss-sha256", "ecdsa-p256-sha256", "ed25519"]
MACS = ["hmac-sha256", "hmac-sha512"]
NONCE_SIZE = 12
TAG_SIZE = 16

# modest: the whole file must stay well under 15 s
FAST = settings(max_examples=40, deadline=None)
SLOW = settings(max_examples=20, deadline=None)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@dataclass(frozen=True)
class Sealed:
    key: cp.Key
    nonce: bytes
    aad: bytes
    plaintext: bytes
    sealed: bytes  # ciphertext || tag


@st.composite
def sealed_messages(draw: st.DrawFn, name: str, plane: cp.Plane, *,
                    min_aad: int = 0, min_plaintext: int = 0) -> Sealed:
    size = cp.lookup(name).default_key_size
    key = cp.Key(name, draw(st.binary(min_size=size, max_size=size)))
    nonce = draw(st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE))
    aad = draw(st.binary(min_size=min_aad, max_size=64))
    plaintext = draw(st.binary(min_size=min_plaintext, max_size=4096))
    sealed = plane.encrypt(key, plaintext, nonce=nonce, aad=aad)
    assert len(sealed) == len(plaintext) + TAG_SIZE
    return Sealed(key, nonce, aad, plaintext, sealed)


def never_decrypts(plane: cp.Plane, key: cp.Key, data: bytes, *, nonce: bytes,
                   aad: bytes | None, error: type[cp.CryptoplaneError] = cp.AuthenticationFailed
                   ) -> None:
    """Neither the fast path nor the request path returns anything; both raise ``error``."""
    with pytest.raises(error):
        plane.decrypt(key, data, nonce=nonce, aad=aad)
    with pytest.raises(error):
        plane.run(cp.Decrypt(key, data, nonce=nonce, aad=aad))


# -- AEAD ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", AEADS)
@FAST
@given(data=st.data())
def test_aead_untampered_round_trip(plane: cp.Plane, name: str, data: st.DataObject) -> None:
    s = data.draw(sealed_messages(name, plane))
    assert plane.decrypt(s.key, s.sealed, nonce=s.nonce, aad=s.aad) == s.plaintext


@pytest.mark.parametrize("name", AEADS)
@FAST
@given(data=st.data())
def test_aead_flipped_ciphertext_bit_is_authentication_failure(
        plane: cp.Plane, name: str, data: st.DataObject) -> None:
    s = data.draw(sealed_messages(name, plane, min_plaintext=1))
    bit = data.draw(st.integers(0, (len(s.sealed) - TAG_SIZE) * 8 - 1))
    never_decrypts(plane, s.key, flip(s.sealed, bit), nonce=s.nonce, aad=s.aad)


@pytest.mark.parametrize("name", AEADS)
@FAST
@given(data=st.data())
def test_aead_flipped_tag_bit_is_authentication_failure(
        plane: cp.Plane, name: str, data: st.DataObject) -> None:
    s = data.draw(sealed_messages(name, plane))
    bit = data.draw(st.integers((len(s.sealed) - TAG_SIZE) * 8, len(s.sealed) * 8 - 1))
    never_decrypts(plane, s.key, flip(s.sealed, bit), nonce=s.nonce, aad=s.aad)


@pytest.mark.parametrize("name", AEADS)
@FAST
@given(data=st.data())
def test_aead_flipped_aad_bit_is_authentication_failure(
        plane: cp.Plane, name: str, data: st.DataObject) -> None:
    s = data.draw(sealed_messages(name, plane, min_aad=1))
    bit = data.draw(st.integers(0, len(s.aad) * 8 - 1))
    never_decrypts(plane, s.key, s.sealed, nonce=s.nonce, aad=flip(s.aad, bit))


@pytest.mark.parametrize("name", AEADS)
@FAST
@given(data=st.data())
def test_aead_dropped_or_extended_aad_is_authentication_failure(
        plane: cp.Plane, name: str, data: st.DataObject) -> None:
    s = data.draw(sealed_messages(name, plane, min_aad=1))
    never_decrypts(plane, s.key, s.sealed, nonce=s.nonce, aad=None)
    never_decrypts(plane, s.key, s.sealed, nonce=s.nonce, aad=s.aad[:-1])
    never_decrypts(plane, s.key, s.sealed, nonce=s.nonce, aad=s.aad + b"\0")


@pytest.mark.parametrize("name", AEADS)
@FAST
@given(data=st.data())
def test_aead_flipped_nonce_bit_is_authentication_failure(
        plane: cp.Plane, name: str, data: st.DataObject) -> None:
    s = data.draw(sealed_messages(name, plane))
    bit = data.draw(st.integers(0, NONCE_SIZE * 8 - 1))
    never_decrypts(plane, s.key, s.sealed, nonce=flip(s.nonce, bit), aad=s.aad)


@pytest.mark.parametrize("name", AEADS)
@FAST
@given(data=st.data())
def test_aead_nonce_of_another_length_never_decrypts(
        plane: cp.Plane, name: str, data: st.DataObject) -> None:
    """A nonce the algorithm cannot take is an ``InvalidRequest``; one it can take (AES-GCM
    accepts 8..128 bytes) is simply the wrong nonce: ``AuthenticationFailed``."""
    s = data.draw(sealed_messages(name, plane))
    length = data.draw(st.integers(0, 160).filter(lambda n: n != NONCE_SIZE))
    nonce = (s.nonce * 14)[:length]
    sizes = cp.lookup(name).nonce_sizes
    assert sizes is not None
    error = cp.AuthenticationFailed if length in sizes else cp.InvalidRequest
    never_decrypts(plane, s.key, s.sealed, nonce=nonce, aad=s.aad, error=error)


@pytest.mark.parametrize("name", AEADS)
@FAST
@given(data=st.data())
def test_aead_truncated_ciphertext_is_authentication_failure(
        plane: cp.Plane, name: str, data: st.DataObject) -> None:
    """Cut anywhere, including inside the tag and below the tag's 16 bytes."""
    s = data.draw(sealed_messages(name, plane))
    cut = data.draw(st.integers(0, len(s.sealed) - 1)
                    | st.integers(0, min(TAG_SIZE, len(s.sealed) - 1)))
    never_decrypts(plane, s.key, s.sealed[:cut], nonce=s.nonce, aad=s.aad)


@pytest.mark.parametrize("name", AEADS)
@FAST
@given(data=st.data())
def test_aead_appended_bytes_are_authentication_failure(
        plane: cp.Plane, name: str, data: st.DataObject) -> None:
    s = data.draw(sealed_messages(name, plane))
    extra = data.draw(st.binary(min_size=1, max_size=32))
    never_decrypts(plane, s.key, s.sealed + extra, nonce=s.nonce, aad=s.aad)


@pytest.mark.parametrize("name", AEADS)
@FAST
@given(data=st.data())
def test_aead_wrong_key_is_authentication_failure(
        plane: cp.Plane, name: str, data: st.DataObject) -> None:
    s = data.draw(sealed_messages(name, plane))
    size = cp.lookup(name).default_key_size
    other = data.draw(st.binary(min_size=size, max_size=size)
                      .filter(lambda m: m != s.key.export_raw()))
    never_decrypts(plane, cp.Key(name, other), s.sealed, nonce=s.nonce, aad=s.aad)


# -- CBC: unauthenticated --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["aes-128-cbc", "aes-256-cbc"])
@FAST
@given(data=st.data())
def test_cbc_is_unauthenticated_tampered_tail_gives_padding_error_or_other_plaintext(
        plane: cp.Plane, name: str, data: st.DataObject) -> None:
    """CBC has no tag: a tampered last block (or the block before it, which decides the
    padding) yields ``AuthenticationFailed`` when the padding breaks, and otherwise a
    plaintext that differs from the original. Never the original, never a foreign error."""
    size = cp.lookup(name).default_key_size
    key = cp.Key(name, data.draw(st.binary(min_size=size, max_size=size)))
    iv = data.draw(st.binary(min_size=16, max_size=16))
    plaintext = data.draw(st.binary(max_size=4096))
    ct = plane.encrypt(key, plaintext, nonce=iv, padding=True)
    assert plane.decrypt(key, ct, nonce=iv, padding=True) == plaintext
    # the tail: the last two blocks, or the IV and the only block
    tail_bits = min(len(ct), 32) * 8
    bit = data.draw(st.integers(0, tail_bits - 1 + (128 if len(ct) == 16 else 0)))
    if len(ct) == 16 and bit >= tail_bits:
        ct2, iv2 = ct, flip(iv, bit - tail_bits)
    else:
        ct2, iv2 = flip(ct, len(ct) * 8 - tail_bits + bit), iv
    for attempt in (lambda: plane.decrypt(key, ct2, nonce=iv2, padding=True),
                    lambda: plane.run(cp.Decrypt(key, ct2, nonce=iv2, padding=True))):
        try:
            out = attempt()
        except cp.AuthenticationFailed:
            continue
        assert out != plaintext


# -- signatures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signers() -> Iterator[dict[str, cp.Key]]:
    yield {name: cp.Key.generate(name) for name in SIGNERS}


@pytest.mark.parametrize("name", SIGNERS)
@SLOW
@given(message=st.binary(min_size=1, max_size=1024), data=st.data())
def test_signature_flipped_message_bit_is_invalid_signature(
        plane: cp.Plane, signers: dict[str, cp.Key], name: str, message: bytes,
        data: st.DataObject) -> None:
    key = signers[name]
    sig = plane.sign(key, message)
    plane.verify(key.public_key(), message, sig)
    bit = data.draw(st.integers(0, len(message) * 8 - 1))
    with pytest.raises(cp.InvalidSignature):
        plane.verify(key.public_key(), flip(message, bit), sig)
    with pytest.raises(cp.InvalidSignature):
        plane.run(cp.Verify(key.public_key(), flip(message, bit), sig))


@pytest.mark.parametrize("name", SIGNERS)
@SLOW
@given(message=st.binary(max_size=1024), data=st.data())
def test_signature_flipped_signature_bit_is_invalid_signature(
        plane: cp.Plane, signers: dict[str, cp.Key], name: str, message: bytes,
        data: st.DataObject) -> None:
    key = signers[name]
    sig = plane.sign(key, message)
    # ECDSA signatures vary in length (DER): draw a position, then fit it to this one
    bit = data.draw(st.integers(0, 1 << 16)) % (len(sig) * 8)
    with pytest.raises(cp.InvalidSignature):
        plane.verify(key.public_key(), message, flip(sig, bit))
    with pytest.raises(cp.InvalidSignature):
        plane.run(cp.Verify(key.public_key(), message, flip(sig, bit)))


@pytest.mark.parametrize("name", SIGNERS)
@SLOW
@given(message=st.binary(max_size=256), data=st.data())
def test_signature_truncated_or_extended_is_invalid_signature(
        plane: cp.Plane, signers: dict[str, cp.Key], name: str, message: bytes,
        data: st.DataObject) -> None:
    key = signers[name]
    sig = plane.sign(key, message)
    cut = data.draw(st.integers(0, 1 << 16)) % len(sig)
    for bad in (sig[:cut], sig + data.draw(st.binary(min_size=1, max_size=8))):
        with pytest.raises(cp.InvalidSignature):
            plane.verify(key.public_key(), message, bad)


# -- HMAC ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MACS)
@FAST
@given(data=st.data())
def test_hmac_flipped_tag_bit_is_authentication_failure(
        plane: cp.Plane, name: str, data: st.DataObject) -> None:
    key = cp.Key(name, data.draw(st.binary(min_size=1, max_size=128)))
    message = data.draw(st.binary(max_size=4096))
    full = cp.lookup(name).digest_size
    size = data.draw(st.sampled_from([full, 16, 10]))  # full and truncated tags
    tag = plane.mac(key, message, tag_size=size)
    plane.verify_mac(key, message, tag)
    bit = data.draw(st.integers(0, size * 8 - 1))
    with pytest.raises(cp.AuthenticationFailed):
        plane.verify_mac(key, message, flip(tag, bit))
    with pytest.raises(cp.AuthenticationFailed):
        plane.run(cp.VerifyMac(key, message, flip(tag, bit)))


@pytest.mark.parametrize("name", MACS)
@FAST
@given(data=st.data())
def test_hmac_flipped_message_bit_is_authentication_failure(
        plane: cp.Plane, name: str, data: st.DataObject) -> None:
    key = cp.Key(name, data.draw(st.binary(min_size=1, max_size=128)))
    message = data.draw(st.binary(min_size=1, max_size=4096))
    tag = plane.mac(key, message)
    bit = data.draw(st.integers(0, len(message) * 8 - 1))
    with pytest.raises(cp.AuthenticationFailed):
        plane.verify_mac(key, flip(message, bit), tag)


# -- the plane survives keys that die in the cyclic GC -----------------------------------

_DEADLOCK = textwrap.dedent("""
    import gc, os
    import cryptoplane as cp
    raw, nonce = os.urandom(16), bytes(12)
    with cp.Plane() as plane:
        keep = [cp.Key("aes-128-gcm", raw) for _ in range(30)]  # live sessions to scan
        for k in keep:
            plane.encrypt(k, b"x", nonce=nonce)
        for threshold in range(2, 30):  # GC after every few allocations: a small window
            gc.set_threshold(threshold)  # is hit at once instead of once in 10k keys
            for _ in range(300):
                cyclic = cp.Key("aes-128-gcm", raw)
                cycle = [cyclic, None]
                cycle[1] = cycle  # dies in the cyclic GC, as after a failed decryption
                plane.encrypt(cyclic, b"x", nonce=nonce)
                del cyclic, cycle
                # dies by reference count, at once, inside the next call
                plane.encrypt(cp.Key("aes-128-gcm", raw), b"x", nonce=nonce)
    print("done")
""")


def test_short_lived_keys_never_deadlock_the_plane() -> None:
    """Keys made per request and dropped (some in reference cycles, which every failed
    decryption's traceback creates) must never hang the plane."""
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run([sys.executable, "-c", _DEADLOCK], cwd=root, timeout=5,
                              capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail("the plane deadlocked: 5 s without finishing ~17k short-lived keys")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
