"""The capacity a crypto server offers a manager: a short self-benchmark at start.

Per algorithm class (``capacity.CLASSES``) the server's own operation is timed on one
thread for a slice of the budget: RSA-2048/3072/4096 PSS-SHA256 signatures, ECDSA
P-256/P-384 and Ed25519 signatures, AES-256-GCM encryption and HMAC-SHA256 of 64 bytes
(ops/s) and of 64 KiB (bytes/s). The rate is then multiplied by the server's worker
threads: it assumes **one core per worker thread** (a server given more workers than
cores over-declares; ``cryptoplane server --capacity`` overrides the measurement).

A class's slice ends after the op that passes it, so the whole measurement takes the
budget plus at most one op per class (an RSA-4096 signature: a few milliseconds).

The RSA keys are fixed, like ``openssl speed``'s: generating a 4096-bit key costs up to
seconds, which a start-up cannot spend. They sign nothing but benchmark messages.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable
from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .capacity import (
    AEAD,
    BYTE_CLASSES,
    CLASSES,
    ECDSA_P256,
    ECDSA_P384,
    ED25519,
    HMAC,
    RSA2048,
    RSA3072,
    RSA4096,
)

# class -> {"ops": ops/s, "bytes": bytes/s}, as manager/protocol.py's Rates
Rates = dict[str, dict[str, float]]

SMALL: Final = 64
LARGE: Final = 64 * 1024
# measurements: one per class, two (small and large) for the byte classes
_SLICES: Final = len(CLASSES) + len(BYTE_CLASSES)


def _rate(op: Callable[[], object], seconds: float) -> float:
    """Ops per second of ``op`` on this thread over about ``seconds``."""
    op()  # the first call pays for lazy set-up (key blinding, tables)
    clock = time.perf_counter
    start = clock()
    done, batch = 0, 1
    while True:
        for _ in range(batch):
            op()
        done += batch
        elapsed = clock() - start
        if elapsed >= seconds:
            return done / elapsed
        # the next batch aims at half the time left: the slice ends at most one op late
        per_op = elapsed / done
        batch = max(1, int((seconds - elapsed) / 2 / per_op))


def _rsa(pem: bytes) -> Callable[[], object]:
    key = serialization.load_pem_private_key(pem, None, unsafe_skip_rsa_key_validation=True)
    assert isinstance(key, rsa.RSAPrivateKey)
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    digest = hashes.SHA256()
    msg = os.urandom(SMALL)
    return lambda: key.sign(msg, pss, digest)


def _ecdsa(curve: ec.EllipticCurve, digest: hashes.HashAlgorithm) -> Callable[[], object]:
    key = ec.generate_private_key(curve)
    algorithm = ec.ECDSA(digest)
    msg = os.urandom(SMALL)
    return lambda: key.sign(msg, algorithm)


def _ed25519() -> Callable[[], object]:
    key = ed25519.Ed25519PrivateKey.generate()
    msg = os.urandom(SMALL)
    return lambda: key.sign(msg)


def _aead(size: int) -> Callable[[], object]:
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)  # the same nonce each time: nothing is kept, only timed
    data = os.urandom(size)
    return lambda: aead.encrypt(nonce, data, None)


def _hmac(size: int) -> Callable[[], object]:
    key = os.urandom(32)
    data = os.urandom(size)
    return lambda: hmac.digest(key, data, "sha256")


def measure_capacity(threads: int, budget: float = 1.0) -> Rates:
    """What this machine serves per class with ``threads`` worker threads (one core
    each), measured over about ``budget`` seconds: ``{class: {"ops", "bytes"}}``, every
    class of ``capacity.CLASSES`` above 0 (bytes 0 for the classes counted in ops)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if not budget > 0:
        raise ValueError(f"budget must be > 0 seconds, got {budget}")
    slice_s = budget / _SLICES
    makers: dict[str, Callable[[], Callable[[], object]]] = {
        RSA2048: lambda: _rsa(_RSA2048),
        RSA3072: lambda: _rsa(_RSA3072),
        RSA4096: lambda: _rsa(_RSA4096),
        ECDSA_P256: lambda: _ecdsa(ec.SECP256R1(), hashes.SHA256()),
        ECDSA_P384: lambda: _ecdsa(ec.SECP384R1(), hashes.SHA384()),
        ED25519: _ed25519,
        AEAD: lambda: _aead(SMALL),
        HMAC: lambda: _hmac(SMALL),
    }
    large = {AEAD: _aead, HMAC: _hmac}
    out: Rates = {}
    for cls in CLASSES:
        ops = _rate(makers[cls](), slice_s) * threads
        nbytes = _rate(large[cls](LARGE), slice_s) * LARGE * threads if cls in large else 0.0
        out[cls] = {"ops": round(ops, 1), "bytes": float(round(nbytes))}
    return out


def parse_capacity(text: str) -> Rates:
    """``--capacity``: ``class=ops[:bytes]`` items, comma-separated, e.g.
    ``rsa2048=3000,aead=200000:1e9``; bytes/s only for the byte classes (aead, hmac).
    ``ValueError`` saying what is wrong."""
    out: Rates = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        cls, eq, value = item.partition("=")
        cls = cls.strip()
        if not eq:
            raise ValueError(f"capacity item {item!r} is not CLASS=OPS[:BYTES]")
        if cls not in CLASSES:
            raise ValueError(f"unknown algorithm class {cls!r} in --capacity; one of "
                             f"{', '.join(CLASSES)}")
        if cls in out:
            raise ValueError(f"class {cls!r} given twice in --capacity")
        ops_text, colon, bytes_text = value.partition(":")
        if colon and cls not in BYTE_CLASSES:
            raise ValueError(f"{cls} is counted in ops/s only; bytes/s is for "
                             f"{', '.join(sorted(BYTE_CLASSES))}")
        ops = _number(ops_text, f"{cls} ops/s")
        nbytes = _number(bytes_text, f"{cls} bytes/s") if colon else 0.0
        if not ops and not nbytes:
            raise ValueError(f"{cls}: a capacity of 0 declares nothing; leave it out")
        out[cls] = {"ops": ops, "bytes": nbytes}
    if not out:
        raise ValueError("--capacity names no class: give CLASS=OPS[:BYTES],...")
    return out


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what}: {text.strip()!r} is not a number") from None
    if not (value >= 0 and value != float("inf")):
        raise ValueError(f"{what} must be a finite number >= 0, got {text.strip()!r}")
    return value


_RSA2048 = b"""\
-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDIAORRU7gC/B4N
wOWH6kojjnf0IpOrclfnjkOJfLb3b9yYvXYOrpeUcwZzT3Y0zNj5JhObDYSxekPV
mySHeW8yVgxCd63ulN/0YNulKaT0RaOoO0V+FM0qKHt3qe/+cdJPE9q7OwQT5FiF
V+zSTOVLR8TrJ4vaKQioXONZBZPQ33Xakx2N0IAhPX5+nfLOFiHo46bYHY3+loGi
V+6VlDO/ZcFdpwczZT1TXIk9B4T/dfUwNREpfy7DOTm3+hJ6t/uFTEeTsKcoT3lC
aukUHy7BO4bdO1xn07rVVG4C16EKz/tm63GJ+nzEXFOkdghEwgs/CPDt7jT7CB6l
618VjawnAgMBAAECggEAW9SlAH5rD9vIxNHb0eMONXM1un+hw+eVWvlkIx2DOOtA
o1Tifu1FJeEGhi1m/elMemE0QU4crgyQVuSMCjQEjV0a9e3Ti6cJiUBruVL8rTfI
Y/cK+k/8v62kuxXo3rBOOwbHuI3pWmTPDDKJxymNYlpKnRokSX/rvLohnP9FlnIj
zWyhtnCxceNvJTIjzxGvUGpc7jKogUndWRM24UcHHHEhwYHrD/CLWojp6G8BjxDe
effa2QXu65FQVFIQI7lJ7TwTS5tE4+Fr14y9qjmZ3Bzo8Fqn/vTBdiqegguU89x8
Kz3LsaEex/PhGqLkwu/O6R4CTtaeyP2gpaqxPkOYUQKBgQDrOJypC+l/JDh85cB0
Hsn7Tm+lN24xluvabtkMB2PFqs5L5TxEY/XDvx77ZwwXYTDxUIiWijE3lLTundlb
+jCaOovEd266Z1sGXKOIkLmyBMN7Rszf18711jVTDrOq1XE1Q4VFAz8PSM4n86Dl
v2X2L4q4Ux6SgUBqpQi/pwEoSQKBgQDZq9pwS6wDfj3NXTMScRPlUNLAcl1xyxdH
w6R0YPbFbFg/CtNqbUMN+9NpDgwncGSzeHDKsApsvjLKyUB8DqKJ/v4Rb32IZ/sC
rvxCCiLqRebHXzz6cXhf77JZC2Hcz0sNo0sG5wNuj/5Kd3MFzQw7XtxG1tC1tuuQ
wRfJflCQ7wKBgQCAnAaEI2A6xRohqBlPJFp5joxawHD+qi8w0nTYL94sgNSlCKSo
HCOPMJuHB/PDgL+a4dacwNhiNGutIB9tO+GBIkuzUz32q3ZIhzRfAgqWPCaJ688v
ALdHESU80YgI+wUYA2AFuN2sxLj7fSjXFYxxS9NELyZDImqPJMcgyvZGCQKBgGbs
4QxKa9r2/ag20qh8uaisMAt5yH+/RZHUi9XP57/wfEXLC67+XT+mfQ/m6Y5YkfVf
FQ5ycWt8AC5tPUWr8eWIooCCFHzElidtsLBVdK8MQJSzjvTpZL8Qa2e5fxvXFSks
tpRb9f54rghuNQBgNdF5CHWiq+vQw9CdzW6kgNoXAoGBAI6PuZ7yAjhApBkHyyoY
zz/iRLnXIdEYN/GLAGpcXixjIoAMh+swDVy3/4pIfk2RKyQ4zfL7JDKjXwKg31wh
kzx5ITZgGhjXo1vOfv4HYN4jjvZiCEU4gmhAWrdkd6BZv/L6wK0UbxLGGdvogBd/
XMOxR6n8vWGyj0kFovHa+Hvd
-----END PRIVATE KEY-----
"""

_RSA3072 = b"""\
-----BEGIN PRIVATE KEY-----
MIIG/gIBADANBgkqhkiG9w0BAQEFAASCBugwggbkAgEAAoIBgQCYTl520o/ENFrW
a45U9U6MTQXxni6YAMpozrtnD8ornwDxCOVyGZg0jrnaSonNtyOZp/QQz/ScDGYA
DxF/aZgyw9w7MmXv6WXQFwh8LSLqjxuQF3pbEn5bJXdW8j+q0YWQPmNyifYg5oMH
028RnGLctGQKk+UoJ29/iEZVuPZw9gMT/ccCXKue1cyPSfvuy3uPsWkaMasr/0pY
iZSbwDBMUyNMRCjuJu0u1LeUU4MKFwGlA3kPqdEGRmZpnH+WfBiq9NEX5m5swgVR
emqNXxEsJP1lQ8Aysx2G+HumUUzPAL4ajwFChvKtvSmsRCI911ZvwNtaIibJ/1zi
OF5EwEh+tC1Qr9lA5L/hQSzUGdjotG7ZelKqr621+CpI2IFiGN+KEqXmJRd9UPe8
N8t4jam4JkxW5+DubUrkWEMUHhTFlv4eC88bSt7rFcsCjgdYwRt7X1HlayWkXcx9
GjtLyy18va60/JKMOx+Uy8qn27ZC7LRK+cbcmFtyZZqS11CR8ikCAwEAAQKCAYAF
AojtcCot+knlpTaSmVoa19rC8qDWO6pszaYQ8w5DppCNnS0M9oYQ7oPzCAIl6+kG
ICXxWqHRcz/0rwo0jnjk7JflM5hyTpNch7FuAj8Uh54QvJD4B3D0FxSoncHV4Nv7
nW3AggTAWszDGGOeKO6Ak4d56JkAW+G5SHaF0dZ7a0A5K18dNwanLCG1MeoRVgyr
spqCM9GNWjGsHWRvxh/gltiBpPlSsiGZqYIbZS7ZiV2yu51DFGMtiWnLfgwdW1oY
XxmvtjFHhCBN0ygOvchug0+KhJo78BbYbnD+Z4odwEtQCPPZv2r3UUDuwwj+ghv7
LhvmtQ606Rjr3M8LVFrECy8wwvxiGnVgCUVsjHlBaJ4U7BVrMPZy8qrFRre2O5sW
pCq9bpRD2yuICtOU5k4AsiCaMh7Sa5duuY+ZjYHXKOyK0rIdf8nU0WRaShjkImTA
0HfjwkJUcBVxeVoaiMmJxt5N9TJl7Te10FbqAzVc3y54Xm9GXK04I3aSn5KlH10C
gcEAzceP1mF257u18YQAEuCA5QXai3wTDFfKtMwMclHhFFwx4SeFS5o1nAjbycN3
agDLIFO5uDTvme5I+Rv2z3wYA2A7bqAj0gSNgQ2lCoAzWZdbwdoiRm8twqSgK/uN
m8AXqhqIH1/KQh+KoYtoMjBUYPeVi6r2Dgyb6Q8Cl+HfakhbC9tjcm4vft7dxSLL
Il1Nh6CGhIJTW48G0hdDHSfc0vcbqJlA/qdvpM9VU7vj85GgbkEL8JMWEZmMJ5zM
q/A9AoHBAL159kGupmMaOO+/F2TPtcxNl20iZxxnC902kSALHY49dpoYrRMRHFb/
8wmbB5Far9n/1wxc+LpY4ih/Tlrx8TLsuK48GtY9F91wEa4fB1XzETACebA83HgT
1Su8+sl8Vqy6HLIotBukc3Y/iWWrVd/4M3mZXSutRDcq7nkxvcDeRf/X5evouqHV
lsvl00wO2cXhciOWAs0MaywHzKSwyOv9uaJAx17GWTcGFHHEonkXhr+6SVwRq8Oy
LEZWt3kcXQKBwQCfebdJZ4NlGB5rK+d6ua5qz1yNmPySJj+cWj6TIk2TH9gwLBar
frlpUZw0A146Mp85UGmwDqZZ30eCd1+RcRSTGTM2Crl3+7tGdrKfLredCSY9V7YU
a/lEzZysOWmHeRld5O31kqEHGbawd3+q1bWu6HFnKnlCbhcuSUmzN4OTtLuKtt2d
QzNf2Yx5SPuwiCqbn5ZgfzfmzzN0Aj8rC0eh34v537t1H4HwchYorIZ+ry9sAtEk
Anmp7humX2hnH+kCgcB2LxKpGXTzL7H/6KOA4AY3btZa3jCOiL/ftV+EKyq+RBws
NeQOloekxHUlsqtfwL8bLPdH4N3L7hDyzaVkGLEn4Hu5QghDRUwTdQmyH+yFcd1w
orqgcPXbeBNo+rE65/FwP44SmkztSQAz66GZ5urjjn8dA8oXqjV4a7Dfq2T+XiYv
VM02/q0asI0klS/cqw6u3NZC2BjbKTnX9u1wdEx+1n3pdJpmxTV0mrg51jq5aTFF
eb60TNlkcUgof4JlaokCgcEAmzOvReAZ3+BQnfqhvNr5hZty4MWTUld2uU61dWHb
FuyVJRKb78I/zol9EYtgtRpkdyRWfoWWtPDCYYnEWq5wQpz9Hi1zMoq+Fd8c87yk
0xV/JEbIqeYjj6EOptSYG7nQnKQ1Md2lmhjialitJxp/D9C6ik7cIN4y/sCTKBxL
Ksy3pMldJofPZMH/t+QpmVqdd8y+bmAmXG7rm0FFeSOMtcFiIaqlwlRJABEgL+13
wSs0ybif3JME+caayKdUf2Jt
-----END PRIVATE KEY-----
"""

_RSA4096 = b"""\
-----BEGIN PRIVATE KEY-----
MIIJQwIBADANBgkqhkiG9w0BAQEFAASCCS0wggkpAgEAAoICAQCUvKZSH25fEmGW
JTfxW/vYs41CgwTQE6P1xD39vg+0j05WoHT9lrG97jktKsVTn7U7tINo+gT5PX4x
SVHsgcYiYJ/JeLEo87wsMQ6S/Dcpk0SPni/n5vh0LRblrn5C9+02LeqXZCAAOJTM
S/zuJEfsDSQrf/HfEveOB+9WpVUucXEFwFPO1dhM2BAFV4WNKkY/nogn0aPZLnMm
HpHbvQXxO20hs1oOmSF16bVVG9J5lCq/kdlRWsqtm9B9aQzQMHa03yK1p4fWtVaH
F4d0UjGe1awbzq+szpHd/Y1vIq0Y5ZKMJtRBlBgWYYD4P0wvzNjXC20WRKj+gaQa
+BAxJdjFd26ttpk90vsRpQQIB/4WwzW4WWT2lDd/oL1UKYRBXlg1+LHdGns8oviH
ryrSXDPcHMuWN0c+JtAFwp8+Yt4STS14m8XhPDrd6sO+l6bNBPUzR+cG6CoPebQW
HH/KtpurRP8sFqZqrnWnb5KC1VeKZeyGNJjMTN/V+6v3qXUDQiIfZyfOYDjEqJwJ
JgZ6y/2EpxIi+jw4XJH69Xmwpdzr87Q1eK6Vs67NX9nNjrPWdtIotYbmF1D7wId1
wqqVFfOAKq+oejwMUCkSYyz2NZ62Z7bbqN5memTmPRZsXq2HJSLNs6kBZNL6K5Xk
zLSZYmoIxVbW2f8trnOJzS+WD7dP/wIDAQABAoICADByfm5zhHz9PMIuX1mDz7XX
TmTizleEfjyYbmTPWshCgY7f9xt+0Wh/Ryp6KwpBFERdWQyBm8sfh5JAQqoZ31Ll
TEbQxEwFkD6IwCmKc+Fb8dIiAZK0/irBYRrxSnk/zol+TVKAr5fC1lzxR3K+aJrv
8N8mbr9tqysdVI1RjzxwgRMRgXr21ty46AcFaiAALB+e4NSviYI9ig5ZmMMNf/kC
lVqL1AK7SFXjCUiuplEpvP7nX/UK8Me54CBpbl4F2zSxFdo7tphuOsAIHvv5peYJ
zWTFXx2Xr5WyeDZCAkYAyUpTf4HY3ju0CNFTtNpBDESHmUHOnYlA6xZJxORtYnz4
cWw5ZJxbmYNkhCcAg141WROM+yn+Ay7vlTO4qIq3sF/q2yXc07HyQM/U9Fl9BE8f
d6kTXDoXx22TMl+jiz3pceHPjurUYB7+4seft4xhVGwoMTE1ZhI5ZvwVBgA9x/85
W/ilMERLGDp14GaV3hWLyTmr2+eWZ66nwkI6unYQAbLk4NiruFCpXroY/UORr1hz
mwwVkK/A4gDNrC1NLQdKCeUmL1VkseOG/eKdkTYfpoTlpFTVzqIqlNvYUHZHAhrw
My7ok4Rd3wT/8A2Gp8jT4p5qFfFygPrw1XDT9O5DQ5hiMtlYc2is8dDw/ik9P54Z
WtlHjbhkOnIcLWqjI35pAoIBAQDHt7Tprcdh4aVzxTNx4sD7UHskNyWVcHUfjeEb
TtVA2a/LdGSzaf0o8xa35j2DwkZXIFgx6eHE4IDL6XarNHgrN+vhs6jTeOBavqHB
/qYkwNpyy2EQ71ZMY7AAarRPf8NVZ8ytd6a4mniOmKFreP7rEmXrWqB+UJS/gGGf
TAqa5rlHr/J49/vAxwbmOqqjvKba6+PBHb2d0ldk8SBbNbbn5KCl6YhuCAG0NAZk
bjBKn0pPM6xynqYULVE3Yb4rW8hGU/nBRsgCAxN54lKn7RVSm+0zlG02bn01TeE5
TBDjR90zyiholZDxyPHshPHCPj+FWvx9yTvi+zIJxQo1OQ3bAoIBAQC+pwatg41e
W1tCRJrAXP8RW2N8jHXHkBGhgMQEbomHk8FYE2260KXnVYl0/kDPmIW9uHmrpYNh
qmEimkJ+6pIsa0BRiZNCblDNGXtBktoyyTOpMB0oPwJWIiaTBWwgYB5E0X/ZIcvG
aIeoHDWAHniOvPF9tt5SH8LzXa2a0KmR/xpM8jjWRak810gerldfCQpfnOonfjv7
hD6nMvydLinFxgVuIuu3nHSepJhwCJBfTWCP+L/ZA3N1p6TcG+vTSXgW2CZDybxC
f87JYR5xOGrF8EVuE8k4CXwWoyTAN2b6CPI6lo0nf8Zm37GwEl3kWV1hHoPg9zae
jH9zUC1rWMmtAoIBAQDEyG/LZ9zyxuC9J2s/JYu8lFohHu07R6k/xA4vWAerdFJQ
h4jJdv9on8ycupGWB5BDPK1p0OcRk5uUT58LphFZlCopI1qPs6RsBTVg7kZKJHOZ
dGdZxlkjv32li33KbzrKJhJ4QVLWxe1Po3g5aujSOjiOI6fLjh5ial7GFKjGY9vf
lK+3HbDDC9fydY+48aL+RjsNBv7USHKwFR4qgMyNxKm9kFNLBzyWkERUJHYUsMsJ
KwMZlNRTQSurA/Xaxv6YvRlzpQhhYyKHj8adi27dDKI1lmPdpBRetzPZvudM6nw8
EU6rbeN5OOOWho+nMqpn/XSXg/Yr+hIdqjYapvLNAoIBACqhMk8OAUg96TPyHyAw
KyB4bNBmn9dVkXupTSsohDv6f9rvzTNegBov+CJez6MbmZwIabxFsBDghgO0tnWm
gbTI7oLM3k6WWB7kObk52uxMLO8BwSNEo4Ma88EgD0NV+q6soYetlODycpLWa+gP
6CkSenT/tMpsK607Hxxk1+W7Qug9qRPQU7007f1eQk8PuHAUqA7YnRTqRxAfyHhk
4BZG5uPvjwFpTHJEn4k9gPquVI8csdkWenSuXaCR5bNC1EVXY4b4zs2Xwmco/iOW
19kWlo+8gNu00zhElm0cdjwmT/Nlwn44heZu0k5qbPAoQ0b6Ccb9wArHo5/nJ6C/
I6kCggEBAMdxkLasoa4f5Uoi3e+FFKELFhs89jQFirbh0OWs8LVU3hGjibksG8pn
97SwmmbcjLOu0hZXwutfkPbRXMDZimVh62qdsez3nvp15IHcy50X3l4TC/7zlbaK
zXLn6geIYmEuFxUbbQ7ZQWLxwa+XkzO9mJgv1uHqmpJDuhpgZ9I+0WsnWn6KM0iQ
U5IK2wh60BN1f5Vcfrl5y2QIjaIgRFiUIwbGylTD0N8trkD6ekgcVAvV6IxXewSC
9Z8bqUMKnf9ae9//mC2iswkiXu60OcREnAmn8yYLYNFD5DeywekXYXPH/4lSJ09g
hwzIISxJ9PDhy9DumJt9yDnZnntPLL8=
-----END PRIVATE KEY-----
"""


__all__ = ["Rates", "measure_capacity", "parse_capacity"]
