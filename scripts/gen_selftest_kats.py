"""Regenerate cryptoplane/data/selftest.json: one known answer per algorithm.

The answers were computed once with ``cryptography`` (OpenSSL) from fixed inputs, and
every algorithm they cover is also checked against NIST CAVP and Wycheproof vectors by
the test suite, so a self-test failure at engine start means that engine's path is
broken, not that the answer is. Keys here are test keys, published on purpose.

    python scripts/gen_selftest_kats.py > cryptoplane/data/selftest.json
"""

from __future__ import annotations

import hashlib
import json

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

import cryptoplane as cp


def fixed(label: str, n: int) -> bytes:
    out = b""
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{label}/{i}".encode()).digest()
        i += 1
    return out[:n]


def main() -> None:
    kats: dict[str, dict[str, str]] = {}
    msg = fixed("message", 100)
    with cp.Plane(self_test=False) as plane:
        for name in cp.algorithms.names():
            alg = cp.algorithms.lookup(name)
            kind = alg.kind.value
            entry: dict[str, str] = {"kind": kind, "msg": msg.hex()}
            if kind in ("aead", "cipher"):
                key = fixed(name + "/key", alg.default_key_size)
                nonce = fixed(name + "/nonce", alg.nonce_sizes.min if alg.mode != "gcm" else 12)
                aad = fixed("aad", 20) if kind == "aead" else None
                data = msg[:96] if alg.mode == "cbc" else msg
                k = cp.Key(name, key)
                entry |= {"key": key.hex(), "nonce": nonce.hex(), "msg": data.hex(),
                          "out": plane.encrypt(k, data, nonce=nonce, aad=aad).hex()}
                if aad:
                    entry["aad"] = aad.hex()
            elif kind == "hash":
                entry["out"] = plane.digest(name, msg).hex()
            elif kind == "mac":
                key = fixed(name + "/key", 32)
                entry |= {"key": key.hex(), "out": plane.mac(cp.Key(name, key), msg).hex()}
            elif kind == "kdf":
                key = fixed(name + "/key", 32)
                entry |= {"key": key.hex(), "salt": "00" * 8, "info": "696e666f",
                          "out": plane.derive(cp.Key(name, key), length=42, salt=b"\0" * 8,
                                              info=b"info").hex()}
            elif name == "x25519":
                a = fixed("x25519/a", 32)
                b = x25519.X25519PrivateKey.from_private_bytes(fixed("x25519/b", 32))
                peer = b.public_key().public_bytes_raw()
                entry |= {"key": a.hex(), "peer": peer.hex(),
                          "out": plane.derive(cp.Key(name, a), peer).hex()}
            elif kind == "akcipher":
                obj: object
                if alg.key_bits is not None:
                    obj = KATS_RSA
                elif name == "ed25519":
                    obj = ed25519.Ed25519PrivateKey.from_private_bytes(fixed("ed25519", 32))
                else:
                    curve = ec.SECP256R1() if "p256" in name else ec.SECP384R1()
                    scalar = int.from_bytes(fixed(name, 32), "big")
                    obj = ec.derive_private_key(scalar, curve)
                pem = obj.private_bytes(  # type: ignore[attr-defined]
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption()).decode()
                k = cp.Key.load_pem(name, pem.encode())
                entry["key_pem"] = pem
                if "oaep" in name:
                    entry["msg"] = msg[:32].hex()
                    entry["out"] = plane.encrypt(k.public_key(), msg[:32]).hex()
                else:
                    entry["out"] = plane.sign(k, msg).hex()
            elif kind == "rng":
                entry = {"kind": kind}
            kats[name] = entry
    print(json.dumps(kats, indent=1, sort_keys=True))


KATS_RSA = rsa.generate_private_key(65537, 2048)

if __name__ == "__main__":
    main()
