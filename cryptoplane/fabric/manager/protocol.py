"""The manager's messages: what servers, clients and operators send it and what it
answers, as typed values with their JSON form. Sans-I/O: dicts in, values out, every
field checked (a manager is a network service; servers and clients trust its answers
only as far as these checks go).

The wire carries each as the one JSON field of a REQUEST/RESPONSE of the fabric
protocol (``docs/wire-protocol.md`` section 8, ``docs/fabric-manager.md``):

| op | request | answer |
|---|---|---|
| SERVER_REGISTER | ``Registration`` | ``Registered`` |
| SERVER_HEARTBEAT | ``Heartbeat`` (with ``tenants``) | ``HeartbeatAnswer`` |
| SERVER_LEAVE | ``{"server_id"}`` | ``{}`` |
| GRANT_REQUEST | ``QuotaRequest`` | ``GrantAnswer`` (``granted`` true or false) |
| GRANT_RENEW | ``{"grant_id"}`` | ``GrantAnswer`` |
| GRANT_RELEASE / GRANT_REVOKE | ``{"grant_id"}`` | ``{}`` |
| GRANT_LIST | ``{}`` | ``{"grants": [Grant...]}`` (no tokens) |
| FABRIC_STATUS | ``{}`` | ``PoolStatus`` JSON |
| WATCH | ``{"grant_ids": [...]}`` | ``{}`` |

A connection that requested, renewed or watched a grant gets EVENT frames about it:
``{"event": "moved", "grant": GrantAnswer JSON}`` (its servers changed: a server left),
``{"event": "revoked", "grant_id": ...}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ...exceptions import InvalidRequest
from ..capacity import CLASSES

# class -> {"ops": ops/s, "bytes": bytes/s}; 0 = not asked for / not measured
Rates = dict[str, dict[str, float]]

MODES: Final = ("spread", "fail-over")
DEFAULT_TTL: Final = 60.0  # seconds a grant lives unless renewed
MAX_TTL: Final = 3600.0
MAX_PRIORITY: Final = 7
MAX_HEARTBEAT_TENANTS: Final = 1024  # tenants one heartbeat may report


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or value < 0:
        raise InvalidRequest(f"{what} must be a finite number >= 0")
    return float(value)


def _str(obj: Mapping[str, Any], name: str, *, max_len: int = 256,
         default: str | None = None) -> str:
    value = obj.get(name, default)
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise InvalidRequest(f"{name!r} must be a string of 1-{max_len} characters")
    return value


def parse_rates(obj: Any, what: str, *, need_one: bool) -> Rates:
    """``{class: {"ops": n, "bytes": n}}`` checked: known classes, numbers >= 0; with
    ``need_one``, at least one rate above 0."""
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{what} must be an object of algorithm classes")
    rates: Rates = {}
    for cls, rate in obj.items():
        if cls not in CLASSES:
            raise InvalidRequest(f"{what}: unknown algorithm class {cls!r}; "
                                 f"one of {', '.join(CLASSES)}")
        if not isinstance(rate, dict) or not set(rate) <= {"ops", "bytes"}:
            raise InvalidRequest(f"{what}[{cls!r}] must be {{'ops': n, 'bytes': n}}")
        rates[cls] = {"ops": _num(rate.get("ops", 0), f"{what}[{cls!r}].ops"),
                      "bytes": _num(rate.get("bytes", 0), f"{what}[{cls!r}].bytes")}
    if need_one and not any(r["ops"] or r["bytes"] for r in rates.values()):
        raise InvalidRequest(f"{what} asks for nothing: give at least one rate above 0")
    return rates


def check_address(address: Any) -> str:
    """A server's address as clients will dial it: tcp://, tls:// or unix:// URL."""
    if not isinstance(address, str) or not address.startswith(
            ("tcp://", "tls://", "unix://")) or len(address) > 512:
        raise InvalidRequest("address must be a tcp://, tls:// or unix:// URL")
    return address


@dataclass(frozen=True)
class Registration:
    """A server joining the pool (SERVER_REGISTER). ``server_id`` is the server's own
    stable name (re-registering with it after a lapsed lease is allowed)."""

    server_id: str
    address: str
    capacity: Rates

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Registration:
        return cls(server_id=_str(obj, "server_id", max_len=128),
                   address=check_address(obj.get("address")),
                   capacity=parse_rates(obj.get("capacity"), "capacity", need_one=True))

    def to_json(self) -> dict[str, Any]:
        return {"server_id": self.server_id, "address": self.address,
                "capacity": self.capacity}


@dataclass(frozen=True)
class Registered:
    """The manager's answer: the lease, and the public keys grants are signed with
    (key id -> raw Ed25519 public key, base64)."""

    server_id: str
    lease_seconds: float
    manager_keys: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"server_id": self.server_id, "lease_seconds": self.lease_seconds,
                "manager_keys": self.manager_keys}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Registered:
        keys = obj.get("manager_keys")
        if not isinstance(keys, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
            raise InvalidRequest("manager_keys must map key ids to base64 public keys")
        return cls(server_id=_str(obj, "server_id"),
                   lease_seconds=_num(obj.get("lease_seconds"), "lease_seconds"),
                   manager_keys=dict(keys))


def parse_tenant_rates(obj: Any, what: str) -> dict[str, Rates]:
    """``{tenant: Rates}`` checked: at most ``MAX_HEARTBEAT_TENANTS`` tenants, names of
    1-128 characters, each value as ``parse_rates``."""
    if not isinstance(obj, dict):
        raise InvalidRequest(f"{what} must be an object of tenants")
    if len(obj) > MAX_HEARTBEAT_TENANTS:
        raise InvalidRequest(f"{what}: at most {MAX_HEARTBEAT_TENANTS} tenants")
    out: dict[str, Rates] = {}
    for tenant, rates in obj.items():
        if not isinstance(tenant, str) or not 1 <= len(tenant) <= 128:
            raise InvalidRequest(f"{what}: tenant names are strings of 1-128 characters")
        out[tenant] = parse_rates(rates, f"{what}[{tenant!r}]", need_one=False)
    return out


@dataclass(frozen=True)
class Heartbeat:
    """A server renewing its lease (SERVER_HEARTBEAT), with its load: the rates it
    served over the last interval, per class and per tenant (its busiest), and the
    requests it holds now."""

    server_id: str
    load: Rates
    inflight: int = 0
    tenants: dict[str, Rates] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Heartbeat:
        inflight = obj.get("inflight", 0)
        if isinstance(inflight, bool) or not isinstance(inflight, int) or inflight < 0:
            raise InvalidRequest("inflight must be an integer >= 0")
        return cls(server_id=_str(obj, "server_id", max_len=128),
                   load=parse_rates(obj.get("load", {}), "load", need_one=False),
                   inflight=inflight,
                   tenants=parse_tenant_rates(obj.get("tenants", {}), "tenants"))

    def to_json(self) -> dict[str, Any]:
        return {"server_id": self.server_id, "load": self.load, "inflight": self.inflight,
                "tenants": self.tenants}


@dataclass(frozen=True)
class HeartbeatAnswer:
    """``registered`` false: the lease had lapsed and the server was removed; it must
    register again. ``revoked``: grant ids servers should stop honouring at once."""

    registered: bool
    lease_seconds: float
    manager_keys: dict[str, str] = field(default_factory=dict)
    revoked: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"registered": self.registered, "lease_seconds": self.lease_seconds,
                "manager_keys": self.manager_keys, "revoked": self.revoked}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> HeartbeatAnswer:
        revoked = obj.get("revoked", [])
        keys = obj.get("manager_keys", {})
        if not isinstance(revoked, list) or not all(isinstance(r, str) for r in revoked):
            raise InvalidRequest("revoked must be a list of grant ids")
        if not isinstance(keys, dict):
            raise InvalidRequest("manager_keys must be an object")
        return cls(registered=bool(obj.get("registered")),
                   lease_seconds=_num(obj.get("lease_seconds", 0), "lease_seconds"),
                   manager_keys={str(k): str(v) for k, v in keys.items()},
                   revoked=list(revoked))


@dataclass(frozen=True)
class QuotaRequest:
    """What a client (or a control plane for a tenant) asks for (GRANT_REQUEST).

    ``mode`` "spread": the grant's rate is divided among ``spread`` servers in
    proportion to their free capacity, each server enforcing its share; "fail-over":
    every named server enforces the whole rate, the client using one at a time (the
    admission counts the rate once either way)."""

    quota: Rates
    priority: int = 0
    ttl: float = DEFAULT_TTL
    label: str = ""
    spread: int = 2
    mode: str = "spread"

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> QuotaRequest:
        priority = obj.get("priority", 0)
        spread = obj.get("spread", 2)
        if isinstance(priority, bool) or not isinstance(priority, int) or not (
                0 <= priority <= MAX_PRIORITY):
            raise InvalidRequest(f"priority must be an integer 0-{MAX_PRIORITY}")
        if isinstance(spread, bool) or not isinstance(spread, int) or not 1 <= spread <= 64:
            raise InvalidRequest("spread must be an integer 1-64")
        ttl = _num(obj.get("ttl", DEFAULT_TTL), "ttl")
        if not 1.0 <= ttl <= MAX_TTL:
            raise InvalidRequest(f"ttl must be 1-{MAX_TTL:g} seconds")
        mode = obj.get("mode", "spread")
        if mode not in MODES:
            raise InvalidRequest(f"mode must be one of {', '.join(MODES)}")
        label = obj.get("label", "")
        if not isinstance(label, str) or len(label) > 128:
            raise InvalidRequest("label must be a string of at most 128 characters")
        return cls(quota=parse_rates(obj.get("quota"), "quota", need_one=True),
                   priority=priority, ttl=ttl, label=label, spread=spread, mode=mode)

    def to_json(self) -> dict[str, Any]:
        return {"quota": self.quota, "priority": self.priority, "ttl": self.ttl,
                "label": self.label, "spread": self.spread, "mode": self.mode}


@dataclass(frozen=True)
class GrantServer:
    server_id: str
    address: str
    rates: Rates  # what this server enforces for the grant

    def to_json(self) -> dict[str, Any]:
        return {"server_id": self.server_id, "address": self.address, "rates": self.rates}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> GrantServer:
        return cls(server_id=_str(obj, "server_id"), address=check_address(
            obj.get("address")), rates=parse_rates(obj.get("rates", {}), "rates",
                                                   need_one=False))


@dataclass(frozen=True)
class Grant:
    """A grant as stored and listed (no token)."""

    grant_id: str
    tenant: str
    label: str
    quota: Rates
    priority: int
    mode: str
    spread: int
    servers: list[GrantServer]
    issued_at: float
    expires_at: float
    ttl: float

    def to_json(self) -> dict[str, Any]:
        return {"grant_id": self.grant_id, "tenant": self.tenant, "label": self.label,
                "quota": self.quota, "priority": self.priority, "mode": self.mode,
                "spread": self.spread, "servers": [s.to_json() for s in self.servers],
                "issued_at": self.issued_at, "expires_at": self.expires_at,
                "ttl": self.ttl}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Grant:
        servers = obj.get("servers", [])
        if not isinstance(servers, list):
            raise InvalidRequest("servers must be a list")
        return cls(grant_id=_str(obj, "grant_id"), tenant=_str(obj, "tenant"),
                   label=str(obj.get("label", "")),
                   quota=parse_rates(obj.get("quota", {}), "quota", need_one=False),
                   priority=int(obj.get("priority", 0)), mode=str(obj.get("mode", "spread")),
                   spread=int(obj.get("spread", 1)),
                   servers=[GrantServer.from_json(s) for s in servers],
                   issued_at=_num(obj.get("issued_at", 0), "issued_at"),
                   expires_at=_num(obj.get("expires_at", 0), "expires_at"),
                   ttl=_num(obj.get("ttl", DEFAULT_TTL), "ttl"))


@dataclass(frozen=True)
class GrantAnswer:
    """GRANT_REQUEST's and GRANT_RENEW's answer. Granted: ``grant`` and its ``token``
    (present it to the grant's servers in HELLO or GRANT_PRESENT; renew after
    ``renew_after`` seconds). Refused: ``reason`` and ``left``, what the pool could still
    grant per class (ops and bytes) at the moment of refusal."""

    granted: bool
    grant: Grant | None = None
    token: str = ""
    renew_after: float = 0.0
    reason: str = ""
    left: Rates = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        if not self.granted:
            return {"granted": False, "reason": self.reason, "left": self.left}
        assert self.grant is not None
        return {"granted": True, "grant": self.grant.to_json(), "token": self.token,
                "renew_after": self.renew_after}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> GrantAnswer:
        if not obj.get("granted"):
            return cls(granted=False, reason=str(obj.get("reason", "")),
                       left=parse_rates(obj.get("left", {}), "left", need_one=False))
        grant = obj.get("grant")
        if not isinstance(grant, dict):
            raise InvalidRequest("a granted answer needs its grant")
        return cls(granted=True, grant=Grant.from_json(grant), token=_str(
            obj, "token", max_len=8192), renew_after=_num(obj.get("renew_after", 0),
                                                           "renew_after"))


def grant_id_of(obj: Mapping[str, Any]) -> str:
    return _str(obj, "grant_id", max_len=64)


def server_id_of(obj: Mapping[str, Any]) -> str:
    return _str(obj, "server_id", max_len=128)


__all__ = ["DEFAULT_TTL", "MODES", "Grant", "GrantAnswer", "GrantServer", "Heartbeat",
           "HeartbeatAnswer", "QuotaRequest", "Rates", "Registered", "Registration",
           "check_address", "grant_id_of", "parse_rates", "parse_tenant_rates",
           "server_id_of"]
