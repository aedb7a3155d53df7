"""``cryptoplane server``: the fabric's crypto server; ``cryptoplane tokens`` and
``cryptoplane tenants``: operator commands that act on the keystore directly.

The keystore is named by ``--store`` (``sqlite:///path`` or ``postgresql://...``, or the
``CRYPTOPLANE_STORE`` environment variable) and opened with the master key from one of
``--master-key-file``, ``--master-key-env`` or ``--master-passphrase-file`` (argon2id
with the store's own salt); with none of them, the ``CRYPTOPLANE_MASTER_KEY`` variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..exceptions import CryptoplaneError
from .sizes import parse_size

DEFAULT_STORE = "sqlite:///cryptoplane-keys.db"
F = TypeVar("F", bound=Callable[..., Any])


def store_options(fn: F) -> F:
    """--store and the master key options, for every command that opens the keystore."""
    decorators = [
        click.option("--store", envvar="CRYPTOPLANE_STORE", default=DEFAULT_STORE,
                     show_default=True, metavar="URL",
                     help="Keystore: sqlite:///PATH or postgresql://... "
                          "(env CRYPTOPLANE_STORE)."),
        click.option("--master-key-file", type=click.Path(dir_okay=False), default=None,
                     help="File holding the master key (base64 or hex of 32 bytes); one "
                          "per line during a rotation: the first wraps, the rest only "
                          "unwrap (`cryptoplane keystore rotate-master --help`)."),
        click.option("--master-key-env", metavar="VAR", default=None,
                     help="Environment variable holding the master key "
                          "(default when no master option is given: "
                          "CRYPTOPLANE_MASTER_KEY)."),
        click.option("--master-passphrase-file", type=click.Path(dir_okay=False),
                     default=None,
                     help="File holding a passphrase; the master key is derived from it "
                          "with argon2id and the store's salt."),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn


def open_store(store: str, master_key_file: str | None, master_key_env: str | None,
               master_passphrase_file: str | None) -> Any:
    """The keystore, migrated and keyed; a usage error for a missing or wrong key."""
    from ..fabric.keystore import MasterKey, open_keystore

    given = [x for x in (master_key_file, master_key_env, master_passphrase_file)
             if x is not None]
    if len(given) > 1:
        raise click.UsageError("give at most one of --master-key-file, --master-key-env "
                               "and --master-passphrase-file")
    try:
        if master_passphrase_file is not None:
            text = Path(master_passphrase_file).read_bytes().rstrip(b"\r\n")
            return open_keystore(store, master_passphrase=text)
        previous: list[MasterKey] = []
        if master_key_file is not None:
            master, previous = MasterKey.ring_from_file(master_key_file)
        else:
            master = MasterKey.from_env(master_key_env or "CRYPTOPLANE_MASTER_KEY")
        return open_keystore(store, master, previous=previous)
    except (CryptoplaneError, OSError) as e:
        raise click.ClickException(str(e)) from None


def _with_store(fn: Callable[..., Any]) -> Callable[..., Any]:
    @store_options
    @functools.wraps(fn)
    def wrapper(store: str, master_key_file: str | None, master_key_env: str | None,
                master_passphrase_file: str | None, **kw: Any) -> Any:
        ks = open_store(store, master_key_file, master_key_env, master_passphrase_file)
        try:
            return fn(ks, **kw)
        except CryptoplaneError as e:
            raise click.ClickException(str(e)) from None
        finally:
            ks.close()
    return wrapper


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d``, ``2w`` as seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration such as 30d, 12h or 15m")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _globs(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


# -- cryptoplane server -------------------------------------------------------------------


@click.command("server")
@store_options
@click.option("--listen", "-l", multiple=True, metavar="ADDR",
              help="tcp://HOST:PORT, HOST:PORT or unix:///PATH (repeatable; port 0: any "
                   "free port). Default tcp://127.0.0.1:7700.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Server certificate (PEM) for TLS 1.3 on the TCP listeners.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Its private key (PEM; default: inside --tls-cert).")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA whose client certificates authenticate (their CN is the tenant).")
@click.option("--require-client-cert", is_flag=True,
              help="Refuse TLS clients without a certificate from --tls-client-ca.")
@click.option("--http", "http", metavar="HOST:PORT", default=None,
              help="Serve /metrics, /healthz and /readyz here.")
@click.option("--engines", default=None, metavar="LIST",
              help="Plane engines, comma-separated (default: inline,threads).")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Threads for signatures and big payloads (default: CPU count).")
@click.option("--max-connections", type=click.IntRange(1), default=10_000, show_default=True)
@click.option("--max-in-flight", type=click.IntRange(1), default=4096, show_default=True,
              help="Requests at the workers per connection before it is no longer read.")
@click.option("--max-buffered", default="1G", show_default=True, metavar="SIZE",
              help="Memory all connections together may make the server hold (frames "
                   "half received, payloads at the workers); k/M/G suffixes.")
@click.option("--handshake-timeout", type=float, default=10.0, show_default=True,
              help="Seconds a client has to complete HELLO (and TLS).")
@click.option("--frame-timeout", type=float, default=30.0, show_default=True,
              help="Seconds a frame begun has to arrive whole.")
@click.option("--idle-timeout", type=float, default=3600.0, show_default=True,
              help="Seconds of silence before a connection owed nothing is closed.")
@click.option("--auto-rotate-interval", type=click.FloatRange(0), default=60.0,
              show_default=True,
              help="Seconds between passes that rotate keys whose auto_rotate_period has "
                   "passed (0: never; servers sharing a store: give one of them this).")
@click.option("--cache-ttl", type=float, default=1.0, show_default=True,
              help="Seconds a key or token read from the keystore is trusted.")
@click.option("--grace", type=float, default=10.0, show_default=True,
              help="Seconds in-flight requests get on SIGTERM/SIGINT (a second signal: "
                   "stop at once).")
@click.option("--ready-file", type=click.Path(dir_okay=False), default=None,
              help="Write the ready event's JSON here once serving (else it goes to "
                   "stdout).")
@click.option("--server-id", default=None,
              help="Name in WELCOME and at the manager (default: host:pid; give a stable "
                   "one under a manager).")
@click.option("--manager", "manager", default=None, metavar="URL[,URL2]",
              help="Join a manager's pool: manager://HOST:PORT[,HOST:PORT] or tcp://... "
                   "(register, heartbeats, leave on shutdown).")
@click.option("--manager-token", envvar="CRYPTOPLANE_MANAGER_TOKEN", default=None,
              help="Token this server presents to the manager "
                   "(env CRYPTOPLANE_MANAGER_TOKEN).")
@click.option("--manager-key", "manager_keys", multiple=True, metavar="FILE|B64",
              help="A manager's Ed25519 public key (raw base64, or a file holding it or a "
                   "PEM public key) to check grants with before registering, or without "
                   "a manager (repeatable). Keys learnt at registration are added.")
@click.option("--advertise", default=None, metavar="URL",
              help="The address clients dial, told to the manager (default: the first "
                   "listener's; give one when listening on 0.0.0.0).")
@click.option("--capacity", default=None, metavar="CLASS=OPS[:BYTES],...",
              help="Capacity to register instead of measuring it, e.g. "
                   "rsa2048=3000,aead=200000:1e9. Only the classes given are registered. "
                   "Measured otherwise: about a second at start, one core per --workers "
                   "thread assumed.")
@click.option("--grants", "grants_mode", type=click.Choice(["required", "optional"]),
              default=None,
              help="required: data requests without a manager's grant are FORBIDDEN (key "
                   "management, digest, random stay free); optional: such clients are "
                   "served unmetered. Default: required with --manager, else optional.")
@click.option("--json", "json_logs", is_flag=True, help="Log JSON lines to stderr.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def server_cmd(store: str, master_key_file: str | None, master_key_env: str | None,
               master_passphrase_file: str | None, listen: tuple[str, ...],
               tls_cert: str | None, tls_key: str | None, tls_client_ca: str | None,
               require_client_cert: bool, http: str | None, engines: str | None,
               workers: int | None, max_connections: int, max_in_flight: int,
               max_buffered: str, handshake_timeout: float, frame_timeout: float,
               idle_timeout: float,
               auto_rotate_interval: float, cache_ttl: float, grace: float,
               ready_file: str | None, server_id: str | None, manager: str | None,
               manager_token: str | None, manager_keys: tuple[str, ...],
               advertise: str | None, capacity: str | None, grants_mode: str | None,
               json_logs: bool, log_level: str) -> None:
    """Serve transit (encrypt, decrypt, sign, data keys, key management...), offload
    sessions and bulk streams over the fabric wire protocol (docs/wire-protocol.md).

    Clients authenticate with a token (`cryptoplane tokens create`) or, with
    --tls-client-ca, a client certificate. On SIGTERM or SIGINT the server says GOAWAY,
    answers what it received, and exits; a second signal stops it at once. SIGHUP
    re-reads --master-key-file (a master-key rotation without a restart).
    """
    configure_logging(json_logs, log_level)
    if (tls_key or tls_client_ca or require_client_cert) and not tls_cert:
        raise click.UsageError("--tls-key, --tls-client-ca and --require-client-cert "
                               "need --tls-cert")
    if require_client_cert and not tls_client_ca:
        raise click.UsageError("--require-client-cert needs --tls-client-ca")
    under = _ManagerOptions.parse(manager, manager_token, manager_keys, advertise,
                                  capacity, grants_mode)
    from ..fabric.auth import server_ssl_context
    from ..fabric.service import service_over

    tls = None
    if tls_cert:
        tls = server_ssl_context(tls_cert, tls_key, client_ca=tls_client_ca,
                                 require_client_cert=require_client_cert)
    ks = open_store(store, master_key_file, master_key_env, master_passphrase_file)
    try:
        service = service_over(ks, engines=_globs(engines) if engines else None,
                               cache_ttl=cache_ttl,
                               server_id=server_id or f"{os.uname().nodename}:{os.getpid()}")
    except BaseException:
        ks.close()
        raise
    if under.table_wanted:
        service.use_grants(under.table(service.server_id))
        if manager and under.capacity is None:
            from ..fabric.selfbench import measure_capacity

            under.capacity = measure_capacity(workers or os.cpu_count() or 1)
    options = {"listen": list(listen) or ["tcp://127.0.0.1:7700"], "tls": tls, "http": http,
               "workers": workers, "max_connections": max_connections,
               "max_in_flight": max_in_flight, "handshake_timeout": handshake_timeout,
               "frame_timeout": frame_timeout, "idle_timeout": idle_timeout,
               "rotate_interval": auto_rotate_interval,
               "max_buffered": parse_size(max_buffered, least=1 << 20)}
    def reload_masters() -> str:
        if master_key_file is None:
            return "master keys unchanged (only --master-key-file is re-read)"
        from ..fabric.keystore import MasterKey
        master, previous = MasterKey.ring_from_file(master_key_file)
        ks.attach_masters(master, previous)
        return (f"master keys reloaded: wrapping under {master.id}, also unwrapping "
                f"{', '.join(m.id for m in previous) or 'nothing else'}")

    try:
        code = _run(service, options, grace, ready_file, reload_masters,
                    under if manager else None)
    finally:
        service.close()
    sys.exit(code)


class _ManagerOptions:
    """The options of a server under a manager, checked before anything opens."""

    def __init__(self, manager: str | None, token: str | None, keys: list[str],
                 advertise: str | None, capacity: Any, required: bool) -> None:
        self.manager = manager
        self.token = token
        self.keys = keys
        self.advertise = advertise
        self.capacity = capacity
        self.required = required
        self.table_wanted = bool(manager or keys or required)
        self.membership: Any = None

    @classmethod
    def parse(cls, manager: str | None, token: str | None, keys: tuple[str, ...],
              advertise: str | None, capacity: str | None,
              mode: str | None) -> _ManagerOptions:
        from ..fabric.selfbench import parse_capacity

        if not manager and (advertise or capacity):
            raise click.UsageError("--advertise and --capacity need --manager")
        required = (mode or ("required" if manager else "optional")) == "required"
        if required and not (manager or keys):
            raise click.UsageError("--grants required needs --manager or --manager-key "
                                   "(no grant could be checked)")
        rates = None
        if capacity is not None:
            try:
                rates = parse_capacity(capacity)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--capacity") from None
        return cls(manager, token, [_manager_key(k) for k in keys], advertise, rates,
                   required)

    def table(self, server_id: str) -> Any:
        from ..fabric.grants import GrantTable

        table = GrantTable(server_id, required=self.required)
        for b64 in self.keys:
            table.add_key(b64)
        return table

    async def join(self, server: Any) -> None:
        """Register with the manager (in the background: a manager not answering yet
        does not stop the server from serving)."""
        from ..fabric.membership import Membership

        assert self.manager is not None
        service = server.service
        self.membership = Membership(
            self.manager.split(",") if not self.manager.startswith("manager://")
            else self.manager, server_id=service.server_id,
            address=self.advertise or server.addresses[0], capacity=self.capacity,
            grants=service.grants, token=self.token,
            inflight=lambda: sum(c.inflight for c in server.connections))
        service.metrics.watch_membership(self.membership)
        await self.membership.start()

    async def leave(self) -> None:
        if self.membership is not None:
            await self.membership.leave()


def _manager_key(text: str) -> str:
    """--manager-key: raw base64, or a file holding it or a PEM public key."""
    from ..fabric.capability import GrantRefused, public_key_b64, public_key_from_b64

    value = text
    if os.path.isfile(text):
        try:
            value = Path(text).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(f"{text}: {e}", param_hint="--manager-key") from None
    try:
        if value.startswith("-----BEGIN"):
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            key = serialization.load_pem_public_key(value.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 public key")
            return public_key_b64(key)
        public_key_from_b64(value)
    except (ValueError, GrantRefused) as e:
        raise click.BadParameter(f"not a manager public key: {e}",
                                 param_hint="--manager-key") from None
    return value


def _run(service: Any, options: dict[str, Any], grace: float, ready_file: str | None,
         reload_masters: Callable[[], str] | None = None,
         under: _ManagerOptions | None = None) -> int:
    import uvloop

    from ..fabric.server import Server, announce

    async def main() -> int:
        loop = asyncio.get_running_loop()
        server = Server(service, **options)
        try:
            await server.start()
        except (OSError, CryptoplaneError) as e:
            click.echo(f"cryptoplane server: {e}", err=True)
            return 1
        stop = asyncio.Event()
        signals: list[int] = []

        def on_signal(signum: int) -> None:
            signals.append(signum)
            logging.getLogger("cryptoplane.fabric").info(
                "%s: %s", signal.Signals(signum).name,
                "stopping now" if len(signals) > 1 else f"draining (grace {grace:g} s)")
            stop.set()

        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, on_signal, s)

        async def reload(read: Callable[[], str]) -> None:
            log = logging.getLogger("cryptoplane.fabric")
            try:  # the keystore checks the keys against the database: off the loop
                log.info("SIGHUP: %s", await loop.run_in_executor(None, read))
            except (CryptoplaneError, OSError) as e:
                log.error("SIGHUP: master keys not reloaded, the old ones stay: %s", e)

        if reload_masters is not None:
            read = reload_masters
            reloads: set[asyncio.Task[None]] = set()

            def on_hup() -> None:
                task = loop.create_task(reload(read))
                reloads.add(task)
                task.add_done_callback(reloads.discard)
            loop.add_signal_handler(signal.SIGHUP, on_hup)
        if under is not None:
            await under.join(server)
        http = f"{_http_host(options['http'])}:{server.http_port}" if server.http_port else None
        announce({"event": "ready", "listen": server.addresses, "http": http,
                   "pid": os.getpid()}, ready_file)
        await stop.wait()
        if under is not None:  # the manager moves this server's grants at once
            await under.leave()
        drain = loop.create_task(server.shutdown(grace))
        while not drain.done() and len(signals) < 2:
            stop.clear()
            if len(signals) > 1:
                break
            waiter = loop.create_task(stop.wait())
            await asyncio.wait({drain, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        if not drain.done():
            await server.shutdown(0)  # a second signal: cut what is left; the drain ends
        await drain
        if ready_file:
            with contextlib.suppress(OSError):
                os.unlink(ready_file)
        # drained: a clean exit; cut short: the status of the signal that cut it
        return 0 if len(signals) < 2 else 128 + signals[-1]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def _http_host(spec: str) -> str:
    from ..fabric.server import parse_listen

    return parse_listen(spec)[1]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(json_logs: bool, level: str) -> None:
    """The ``cryptoplane`` loggers to stderr, plain or JSON lines (server commands)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_logs else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("cryptoplane")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())



# -- cryptoplane tokens ---------------------------------------------------------------------


@click.group("tokens")
def tokens() -> None:
    """Bearer tokens for the fabric server: create (the secret is shown once), list,
    revoke. Acts on the keystore directly."""


@tokens.command("create")
@click.option("--tenant", "-t", required=True, help="The tenant the token acts for.")
@click.option("--keys", default="*", show_default=True, metavar="GLOBS",
              help="Comma-separated globs over key names.")
@click.option("--ops", default="*", show_default=True, metavar="LIST",
              help="Comma-separated op names or globs: encrypt, decrypt, sign, "
                   "key_create, session, admin...")
@click.option("--expires", default=None, metavar="DURATION",
              help="Lifetime such as 30d, 12h, 15m (default: never).")
@click.option("--label", default="", help="A note shown by `tokens list`.")
@_with_store
def tokens_create(ks: Any, tenant: str, keys: str, ops: str, expires: str | None,
                  label: str) -> None:
    """Create a token and print it (the only time the secret is shown)."""
    expires_at = time.time() + parse_duration(expires) if expires else None
    token = ks.create_token(tenant, keys=_globs(keys), ops=_globs(ops),
                            expires_at=expires_at, label=label)
    click.echo(token)


@tokens.command("list")
@click.option("--tenant", "-t", required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_with_store
def tokens_list(ks: Any, tenant: str, as_json: bool) -> None:
    """The tenant's tokens that are not revoked (never their secrets)."""
    for info in ks.list_tokens(tenant):
        row = {"token_id": info.token_id, "tenant": info.tenant, "keys": list(info.keys),
               "ops": list(info.ops), "expires_at": info.expires_at, "label": info.label}
        if as_json:
            click.echo(json.dumps(row))
        else:
            exp = ("never" if info.expires_at is None else
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.expires_at)))
            click.echo(f"{info.token_id}  keys={','.join(info.keys)}  "
                       f"ops={','.join(info.ops)}  expires={exp}  {info.label}".rstrip())


@tokens.command("revoke")
@click.argument("token_id")
@click.option("--tenant", "-t", default=None, help="Only if the token is this tenant's.")
@_with_store
def tokens_revoke(ks: Any, token_id: str, tenant: str | None) -> None:
    """Revoke a token by its id (the 16 hex digits after cpt_). Servers stop taking it
    within their cache TTL."""
    if token_id.startswith("cpt_"):
        token_id = token_id[4:].split("_", 1)[0]
    if not ks.revoke_token(token_id, tenant=tenant):
        raise click.ClickException(f"no live token {token_id}")
    click.echo(f"revoked {token_id}")


# -- cryptoplane tenants -----------------------------------------------------------------------


@click.group("tenants")
def tenants() -> None:
    """Tenants and their rate limits, in the keystore (servers apply changes live)."""


def _rate(value: float | None) -> float | None:
    return None if value is None or value == 0 else value


@tenants.command("create")
@click.argument("tenant")
@click.option("--ops", type=click.FloatRange(0), default=None, help="Requests/s (0: none).")
@click.option("--bytes", "nbytes", type=click.FloatRange(0), default=None,
              help="Payload bytes/s (0: none).")
@_with_store
def tenants_create(ks: Any, tenant: str, ops: float | None, nbytes: float | None) -> None:
    """Create a tenant, optionally with limits."""
    if not ks.create_tenant(tenant, ops=_rate(ops), bytes=_rate(nbytes)):
        raise click.ClickException(f"tenant {tenant!r} already exists")
    click.echo(f"created {tenant}")


@tenants.command("list")
@click.option("--json", "as_json", is_flag=True)
@_with_store
def tenants_list(ks: Any, as_json: bool) -> None:
    """Every tenant with its limits."""
    for t in ks.list_tenants():
        lim = ks.tenant_limits(t)
        if as_json:
            click.echo(json.dumps({"tenant": t, "ops_per_s": lim.ops, "bytes_per_s": lim.bytes}))
        else:
            click.echo(f"{t}  ops/s={lim.ops or 'unlimited'}  bytes/s={lim.bytes or 'unlimited'}")


@tenants.command("limits")
@click.argument("tenant")
@click.option("--ops", type=click.FloatRange(0), default=None,
              help="New requests/s (0: unlimited).")
@click.option("--bytes", "nbytes", type=click.FloatRange(0), default=None,
              help="New payload bytes/s (0: unlimited).")
@_with_store
def tenants_limits(ks: Any, tenant: str, ops: float | None, nbytes: float | None) -> None:
    """Show a tenant's limits, or change them (an option left out keeps its value)."""
    lim = ks.tenant_limits(tenant)
    if ops is not None or nbytes is not None:
        lim = ks.set_tenant_limits(tenant, _rate(ops) if ops is not None else lim.ops,
                                   _rate(nbytes) if nbytes is not None else lim.bytes)
    click.echo(json.dumps({"tenant": tenant, "ops_per_s": lim.ops, "bytes_per_s": lim.bytes}))
