"""What a request becomes on a fabric connection: scope, expiry and rate checks, the hot
ENCRYPT path, inline operations, and the hand-off of slow ones to worker threads.

``Handling`` is the request half of ``connection.Connection``, which adds the
transport, the handshake and flow control (``streaming.Streaming`` sits between them).
Per request: one dict lookup for the op (``dispatch.OPS``), the scope check cached per
connection (key name, op), the rate limits' ``admit``, and either the answer at once,
appended to the receive's list of answers, or a job for the workers. ENCRYPT of one
DATA field under a plain AEAD key takes ``_encrypt_fast``: the key's usable version is
looked up once per receive, nonces are drawn 512 at a time, the answer is packed with
one struct. No per-request future, log line or lookup beyond these.

Grants (``grants``): a connection that presented one has its ``GrantEntry`` in
``grant``, and each data request is charged to it for its algorithm class before the
tenant limits are (a refusal charges neither): the class of a transit op is its key's
(``server.key_classes``, filled from the key cache once per key), of a RAW_* op its
session's (fixed at SESSION_OPEN), of stream pieces ``aead`` in bytes. Without a grant
``grant`` is None and the fast paths pay one attribute check.
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any, Final, Protocol

from ..exceptions import InvalidRequest
from ..offload import Offloader
from . import codec as C
from .auth import Principal
from .capacity import AEAD, FREE, KEYED_DATA_OPS, RAW_OPS, class_of_key_type
from .codec import Field, FrameType, Op, Status
from .dispatch import (
    ADMIN,
    BIG,
    INLINE,
    OPS,
    SESSION_OPS,
    STREAM_OPS,
    WORKER,
    OpSpec,
    error_answer,
    run_batch,
)
from .errors import ProtocolError, ShuttingDown
from .grants import GrantEntry
from .service import Service
from .sessions import Sessions, run_raw

_pack = C.HEADER.pack
_VERSION: Final = C.VERSION
RESPONSE: Final = int(FrameType.RESPONSE)
BATCH_RESPONSE: Final = int(FrameType.BATCH_RESPONSE)
ENCRYPT: Final = int(Op.ENCRYPT)
DECRYPT: Final = int(Op.DECRYPT)
TENANT_LIMITS: Final = int(Op.TENANT_LIMITS)
GRANT_PRESENT: Final = int(Op.GRANT_PRESENT)
# ops a grant is charged for (when their class is not FREE)
CHARGED: Final = frozenset(int(op) for op in KEYED_DATA_OPS | RAW_OPS)
_AFTER_LENGTH: Final = C.HEADER_SIZE - 4
# a RESPONSE header and its first field's head, packed at once (the hot path's answer)
_pack_field_answer = struct.Struct("!IBBHQHHHHBI").pack
_VERSION_FIELD: Final = bytes((Field.VERSION,)) + (4).to_bytes(4, "big")
NONCE_POOL: Final = 12 * 512
_COPY_LIMIT: Final = 16 * 1024  # answers up to this size are joined to their header
STATUS_NAMES: Final = {int(s): s.name.lower() for s in Status}
SHUTDOWN_RETRY: Final = 0.001  # RETRY_AFTER of SHUTTING_DOWN: at once, elsewhere


class Host(Protocol):
    """What a connection needs of its server (``server.Server`` is one)."""

    service: Service
    connections: set[Any]
    names: dict[bytes, str]
    key_classes: dict[tuple[str, str], str]
    stopping: bool
    max_connections: int
    max_frame: int
    max_in_flight: int
    max_in_flight_bytes: int
    write_high_water: int

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def workers(self) -> Offloader: ...
    @property
    def admin(self) -> Offloader: ...
    @property
    def auth(self) -> Offloader: ...
    def remember_name(self, raw: bytes, name: str) -> None: ...
    def remember_class(self, tenant: str, name: str, cls: str) -> None: ...
    def charge(self, nbytes: int) -> bool: ...
    def release(self, nbytes: int) -> None: ...
    def starving(self, conn: Any) -> None: ...
    def kind_of(self, transport: Any) -> str: ...
    def connection_gone(self) -> None: ...


class Handling:
    """The request half of a connection (see the module docstring). The attributes are
    set by ``Connection.__init__``."""

    server: Host
    svc: Service
    transit: Any
    admit: Any
    principal: Principal | None
    tenant: str
    label: str
    allowed: dict[tuple[str, str | None], bool]
    out: list[Any]
    out_bytes: int
    ids: set[int]
    inflight: int
    inflight_bytes: int
    draining: bool
    sessions: Sessions | None
    counts: dict[tuple[int, int], list[int]]
    hot: dict[bytes, tuple[Any, bytes, int, str, bytes]]
    hot_dec: dict[tuple[bytes, int], tuple[Any, str]]
    nonces: bytes
    npos: int
    encrypt: Any
    decrypt: Any
    record_use: Any
    grant: GrantEntry | None

    # what the connection provides
    def _fatal(self, fid: int, message: str, ftype: int = RESPONSE,
               status: int = Status.PROTOCOL_ERROR) -> None:
        raise NotImplementedError

    def _pause(self) -> None:
        raise NotImplementedError

    def starve(self) -> None:
        raise NotImplementedError

    def completed(self, token: Any, result: Any, error: BaseException | None) -> None:
        raise NotImplementedError

    def settle(self) -> None:
        raise NotImplementedError

    def _open_stream(self, f: C.Frame, name: str, fields: dict[int, bytes],
                     out: list[Any]) -> None:
        raise NotImplementedError


    def _answer(self, out: list[Any], fid: int, op: int, status: int, payload: bytes,
                ftype: int = RESPONSE) -> None:
        n = len(payload)
        self.out_bytes += n
        head = _pack(_AFTER_LENGTH + n, _VERSION, ftype, 0, fid, op, status, 0, 0)
        if n <= _COPY_LIMIT:
            out.append(head + payload)
        else:
            out.append(head)
            out.append(payload)

    def _count(self, op: int, status: int, nbytes: int, items: int = 0) -> None:
        row = self.counts.get((op, status))
        if row is None:
            self.counts[op, status] = [1, nbytes, items]
        else:
            row[0] += 1
            row[1] += nbytes
            row[2] += items

    def _flush_counts(self) -> None:
        count = self.svc.metrics.count
        tenant = self.tenant or "-"
        for (op, status), (n, nbytes, items) in self.counts.items():
            spec = OPS.get(op)
            if spec is not None:
                count(tenant, spec.name, STATUS_NAMES.get(status, "internal"), n, nbytes,
                      items)
        self.counts.clear()

    def _error(self, out: list[Any], fid: int, op: int, exc: BaseException) -> None:
        status, payload = error_answer(exc)
        self._answer(out, fid, op, status, payload)
        self._count(op, status, 0)

    def _encrypt_fast(self, f: C.Frame, out: list[Any]) -> bool:
        """ENCRYPT of one DATA field with a plain AEAD key, in scope, not draining: the
        hot path. False: take the general one (``Transit.encrypt``, same result).

        What it saves over the general path: the key's usable version is looked up once
        per receive (``hot``), nonces come from one ``os.urandom`` per 512 requests, and
        the answer is packed with one struct and joined once."""
        p = f.payload
        n = len(p) - 5
        if (n < 0 or n >= BIG or p[0] != 1 or int.from_bytes(p[1:5], "big") != n
                or self.draining or f.id in self.ids):
            return False
        hot = self.hot.get(f.key)
        if hot is None:
            hot = self._heat(f.key)
            if hot is None:
                return False
        aead, header, version, name, tail = hot
        g = self.grant
        if g is not None:
            try:
                if g.admit(AEAD, 1, n):
                    return False  # charged nothing; the general path answers THROTTLED
            except Exception:
                return False  # and UNAUTHORIZED, FORBIDDEN
        principal = self.principal
        assert principal is not None
        if self.admit(principal, 1, n):
            if g is not None:
                g.refund(AEAD, 1, n)
            return False  # the general path answers THROTTLED
        pos = self.npos
        if pos >= NONCE_POOL:
            self.nonces = os.urandom(NONCE_POOL)
            pos = 0
        nonce = self.nonces[pos:pos + 12]
        self.npos = pos + 12
        try:
            ct = self.encrypt(aead, p[5:], nonce, b"")
        except Exception:
            if g is not None:
                g.refund(AEAD, 1, n)
            return False  # the general path says why
        self.record_use(self.tenant, name, version, "encrypt", n, self.label)
        out.append(b"".join((_pack_field_answer(_AFTER_LENGTH + len(ct) + 31, _VERSION,
                                                RESPONSE, 0, f.id, ENCRYPT, 0, 0, 0, 2,
                                                len(ct) + 17),
                             header, nonce, ct, tail)))
        row = self.counts.get((ENCRYPT, 0))
        if row is None:
            self.counts[ENCRYPT, 0] = [1, n, 0]
        else:
            row[0] += 1
            row[1] += n
        return True

    def _heat(self, key: bytes) -> tuple[Any, bytes, int, str, bytes] | None:
        """The hot path's view of a key, for this receive: None when it does not apply
        (a derived or non-AEAD key, out of scope, not found: the general path answers)."""
        name = self.server.names.get(key)
        if name is None or ("encrypt", name) not in self.allowed:
            return None
        try:
            ver = self.transit.ring(self.tenant, name).fast
        except Exception:
            return None
        if ver is None or ver.aead is None:
            return None
        hot = (ver.aead, ver.ct_header, ver.number, name,
               _VERSION_FIELD + ver.number.to_bytes(4, "big"))
        self.hot[key] = hot
        return hot

    def _decrypt_fast(self, f: C.Frame, out: list[Any]) -> bool:
        """DECRYPT of one CIPHERTEXT field (a transit blob) under a plain AEAD key: the
        version's key found once per receive and version, no field parser. False (also
        when the tag does not verify): the general path answers, with the same result."""
        p = f.payload
        n = len(p) - 5
        if (n < 33 or n >= BIG or p[0] != 2 or p[5] != 0xC7
                or int.from_bytes(p[1:5], "big") != n or self.draining or f.id in self.ids):
            return False
        v = int.from_bytes(p[6:10], "big")
        hot = self.hot_dec.get((f.key, v))
        if hot is None:
            name = self.server.names.get(f.key)
            if name is None or ("decrypt", name) not in self.allowed:
                return False
            try:
                ring = self.transit.ring(self.tenant, name)
                if ring.fast is None:
                    return False
                aead = ring.for_check(v).aead
            except Exception:
                return False
            hot = self.hot_dec[f.key, v] = (aead, name)
        aead, name = hot
        g = self.grant
        if g is not None:
            try:
                if g.admit(AEAD, 1, n):
                    return False
            except Exception:
                return False
        principal = self.principal
        assert principal is not None
        if self.admit(principal, 1, n):
            if g is not None:
                g.refund(AEAD, 1, n)
            return False
        try:
            pt = self.decrypt(aead, p[22:], p[10:22], b"")
        except Exception:
            if g is not None:
                g.refund(AEAD, 1, n)
            return False
        m = len(pt)
        self.record_use(self.tenant, name, v, "decrypt", m, self.label)
        out.append(_pack_field_answer(_AFTER_LENGTH + m + 5, _VERSION, RESPONSE, 0, f.id,
                                      DECRYPT, 0, 0, 0, 1, m) + pt)
        row = self.counts.get((DECRYPT, 0))
        if row is None:
            self.counts[DECRYPT, 0] = [1, n, 0]
        else:
            row[0] += 1
            row[1] += n
        return True

    def _check(self, spec: OpSpec, f: C.Frame) -> str:
        """The key name, once scope and shutdown are checked (raises the error)."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another server")
        if spec.keyed:
            key = f.key
            if not key:
                raise InvalidRequest(f"{spec.name} needs a key name")
            name = self.server.names.get(key)
            if name is None:
                try:
                    name = key.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidRequest("the key reference is not UTF-8") from None
                self.server.remember_name(key, name)
        else:
            name = ""
        scope = (spec.scope, name or None)
        if scope not in self.allowed:
            assert self.principal is not None
            self.principal.check(spec.scope, name or None)
            if len(self.allowed) < 4096:
                self.allowed[scope] = True
        return name

    def _request(self, f: C.Frame, out: list[Any]) -> None:
        fid, op = f.id, f.op
        spec = OPS.get(op)
        if spec is None:
            if op == GRANT_PRESENT:
                self._grant_present(f, out)
                return
            self._answer(out, fid, op, Status.NOT_SUPPORTED,
                         C.error_fields(f"unknown operation {op}"))
            return
        if fid in self.ids:
            self._fatal(fid, f"request id {fid} is already in flight")
            return
        try:
            name = self._check(spec, f)
            assert self.principal is not None
            g = self.grant
            cls = FREE
            if g is not None and op in CHARGED:
                fields = C.decode_fields(f.payload)
                cls = self._charge_class(op, name, fields)
                if cls != FREE:
                    self._grant_admit(g, cls, 1, len(f.payload))
            else:
                fields = None
            # an operator lifting a limit must not be refused by it
            wait = self.admit(self.principal, 1, len(f.payload)) if op != TENANT_LIMITS else 0
            if wait:
                if cls != FREE:
                    assert g is not None
                    g.refund(cls, 1, len(f.payload))
                raise C.error_for(Status.THROTTLED, "rate limit exceeded", wait)
            if fields is None:
                fields = C.decode_fields(f.payload)
            if op in SESSION_OPS:
                self._session(f, fields, out)
                return
            if op in STREAM_OPS:
                self._open_stream(f, name, fields, out)
                return
            where = spec.where
            if where == INLINE and len(f.payload) >= BIG:
                where = WORKER
            if where == INLINE:
                assert spec.run is not None
                answer = spec.run(self.svc, self.tenant, name, fields, self.label)
                self._answer(out, fid, op, 0, answer)
                self._count(op, 0, len(f.payload))
                return
        except Exception as e:
            if isinstance(e, ShuttingDown):
                self._answer(out, fid, op, Status.SHUTTING_DOWN,
                             C.error_fields(str(e), SHUTDOWN_RETRY))
                self._count(op, Status.SHUTTING_DOWN, 0)
                return
            self._error(out, fid, op, e)
            return
        assert spec.run is not None
        self._submit(where, spec.run, (self.svc, self.tenant, name, fields, self.label),
                     ("req", fid, op, len(f.payload), 0))

    def _submit(self, where: int, fn: Any, args: tuple[Any, ...], token: tuple[Any, ...]
                ) -> None:
        self.ids.add(token[1])
        self.inflight += 1
        self.inflight_bytes += token[3]
        over = self.server.charge(token[3])
        pool = self.server.admin if where == ADMIN else self.server.workers
        pool.submit(fn, args, self, token)
        if over:
            self.starve()
        elif (self.inflight >= self.server.max_in_flight
                or self.inflight_bytes >= self.server.max_in_flight_bytes):
            self._pause()

    def _batch(self, f: C.Frame, out: list[Any]) -> None:
        fid, op = f.id, f.op
        spec = OPS.get(op)
        if spec is None or (spec.batch is None and (spec.run is None or spec.where == ADMIN)):
            self._answer(out, fid, op, Status.NOT_SUPPORTED,
                         C.error_fields(f"operation {op} cannot be batched"))
            return
        if fid in self.ids:
            self._fatal(fid, f"request id {fid} is already in flight")
            return
        try:
            name = self._check(spec, f)
            try:
                items = C.decode_batch(f.payload)
            except ProtocolError as e:  # the frame was sound: refuse the batch only
                raise InvalidRequest(str(e)) from None
            assert self.principal is not None
            g = self.grant
            cls = FREE
            if g is not None and op in CHARGED:
                cls = self._key_class(op, name)
                if cls != FREE:
                    self._grant_admit(g, cls, len(items), len(f.payload))
            wait = self.admit(self.principal, len(items), len(f.payload))
            if wait:
                if cls != FREE:
                    assert g is not None
                    g.refund(cls, len(items), len(f.payload))
                raise C.error_for(Status.THROTTLED, "rate limit exceeded", wait)
            if spec.where == INLINE and len(f.payload) < BIG:
                answer = run_batch(self.svc, self.tenant, spec, name, items, self.label)
                self._answer(out, fid, op, 0, answer, BATCH_RESPONSE)
                self._count(op, 0, len(f.payload), len(items))
                return
        except Exception as e:
            if isinstance(e, ShuttingDown):
                self._answer(out, fid, op, Status.SHUTTING_DOWN,
                             C.error_fields(str(e), SHUTDOWN_RETRY))
                return
            self._error(out, fid, op, e)
            return
        self._submit(WORKER, run_batch, (self.svc, self.tenant, spec, name, items, self.label),
                     ("batch", fid, op, len(f.payload), len(items)))

    # ---- grants ------------------------------------------------------------------------

    def _grant_admit(self, g: GrantEntry, cls: str, ops: int, nbytes: int) -> None:
        """Charge ``ops``/``nbytes`` of ``cls`` to the grant, or raise THROTTLED (or the
        grant's UNAUTHORIZED, FORBIDDEN) and charge nothing."""
        wait = g.admit(cls, ops, nbytes)
        if wait:
            raise C.error_for(Status.THROTTLED, f"grant rate for {cls} exceeded", wait)

    def _key_class(self, op: int, name: str) -> str:
        """The algorithm class of a transit op on key ``name`` (its type, remembered
        per server: the key cache is asked once per key)."""
        if op not in KEYED_DATA_OPS:
            return FREE
        cls = self.server.key_classes.get((self.tenant, name))
        if cls is None:
            cls = class_of_key_type(self.transit.ring(self.tenant, name).type.value)
            self.server.remember_class(self.tenant, name, cls)
        return cls

    def _charge_class(self, op: int, name: str, fields: dict[int, bytes]) -> str:
        if op in RAW_OPS:
            s = self.sessions
            return FREE if s is None else s.class_of(fields)
        return self._key_class(op, name)

    def _grant_present(self, f: C.Frame, out: list[Any]) -> None:
        """GRANT_PRESENT: ``{"grant": token}`` replaces the connection's grant (a
        renewal, or a first grant after HELLO); refused UNAUTHORIZED, the old one
        stays."""
        table = self.svc.grants
        if table is None:
            self._answer(out, f.id, f.op, Status.NOT_SUPPORTED,
                         C.error_fields("this server does not enforce grants"))
            return
        try:
            token = C.get_json(C.decode_fields(f.payload)).get("grant")
            if not isinstance(token, str):
                raise InvalidRequest('GRANT_PRESENT takes {"grant": "<token>"}')
            entry = table.present(token, self.tenant)
        except Exception as e:
            self._error(out, f.id, f.op, e)
            return
        self.grant = entry
        self._answer(out, f.id, f.op, 0, C.json_field(
            {"grant_id": entry.grant_id, "expires_at": entry.expires_at}))

    # ---- offload sessions ------------------------------------------------------------

    def _session(self, f: C.Frame, fields: dict[int, bytes], out: list[Any]) -> None:
        s = self.sessions
        if s is None:
            s = self.sessions = Sessions(self.svc.plane)
        op = f.op
        if op == Op.SESSION_OPEN:
            answer = s.open(fields)
        elif op == Op.SESSION_CLOSE:
            answer = s.close(fields)
        else:
            key = s.key(fields)
            if s.where(op, fields) != INLINE:
                self._submit(WORKER, run_raw, (self.svc.plane, key, op, fields),
                             ("req", f.id, op, len(f.payload), 0))
                return
            answer = run_raw(self.svc.plane, key, op, fields)
        self._answer(out, f.id, op, 0, answer)
        self._count(op, 0, len(f.payload))

