"""``cryptoplane keystore``: the keystore itself — its schema and master keys — for
operators; ``tokens`` and ``tenants`` (cli/server.py) act on what it holds.

A master-key rotation runs while servers keep serving: the master-key file holds the new
key on its first line and the old one below it; servers re-read it on SIGHUP; this command
rewraps every key version in short transactions (a crash just means running it again);
then the old line goes and the servers are sent SIGHUP once more.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..exceptions import CryptoplaneError
from .server import open_store, store_options


@click.group("keystore")
def keystore() -> None:
    """The keystore's schema and master keys (status, rotate-master)."""


def _open(store: str, master_key_file: str | None, master_key_env: str | None,
          master_passphrase_file: str | None) -> Any:
    return open_store(store, master_key_file, master_key_env, master_passphrase_file)


@keystore.command("status")
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status_cmd(store: str, master_key_file: str | None, master_key_env: str | None,
               master_passphrase_file: str | None, as_json: bool) -> None:
    """Schema version, the master key that wraps new versions, and how many key
    versions each master key wraps (a rotation in progress shows two)."""
    ks = _open(store, master_key_file, master_key_env, master_passphrase_file)
    try:
        info = {"schema_version": ks.schema_version(), "master": ks.master_id,
                "versions_by_master": ks.master_usage()}
    except CryptoplaneError as e:
        raise click.ClickException(str(e)) from None
    finally:
        ks.close()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"schema version   {info['schema_version']}")
    click.echo(f"wrapping master  {info['master']}")
    for mid, count in sorted(info["versions_by_master"].items()):
        click.echo(f"  {mid}  wraps {count} key version(s)")


@keystore.command("rotate-master")
@store_options
@click.option("--batch", type=click.IntRange(1, 10_000), default=100, show_default=True,
              help="Key versions rewrapped per transaction (short transactions keep "
                   "servers serving meanwhile).")
def rotate_master_cmd(store: str, master_key_file: str | None, master_key_env: str | None,
                      master_passphrase_file: str | None, batch: int) -> None:
    """Rewrap every key version under the master key on the first line of
    --master-key-file (the lines below it are the old keys, which only unwrap).

    \b
    Without stopping the servers:
      1. put the new key (64 hex digits) on top of the master-key file, keep the old below;
      2. send SIGHUP to every server (they re-read the file: new wraps, old unwraps);
      3. run this command (killed or failed? run it again: it goes on where it stopped);
      4. remove the old line and send SIGHUP again.
    """
    ks = _open(store, master_key_file, master_key_env, master_passphrase_file)
    try:
        before = ks.master_usage()
        total = sum(n for mid, n in before.items() if mid != ks.master_id)
        bar: Any
        with click.progressbar(length=max(total, 1), label="rewrapping",
                               file=sys.stderr) as bar:
            last = 0

            def progress(done: int) -> None:
                nonlocal last
                bar.update(done - last)
                last = done
            done = ks.rotate_master(batch=batch, on_batch=progress)
        after = ks.master_usage()
    except CryptoplaneError as e:
        raise click.ClickException(str(e)) from None
    finally:
        ks.close()
    click.echo(f"rewrapped {done} key version(s); every version is now under master "
               f"{ks.master_id}: {after}")
