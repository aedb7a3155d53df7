"""``cryptoplane keys``: a tenant's named keys on a fabric server (create, list, read,
rotate, config, trim, delete, export-public), through the fabric client.

The token comes from ``--token`` or ``CRYPTOPLANE_TOKEN`` and is never printed. Errors
are one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import functools
import json
import ssl
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from ..exceptions import CryptoplaneError
from ..fabric.client_sync import Client

F = TypeVar("F", bound=Callable[..., Any])


def _ssl_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not (ca or cert):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def connection_options(fn: F) -> F:
    """--server, --token, --ca/--cert/--key, --json, and one-line errors."""

    @click.option("--server", "server", envvar="CRYPTOPLANE_SERVER", required=True,
                  help="Server URL: tcp://host:port, tls://host:port or unix:///path "
                       "(env CRYPTOPLANE_SERVER).")
    @click.option("--token", envvar="CRYPTOPLANE_TOKEN", show_envvar=True,
                  help="Bearer token (prefer the environment: a command line is visible "
                       "to other users).")
    @click.option("--ca", type=click.Path(exists=True, dir_okay=False),
                  help="CA certificate to verify a tls:// server with.")
    @click.option("--cert", type=click.Path(exists=True, dir_okay=False),
                  help="Client certificate (mutual TLS).")
    @click.option("--key", "cert_key", type=click.Path(exists=True, dir_okay=False),
                  help="The client certificate's private key.")
    @click.option("--timeout", type=float, default=30.0, show_default=True,
                  help="Seconds to wait for the server.")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @functools.wraps(fn)
    def wrapper(server: str, token: str | None, ca: str | None, cert: str | None,
                cert_key: str | None, timeout: float, as_json: bool, **kw: Any) -> Any:
        try:
            ctx = _ssl_context(ca, cert, cert_key)
            if server.startswith("tls://") and ctx is None:
                ctx = ssl.create_default_context()
            with Client(server, token=token, ssl=ctx, connections=1, timeout=timeout,
                        name="cryptoplane keys") as client:
                return fn(client, as_json, **kw)
        except (CryptoplaneError, OSError, ssl.SSLError) as e:
            _fail(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        except ValueError as e:
            _fail(str(e))
        return None

    return wrapper  # type: ignore[return-value]


def _when(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):
        return "-"


def _show(obj: dict[str, Any], as_json: bool, title: str = "") -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, sort_keys=True))
        return
    table = Table(title=title or None, title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for k, v in obj.items():
        if k in ("created_at", "updated_at"):
            v = _when(v)
        elif isinstance(v, dict):
            v = "\n".join(f"{kk}: {str(vv).strip()}" for kk, vv in v.items())
        elif isinstance(v, list):
            v = ", ".join(str(x) for x in v)
        table.add_row(k, str(v))
    Console().print(table)


@click.group()
def keys() -> None:
    """Manage a tenant's named keys on a fabric server (Vault transit-style keyrings:
    versions, rotation, minimum versions, export of public halves)."""


@keys.command("create")
@click.argument("name")
@click.option("--type", "key_type", default="aes256-gcm96", show_default=True,
              help="Key type (aes256-gcm96, chacha20-poly1305, hmac, rsa-2048, rsa-3072, "
                   "rsa-4096, ecdsa-p256, ecdsa-p384, ed25519).")
@click.option("--exportable", is_flag=True, help="Allow export of the material.")
@click.option("--deletion-allowed", is_flag=True, help="Allow the key to be deleted.")
@click.option("--derived", is_flag=True, help="Derive a key per context.")
@click.option("--convergent", is_flag=True,
              help="Deterministic encryption per context (needs --derived).")
@connection_options
def create_cmd(client: Client, as_json: bool, name: str, key_type: str, exportable: bool,
               deletion_allowed: bool, derived: bool, convergent: bool) -> None:
    """Create the key NAME."""
    policy = {k: True for k, v in (("exportable", exportable),
                                   ("deletion_allowed", deletion_allowed),
                                   ("derived", derived), ("convergent", convergent)) if v}
    _show(client.create_key(name, key_type, **policy), as_json, f"key {name}")


@keys.command("list")
@connection_options
def list_cmd(client: Client, as_json: bool) -> None:
    """List the tenant's keys."""
    names = client.list_keys()
    if as_json:
        click.echo(json.dumps({"keys": names}))
        return
    table = Table(title=f"{len(names)} keys", title_justify="left")
    table.add_column("name")
    for n in sorted(names):
        table.add_row(n)
    Console().print(table)


@keys.command("read")
@click.argument("name")
@connection_options
def read_cmd(client: Client, as_json: bool, name: str) -> None:
    """Show NAME's policy and versions (and public keys of key pairs)."""
    _show(client.read_key(name), as_json, f"key {name}")


@keys.command("rotate")
@click.argument("name")
@connection_options
def rotate_cmd(client: Client, as_json: bool, name: str) -> None:
    """Add a new version to NAME; new encryptions use it."""
    _show(client.rotate_key(name), as_json, f"key {name}")


@keys.command("config")
@click.argument("name")
@click.option("--min-decryption-version", type=int,
              help="Refuse ciphertexts of older versions.")
@click.option("--min-encryption-version", type=int,
              help="Encrypt with at least this version (0: the latest).")
@click.option("--deletion-allowed/--no-deletion-allowed", default=None,
              help="Allow or forbid deleting the key.")
@click.option("--exportable", is_flag=True, default=None,
              help="Make the key exportable (cannot be undone).")
@click.option("--auto-rotate-period", type=float,
              help="Seconds between automatic rotations (0: never).")
@connection_options
def config_cmd(client: Client, as_json: bool, name: str,
               min_decryption_version: int | None, min_encryption_version: int | None,
               deletion_allowed: bool | None, exportable: bool | None,
               auto_rotate_period: float | None) -> None:
    """Change NAME's policy."""
    changes = {k: v for k, v in (("min_decryption_version", min_decryption_version),
                                 ("min_encryption_version", min_encryption_version),
                                 ("deletion_allowed", deletion_allowed),
                                 ("exportable", exportable),
                                 ("auto_rotate_period", auto_rotate_period)) if v is not None}
    if not changes:
        _fail("nothing to change: give at least one option (see --help)")
    _show(client.config_key(name, **changes), as_json, f"key {name}")


@keys.command("trim")
@click.argument("name")
@click.option("--min-version", type=int, required=True,
              help="Destroy every version below this one.")
@connection_options
def trim_cmd(client: Client, as_json: bool, name: str, min_version: int) -> None:
    """Destroy NAME's versions below --min-version (ciphertexts under them are lost)."""
    _show(client.trim_key(name, min_version), as_json, f"key {name}")


@keys.command("delete")
@click.argument("name")
@connection_options
def delete_cmd(client: Client, as_json: bool, name: str) -> None:
    """Delete NAME (its policy must allow deletion)."""
    client.delete_key(name)
    if as_json:
        click.echo(json.dumps({"deleted": name}))
    else:
        click.echo(f"deleted {name}")


@keys.command("export-public")
@click.argument("name")
@click.option("--version", type=int, help="Key version (default: the latest).")
@connection_options
def export_public_cmd(client: Client, as_json: bool, name: str, version: int | None) -> None:
    """Print the public key (PEM) of the key pair NAME."""
    info = client.read_key(name)
    public = info.get("public_keys") or info.get("keys") or {}
    if not isinstance(public, dict) or not public:
        _fail(f"{name} has no public key (is it a key pair?)")
    want = str(version if version is not None else info.get("latest_version",
                                                            max(public, key=int)))
    pem = public.get(want)
    if isinstance(pem, dict):
        pem = pem.get("public_key") or pem.get("pem")
    if not pem:
        _fail(f"{name} has no version {want}")
    if as_json:
        click.echo(json.dumps({"name": name, "version": int(want), "public_key": pem}))
    else:
        click.echo(str(pem).rstrip("\n"))
