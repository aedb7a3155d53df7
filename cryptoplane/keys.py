"""Keys: material bound to one algorithm, checked once, never shown.

A ``Key`` validates its material against the catalogue when it is made (sizes, equal XTS
halves, RSA modulus bits, the curve) so engines never meet a bad key. Its ``repr``,
``str`` and error messages carry the algorithm and a random handle, never the material or
anything derived from it; pickling is refused so a key cannot leak through a log handler
or a multiprocessing queue by accident (engines that cross process boundaries export it
explicitly).
"""

from __future__ import annotations

import hmac
import os
import secrets
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from .algorithms import Algorithm, Kind, lookup
from .exceptions import KeyRejected, NotSupported
from .kernels import Kernel, prepare

PrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    | x25519.X25519PrivateKey
)
PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    | x25519.X25519PublicKey
)
AsymmetricKey = PrivateKey | PublicKey

_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
}


class Unbound:
    """What ``Key.session_hint`` holds before any plane has seen the key: no plane's fast
    path admits it (its ``fast_plane`` is no plane), so the first call takes the slow path
    and makes a real session."""

    __slots__ = ()
    fast_plane = None
    plane = None
    engine = None


UNBOUND: Any = Unbound()


class Key:
    """Key material plus its algorithm.

    ``Key("aes-256-gcm", material)`` for raw symmetric keys (and raw Ed25519/X25519
    private keys); ``Key.generate(name)``; ``Key.load_pem``/``load_der`` for asymmetric
    keys; ``key.public_key()`` for the public half.
    """

    __slots__ = ("__weakref__", "_handle", "_kernel", "_material", "_obj", "_private",
                 "algorithm", "session_hint")

    algorithm: Algorithm
    _material: bytes | None
    _obj: AsymmetricKey | None
    _kernel: Kernel | None
    # The session of the last plane that bound this key, or UNBOUND: each plane's fast
    # path reads it (one slot load, in C too) and serves the call only when the session
    # is its own (``session_hint.fast_plane is plane``). Written by planes only.
    session_hint: Any
    _handle: str

    def __init__(self, algorithm: str | Algorithm, material: bytes | bytearray | memoryview):
        alg = lookup(algorithm)
        object.__setattr__(self, "algorithm", alg)
        self._kernel = None
        self.session_hint = UNBOUND
        self._handle = secrets.token_hex(4)
        self._obj = None
        self._material = None
        self._private = True  # symmetric, or the private half of a raw key pair
        raw = bytes(material)
        if alg.kind in (Kind.HASH, Kind.RNG):
            raise KeyRejected(f"{alg.name} takes no key")
        if alg.symmetric:
            _check_symmetric(alg, raw)
            self._material = raw
        elif alg.name == "ed25519":
            self._obj = _raw_private(alg, raw, ed25519.Ed25519PrivateKey.from_private_bytes)
        elif alg.name == "x25519":
            self._obj = _raw_private(alg, raw, x25519.X25519PrivateKey.from_private_bytes)
        else:
            raise KeyRejected(
                f"{alg.name} keys have no raw form: use Key.load_pem/load_der or generate"
            )

    # -- construction -------------------------------------------------------------------

    @classmethod
    def _from_object(cls, alg: Algorithm, obj: AsymmetricKey) -> Key:
        key = cls.__new__(cls)
        object.__setattr__(key, "algorithm", alg)
        key._kernel = None
        key.session_hint = UNBOUND
        key._handle = secrets.token_hex(4)
        key._material = None
        _check_asymmetric(alg, obj)
        key._obj = obj
        # once: every Sign request asks, and the isinstance checks against
        # cryptography's key ABCs cost ~0.5 µs each time
        key._private = not _is_public(obj)
        return key

    @classmethod
    def from_cryptography(cls, algorithm: str | Algorithm, obj: AsymmetricKey) -> Key:
        """Wrap a key object made by ``cryptography`` (checked against the algorithm)."""
        return cls._from_object(lookup(algorithm), obj)

    @classmethod
    def generate(cls, algorithm: str | Algorithm, *, size: int | None = None) -> Key:
        """A fresh key from the OS CSPRNG. ``size``: bytes for symmetric keys, modulus
        bits for RSA (default 2048)."""
        alg = lookup(algorithm)
        if alg.symmetric:
            n = size if size is not None else alg.default_key_size
            while True:
                material = os.urandom(n)
                if alg.mode != "xts" or material[: n // 2] != material[n // 2 :]:
                    return cls(alg, material)
        obj: PrivateKey
        if alg.key_bits is not None:
            bits = size or 2048
            if bits not in alg.key_bits:
                raise KeyRejected(f"{alg.name} needs a {alg.describe_key_sizes()}, not {bits}")
            obj = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        elif alg.curve in _CURVES:
            obj = ec.generate_private_key(_CURVES[alg.curve]())
        elif alg.name == "ed25519":
            obj = ed25519.Ed25519PrivateKey.generate()
        elif alg.name == "x25519":
            obj = x25519.X25519PrivateKey.generate()
        else:
            raise KeyRejected(f"{alg.name} takes no key")
        return cls._from_object(alg, obj)

    @classmethod
    def load_pem(cls, algorithm: str | Algorithm, data: bytes,
                 password: bytes | None = None) -> Key:
        """A private or public key in PEM (PKCS#8, SubjectPublicKeyInfo, PKCS#1, SEC1)."""
        return cls._load(algorithm, data, password, pem=True)

    @classmethod
    def load_der(cls, algorithm: str | Algorithm, data: bytes,
                 password: bytes | None = None) -> Key:
        return cls._load(algorithm, data, password, pem=False)

    @classmethod
    def _load(cls, algorithm: str | Algorithm, data: bytes, password: bytes | None,
              *, pem: bool) -> Key:
        alg = lookup(algorithm)
        if alg.symmetric:
            raise KeyRejected(f"{alg.name} keys are raw bytes: use Key({alg.name!r}, material)")
        load_priv = (serialization.load_pem_private_key if pem
                     else serialization.load_der_private_key)
        load_pub = (serialization.load_pem_public_key if pem
                    else serialization.load_der_public_key)
        obj: Any
        try:
            obj = load_priv(data, password=password)
        except TypeError as e:  # password missing or given for an unencrypted key
            raise KeyRejected(f"cannot load {alg.name} key: {e}") from None
        except ValueError:
            try:
                obj = load_pub(data)
            except (ValueError, TypeError):
                what = "PEM" if pem else "DER"
                raise KeyRejected(
                    f"cannot load {alg.name} key: not a valid {what} private or public key "
                    "(or wrong password)"
                ) from None
        except Exception as e:  # UnsupportedAlgorithm and friends
            raise KeyRejected(f"cannot load {alg.name} key: {type(e).__name__}") from None
        return cls._from_object(alg, obj)

    # -- properties and export ----------------------------------------------------------

    @property
    def is_private(self) -> bool:
        """True for symmetric keys and private halves of key pairs."""
        return self._private

    @property
    def size(self) -> int:
        """Key size in bits (the modulus for RSA, the curve order's size for EC)."""
        if self._material is not None:
            return len(self._material) * 8
        obj = self._obj
        if isinstance(obj, (rsa.RSAPrivateKey, rsa.RSAPublicKey,
                            ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
            return obj.key_size if not hasattr(obj, "curve") else obj.curve.key_size
        return 256

    def public_key(self) -> Key:
        """The public half of a key pair (a new ``Key`` of the same algorithm)."""
        obj = self._obj
        if obj is None:
            raise KeyRejected(f"{self.algorithm.name} is symmetric: there is no public half")
        if _is_public(obj):
            return self
        return Key._from_object(self.algorithm, obj.public_key())  # type: ignore[union-attr]

    def export_raw(self) -> bytes:
        """Raw bytes: symmetric material, or raw Ed25519/X25519 private/public keys."""
        if self._material is not None:
            return self._material
        obj = self._obj
        if isinstance(obj, (ed25519.Ed25519PrivateKey, x25519.X25519PrivateKey)):
            return obj.private_bytes_raw()
        if isinstance(obj, (ed25519.Ed25519PublicKey, x25519.X25519PublicKey)):
            return obj.public_bytes_raw()
        raise KeyRejected(f"{self.algorithm.name} keys have no raw form: export PEM or DER")

    def export_pem(self, password: bytes | None = None) -> bytes:
        """PKCS#8 (private, encrypted when ``password`` is given) or SubjectPublicKeyInfo."""
        return self._export(serialization.Encoding.PEM, password)

    def export_der(self, password: bytes | None = None) -> bytes:
        return self._export(serialization.Encoding.DER, password)

    def _export(self, encoding: serialization.Encoding, password: bytes | None) -> bytes:
        obj = self._obj
        if obj is None:
            raise KeyRejected(f"{self.algorithm.name} is symmetric: use export_raw()")
        if _is_public(obj):
            return obj.public_bytes(  # type: ignore[union-attr]
                encoding, serialization.PublicFormat.SubjectPublicKeyInfo)
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password
            else serialization.NoEncryption()
        )
        return obj.private_bytes(  # type: ignore[union-attr]
            encoding, serialization.PrivateFormat.PKCS8, enc
        )

    def cryptography_key(self) -> AsymmetricKey:
        """The underlying ``cryptography`` key object (hazardous: no checks beyond here)."""
        if self._obj is None:
            raise KeyRejected(f"{self.algorithm.name} is symmetric")
        return self._obj

    # -- never show material ------------------------------------------------------------

    def __repr__(self) -> str:
        part = "private" if self._obj is not None and self.is_private else (
            "public" if self._obj is not None else "secret")
        return f"<Key {self.algorithm.name} {self.size}-bit {part} #{self._handle}>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError(
            "cryptoplane Key objects are not picklable (that would copy key material into "
            "logs or queues); export it explicitly with export_raw()/export_pem()"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "algorithm":
            raise AttributeError("a Key's algorithm cannot change")
        object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Key) or other.algorithm is not self.algorithm:
            return NotImplemented
        if self._material is not None and other._material is not None:
            return hmac.compare_digest(self._material, other._material)
        return self is other

    __hash__ = object.__hash__

    def kernel(self) -> Kernel:
        """The key prepared for in-process use (key schedule done once, then cached)."""
        k = self._kernel
        if k is None:
            material = self._material if self._material is not None else self._obj
            assert material is not None  # every key holds one or the other
            k = self._kernel = prepare(self.algorithm, material)
        return k


def _is_public(obj: object) -> bool:
    return isinstance(obj, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey,
                            ed25519.Ed25519PublicKey, x25519.X25519PublicKey))


def _check_symmetric(alg: Algorithm, raw: bytes) -> None:
    ks = alg.key_sizes
    if ks is None or len(raw) not in ks:
        sizes = alg.describe_key_sizes()
        raise KeyRejected(f"{alg.name} needs a key of {sizes}, got {len(raw)} bytes")
    if alg.mode == "xts":
        half = len(raw) // 2
        # constant time: the comparison must not tell how much of the key repeats
        if hmac.compare_digest(raw[:half], raw[half:]):
            raise KeyRejected(f"{alg.name} key halves are equal (XTS forbids it)")


def _raw_private(alg: Algorithm, raw: bytes, loader: Any) -> AsymmetricKey:
    if len(raw) != 32:
        raise KeyRejected(f"{alg.name} raw private keys are 32 bytes, got {len(raw)}")
    obj: AsymmetricKey = loader(raw)
    return obj


def _check_asymmetric(alg: Algorithm, obj: Any) -> None:
    ok: bool
    if alg.key_bits is not None:
        ok = isinstance(obj, (rsa.RSAPrivateKey, rsa.RSAPublicKey))
        if ok:
            bits = obj.key_size  # type: ignore[union-attr]
            if bits not in alg.key_bits:
                raise KeyRejected(
                    f"{alg.name} needs a {alg.describe_key_sizes()}, got {bits} bits"
                )
    elif alg.curve in _CURVES:
        ok = isinstance(obj, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey))
        if ok and obj.curve.name != alg.curve:  # type: ignore[union-attr]
            raise KeyRejected(
                f"{alg.name} needs a {alg.curve} key, got "
                f"{obj.curve.name}"  # type: ignore[union-attr]
            )
    elif alg.name == "ed25519":
        ok = isinstance(obj, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey))
    elif alg.name == "x25519":
        ok = isinstance(obj, (x25519.X25519PrivateKey, x25519.X25519PublicKey))
    else:
        raise NotSupported(f"{alg.name} has no asymmetric keys")
    if not ok:
        raise KeyRejected(f"{alg.name} cannot use a {type(obj).__name__.lstrip('_')}")
