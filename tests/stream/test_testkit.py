"""The age test kit (C2SP CCTV): every vector, by its expected outcome.

Each vector is a textual header, a blank line, then the age file (maybe zlib). Success
vectors must decrypt to their payload hash; failures must raise the matching typed error,
and the plaintext released before a payload failure must match the hash too. Vectors
that only hybrid post-quantum identities can open are counted as unsupported, and the
count is pinned so nothing else hides there.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from pathlib import Path

import pytest
import support

from cryptoplane.stream import (
    ArmorError,
    Decryptor,
    HeaderError,
    HeaderMacMismatch,
    NoIdentityMatched,
    PayloadError,
    ScryptIdentity,
    UnsupportedRecipient,
    X25519Identity,
    decrypt,
)
from cryptoplane.stream.recipients import Identity

KIT = Path(__file__).resolve().parents[2] / "../shared/vectors/age-testkit"
# the hybrid (mlkem768x25519) vectors whose only identities are hybrid ones
UNSUPPORTED = 18

EXPECT = {
    "header failure": HeaderError,
    "armor failure": ArmorError,
    "no match": NoIdentityMatched,
    "HMAC failure": HeaderMacMismatch,
    "payload failure": PayloadError,
}


def _names() -> list[str]:
    if not KIT.is_dir():
        return []
    return sorted(p.name for p in KIT.iterdir() if not p.name.startswith("README"))


def load(name: str) -> tuple[dict[str, list[str]], bytes]:
    raw = (KIT / name).read_bytes()
    head, _, body = raw.partition(b"\n\n")
    meta: dict[str, list[str]] = {}
    for line in head.decode().splitlines():
        key, _, value = line.partition(": ")
        meta.setdefault(key, []).append(value)
    if meta.get("compressed") == ["zlib"]:
        body = zlib.decompress(body)
    return meta, body


def identities(meta: dict[str, list[str]]) -> tuple[list[Identity], int]:
    """The usable identities, and how many were refused as unsupported."""
    out: list[Identity] = []
    refused = 0
    for text in meta.get("identity", []):
        try:
            out.append(X25519Identity.parse(text))
        except UnsupportedRecipient:
            refused += 1
    out += [ScryptIdentity(p) for p in meta.get("passphrase", [])]
    if not out and not refused:  # a vector that fails before any key is needed
        out.append(X25519Identity.generate())
    return out, refused


def run(
    meta: dict[str, list[str]], body: bytes, keys: list[Identity]
) -> tuple[bytes, Exception | None]:
    out = io.BytesIO()
    armor = meta.get("armored") == ["yes"]
    try:
        decrypt(io.BytesIO(body), out, keys, armor=armor, workers=1)
    except Exception as exc:
        return out.getvalue(), exc
    return out.getvalue(), None


def check(name: str, meta: dict[str, list[str]], result: bytes, error: Exception | None) -> None:
    expect = meta["expect"][0]
    if expect == "success":
        assert error is None, f"{name}: {error!r}"
    else:
        wanted = EXPECT[expect]
        assert isinstance(error, wanted), f"{name}: expected {expect}, got {error!r}"
        if wanted is HeaderError:  # a header failure is not an armor one
            assert not isinstance(error, ArmorError), f"{name}: {error!r}"
    if expect in ("success", "payload failure"):
        assert hashlib.sha256(result).hexdigest() == meta["payload"][0], name
    else:
        assert result == b"", name


def test_testkit_summary() -> None:
    """Counts the vectors by kind; pins the number that only hybrid keys could open."""
    names = _names()
    if not names:
        support.unavailable(f"the age test kit is missing at {KIT}")
    counts = {"success": 0, "failure": 0, "unsupported": 0}
    for name in names:
        meta, _ = load(name)
        keys, refused = identities(meta)
        if not keys and refused:
            counts["unsupported"] += 1
        else:
            counts["success" if meta["expect"][0] == "success" else "failure"] += 1
    print(f"\nage test kit: {counts['success']} success, {counts['failure']} failure, "
          f"{counts['unsupported']} unsupported (hybrid post-quantum), {len(names)} in all")
    assert counts["unsupported"] == UNSUPPORTED
    assert counts["success"] + counts["failure"] + UNSUPPORTED == len(names)


@pytest.mark.parametrize("name", _names())
def test_vector(name: str) -> None:
    meta, body = load(name)
    keys, refused = identities(meta)
    if not keys and refused:
        with pytest.raises(UnsupportedRecipient):
            X25519Identity.parse(meta["identity"][0])
        return
    result, error = run(meta, body, keys)
    check(name, meta, result, error)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_testkit_incremental(chunk: int) -> None:
    """The same verdicts through ``Decryptor`` fed in pieces (small vectors only)."""
    names = _names()
    if not names:
        support.unavailable(f"the age test kit is missing at {KIT}")
    for name in names:
        meta, body = load(name)
        keys, _ = identities(meta)
        if not keys or (chunk == 1 and len(body) > 20_000):
            continue
        armor = meta.get("armored") == ["yes"]
        dec = Decryptor(keys, armor=armor)
        out = bytearray()
        error: Exception | None = None
        try:
            for i in range(0, len(body), chunk):
                out += dec.update(body[i : i + chunk])
            out += dec.finish()
        except Exception as exc:
            error = exc
        if meta["expect"][0] == "payload failure":
            # finish() raises rather than release a last chunk with its error: what came
            # out must be a prefix of what decrypt() released (which matches the hash)
            whole, _ = run(meta, body, keys)
            assert isinstance(error, PayloadError), name
            assert whole.startswith(bytes(out)), name
        else:
            check(name, meta, bytes(out), error)
