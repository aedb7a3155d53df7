"""What transit adds to the bare library call: ``python tests/fabric/transit/bench_transit.py``.

Best of 5 runs of N calls each, µs per operation on 64-byte payloads (one core). Not a
test (pytest does not collect it): timings belong in reports, not in assertions.

Measured 2026-12-06 on the 2-vCPU development machine, shared and loaded (load average
4-5), the lowest of six runs: bare AESGCM.encrypt 0.52 µs (1.16 with os.urandom(12) for
its nonce), plane.encrypt 0.54, Transit.encrypt 2.04, Transit.decrypt 2.14; batches
1.46 µs per encrypt item (~690k/s) and 1.58 per decrypt item; convergent encrypt 5.1;
HMAC-SHA256 3.1; sign Ed25519 34, ECDSA P-256 26, RSA-2048 PSS 259. What Transit.encrypt
adds to a bare encrypt with a fresh nonce, ~0.9 µs: the key source's lookup and audit
call (~0.4 together, in the memory source), the ring check, the blob's concatenation.
"""

from __future__ import annotations

import os
import timeit
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import cryptoplane as cp
from cryptoplane.fabric.transit import MemoryKeySource, Transit


def per_op(fn: Callable[[], Any], n: int, per_call: int = 1) -> float:
    return min(timeit.repeat(fn, number=n, repeat=5)) / n / per_call * 1e6


def main() -> None:
    data = os.urandom(64)
    raw, nonce = os.urandom(32), os.urandom(12)
    aes = AESGCM(raw)
    with cp.Plane() as plane:
        key = cp.Key("aes-256-gcm", raw)
        plane.encrypt(key, data, nonce)
        t = Transit(plane, MemoryKeySource(audit_limit=1000))
        for name, kt in (("k", "aes256-gcm96"), ("ed", "ed25519"), ("ec", "ecdsa-p256"),
                         ("rsa", "rsa-2048"), ("h", "hmac")):
            t.create_key("bench", name, kt)
        t.create_key("bench", "conv", "aes256-gcm96", derived=True, convergent=True)
        ct = t.encrypt("bench", "k", data)
        items = [{"plaintext": data} for _ in range(10_000)]
        cts = [{"ciphertext": c} for c in t.encrypt_batch("bench", "k", items)]
        rows = [
            ("AESGCM.encrypt (bare, fixed nonce)", per_op(lambda: aes.encrypt(nonce, data, None),
                                                          200_000)),
            ("os.urandom(12) + AESGCM.encrypt",
             per_op(lambda: aes.encrypt(os.urandom(12), data, None), 200_000)),
            ("plane.encrypt", per_op(lambda: plane.encrypt(key, data, nonce), 200_000)),
            ("Transit.encrypt", per_op(lambda: t.encrypt("bench", "k", data), 200_000)),
            ("Transit.decrypt", per_op(lambda: t.decrypt("bench", "k", ct), 200_000)),
            ("encrypt_batch, per item (10k)",
             per_op(lambda: t.encrypt_batch("bench", "k", items), 5, len(items))),
            ("decrypt_batch, per item (10k)",
             per_op(lambda: t.decrypt_batch("bench", "k", cts), 5, len(cts))),
            ("Transit.encrypt, convergent (cached context)",
             per_op(lambda: t.encrypt("bench", "conv", data, context=b"user-1"), 50_000)),
            ("Transit.hmac sha256", per_op(lambda: t.hmac("bench", "h", data), 50_000)),
            ("Transit.sign ed25519", per_op(lambda: t.sign("bench", "ed", data), 5_000)),
            ("Transit.sign ecdsa-p256", per_op(lambda: t.sign("bench", "ec", data), 2_000)),
            ("Transit.sign rsa-2048 pss", per_op(lambda: t.sign("bench", "rsa", data), 200)),
        ]
    for label, us in rows:
        print(f"{label:48s} {us:9.3f} µs   {1e6 / us:12,.0f} /s")


if __name__ == "__main__":
    main()
