"""Sessions' fast-path counters: the Tally (C in ``_native._fastpath``, or pure Python).

Both Tally implementations must count the same, exactly, from several threads at once;
a session's ``counts()`` and ``plane.stats()`` must add up over many calls of every
fast-path op, and survive the session's key. Under CI a missing native Tally fails
instead of skipping.
"""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import unavailable

import cryptoplane as cp
from cryptoplane import _native
from cryptoplane.session import FAST_OPS, OP_DECRYPT, OP_ENCRYPT, OP_INDEX, Session

NONCE = bytes(12)


def _native_tally() -> Any:
    if _native.NativeTally is None:
        unavailable(f"native Tally not built: {_native.FAST_PATH_REASON}")
    return _native.NativeTally


TALLIES: dict[str, Callable[[], Any]] = {
    "native": lambda: _native_tally(),
    "python": lambda: _native.PythonTally,
    "locked": lambda: _native.LockedTally,
}


@pytest.fixture(params=list(TALLIES))
def tally_cls(request: pytest.FixtureRequest) -> Any:
    return TALLIES[request.param]()


@pytest.fixture
def switchy() -> Iterator[None]:
    """Threads switch as often as the interpreter allows: races show up, if any."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


@pytest.fixture
def plane() -> Iterator[cp.Plane]:
    with cp.Plane(self_test=False) as p:
        yield p


# -- the Tally itself ---------------------------------------------------------------------


def test_ops_and_indexes() -> None:
    assert FAST_OPS == _native.TALLY_OPS
    assert (OP_ENCRYPT, OP_DECRYPT) == (0, 1)  # the C trampoline adds to these itself
    assert [OP_INDEX[op] for op in FAST_OPS] == list(range(len(FAST_OPS)))
    if _native.NativeTally is not None:
        import cryptoplane._native._fastpath as _fastpath

        assert _fastpath.TALLY_OPS == FAST_OPS
    expected = _native.NativeTally if _native.FAST_PATH == "native" else _native._PyTally
    assert _native.Tally is expected


def test_tally_counts(tally_cls: Any) -> None:
    t = tally_cls()
    assert t.snapshot() == []
    t.add(OP_INDEX["mac"], 0)  # a request of no bytes still counts
    assert t.snapshot() == [("mac", 1, 0)]
    for i in range(1000):
        t.add(i % len(FAST_OPS), i)
    t.add(OP_INDEX["sign"], 2**63)  # large counts stay exact
    want = {op: [0, 0] for op in FAST_OPS}
    want["mac"][0] += 1
    for i in range(1000):
        want[FAST_OPS[i % len(FAST_OPS)]][0] += 1
        want[FAST_OPS[i % len(FAST_OPS)]][1] += i
    want["sign"][0] += 1
    want["sign"][1] += 2**63
    assert t.snapshot() == [(op, r, b) for op, (r, b) in want.items()]
    assert t.snapshot() == t.snapshot()  # reading changes nothing
    assert type(t.snapshot()[0][1]) is int


def test_tally_refuses_bad_op(tally_cls: Any) -> None:
    t = tally_cls()
    with pytest.raises(IndexError):
        t.add(len(FAST_OPS), 1)
    with pytest.raises(TypeError):
        t.add("encrypt", 1)
    with pytest.raises(TypeError):
        t.add(0)  # type: ignore[call-arg]
    assert t.snapshot() == []


def test_tally_exact_under_threads(tally_cls: Any, switchy: None) -> None:
    t = tally_cls()
    n, threads = 20_000, 4
    start = threading.Barrier(threads)

    def hammer(seed: int) -> None:
        start.wait()
        for i in range(n):
            t.add((seed + i) % 2, 10)

    workers = [threading.Thread(target=hammer, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert t.snapshot() == [("encrypt", n * threads // 2, 10 * n * threads // 2),
                            ("decrypt", n * threads // 2, 10 * n * threads // 2)]


def test_native_tally_is_final() -> None:
    native = _native_tally()
    with pytest.raises(TypeError):
        type("Sub", (native,), {})  # the trampoline tests the exact type: no subclasses
    with pytest.raises(TypeError):
        native(1)


# -- sessions and plane statistics --------------------------------------------------------


def test_session_has_tally(plane: cp.Plane) -> None:
    key = cp.Key.generate("aes-256-gcm")
    s = plane.session(key)
    assert type(s.tally) is _native.Tally
    assert s.counts() == []
    plane.encrypt(key, b"abc", nonce=NONCE)
    assert s.counts() == [("encrypt", 1, 3)]
    assert not hasattr(s, "c_encrypt")  # the packed-int counters are gone
    assert "tally" in Session.__slots__


def _every_op(plane: cp.Plane, rounds: int) -> dict[str, tuple[int, int]]:
    """Call every fast-path op ``rounds`` times; the (requests, bytes) each must show."""
    gcm = cp.Key.generate("aes-256-gcm")
    cbc = cp.Key.generate("aes-256-cbc")
    ed = cp.Key.generate("ed25519")
    mk = cp.Key.generate("hmac-sha256")
    xts = cp.Key.generate("aes-256-xts")
    chacha = cp.Key.generate("chacha20-poly1305")
    want = {op: [0, 0] for op in FAST_OPS}

    def count(op: str, n: int) -> None:
        want[op][0] += 1
        want[op][1] += n

    for i in range(rounds):
        data = bytes(i * 7 % 300)
        ct = plane.encrypt(gcm, data, nonce=NONCE)
        count("encrypt", len(data))
        plane.decrypt(gcm, ct, nonce=NONCE)
        count("decrypt", len(ct))
        padded = plane.encrypt(cbc, data, nonce=bytes(16), padding=True)  # through _slow
        count("encrypt", len(data))
        plane.decrypt(cbc, padded, nonce=bytes(16), padding=True)
        count("decrypt", len(padded))
        sig = plane.sign(ed, data)
        count("sign", len(data))
        plane.verify(ed, data, sig)
        count("verify", len(data))
        plane.mac(mk, data)
        count("mac", len(data))
        run = bytes(512 * (1 + i % 3))
        enc = plane.encrypt_sectors(xts, run, sector=i, sector_size=512)
        count("encrypt_sectors", len(run))
        plane.decrypt_sectors(xts, enc, sector=i, sector_size=512)
        count("decrypt_sectors", len(enc))
        sealed = bytearray(len(data) + 16)  # one final chunk (age's are 64 KiB)
        plane.seal_chunks(chacha, data, sealed, counter=0, final=True)
        count("seal_chunks", len(data))
        plane.open_chunks(chacha, sealed, bytearray(len(data)), counter=0, final=True)
        count("open_chunks", len(sealed))
    return {op: (r, b) for op, (r, b) in want.items()}


def _algorithm_of(op: str) -> str:
    return {"sign": "ed25519", "verify": "ed25519", "mac": "hmac-sha256",
            "encrypt_sectors": "aes-256-xts", "decrypt_sectors": "aes-256-xts",
            "seal_chunks": "chacha20-poly1305", "open_chunks": "chacha20-poly1305"}.get(
                op, "aes-256-gcm")


def test_counts_across_ops(plane: cp.Plane) -> None:
    want = _every_op(plane, 200)
    algs = plane.stats()["algorithms"]
    for op, (requests, nbytes) in want.items():
        got = algs[_algorithm_of(op)][op]
        if op in ("encrypt", "decrypt"):  # CBC's share is counted under aes-256-cbc
            cbc = algs["aes-256-cbc"][op]
            got = {"requests": got["requests"] + cbc["requests"],
                   "bytes": got["bytes"] + cbc["bytes"]}
        assert (got["requests"], got["bytes"]) == (requests, nbytes), op
    total = plane.stats()["engines"]["inline"]
    assert total["requests"] == sum(r for r, _ in want.values())
    assert total["bytes"] == sum(b for _, b in want.values())


def test_counts_of_one_session(plane: cp.Plane) -> None:
    key = cp.Key.generate("chacha20-poly1305")
    s = plane.session(key)
    for i in range(500):
        ct = plane.encrypt(key, bytes(i), nonce=NONCE)
        if i % 5 == 0:
            plane.decrypt(key, ct, NONCE)
    assert s.counts() == [("encrypt", 500, sum(range(500))),
                          ("decrypt", 100, sum(i + 16 for i in range(0, 500, 5)))]


@pytest.mark.parametrize("op", ["encrypt", "mac"])
def test_threads_hammering_one_session(plane: cp.Plane, op: str, switchy: None) -> None:
    """encrypt: the C trampoline's in-place add (when native); mac: Tally.add."""
    alg = "aes-256-gcm" if op == "encrypt" else "hmac-sha256"
    key = cp.Key.generate(alg)
    plane.session(key)
    n, threads, size = 5_000, 4, 33
    start = threading.Barrier(threads)
    call: Callable[[], Any] = (
        (lambda: plane.encrypt(key, bytes(size), nonce=NONCE)) if op == "encrypt"
        else (lambda: plane.mac(key, bytes(size))))
    errors: list[BaseException] = []

    def hammer() -> None:
        start.wait()
        try:
            for _ in range(n):
                call()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    got = plane.stats()["algorithms"][alg][op]
    assert (got["requests"], got["bytes"]) == (n * threads, n * threads * size)
    assert key.session_hint.counts() == [(op, n * threads, n * threads * size)]


def test_counts_survive_the_key(plane: cp.Plane) -> None:
    key = cp.Key.generate("aes-128-gcm")
    mk = cp.Key.generate("hmac-sha256")
    for i in range(100):
        plane.encrypt(key, bytes(i), nonce=NONCE)
        plane.mac(mk, bytes(i))
    before = plane.stats()["algorithms"]
    del key, mk
    gc.collect()  # the sessions end: their tallies fold into the plane's counters
    after = plane.stats()["algorithms"]
    assert after == before
    assert after["aes-128-gcm"]["encrypt"] == {"requests": 100, "bytes": 4950, "errors": {}}
    assert after["hmac-sha256"]["mac"] == {"requests": 100, "bytes": 4950, "errors": {}}
    assert not plane.sessions.live()  # folded once, not counted twice
    gc.collect()
    assert plane.stats()["algorithms"] == before


def test_rebinding_folds_the_old_session(plane: cp.Plane) -> None:
    key = cp.Key.generate("aes-256-gcm")
    for _ in range(10):
        plane.encrypt(key, b"x" * 10, nonce=NONCE)
    plane.session(key, client="tenant")  # a new session; the old one's counts fold
    for _ in range(5):
        plane.encrypt(key, b"y" * 4, nonce=NONCE)
    st = plane.stats()
    assert st["algorithms"]["aes-256-gcm"]["encrypt"]["requests"] == 15
    assert st["clients"]["-"]["bytes"] == 100
    assert st["clients"]["tenant"]["bytes"] == 20
