"""Offload sessions (wire protocol section 4.4): a client's own key, held in the server's
memory for the life of one connection, and the raw plane operations on it.

The remote engine (``cryptoplane.fabric.Remote``) sends its key once (SESSION_OPEN:
a plane catalogue algorithm and the material: raw bytes for symmetric keys, PKCS#8 or
SubjectPublicKeyInfo DER for key pairs, or a raw 32-byte Ed25519/X25519 private key),
then RAW_* requests naming the session. Answers are the server plane's, the same OpenSSL
calls a local plane makes, so they are byte for byte what the caller's own plane gives.
Nothing is stored; the keys go with the connection. At most ``MAX_SESSIONS`` per
connection. Each session's algorithm class (``capacity.class_of_session``) is fixed at
SESSION_OPEN, so a grant charges RAW_* requests without looking at the key again.
"""

from __future__ import annotations

from typing import Final

from ..algorithms import lookup
from ..exceptions import InvalidRequest, KeyRejected, QuotaExceeded
from ..keys import Key
from ..plane import Plane
from . import codec as C
from .capacity import FREE, class_of_session
from .codec import Field, Op
from .dispatch import BIG, INLINE, WORKER, field

MAX_SESSIONS: Final = 1024
RAW_KEYS: Final = frozenset({"ed25519", "x25519"})


class Sessions:
    """One connection's session keys, numbered from 1."""

    __slots__ = ("_classes", "_keys", "_next", "plane")

    def __init__(self, plane: Plane) -> None:
        self.plane = plane
        self._keys: dict[int, Key] = {}
        self._classes: dict[int, str] = {}
        self._next = 1

    def __len__(self) -> int:
        return len(self._keys)

    def clear(self) -> None:
        self._keys.clear()
        self._classes.clear()

    def open(self, f: dict[int, bytes]) -> bytes:
        if len(self._keys) >= MAX_SESSIONS:
            raise QuotaExceeded(f"at most {MAX_SESSIONS} sessions per connection")
        name = C.get_text(f, Field.ALGORITHM)
        material = f.get(Field.KEY)
        if material is None:
            raise InvalidRequest("SESSION_OPEN needs KEY")
        alg = lookup(name)
        if alg.symmetric or (alg.name in RAW_KEYS and len(material) == 32):
            key = Key(alg, material)
        else:
            key = Key.load_der(alg, material)
        sid = self._next
        self._next = sid + 1 if sid < 0xFFFFFFFF else 1
        self._keys[sid] = key
        self._classes[sid] = class_of_session(
            alg.name, key.size if alg.name.startswith("rsa-") else 0)
        return field(Field.SESSION, C.u32(sid))

    def close(self, f: dict[int, bytes]) -> bytes:
        sid = C.get_u32(f, Field.SESSION)
        self._classes.pop(sid, None)
        if self._keys.pop(sid, None) is None:
            raise KeyRejected(f"no session {sid} on this connection")
        return b""

    def key(self, f: dict[int, bytes]) -> Key:
        sid = C.get_u32(f, Field.SESSION)
        key = self._keys.get(sid)
        if key is None:
            raise KeyRejected(f"no session {sid} on this connection")
        return key

    def class_of(self, f: dict[int, bytes]) -> str:
        """The algorithm class of a RAW_* request (FREE: no such session; the request
        is then answered with that error)."""
        return self._classes.get(C.get_u32(f, Field.SESSION, 0), FREE)

    def where(self, op: int, f: dict[int, bytes]) -> int:
        """INLINE or WORKER for a raw op: key pairs and big payloads go to a worker."""
        if op in (Op.SESSION_OPEN, Op.SESSION_CLOSE):
            return INLINE
        key = self._keys.get(C.get_u32(f, Field.SESSION, 0))
        if key is None:
            return INLINE  # answered at once with the error
        if not key.algorithm.symmetric or len(f.get(Field.DATA, b"")) >= BIG:
            return WORKER
        return INLINE


def run_raw(plane: Plane, key: Key, op: int, f: dict[int, bytes]) -> bytes:
    """One raw operation on a session key (any thread)."""
    data = f.get(Field.DATA)
    if data is None:
        raise InvalidRequest("missing field DATA")
    if op == Op.RAW_ENCRYPT:
        return field(Field.DATA, plane.encrypt(key, data, f.get(Field.NONCE), f.get(Field.AAD)))
    if op == Op.RAW_DECRYPT:
        return field(Field.DATA, plane.decrypt(key, data, f.get(Field.NONCE), f.get(Field.AAD)))
    if op == Op.RAW_SIGN:
        return field(Field.SIGNATURE, plane.sign(key, data))
    if op == Op.RAW_VERIFY:
        sig = f.get(Field.SIGNATURE)
        if sig is None:
            raise InvalidRequest("missing field SIGNATURE")
        plane.verify(key, data, sig)
        return b""
    if op == Op.RAW_MAC:
        size = C.get_u32(f, Field.TAG_SIZE, 0)
        return field(Field.MAC, plane.mac(key, data, tag_size=size or None))
    if op == Op.RAW_VERIFY_MAC:
        tag = f.get(Field.MAC)
        if tag is None:
            raise InvalidRequest("missing field MAC")
        plane.verify_mac(key, data, tag)
        return b""
    raise InvalidRequest(f"op {op} is not a raw session operation")
