"""The native STREAM chunk kernel (``_native/chunks.c``) against its pure-Python contract
(``_native/chunks_fallback.py``): the same bytes, the same errors and messages."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import support
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cryptoplane import _native
from cryptoplane._native import chunks_fallback as fallback
from cryptoplane.exceptions import InvalidRequest

try:
    from cryptoplane._native import _chunks as native
except ImportError as exc:  # pragma: no cover - only where the extension is not built
    native = None
    _why = str(exc)


@pytest.fixture(autouse=True)
def _needs_native() -> None:
    if native is None:
        support.unavailable(f"the native chunk kernel is not built: {_why}")


KEY = bytes(range(32))
CHUNK = 65536
MAX = 1 << 88
Fn = Callable[..., int]


def _outcome(fn: Fn, key: Any, src: Any, dst: Any, **kw: Any) -> tuple[Any, ...]:
    """What a call did: ("ok", return value, dst bytes) or ("error", type, message)."""
    try:
        n = fn(key, src, dst, **kw)
    except Exception as exc:
        return ("error", type(exc), str(exc))
    return ("ok", n, bytes(dst))


def _both(name: str, key: Any, src: Any, dst_size: int, **kw: Any) -> tuple[Any, ...]:
    a = _outcome(getattr(native, name), key, src, bytearray(dst_size), **kw)
    b = _outcome(getattr(fallback, name), key, src, bytearray(dst_size), **kw)
    assert a == b
    return a


SIZES = [0, 1, 100, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 17]
COUNTERS = [0, 1, 255, 256, (1 << 64) - 1, 1 << 64, MAX - 4]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("counter", COUNTERS)
def test_seal_and_open_match_fallback(size: int, counter: int) -> None:
    src = os.urandom(size)
    for final in (True, False):
        sealed = _both("seal_chunks", KEY, src, size + 16 * 5, counter=counter, final=final)
        if sealed[0] == "error":
            assert not final and (size == 0 or size % CHUNK)
            continue
        ct = sealed[2][:sealed[1]]
        opened = _both("open_chunks", KEY, ct, size + 1, counter=counter, final=final)
        assert opened[0] == "ok" and opened[2][:opened[1]] == src


def test_known_answer_first_chunk() -> None:
    # independent of both kernels: cryptography's AEAD with the STREAM nonce
    src = os.urandom(CHUNK + 5)
    dst = bytearray(len(src) + 32)
    native.seal_chunks(KEY, src, dst, counter=7, final=True)
    aead = ChaCha20Poly1305(KEY)
    assert dst[:CHUNK + 16] == aead.encrypt(bytes(10) + b"\x07\x00", src[:CHUNK], None)
    assert dst[CHUNK + 16:] == aead.encrypt(bytes(10) + b"\x08\x01", src[CHUNK:], None)


def test_counter_carries_past_64_bits() -> None:
    src = os.urandom(3 * CHUNK)
    dst = bytearray(len(src) + 48)
    native.seal_chunks(KEY, src, dst, counter=(1 << 64) - 2, final=False)
    aead = ChaCha20Poly1305(KEY)
    nonce = (1 << 64).to_bytes(11, "big") + b"\x00"
    assert dst[2 * (CHUNK + 16):] == aead.encrypt(nonce, src[2 * CHUNK:], None)


@pytest.mark.parametrize("name", ["seal_chunks", "open_chunks"])
@pytest.mark.parametrize(("key", "size", "dst_size", "kw"), [
    (KEY, 100, 200, {"counter": 0, "final": False}),               # not whole chunks
    (KEY, 0, 200, {"counter": 0, "final": False}),                 # empty non-final
    (KEY, 10, 200, {"counter": 0, "final": True}),                 # open: < a tag
    (KEY, CHUNK + 16 + 5, 1 << 17, {"counter": 0, "final": True}),  # open: short tail
    (KEY[:31], CHUNK, 1 << 17, {"counter": 0, "final": True}),     # short key
    (KEY, CHUNK, 1 << 17, {"counter": -1, "final": True}),         # negative counter
    (KEY, CHUNK, 1 << 17, {"counter": MAX, "final": True}),        # past 2**88
    (KEY, 2 * CHUNK, 1 << 18, {"counter": MAX - 1, "final": False}),  # runs past 2**88
    (KEY, CHUNK, 1 << 17, {"counter": MAX - 1, "final": True}),    # the last chunk: fine
    (KEY, 100, 10, {"counter": 0, "final": True}),                 # dst too small
    (KEY, CHUNK, 1 << 17, {"counter": 0, "final": True, "chunk_size": 4096}),
    (KEY, 4096 * 3 + 16 * 3, 1 << 17, {"counter": 0, "final": False, "chunk_size": 4096}),
])
def test_errors_match_fallback(name: str, key: bytes, size: int, dst_size: int,
                               kw: dict[str, Any]) -> None:
    _both(name, key, os.urandom(size), dst_size, **kw)


@pytest.mark.parametrize("name", ["seal_chunks", "open_chunks"])
def test_read_only_dst_matches_fallback(name: str) -> None:
    src = os.urandom(CHUNK + 16)
    for dst in (bytes(1 << 17), memoryview(bytearray(1 << 17)).toreadonly()):
        a = _outcome(getattr(native, name), KEY, src, dst, counter=0, final=True)
        b = _outcome(getattr(fallback, name), KEY, src, dst, counter=0, final=True)
        assert a == b and a[0] == "error" and a[1] is InvalidRequest


@pytest.mark.parametrize("name", ["seal_chunks", "open_chunks"])
def test_argument_types(name: str) -> None:
    fn = getattr(native, name)
    with pytest.raises(TypeError):
        fn(KEY, "text", bytearray(10), counter=0, final=True)
    with pytest.raises(TypeError):
        fn(KEY, b"", object(), counter=0, final=True)
    with pytest.raises(TypeError, match="counter"):
        fn(KEY, b"", bytearray(32), final=True)
    with pytest.raises(TypeError, match="final"):
        fn(KEY, b"", bytearray(32), counter=0)
    with pytest.raises(InvalidRequest, match="chunk_size must be positive"):
        fn(KEY, b"x" * 32, bytearray(64), counter=0, final=True, chunk_size=0)


def test_overlapping_buffers_are_refused() -> None:
    buf = bytearray(2 * CHUNK + 64)
    with pytest.raises(InvalidRequest, match="overlap"):
        native.seal_chunks(KEY, memoryview(buf)[:CHUNK], memoryview(buf)[16:], counter=0,
                           final=True)


def _sealed(chunks: int, tail: int, counter: int = 0) -> tuple[bytes, bytes]:
    src = os.urandom(chunks * CHUNK + tail)
    dst = bytearray(len(src) + 16 * (chunks + 1))
    n = native.seal_chunks(KEY, src, dst, counter=counter, final=True)
    return src, bytes(dst[:n])


@pytest.mark.parametrize("fn", [native.open_chunks if native else None, fallback.open_chunks])
def test_tampered_chunk_reports_its_index(fn: Fn) -> None:
    _, ct = _sealed(4, 100)
    for bad in range(5):
        t = bytearray(ct)
        t[bad * (CHUNK + 16) + 3] ^= 0x40
        with pytest.raises(fallback.ChunkAuthenticationFailed) as info:
            fn(KEY, t, bytearray(len(t)), counter=0, final=True)
        assert info.value.index == bad
        assert str(info.value) == f"chunk {bad} of the batch failed authentication"
    with pytest.raises(fallback.ChunkAuthenticationFailed) as info:
        fn(bytes(32), ct, bytearray(len(ct)), counter=0, final=True)
    assert info.value.index == 0
    # a wrong counter or a wrong final flag is a wrong nonce
    with pytest.raises(fallback.ChunkAuthenticationFailed):
        fn(KEY, ct, bytearray(len(ct)), counter=1, final=True)
    with pytest.raises(fallback.ChunkAuthenticationFailed) as info:
        fn(KEY, ct[:4 * (CHUNK + 16)], bytearray(len(ct)), counter=0, final=True)
    assert info.value.index == 3


def test_failing_chunk_is_zeroed_in_dst() -> None:
    src, ct = _sealed(3, 0)
    t = bytearray(ct)
    t[2 * (CHUNK + 16) - 1] ^= 1  # chunk 1's tag
    dst = bytearray(b"\xaa" * len(ct))
    with pytest.raises(fallback.ChunkAuthenticationFailed):
        native.open_chunks(KEY, t, dst, counter=0, final=True)
    assert dst[:CHUNK] == src[:CHUNK]           # authenticated before the failure
    assert dst[CHUNK:2 * CHUNK] == bytes(CHUNK)  # the failing chunk: no plaintext left
    assert dst[2 * CHUNK:] == b"\xaa" * (len(dst) - 2 * CHUNK)  # never reached


def test_threads_get_correct_bytes() -> None:
    keys = [os.urandom(32) for _ in range(4)]
    src = os.urandom(8 * CHUNK + 9)
    expected = []
    for k in keys:
        d = bytearray(len(src) + 16 * 9)
        fallback.seal_chunks(k, src, d, counter=5, final=True)
        expected.append(bytes(d))
    errors: list[str] = []

    def work(i: int) -> None:
        for r in range(15):
            k = (i + r) % len(keys)
            d = bytearray(len(src) + 16 * 9)
            native.seal_chunks(keys[k], src, d, counter=5, final=True)
            p = bytearray(len(src))
            native.open_chunks(keys[k], d, p, counter=5, final=True)
            if bytes(d) != expected[k] or bytes(p) != src:
                errors.append(f"thread {i} round {r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_package_picks_native_and_honours_no_native() -> None:
    if os.environ.get("CRYPTOPLANE_NO_NATIVE", "") in ("", "0"):
        assert _native.CHUNKS_BACKEND == "native"
        assert _native.seal_chunks is native.seal_chunks
    assert _native.ChunkAuthenticationFailed is fallback.ChunkAuthenticationFailed
    code = ("import cryptoplane._native as n, cryptoplane._native.chunks_fallback as f;"
            "print(n.CHUNKS_BACKEND, n.seal_chunks is f.seal_chunks, n.CHUNKS_BACKEND_REASON)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60,
                         env={**os.environ, "CRYPTOPLANE_NO_NATIVE": "1"}).stdout
    assert out.split(None, 2) == ["python", "True", "CRYPTOPLANE_NO_NATIVE is set\n"]
