"""Known-answer self-tests run when an engine starts, like the kernel's testmgr.

One answer per algorithm (``data/selftest.json``) run through the engine's own path; an
algorithm whose answer is wrong (or whose path raises) is withdrawn from that engine.
Randomised signatures (PSS, ECDSA) verify a stored signature, then sign and verify a
fresh one (a pairwise consistency test).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from .. import requests as rq
from ..algorithms import Algorithm
from ..keys import Key

Runner = Callable[[rq.Request], Any]


@dataclass(frozen=True, slots=True)
class SelfTestResult:
    algorithm: str
    passed: bool
    detail: str = ""  # why it failed; never key material
    seconds: float = 0.0


@cache
def known_answers() -> dict[str, dict[str, str]]:
    text = resources.files("cryptoplane").joinpath("data/selftest.json").read_text()
    data: dict[str, dict[str, str]] = json.loads(text)
    return data


@cache
def _private_key(name: str) -> Key:
    """Parsing (and validating) an RSA key costs ~35 ms: do it once per process."""
    return Key.load_pem(name, known_answers()[name]["key_pem"].encode())


def _b(entry: dict[str, str], field: str) -> bytes:
    return bytes.fromhex(entry[field])


class _Mismatch(Exception):
    pass


def _expect(got: object, want: bytes, what: str) -> None:
    if got != want:
        raise _Mismatch(f"{what} differs from the known answer")


def _check(alg: Algorithm, kat: dict[str, str], run: Runner) -> None:
    kind = kat["kind"]
    msg = _b(kat, "msg") if "msg" in kat else b""
    name = alg.name
    if kind in ("aead", "cipher"):
        key = Key(name, _b(kat, "key"))
        nonce, aad = _b(kat, "nonce"), (_b(kat, "aad") if "aad" in kat else None)
        _expect(run(rq.Encrypt(key, msg, nonce=nonce, aad=aad)), _b(kat, "out"), "encrypt")
        _expect(run(rq.Decrypt(key, _b(kat, "out"), nonce=nonce, aad=aad)), msg, "decrypt")
    elif kind == "hash":
        _expect(run(rq.Digest(name, msg)), _b(kat, "out"), "digest")
    elif kind == "mac":
        key = Key(name, _b(kat, "key"))
        _expect(run(rq.Mac(key, msg)), _b(kat, "out"), "mac")
        run(rq.VerifyMac(key, msg, _b(kat, "out")))
    elif kind == "kdf":
        key = Key(name, _b(kat, "key"))
        req = rq.Derive(key, length=len(_b(kat, "out")), salt=_b(kat, "salt"),
                        info=_b(kat, "info"))
        _expect(run(req), _b(kat, "out"), "derive")
    elif kind == "kpp":
        _expect(run(rq.Derive(Key(name, _b(kat, "key")), _b(kat, "peer"))), _b(kat, "out"),
                "shared secret")
    elif kind == "akcipher":
        priv = _private_key(name)
        pub = priv.public_key()
        if "oaep" in name:
            _expect(run(rq.Decrypt(priv, _b(kat, "out"))), msg, "decrypt")
            _expect(run(rq.Decrypt(priv, run(rq.Encrypt(pub, msg)))), msg, "round trip")
        else:
            run(rq.Verify(pub, msg, _b(kat, "out")))
            sig = run(rq.Sign(priv, msg))
            if name.startswith(("rsa-pkcs1v15", "ed25519")):  # deterministic schemes
                _expect(sig, _b(kat, "out"), "signature")
            run(rq.Verify(pub, msg, sig))
    elif kind == "rng":
        a, b = run(rq.Random(32)), run(rq.Random(32))
        if len(a) != 32 or a == b:
            raise _Mismatch("random output is not fresh")


def run_self_tests(algorithms: list[Algorithm], run: Runner) -> dict[str, SelfTestResult]:
    """Run each algorithm's known answer through ``run``; a result per algorithm."""
    kats = known_answers()
    results: dict[str, SelfTestResult] = {}
    for alg in algorithms:
        t0 = time.perf_counter()
        kat = kats.get(alg.name)
        if kat is None:
            results[alg.name] = SelfTestResult(alg.name, False, "no known answer")
            continue
        try:
            _check(alg, kat, run)
        except Exception as e:  # any failure withdraws the algorithm; say why
            results[alg.name] = SelfTestResult(
                alg.name, False, f"{type(e).__name__}: {e}", time.perf_counter() - t0)
        else:
            results[alg.name] = SelfTestResult(alg.name, True, "", time.perf_counter() - t0)
    return results
