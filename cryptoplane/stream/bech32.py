"""Bech32 (BIP 173, the original checksum, not Bech32m) as age uses it for keys.

age lifts BIP 173's 90-character limit (hybrid keys are far longer) and writes secret
keys in upper case; a string mixing cases is refused, as BIP 173 says.
"""

from __future__ import annotations

from cryptoplane.exceptions import KeyRejected

_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: list[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            if (top >> i) & 1:
                chk ^= _GEN[i]
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert(data: bytes | list[int], frombits: int, tobits: int, pad: bool) -> list[int]:
    acc = bits = 0
    out: list[int] = []
    maxv = (1 << tobits) - 1
    for value in data:
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            out.append((acc >> bits) & maxv)
    if pad:
        if bits:
            out.append((acc << (tobits - bits)) & maxv)
    elif bits >= frombits or (acc << (tobits - bits)) & maxv:
        raise KeyRejected("invalid Bech32 padding")
    return out


def encode(hrp: str, data: bytes) -> str:
    """Encode ``data`` under the human-readable part ``hrp`` (lower case)."""
    words = _convert(data, 8, 5, True)
    check = _polymod([*_hrp_expand(hrp), *words, 0, 0, 0, 0, 0, 0]) ^ 1
    words += [(check >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[w] for w in words)


def decode(text: str) -> tuple[str, bytes]:
    """Return ``(hrp, data)``; the hrp comes back in lower case."""
    if text.lower() != text and text.upper() != text:
        raise KeyRejected("a Bech32 string mixes upper and lower case")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text) or any(not 33 <= ord(c) <= 126 for c in text):
        raise KeyRejected("not a Bech32 string")
    hrp = text[:pos]
    try:
        words = [_CHARSET.index(c) for c in text[pos + 1 :]]
    except ValueError:
        raise KeyRejected("invalid character in a Bech32 string") from None
    if _polymod([*_hrp_expand(hrp), *words]) != 1:
        raise KeyRejected("bad Bech32 checksum")
    return hrp, bytes(_convert(words[:-6], 5, 8, False))


__all__ = ["decode", "encode"]
