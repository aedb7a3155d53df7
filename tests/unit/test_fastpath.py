"""The native fast path (``_native._fastpath.FastAead``) against the pure-Python methods.

Every test runs the same calls on a Plane whose encrypt/decrypt are the C trampoline and
on one whose encrypt/decrypt are the Python methods it was made from, and requires the
same results, the same typed errors (type, message, cause and context) and the same
statistics. Under CI a missing native extension fails these tests instead of skipping.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import json
import os
import pydoc
import subprocess
import sys
import tracemalloc
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from support import unavailable

import cryptoplane as cp
from cryptoplane import _native
from cryptoplane.plane import Plane

NONCE = bytes(range(12))
IV = bytes(range(16))


def _native_type() -> Any:
    if _native.NativeFastAead is None:
        unavailable(f"native fast path not built: {_native.FAST_PATH_REASON}")
    return _native.NativeFastAead


class PythonPlane(Plane):
    encrypt = Plane._encrypt_py  # type: ignore[assignment]
    decrypt = Plane._decrypt_py  # type: ignore[assignment]


def native_plane_class() -> type[Plane]:
    fast = _native_type()

    class NativePlane(Plane):
        encrypt = fast("encrypt", Plane._encrypt_py)
        decrypt = fast("decrypt", Plane._decrypt_py)

    return NativePlane


@pytest.fixture(scope="module")
def planes() -> Iterator[dict[str, Plane]]:
    with native_plane_class()(self_test=False) as n, PythonPlane(self_test=False) as p:
        yield {"native": n, "python": p}


@pytest.fixture
def fresh_planes() -> Iterator[dict[str, Plane]]:
    """New planes, for tests that read statistics."""
    with native_plane_class()(self_test=False) as n, PythonPlane(self_test=False) as p:
        yield {"native": n, "python": p}


def outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    """What a call did, comparable across implementations."""
    try:
        return ("ok", call())
    except Exception as e:
        ctx = e.__context__
        return ("raised", type(e), str(e), e.__cause__, e.__suppress_context__,
                type(ctx) if ctx is not None else None)


def both(planes: dict[str, Plane], algorithm: str, run: Callable[[Plane, cp.Key], Any],
         material: bytes | None = None) -> tuple[Any, ...]:
    """Run ``run`` on each plane with its own Key of the same material; they must agree."""
    material = material or cp.Key.generate(algorithm).export_raw()
    got = {name: outcome(functools.partial(run, p, cp.Key(algorithm, material)))
           for name, p in planes.items()}
    assert got["native"] == got["python"]
    return got["native"]


# -- what the native descriptor is ------------------------------------------------------


def test_plane_uses_native_unless_disabled() -> None:
    fast = _native_type()
    disabled = os.environ.get("CRYPTOPLANE_NO_NATIVE", "") not in ("", "0")
    for op in ("encrypt", "decrypt"):
        attr = Plane.__dict__[op]
        if disabled:
            assert isinstance(attr, types.FunctionType)
        else:
            assert isinstance(attr, fast)
            assert attr.__wrapped__ is Plane.__dict__[f"_{op}_py"]
    assert ("python" if disabled else "native") == _native.FAST_PATH


def test_no_native_env_keeps_python_methods() -> None:
    code = ("import types; from cryptoplane.plane import Plane; "
            "from cryptoplane import _native; "
            "assert isinstance(Plane.__dict__['encrypt'], types.FunctionType); "
            "assert _native.FAST_PATH == 'python', _native.FAST_PATH")
    env = {**os.environ, "CRYPTOPLANE_NO_NATIVE": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_descriptor_looks_like_the_method(planes: dict[str, Plane]) -> None:
    native = planes["native"]
    cls = type(native)
    bound = native.encrypt
    assert bound.__self__ is native  # type: ignore[attr-defined]
    assert bound.__doc__ == Plane._encrypt_py.__doc__
    assert cls.encrypt.__name__ == "encrypt"
    assert cls.encrypt.__qualname__ == "Plane.encrypt"
    assert "Encrypt. AEAD returns" in pydoc.render_doc(bound)
    assert "Decrypt; AEAD tags" in pydoc.render_doc(native.decrypt)
    # through __wrapped__: the Python method's signature
    assert inspect.signature(bound) == inspect.signature(planes["python"].encrypt)
    assert "native fast path" in repr(cls.encrypt)
    key = cp.Key.generate("aes-256-gcm")
    ct = bound(key, b"abc", nonce=NONCE)  # a bound method object, kept and called
    assert cls.decrypt(native, key, ct, NONCE) == b"abc"  # through the class
    with pytest.raises(ValueError, match="'encrypt' or 'decrypt'"):
        _native_type()("sign", Plane._encrypt_py)
    with pytest.raises(TypeError):
        _native_type()("encrypt", 42)


# -- same results, same errors ----------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["aes-256-gcm", "aes-128-gcm", "chacha20-poly1305"])
@pytest.mark.parametrize("size", [0, 1, 64, 1000, 16 * 1024])
def test_aead_round_trip(planes: dict[str, Plane], algorithm: str, size: int) -> None:
    data = os.urandom(size)
    material = cp.Key.generate(algorithm).export_raw()

    def run(p: Plane, k: cp.Key) -> tuple[bytes, bytes]:
        ct = p.encrypt(k, data, nonce=NONCE, aad=b"hdr")
        return ct, p.decrypt(k, ct, nonce=NONCE, aad=b"hdr")

    result = both(planes, algorithm, run, material)
    assert result[0] == "ok"
    ct, pt = result[1]
    assert pt == data
    lib = ChaCha20Poly1305 if algorithm.startswith("chacha") else AESGCM
    assert ct == lib(material).encrypt(NONCE, data, b"hdr")


@pytest.mark.parametrize("algorithm", ["aes-128-ctr", "aes-256-ctr"])
def test_ctr(planes: dict[str, Plane], algorithm: str) -> None:
    data = os.urandom(777)

    def run(p: Plane, k: cp.Key) -> tuple[bytes, bytes]:
        ct = p.encrypt(k, data, nonce=IV)
        return ct, p.decrypt(k, ct, IV)

    result = both(planes, algorithm, run)
    assert result[0] == "ok" and result[1][1] == data
    short = both(planes, algorithm, lambda p, k: p.encrypt(k, data, nonce=IV[:12]))
    assert short[1] is cp.InvalidRequest
    aad = both(planes, algorithm, lambda p, k: p.encrypt(k, data, nonce=IV, aad=b"x"))
    assert aad[1] is cp.InvalidRequest


def test_cbc_padding(planes: dict[str, Plane]) -> None:
    msg = b"not a block multiple"

    def padded(p: Plane, k: cp.Key) -> tuple[bytes, bytes, bytes]:
        ct = p.encrypt(k, msg, nonce=IV, padding=True)
        return ct, p.decrypt(k, ct, nonce=IV, padding=True), p.decrypt(k, ct, IV)

    result = both(planes, "aes-256-cbc", padded)
    assert result[0] == "ok"
    ct, pt, raw = result[1]
    assert len(ct) == 32 and pt == msg and raw.endswith(bytes([12]) * 12)
    unpadded = both(planes, "aes-256-cbc", lambda p, k: p.encrypt(k, msg, nonce=IV))
    assert unpadded[1] is cp.InvalidRequest and "padding=True" in unpadded[2]


@pytest.mark.parametrize("algorithm", ["aes-256-gcm", "chacha20-poly1305"])
@pytest.mark.parametrize("op", ["encrypt", "decrypt"])
def test_padding_on_aead_is_refused(planes: dict[str, Plane], algorithm: str,
                                    op: str) -> None:
    for padding in (True, 1, "yes"):
        def run(p: Plane, k: cp.Key, pad: object = padding) -> bytes:
            return getattr(p, op)(k, b"x" * 32, nonce=NONCE, padding=pad)  # type: ignore[no-any-return]

        r = both(planes, algorithm, run)
        assert r[1] is cp.InvalidRequest and "padding does not apply" in r[2]


@pytest.mark.parametrize("algorithm", ["aes-256-gcm", "chacha20-poly1305"])
@pytest.mark.parametrize("op", ["encrypt", "decrypt"])
@pytest.mark.parametrize("nonce", [b"", b"short", bytes(7), bytes(13), None, "text", 12])
def test_bad_nonce(planes: dict[str, Plane], algorithm: str, op: str,
                   nonce: object) -> None:
    r = both(planes, algorithm, lambda p, k: getattr(p, op)(k, b"y" * 40, nonce=nonce))
    if algorithm == "aes-256-gcm" and isinstance(nonce, bytes) and len(nonce) >= 8:
        # 8..128 bytes is a valid GCM nonce
        assert r[0] == "ok" if op == "encrypt" else r[1] is cp.AuthenticationFailed
        return
    assert r[0] == "raised" and r[1] is cp.InvalidRequest
    assert r[3] is None and r[4] is True  # raise ... from None


@pytest.mark.parametrize("algorithm", ["aes-256-gcm", "chacha20-poly1305"])
def test_tampered(planes: dict[str, Plane], algorithm: str) -> None:
    def run(p: Plane, k: cp.Key) -> bytes:
        ct = bytearray(p.encrypt(k, b"secret" * 10, nonce=NONCE, aad=b"a"))
        ct[3] ^= 1
        return p.decrypt(k, bytes(ct), nonce=NONCE, aad=b"a")

    r = both(planes, algorithm, run)
    assert r[1] is cp.AuthenticationFailed  # and so no plaintext came back
    assert r[3] is None and r[4] is True
    wrong_aad = both(planes, algorithm, lambda p, k: p.decrypt(
        k, p.encrypt(k, b"m", nonce=NONCE, aad=b"a"), nonce=NONCE, aad=b"b"))
    assert wrong_aad[1] is cp.AuthenticationFailed
    short = both(planes, algorithm, lambda p, k: p.decrypt(k, b"abc", nonce=NONCE))
    assert short[0] == "raised" and issubclass(short[1], cp.CryptoplaneError)


@pytest.mark.parametrize("op", ["encrypt", "decrypt"])
@pytest.mark.parametrize("bad", [b"k" * 32, None, 42, "aes-256-gcm", object()])
def test_not_a_key(planes: dict[str, Plane], op: str, bad: object) -> None:
    got = {name: outcome(functools.partial(getattr(p, op), bad, b"data", nonce=NONCE))
           for name, p in planes.items()}
    assert got["native"] == got["python"]
    assert got["native"][1] is cp.InvalidRequest
    assert got["native"][5] is None  # no AttributeError left in the context


CALL_FORMS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((), {}),
    (("K",), {}),
    (("K", b"d", NONCE, None, False, "extra"), {}),
    (("K", b"d"), {"nonce": NONCE, "bogus": 1}),
    (("K", b"d", NONCE), {"nonce": NONCE}),
    (("K", b"d"), {"key": "K"}),
    (("K",), {"key": "K", "data": b"d"}),
    (("K", b"d", NONCE, None, False), {"padding": False}),
    (("K", b"d"), {"self": None}),
    ((), {"data": b"d", "nonce": NONCE}),
    # equal to a parameter name but not interned: the native code takes the Python path
    (("K", b"d"), {"".join(["no", "nce"]): NONCE}),
]


@pytest.mark.parametrize(("args", "kwargs"), CALL_FORMS)
@pytest.mark.parametrize("op", ["encrypt", "decrypt"])
def test_argument_errors(planes: dict[str, Plane], op: str, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> None:
    key = cp.Key.generate("aes-256-gcm")
    args = tuple(key if a == "K" else a for a in args)
    kwargs = {k: key if v == "K" else v for k, v in kwargs.items()}
    got = {name: outcome(functools.partial(getattr(p, op), *args, **kwargs))
           for name, p in planes.items()}
    assert got["native"] == got["python"]


def test_unbound_calls_match(planes: dict[str, Plane]) -> None:
    native_cls, python_cls = type(planes["native"]), type(planes["python"])
    assert (outcome(lambda: native_cls.encrypt())  # type: ignore[call-arg]
            == outcome(lambda: python_cls.encrypt()))  # type: ignore[call-arg]


def test_keyword_and_positional_forms(planes: dict[str, Plane]) -> None:
    data = os.urandom(100)
    forms: list[Callable[[Plane, cp.Key], bytes]] = [
        lambda p, k: p.encrypt(k, data, NONCE),
        lambda p, k: p.encrypt(k, data, nonce=NONCE),
        lambda p, k: p.encrypt(key=k, data=data, nonce=NONCE),
        lambda p, k: p.encrypt(k, data=data, nonce=NONCE, aad=None),
        lambda p, k: p.encrypt(k, data, NONCE, None),
        lambda p, k: p.encrypt(k, data, NONCE, None, False),
        lambda p, k: p.encrypt(k, data, nonce=NONCE, padding=False),
        lambda p, k: p.encrypt(k, data, nonce=NONCE, padding=0),  # type: ignore[arg-type]
        lambda p, k: p.encrypt(k, data, nonce=NONCE, padding=None),  # type: ignore[arg-type]
        lambda p, k: p.encrypt(padding=False, aad=None, nonce=NONCE, data=data, key=k),
        lambda p, k: p.encrypt(k, data, **{"nonce": NONCE}),  # type: ignore[arg-type]
        lambda p, k: p.encrypt(*(k, data), **{"aad": None, "nonce": NONCE}),  # type: ignore[arg-type]
        lambda p, k: p.encrypt(k, memoryview(data), nonce=bytearray(NONCE)),  # type: ignore[arg-type]
    ]
    material = cp.Key.generate("aes-256-gcm").export_raw()
    expected = AESGCM(material).encrypt(NONCE, data, None)
    for form in forms:
        assert both(planes, "aes-256-gcm", form, material) == ("ok", expected)
    with_aad = both(planes, "aes-256-gcm",
                    lambda p, k: p.decrypt(k, p.encrypt(k, data, NONCE, b"h"), NONCE, b"h"))
    assert with_aad == ("ok", data)


def counts(p: Plane, algorithm: str) -> dict[str, Any]:
    return p.stats()["algorithms"].get(algorithm, {})  # type: ignore[no-any-return]


def test_stats_equal(fresh_planes: dict[str, Plane]) -> None:
    material = cp.Key.generate("aes-256-gcm").export_raw()
    for p in fresh_planes.values():
        k = cp.Key("aes-256-gcm", material)
        for size in (0, 10, 1000):
            ct = p.encrypt(k, bytes(size), nonce=NONCE)
            p.decrypt(k, ct, nonce=NONCE)
        with pytest.raises(cp.InvalidRequest):
            p.encrypt(k, b"x", nonce=b"1")
        with pytest.raises(cp.AuthenticationFailed):
            p.decrypt(k, b"x" * 20, nonce=NONCE)
        with pytest.raises(cp.InvalidRequest):
            p.encrypt(k, b"x", nonce=NONCE, padding=True)
    native, python = (counts(p, "aes-256-gcm") for p in fresh_planes.values())
    assert native == python
    assert native["encrypt"]["requests"] == 3
    assert native["encrypt"]["bytes"] == 1010
    assert native["decrypt"]["requests"] == 3
    assert native["decrypt"]["bytes"] == 1010 + 3 * 16
    assert native["encrypt"]["errors"] == {"InvalidRequest": 2}
    assert native["decrypt"]["errors"] == {"AuthenticationFailed": 1}


def test_session_on_threads_engine(fresh_planes: dict[str, Plane]) -> None:
    material = cp.Key.generate("aes-256-gcm").export_raw()
    got = {}
    for name, p in fresh_planes.items():
        k = cp.Key("aes-256-gcm", material)
        s = p.session(k, engine="threads")
        assert s.fast_plane is None  # the slow path: through the threads engine
        ct = p.encrypt(k, b"via threads", nonce=NONCE)
        got[name] = (ct, p.decrypt(k, ct, nonce=NONCE),
                     outcome(functools.partial(p.decrypt, k, b"z" * 30, nonce=NONCE)),
                     p.stats()["engines"]["threads"]["requests"],
                     counts(p, "aes-256-gcm"))
    assert got["native"] == got["python"]
    assert got["native"][1] == b"via threads"
    assert got["native"][2][1] is cp.AuthenticationFailed
    assert got["native"][3] == 2


def test_key_alternating_between_planes(fresh_planes: dict[str, Plane]) -> None:
    """One Key used on both planes in turn: each call rebinds it; results and counts
    stay right on each side."""
    native, python = fresh_planes["native"], fresh_planes["python"]
    key = cp.Key.generate("chacha20-poly1305")
    lib = ChaCha20Poly1305(key.export_raw())
    for i in range(6):
        data = os.urandom(50 + i)
        for p in (native, python, python, native):
            ct = p.encrypt(key, data, nonce=NONCE)
            assert ct == lib.encrypt(NONCE, data, None)
            assert p.decrypt(key, ct, nonce=NONCE) == data
    del key
    gc.collect()  # the key's sessions end: their counts fold into the planes'
    a, b = counts(native, "chacha20-poly1305"), counts(python, "chacha20-poly1305")
    assert a == b
    assert a["encrypt"]["requests"] == 12 and a["decrypt"]["requests"] == 12


def test_raw_callable_errors_pass_like_python(fresh_planes: dict[str, Plane]) -> None:
    """A session's raw callable raising something the kernel does not reproduce, or a
    BaseException: both implementations re-raise it the same way."""
    for exc in (RuntimeError("odd"), KeyboardInterrupt()):
        got = {}
        for name, p in fresh_planes.items():
            k = cp.Key.generate("aes-256-gcm")
            p.encrypt(k, b"bind", nonce=NONCE)

            def boom(nonce: object, data: object, aad: object, exc: BaseException = exc) -> Any:
                raise exc

            k.session_hint.enc = boom
            try:
                p.encrypt(k, b"x", nonce=NONCE)
            except BaseException as e:
                got[name] = (type(e), e.__cause__, e.__suppress_context__, e.__context__)
            exc.__traceback__ = None
            exc.__suppress_context__ = False
        assert got["native"] == got["python"]
        assert got["native"][0] is type(exc)


# -- references and memory ----------------------------------------------------------------


def test_no_reference_or_memory_leaks(planes: dict[str, Plane]) -> None:
    native = planes["native"]
    key = cp.Key.generate("aes-256-gcm")
    cbc = cp.Key.generate("aes-256-cbc")
    data, aad = os.urandom(100), os.urandom(7)
    ct = native.encrypt(key, data, nonce=NONCE, aad=aad)
    bad = bytes([ct[0] ^ 1]) + ct[1:]

    def error(call: Callable[[], Any]) -> None:
        with contextlib.suppress(cp.CryptoplaneError, TypeError):
            call()

    paths: list[Callable[[], Any]] = [
        lambda: native.encrypt(key, data, nonce=NONCE, aad=aad),
        lambda: native.decrypt(key, ct, NONCE, aad),
        lambda: error(lambda: native.decrypt(key, bad, nonce=NONCE, aad=aad)),
        lambda: error(lambda: native.encrypt(key, data, nonce=b"1")),
        lambda: error(lambda: native.encrypt(b"not a key", data, nonce=NONCE)),  # type: ignore[arg-type]
        lambda: error(lambda: native.encrypt(key, data, nonce=NONCE, bogus=1)),  # type: ignore[call-arg]
        lambda: error(lambda: native.encrypt(key)),  # type: ignore[call-arg]
        lambda: native.encrypt(cbc, data[:96], nonce=IV, padding=True),
    ]
    watched = [key, cbc, data, aad, ct, bad, NONCE, IV, native, key.session_hint]

    def run(n: int) -> None:
        for path in paths:
            for _ in range(n):
                path()

    run(200)  # warm: sessions, caches, interned names
    gc.collect()
    refs = [sys.getrefcount(o) for o in watched]
    tracemalloc.start()
    try:
        run(100)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        run(2000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert [sys.getrefcount(o) for o in watched] == refs
    assert grown < 64 * 1024, f"{grown} bytes kept over {2000 * len(paths)} calls"


# -- counters: the Tally ------------------------------------------------------------------

# One workload over every fast-path op, run here and in a CRYPTOPLANE_NO_NATIVE=1
# interpreter: the statistics must be the same, whichever Tally and trampoline count.
STATS_WORKLOAD = r'''
import gc, json
import cryptoplane as cp

def workload(plane):
    nonce, iv = bytes(12), bytes(16)
    gcm, cha = cp.Key.generate("aes-256-gcm"), cp.Key.generate("chacha20-poly1305")
    cbc, ed = cp.Key.generate("aes-256-cbc"), cp.Key.generate("ed25519")
    mk, xts = cp.Key.generate("hmac-sha256"), cp.Key.generate("aes-256-xts")
    plane.session(cha, client="tenant")
    for i in range(300):
        data = bytes(i * 37 % 2000)
        aad = b"a" if i % 2 else None
        ct = plane.encrypt(gcm, data, nonce=nonce, aad=aad)
        plane.decrypt(gcm, ct, nonce, aad)
        plane.encrypt(cha, data, nonce=nonce)
        if i % 10 == 0:
            plane.decrypt(cbc, plane.encrypt(cbc, data, iv, padding=True), iv, padding=True)
            plane.verify(ed, data, plane.sign(ed, data))
            plane.mac(mk, data)
            run = bytes(512 * (1 + i % 3))
            plane.decrypt_sectors(xts, plane.encrypt_sectors(xts, run, sector=i,
                                  sector_size=512), sector=i, sector_size=512)
        for call in (lambda: plane.encrypt(gcm, b"x", nonce=b"1"),
                     lambda: plane.decrypt(gcm, b"y" * 20, nonce=nonce)):
            if i % 50 == 0:
                try:
                    call()
                except cp.CryptoplaneError:
                    pass
    dying = cp.Key.generate("aes-128-gcm")
    for i in range(50):
        plane.encrypt(dying, bytes(i), nonce=nonce)
    del dying
    gc.collect()  # its session's counts fold into the plane's
    st = plane.stats()
    inline = st["engines"]["inline"]
    return json.dumps({"algorithms": st["algorithms"], "clients": st["clients"],
                       "inline": [inline["requests"], inline["bytes"], inline["errors"]]},
                      sort_keys=True)
'''


def run_workload(plane: Plane) -> Any:
    ns: dict[str, Any] = {}
    exec(STATS_WORKLOAD, ns)  # our own code, shared with the subprocess
    return json.loads(ns["workload"](plane))


def test_stats_equal_native_and_python_modes(fresh_planes: dict[str, Plane]) -> None:
    """The native trampoline with the C Tally, the Python methods with it, and a
    CRYPTOPLANE_NO_NATIVE=1 interpreter (Python methods, pure-Python Tally) agree."""
    got = {name: run_workload(p) for name, p in fresh_planes.items()}
    code = (STATS_WORKLOAD + "\nfrom cryptoplane import _native\n"
            "assert _native.FAST_PATH == 'python' and _native.Tally is _native._PyTally\n"
            "with cp.Plane(self_test=False) as p:\n    print(workload(p))\n")
    env = {**os.environ, "CRYPTOPLANE_NO_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout
    got["no-native"] = json.loads(out)
    assert got["native"] == got["python"] == got["no-native"]
    algs = got["native"]["algorithms"]
    assert algs["aes-256-gcm"]["encrypt"]["requests"] == 300
    assert algs["aes-256-gcm"]["encrypt"]["bytes"] == sum(i * 37 % 2000 for i in range(300))
    assert algs["aes-256-gcm"]["encrypt"]["errors"] == {"InvalidRequest": 6}
    assert algs["aes-128-gcm"]["encrypt"] == {"requests": 50, "bytes": 1225, "errors": {}}
    assert algs["aes-256-xts"]["decrypt_sectors"]["requests"] == 30
    assert got["native"]["clients"]["tenant"]["requests"] == 300


def test_native_session_tally_type(planes: dict[str, Plane]) -> None:
    """Sessions made with the native fast path count in the C Tally, which the
    trampoline adds to in place."""
    _native_type()  # skips, or fails under CI, without the native module
    native_tally = _native.NativeTally
    assert native_tally is not None
    if _native.FAST_PATH == "native":
        key = cp.Key.generate("aes-256-gcm")
        planes["native"].encrypt(key, b"abcd", nonce=NONCE)
        assert type(key.session_hint.tally) is native_tally
        assert key.session_hint.counts() == [("encrypt", 1, 4)]


@pytest.mark.parametrize("kind", ["python", "subclass", "missing", "broken"])
def test_trampoline_with_other_tallies(fresh_planes: dict[str, Plane], kind: str) -> None:
    """A session whose tally is not exactly the C Tally: the trampoline calls its
    ``add`` the Python way, as the Python method does; errors are the same too."""

    class Odd(_native.PythonTally):
        __slots__ = ()

    class Broken:
        def add(self, op: int, n: int) -> None:
            raise RuntimeError(f"cannot count {op} {n}")

    got = {}
    material = cp.Key.generate("aes-256-gcm").export_raw()
    for name, p in fresh_planes.items():
        key = cp.Key("aes-256-gcm", material)
        p.encrypt(key, b"bind", nonce=NONCE)
        s = key.session_hint
        if kind == "missing":
            del s.tally
        else:
            s.tally = {"python": _native.PythonTally, "subclass": Odd,
                       "broken": Broken}[kind]()
        results = []
        for data in (b"", b"x" * 10, bytearray(5)):
            results.append(outcome(functools.partial(p.encrypt, key, data, nonce=NONCE)))
            ct = p._encrypt_py(key, bytes(data), nonce=NONCE) if kind in (
                "python", "subclass") else b"z" * 17
            results.append(outcome(functools.partial(p.decrypt, key, ct, nonce=NONCE)))
        got[name] = (results, s.counts() if kind in ("python", "subclass") else None)
    assert got["native"] == got["python"]
    if kind in ("python", "subclass"):
        assert got["native"][1] == [("encrypt", 6, 30), ("decrypt", 3, 63)]
    else:
        assert got["native"][0][0][1] in (AttributeError, RuntimeError)


def test_tally_counts_not_leaking(planes: dict[str, Plane]) -> None:
    """Counting in place allocates nothing: memory stays flat over many calls."""
    native = planes["native"]
    key = cp.Key.generate("aes-256-gcm")
    data = os.urandom(1000)
    for _ in range(100):
        native.encrypt(key, data, nonce=NONCE)
    tally = key.session_hint.tally
    refs = sys.getrefcount(tally)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5000):
            native.encrypt(key, data, nonce=NONCE)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024
    assert sys.getrefcount(tally) == refs
    assert key.session_hint.counts() == [("encrypt", 5100, 5_100_000)]
