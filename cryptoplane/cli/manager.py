"""``cryptoplane manager`` (run the fabric's manager), ``cryptoplane quota`` (grants:
request, renew, release, list, revoke) and ``cryptoplane fabric status`` (the pool).

The client commands talk to a running manager (``--manager``, env
``CRYPTOPLANE_MANAGER``) with a token (``--token``, env ``CRYPTOPLANE_TOKEN``). Exit
status: 0 done; 1 the manager could not be reached or failed; 2 the token was refused
or lacks the scope; 3 the quota was refused (what is left is printed).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..exceptions import CryptoplaneError, InvalidRequest
from .server import DEFAULT_STORE

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_MANAGER = "manager://127.0.0.1:7800"
EXIT_REFUSED = 3


# -- cryptoplane manager ------------------------------------------------------------------


@click.command("manager")
@click.option("--store", envvar="CRYPTOPLANE_STORE", default=DEFAULT_STORE, show_default=True,
              metavar="URL", help="The keystore's database: sqlite:///PATH or "
              "postgresql://... (env CRYPTOPLANE_STORE). Several managers share one "
              "PostgreSQL.")
@click.option("--listen", "-l", multiple=True, metavar="ADDR",
              help="tcp://HOST:PORT, HOST:PORT or unix:///PATH (repeatable; port 0: any "
                   "free port). Default tcp://127.0.0.1:7800.")
@click.option("--signing-key", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("cryptoplane-manager-key.pem"), show_default=True,
              envvar="CRYPTOPLANE_MANAGER_KEY",
              help="Ed25519 private key (PEM) that signs grants; created (mode 0600) if "
                   "missing. Every manager of a pool shares the file.")
@click.option("--lease", type=click.FloatRange(0.05), default=10.0, show_default=True,
              help="Seconds a server's registration lives without a heartbeat.")
@click.option("--overcommit", type=click.FloatRange(0.01), default=1.0, show_default=True,
              help="Grants may add up to capacity times this factor.")
@click.option("--manager-id", default=None, help="Name in logs and status (default: "
              "host:pid).")
@click.option("--http", "http", metavar="HOST:PORT", default=None,
              help="Serve /metrics, /healthz, /readyz and /status here.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Certificate (PEM) for TLS 1.3 on the TCP listeners.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Its private key (PEM; default: inside --tls-cert).")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA whose client certificates authenticate (their CN is the tenant).")
@click.option("--cache-ttl", type=float, default=1.0, show_default=True,
              help="Seconds a token read from the keystore is trusted.")
@click.option("--threads", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Threads for database calls and signatures.")
@click.option("--token-recheck", type=click.FloatRange(0.05), default=5.0,
              show_default=True, help="Seconds between checks that open connections' "
              "tokens still stand (a revoked token's connections then close).")
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None,
              help="Write the ready event's JSON here once serving (else stdout).")
@click.option("--json", "json_logs", is_flag=True, help="Log JSON lines to stderr.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def manager_cmd(store: str, listen: tuple[str, ...], signing_key: Path, lease: float,
                overcommit: float, manager_id: str | None, http: str | None,
                tls_cert: str | None, tls_key: str | None, tls_client_ca: str | None,
                cache_ttl: float, threads: int, token_recheck: float,
                ready_file: str | None, json_logs: bool, log_level: str) -> None:
    """Run the fabric's manager: crypto servers register their capacity and heartbeat;
    clients ask for quotas and get grants (servers, rates, a signed token) or a refusal
    saying what is left (docs/fabric-manager.md).

    Token scopes (`cryptoplane tokens create --ops ...`): fabric-server for crypto
    servers, quota for clients, admin for operators (revoke, the whole pool's status).
    SIGTERM or SIGINT: stop accepting, say GOAWAY, exit.
    """
    from .server import configure_logging

    configure_logging(json_logs, log_level)
    if (tls_key or tls_client_ca) and not tls_cert:
        raise click.UsageError("--tls-key and --tls-client-ca need --tls-cert")
    from ..fabric.auth import server_ssl_context
    from ..fabric.manager.app import DEFAULT_LISTEN, ManagerConfig, run

    tls = None
    if tls_cert:
        tls = server_ssl_context(tls_cert, tls_key, client_ca=tls_client_ca)
    config = ManagerConfig(store=store, signing_key=signing_key,
                           listen=list(listen) or [DEFAULT_LISTEN], lease=lease,
                           overcommit=overcommit, manager_id=manager_id or "", http=http,
                           ready_file=ready_file, tls=tls, cache_ttl=cache_ttl,
                           threads=threads, token_recheck=token_recheck)
    sys.exit(run(config))


# -- talking to a manager ---------------------------------------------------------------


def client_options(fn: F) -> F:
    decorators = [
        click.option("--manager", "-m", "manager_url", envvar="CRYPTOPLANE_MANAGER",
                     default=DEFAULT_MANAGER, show_default=True, metavar="URL",
                     help="manager://HOST:PORT[,HOST:PORT...], tcp://, tls:// or "
                          "unix:// (env CRYPTOPLANE_MANAGER)."),
        click.option("--token", envvar="CRYPTOPLANE_TOKEN", default=None,
                     help="Bearer token; prefer env CRYPTOPLANE_TOKEN (a command line "
                          "is visible to other users)."),
        click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False),
                     default=None, help="CA to verify a tls:// manager against."),
        click.option("--timeout", type=click.FloatRange(0.1), default=10.0,
                     show_default=True, help="Seconds to wait for the manager."),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn


def _with_manager(url: str, token: str | None, tls_ca: str | None, timeout: float,
                  fn: Callable[[Any], Awaitable[T]]) -> T:
    """``fn(ManagerClient)`` against the manager; failures as exit statuses, no
    traceback."""
    from ..fabric.auth import client_ssl_context
    from ..fabric.errors import ConnectionLost, Forbidden, Unauthorized
    from ..fabric.manager.client import ManagerClient

    async def go() -> T:
        ssl = client_ssl_context(tls_ca) if tls_ca else None
        client = await ManagerClient.connect(url, token=token, ssl=ssl, timeout=timeout,
                                             name="cryptoplane-cli")
        try:
            return await fn(client)
        finally:
            await client.close()

    try:
        return asyncio.run(go())
    except (Unauthorized, Forbidden) as e:
        click.echo(f"cryptoplane: {e}", err=True)
        sys.exit(2)
    except (ConnectionLost, OSError, TimeoutError) as e:
        click.echo(f"cryptoplane: cannot reach the manager at {url}: {e}", err=True)
        sys.exit(1)
    except CryptoplaneError as e:
        click.echo(f"cryptoplane: {e}", err=True)
        sys.exit(1)


def _quota_spec(specs: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """``rsa2048=500,aead=100000:1e9`` (repeatable) as rates."""
    out: dict[str, dict[str, float]] = {}
    for spec in specs:
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            cls, sep, rates = part.partition("=")
            ops, _, nbytes = rates.partition(":")
            try:
                if not sep or not cls:
                    raise ValueError
                out[cls.strip()] = {"ops": float(ops or 0), "bytes": float(nbytes or 0)}
            except ValueError:
                raise click.BadParameter(f"{part!r}: expected CLASS=OPS[:BYTES], such as "
                                         "rsa2048=500 or aead=100000:1e9",
                                         param_hint="--quota") from None
    if not out:
        raise click.BadParameter("give at least one CLASS=OPS[:BYTES]",
                                 param_hint="--quota")
    return out


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.4g}M"
    if n >= 1e4:
        return f"{n / 1e3:.4g}k"
    return f"{n:.4g}"


def _rate(rate: dict[str, float]) -> str:
    parts = []
    if rate.get("ops"):
        parts.append(f"{_count(rate['ops'])} ops/s")
    if rate.get("bytes"):
        parts.append(f"{_bytes(rate['bytes'])}/s")
    return ", ".join(parts) or "-"


def _rates(rates: dict[str, dict[str, float]], sep: str = "; ") -> str:
    return sep.join(f"{cls} {_rate(r)}" for cls, r in sorted(rates.items())) or "-"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _print_grant(answer: Any) -> None:
    g = answer.grant
    click.echo(f"grant {g.grant_id}  tenant {g.tenant}  mode {g.mode}  priority "
               f"{g.priority}  expires {_when(g.expires_at)} (renew after "
               f"{answer.renew_after:g} s)")
    click.echo(f"  quota: {_rates(g.quota)}")
    for s in g.servers:
        click.echo(f"  server {s.server_id}  {s.address}  {_rates(s.rates)}")
    click.echo(f"token: {answer.token}")


def _print_refusal(reason: str, left: dict[str, dict[str, float]]) -> None:
    click.echo(f"refused: {reason}", err=True)
    for cls, rate in sorted(left.items()):
        click.echo(f"  left {cls}: {_rate(rate) if any(rate.values()) else 'nothing'}",
                   err=True)


@click.group("quota")
def quota() -> None:
    """Grants from the fabric's manager: ask for a quota, renew, release, list, revoke."""


@quota.command("request")
@client_options
@click.option("--quota", "-q", "specs", multiple=True, required=True,
              metavar="CLASS=OPS[:BYTES]",
              help="Rate per algorithm class, e.g. rsa2048=500 or aead=100000:1e9 "
                   "(ops/s, then bytes/s); comma-separated or repeated. Classes: "
                   "rsa2048, rsa3072, rsa4096, ecdsa-p256, ecdsa-p384, ed25519, aead, "
                   "hmac... (cryptoplane/fabric/capacity.py).")
@click.option("--priority", type=click.IntRange(0, 7), default=0, show_default=True)
@click.option("--ttl", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
              help="Seconds the grant lives unless renewed.")
@click.option("--spread", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Servers to spread the grant over.")
@click.option("--mode", type=click.Choice(["spread", "fail-over"]), default="spread",
              show_default=True, help="spread: each server enforces a share; fail-over: "
              "each enforces the whole rate, used one at a time.")
@click.option("--label", default="", help="A note shown in listings.")
@click.option("--tenant", default=None, help="Act for this tenant (admin tokens).")
@click.option("--json", "as_json", is_flag=True, help="Print the answer's JSON.")
def quota_request(manager_url: str, token: str | None, tls_ca: str | None, timeout: float,
                  specs: tuple[str, ...], priority: int, ttl: float, spread: int,
                  mode: str, label: str, tenant: str | None, as_json: bool) -> None:
    """Ask for a quota; print the grant (servers, rates, expiry) and its token. A
    refusal prints what the pool could still give and exits 3."""
    from ..fabric.codec import Op
    from ..fabric.manager.protocol import QuotaRequest

    body = {"quota": _quota_spec(specs), "priority": priority, "ttl": ttl,
            "spread": spread, "mode": mode, "label": label}
    try:
        QuotaRequest.from_json(body)
    except InvalidRequest as e:
        raise click.BadParameter(str(e)) from None
    if tenant:
        body["tenant"] = tenant

    async def go(client: Any) -> dict[str, Any]:
        return dict(await client.call(Op.GRANT_REQUEST, body))

    _show_answer(_with_manager(manager_url, token, tls_ca, timeout, go), as_json)


def _show_answer(obj: dict[str, Any], as_json: bool) -> None:
    """A GrantAnswer as JSON or text; a refusal exits EXIT_REFUSED."""
    from ..fabric.manager.protocol import GrantAnswer

    answer = GrantAnswer.from_json(obj)
    if as_json:
        click.echo(json.dumps(obj, sort_keys=True))
    elif answer.granted:
        _print_grant(answer)
    if not answer.granted:
        if not as_json:
            _print_refusal(answer.reason, answer.left)
        sys.exit(EXIT_REFUSED)


@quota.command("renew")
@client_options
@click.argument("grant_id")
@click.option("--tenant", default=None, help="Act for this tenant (admin tokens).")
@click.option("--json", "as_json", is_flag=True)
def quota_renew(manager_url: str, token: str | None, tls_ca: str | None, timeout: float,
                grant_id: str, tenant: str | None, as_json: bool) -> None:
    """Renew a grant: a new expiry and token (its servers may have changed)."""
    from ..fabric.codec import Op

    body: dict[str, Any] = {"grant_id": grant_id}
    if tenant:
        body["tenant"] = tenant

    async def go(client: Any) -> dict[str, Any]:
        return dict(await client.call(Op.GRANT_RENEW, body))

    _show_answer(_with_manager(manager_url, token, tls_ca, timeout, go), as_json)


@quota.command("release")
@client_options
@click.argument("grant_id")
@click.option("--tenant", default=None, help="Act for this tenant (admin tokens).")
def quota_release(manager_url: str, token: str | None, tls_ca: str | None, timeout: float,
                  grant_id: str, tenant: str | None) -> None:
    """Give a grant back: its share is free for others at once."""
    from ..fabric.codec import Op

    body: dict[str, Any] = {"grant_id": grant_id}
    if tenant:
        body["tenant"] = tenant

    async def go(client: Any) -> None:
        await client.call(Op.GRANT_RELEASE, body)

    _with_manager(manager_url, token, tls_ca, timeout, go)
    click.echo(f"released {grant_id}")


@quota.command("revoke")
@client_options
@click.argument("grant_id")
def quota_revoke(manager_url: str, token: str | None, tls_ca: str | None, timeout: float,
                 grant_id: str) -> None:
    """Revoke a grant (admin): servers drop it at their next heartbeat."""
    from ..fabric.codec import Op

    async def go(client: Any) -> dict[str, Any]:
        return dict(await client.call(Op.GRANT_REVOKE, {"grant_id": grant_id}))

    obj = _with_manager(manager_url, token, tls_ca, timeout, go)
    if not obj.get("revoked"):
        click.echo(f"cryptoplane: no grant {grant_id}", err=True)
        sys.exit(1)
    click.echo(f"revoked {grant_id}")


@quota.command("list")
@client_options
@click.option("--all", "all_tenants", is_flag=True, help="Every tenant's (admin tokens).")
@click.option("--tenant", default=None, help="This tenant's (admin tokens).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def quota_list(manager_url: str, token: str | None, tls_ca: str | None, timeout: float,
               all_tenants: bool, tenant: str | None, as_json: bool) -> None:
    """Live grants: yours, or with an admin token another tenant's or everyone's."""
    from ..fabric.codec import Op

    body: dict[str, Any] = {}
    if all_tenants:
        body["all"] = True
    if tenant:
        body["tenant"] = tenant

    async def go(client: Any) -> list[dict[str, Any]]:
        grants = (await client.call(Op.GRANT_LIST, body)).get("grants", [])
        return list(grants) if isinstance(grants, list) else []

    for g in _with_manager(manager_url, token, tls_ca, timeout, go):
        if as_json:
            click.echo(json.dumps(g, sort_keys=True))
        else:
            servers = ",".join(s.get("server_id", "?") for s in g.get("servers", []))
            click.echo(f"{g.get('grant_id')}  tenant={g.get('tenant')}  "
                       f"quota={_rates(g.get('quota', {}))}  servers={servers or '-'}  "
                       f"expires={_when(float(g.get('expires_at', 0)))}  "
                       f"{g.get('label', '')}".rstrip())


# -- cryptoplane fabric status -------------------------------------------------------------


@click.group("fabric")
def fabric() -> None:
    """The fabric's pool as its manager sees it."""


@fabric.command("status")
@client_options
@click.option("--json", "as_json", is_flag=True, help="The manager's status JSON.")
def fabric_status(manager_url: str, token: str | None, tls_ca: str | None, timeout: float,
                  as_json: bool) -> None:
    """Servers (address, capacity, load, lease), capacity / granted / left per class,
    and grants (an admin token sees every tenant's, a quota token its own)."""
    from ..fabric.codec import Op

    async def go(client: Any) -> dict[str, Any]:
        return dict(await client.call(Op.FABRIC_STATUS))

    status = _with_manager(manager_url, token, tls_ca, timeout, go)
    if as_json:
        click.echo(json.dumps(status, sort_keys=True, indent=2))
        return
    print_status(status)


def _granted_by_tenant(grants: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per tenant and class, the quotas of its live grants summed."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for g in grants:
        mine = out.setdefault(str(g.get("tenant", "")), {})
        for cls, rate in (g.get("quota") or {}).items():
            acc = mine.setdefault(cls, {"ops": 0.0, "bytes": 0.0})
            acc["ops"] += float(rate.get("ops", 0.0))
            acc["bytes"] += float(rate.get("bytes", 0.0))
    return out


def print_status(status: dict[str, Any]) -> None:
    """The status as tables (rich; plain characters when not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width), soft_wrap=False)
    servers = Table(title=f"servers (lease {status.get('lease_seconds', 0):g} s, "
                    f"overcommit {status.get('overcommit', 1):g})", title_justify="left")
    for col in ("server", "address", "capacity", "load", "inflight", "lease age", "grants"):
        servers.add_column(col, no_wrap=col in ("server", "address"),
                           justify="right" if col in ("inflight", "lease age", "grants")
                           else "left")
    for s in status.get("servers", []):
        servers.add_row(str(s.get("server_id")), str(s.get("address")),
                        _rates(s.get("capacity", {}), "\n"),
                        _rates(s.get("load", {}), "\n"), str(s.get("inflight", 0)),
                        f"{float(s.get('lease_age', 0)):.1f} s", str(s.get("grants", 0)))
    console.print(servers)
    totals = Table(title="pool", title_justify="left")
    for col in ("class", "capacity", "granted", "left"):
        totals.add_column(col)
    capacity = status.get("capacity", {})
    granted = status.get("granted", {})
    left = status.get("left", {})
    for cls in sorted(set(capacity) | set(granted) | set(left)):
        totals.add_row(cls, _rate(capacity.get(cls, {})), _rate(granted.get(cls, {})),
                       _rate(left.get(cls, {})))
    console.print(totals)
    by_tenant = _granted_by_tenant(status.get("grants", []))
    used = status.get("used_by_tenant", {})
    if by_tenant or used:
        tenants = Table(title="tenants (used: over the servers' last heartbeats)",
                        title_justify="left")
        for col in ("tenant", "granted", "used"):
            tenants.add_column(col, no_wrap=col == "tenant")
        for tenant in sorted(set(by_tenant) | set(used)):
            tenants.add_row(tenant, _rates(by_tenant.get(tenant, {}), "\n"),
                            _rates(used.get(tenant, {}), "\n"))
        console.print(tenants)
    grants = Table(title="grants", title_justify="left")
    for col in ("grant", "tenant", "quota", "servers", "expires", "label"):
        grants.add_column(col, no_wrap=col == "grant")
    for g in status.get("grants", []):
        grants.add_row(str(g.get("grant_id")), str(g.get("tenant")),
                       _rates(g.get("quota", {}), "\n"),
                       "\n".join(s.get("server_id", "?") for s in g.get("servers", []))
                       or "-", _when(float(g.get("expires_at", 0))), str(g.get("label", "")))
    console.print(grants)
    if status.get("refusals"):
        console.print(f"refusals (this manager): {status['refusals']}")


__all__ = ["fabric", "manager_cmd", "print_status", "quota"]
