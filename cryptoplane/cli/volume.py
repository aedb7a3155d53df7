"""``cryptoplane volume``: LUKS1/LUKS2 volumes that cryptsetup itself can open.

Thin over ``cryptoplane.volume.luks``. Passphrases never come from the command line:
they are prompted for (hidden; new ones twice), read whole from ``--key-file FILE``
(``-`` is stdin), or read as one line from ``--passphrase-fd N``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from ..volume import kdf as kdfs
from ..volume import luks
from .signals import on_signals
from .volume_options import (
    header_option,
    new_secret_options,
    read_secret,
    run,
    secret_options,
)

F = TypeVar("F", bound=Callable[..., Any])


def _kdf_options(fn: F) -> F:
    for opt in reversed([
        click.option("--pbkdf", type=click.Choice(["argon2id", "argon2i", "pbkdf2"]),
                     help="Keyslot KDF (default argon2id; LUKS1: pbkdf2)."),
        click.option("--iter-time", type=click.IntRange(1), metavar="MS",
                     help="Benchmark the KDF to take MS milliseconds (default 2000)."),
        click.option("--pbkdf-force-iterations", type=click.IntRange(1), metavar="N",
                     help="Use exactly N iterations (pbkdf2) or passes (argon2)."),
        click.option("--pbkdf-memory", type=click.IntRange(8), metavar="KiB",
                     help="Argon2 memory in KiB (default 1048576)."),
        click.option("--pbkdf-parallel", type=click.IntRange(1, 64), metavar="N",
                     help="Argon2 lanes (default: up to 4 CPUs)."),
        click.option("--hash", "hash_name", default="sha256", show_default=True,
                     help="PBKDF2 hash."),
    ]):
        fn = opt(fn)
    return fn


def _kdf_params(pbkdf: str | None, version: int, force: int | None, memory: int | None,
                parallel: int | None, hash_name: str, iter_time: int | None,
                ) -> kdfs.KdfParams | None:
    name = pbkdf or ("pbkdf2" if version == 1 else "argon2id")
    if force is not None:
        if name == "pbkdf2":
            return kdfs.Pbkdf2(hash_name, force)
        return kdfs.Argon2(name, force, memory or kdfs.ARGON2_DEFAULT_MEMORY_KIB,
                           parallel or min(4, os.cpu_count() or 1))
    if name != "pbkdf2" and (memory or parallel):
        return kdfs.benchmark(name, iter_time_ms=iter_time or kdfs.DEFAULT_ITER_TIME_MS,
                              max_memory_kib=memory or kdfs.ARGON2_DEFAULT_MEMORY_KIB,
                              cpus=parallel)
    if name == "pbkdf2" and hash_name != "sha256":
        return kdfs.benchmark("pbkdf2", hash_name=hash_name,
                              iter_time_ms=iter_time or kdfs.DEFAULT_ITER_TIME_MS)
    return None


def _version_of(path: str, header: str | None) -> int:
    return int(run(lambda: luks.dump(path, header=header))["version"])


# -- commands ------------------------------------------------------------------------

@click.group()
def volume() -> None:
    """LUKS2 and LUKS1 encrypted volumes, compatible with cryptsetup.

    Works on image files, block devices and detached headers (--header). Passphrases
    are prompted for, or read from --key-file FILE or --passphrase-fd N; never from the
    command line.
    """


@volume.command("format")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--type", "luks_type", type=click.Choice(["luks2", "luks1"]), default="luks2",
              show_default=True, help="LUKS version.")
@click.option("--cipher", "-c", default="aes-xts-plain64", show_default=True,
              help="Data cipher spec (aes-xts-plain64, aes-cbc-essiv:sha256, ...).")
@click.option("--key-size", "-s", type=int, default=512, show_default=True,
              help="Volume key size in bits (512 = AES-256-XTS).")
@click.option("--sector-size", type=click.Choice(["512", "1024", "2048", "4096"]),
              default="4096", show_default=True, help="LUKS2 data sector size.")
@click.option("--label", help="LUKS2 label.")
@click.option("--uuid", help="Volume UUID (default: random).")
@click.option("--offset", type=click.IntRange(0), metavar="BYTES",
              help="Data offset in bytes (default 16 MiB, or 0 with --header).")
@click.option("--wipe", is_flag=True, help="Fill the data area with encrypted zeros.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_kdf_options
@secret_options
@header_option
@on_signals
def format_cmd(path: str, luks_type: str, cipher: str, key_size: int, sector_size: str,
               label: str | None, uuid: str | None, offset: int | None, wipe: bool, yes: bool,
               pbkdf: str | None, iter_time: int | None, pbkdf_force_iterations: int | None,
               pbkdf_memory: int | None, pbkdf_parallel: int | None, hash_name: str,
               key_file: str | None, passphrase_fd: int | None, header: str | None) -> None:
    """Make a new LUKS volume on PATH (destroys what is there)."""
    version = 1 if luks_type == "luks1" else 2
    if not yes:
        click.confirm(f"This overwrites the start of {path} and makes its data unreadable. "
                      f"Continue?", abort=True, err=True)
    secret = read_secret(key_file, passphrase_fd, "New passphrase", new=True)
    params = run(lambda: _kdf_params(pbkdf, version, pbkdf_force_iterations, pbkdf_memory,
                                     pbkdf_parallel, hash_name, iter_time))
    info = run(lambda: luks.format(
        path, secret, version=version, cipher=cipher, key_size=key_size,
        sector_size=int(sector_size), kdf=pbkdf, kdf_params=params, iter_time_ms=iter_time,
        label=label, uuid=uuid, header=header, data_offset=offset))
    click.echo(f"LUKS{info.version} volume {info.uuid}: {info.cipher}, {info.key_size}-bit "
               f"key, data at {info.data_offset}, keyslot {info.keyslot}")
    if wipe:
        _wipe(path, secret, header)


def _wipe(path: str, secret: bytes, header: str | None) -> None:
    """Encrypted zeros over the whole data area, written through the volume's own data
    path (one rule for IVs: a separate loop here once got them wrong)."""
    from ..plane import Plane
    from ..volume.device import Volume

    layout = run(lambda: luks.unlock(path, passphrase=secret, header=header))
    chunk = 1 << 20
    columns = (TextColumn("wiping"), BarColumn(), TransferSpeedColumn())
    with Plane() as plane, Volume(path, layout, plane) as vol, \
            Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("wipe", total=vol.size)
        for done in range(0, vol.size, chunk):
            vol.write_zeroes(done, min(chunk, vol.size - done))
            bar.update(task, completed=min(done + chunk, vol.size))
        vol.flush()


@volume.command("open-test")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--key-slot", "-S", type=int, help="Try this keyslot only.")
@secret_options
@header_option
def open_test(path: str, key_slot: int | None, key_file: str | None,
              passphrase_fd: int | None, header: str | None) -> None:
    """Check a passphrase (cryptsetup open --test-passphrase); exit 2 if it is wrong."""
    secret = read_secret(key_file, passphrase_fd, "Passphrase")
    slot = run(lambda: luks.test_passphrase(path, passphrase=secret, header=header,
                                            slot=key_slot))
    click.echo(f"Passphrase opens keyslot {slot}.")


@volume.command("dump")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@header_option
def dump_cmd(path: str, as_json: bool, header: str | None) -> None:
    """Show the header: segments, keyslots, digests (no secrets)."""
    d = run(lambda: luks.dump(path, header=header))
    if as_json:
        click.echo(json.dumps(d, indent=2, sort_keys=True))
        return
    console = Console()
    general = Table(title=f"LUKS{d['version']} header", show_header=False)
    for k in ("version", "uuid", "label", "epoch", "metadata_size", "keyslots_size",
              "cipher", "hash", "key_size", "data_offset", "header_copies", "requirements"):
        if k in d:
            general.add_row(k, str(d[k]))
    console.print(general)
    if "segments" in d:
        seg = Table(title="Data segments")
        for col in ("id", "type", "offset", "size", "cipher", "sector_size", "iv_tweak"):
            seg.add_column(col)
        for i, s in d["segments"].items():
            seg.add_row(i, s["type"], str(s["offset"]), str(s["size"]), s["cipher"],
                        str(s["sector_size"]), str(s["iv_tweak"]))
        console.print(seg)
    ks = Table(title="Keyslots")
    for col in ("slot", "kdf", "cost", "area offset", "area size"):
        ks.add_column(col)
    for i, k in d["keyslots"].items():
        kd = k["kdf"]
        if "unusable" in k:
            cost = f"unusable: {k['unusable']}"
        elif kd["type"] == "pbkdf2":
            cost = f"{kd['iterations']} iterations ({kd['hash']})"
        else:
            cost = f"time {kd['time']}, {kd['memory']} KiB, {kd['cpus']} lanes"
        if k.get("bound") is False:
            cost += " (unbound)"
        ks.add_row(i, kd["type"], cost, str(k["area_offset"]), str(k["area_size"]))
    console.print(ks)


def _params_for(path: str, header: str | None, pbkdf: str | None, iterations: int | None,
                memory: int | None, parallel: int | None, hash_name: str,
                iter_time: int | None) -> Any:
    """The KDF costs for a new keyslot of the volume at ``path`` (its version decides
    what is allowed)."""
    version = _version_of(path, header)
    return run(lambda: _kdf_params(pbkdf, version, iterations, memory, parallel, hash_name,
                                   iter_time))


@volume.command("add-key")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--key-slot", "-S", type=int, help="Put the new passphrase in this slot.")
@new_secret_options
@_kdf_options
@secret_options
@header_option
@on_signals
def add_key_cmd(path: str, key_slot: int | None, new_key_file: str | None,
                new_passphrase_fd: int | None, pbkdf: str | None, iter_time: int | None,
                pbkdf_force_iterations: int | None, pbkdf_memory: int | None,
                pbkdf_parallel: int | None, hash_name: str, key_file: str | None,
                passphrase_fd: int | None, header: str | None) -> None:
    """Add a passphrase, authorised by an existing one."""
    old = read_secret(key_file, passphrase_fd, "Existing passphrase")
    new = read_secret(new_key_file, new_passphrase_fd, "New passphrase", new=True)
    params = _params_for(path, header, pbkdf, pbkdf_force_iterations, pbkdf_memory,
                         pbkdf_parallel, hash_name, iter_time)
    slot = run(lambda: luks.add_key(path, passphrase=old, new_passphrase=new, slot=key_slot,
                                    kdf=pbkdf, kdf_params=params, iter_time_ms=iter_time,
                                    header=header))
    click.echo(f"Added keyslot {slot}.")


@volume.command("remove-key")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--key-slot", "-S", type=int,
              help="Destroy this slot (luksKillSlot) instead of the passphrase's.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before removing the last slot.")
@secret_options
@header_option
@on_signals
def remove_key_cmd(path: str, key_slot: int | None, yes: bool, key_file: str | None,
                   passphrase_fd: int | None, header: str | None) -> None:
    """Remove the keyslot a passphrase opens, or the slot --key-slot names.

    With --key-slot, a passphrase of another keyslot is asked for (of this one, if it is
    the last), as cryptsetup luksKillSlot does: a wrong one exits 2 and changes nothing.
    """
    secret = read_secret(key_file, passphrase_fd, "Passphrase to remove" if key_slot is None
                         else "Enter any remaining passphrase")
    d = run(lambda: luks.dump(path, header=header))
    if len(d["keyslots"]) == 1 and not yes:
        click.confirm("This is the last keyslot: the volume will be unusable. Continue?",
                      abort=True, err=True)
    slot = run(lambda: luks.remove_key(path, slot=key_slot, passphrase=secret,
                                       header=header))
    click.echo(f"Removed keyslot {slot}.")


@volume.command("change-key")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--key-slot", "-S", type=int, help="Change this slot only.")
@new_secret_options
@_kdf_options
@secret_options
@header_option
@on_signals
def change_key_cmd(path: str, key_slot: int | None, new_key_file: str | None,
                   new_passphrase_fd: int | None, pbkdf: str | None, iter_time: int | None,
                   pbkdf_force_iterations: int | None, pbkdf_memory: int | None,
                   pbkdf_parallel: int | None, hash_name: str, key_file: str | None,
                   passphrase_fd: int | None, header: str | None) -> None:
    """Change a passphrase, crash-safely (the old one works until the new one does)."""
    old = read_secret(key_file, passphrase_fd, "Current passphrase")
    new = read_secret(new_key_file, new_passphrase_fd, "New passphrase", new=True)
    params = _params_for(path, header, pbkdf, pbkdf_force_iterations, pbkdf_memory,
                         pbkdf_parallel, hash_name, iter_time)
    slot = run(lambda: luks.change_key(path, old, new, slot=key_slot, kdf=pbkdf,
                                       kdf_params=params, iter_time_ms=iter_time,
                                       header=header))
    click.echo(f"Passphrase changed; it is in keyslot {slot}.")


@volume.command("backup-header")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_file", type=click.Path(dir_okay=False))
@header_option
def backup_header_cmd(path: str, out_file: str, header: str | None) -> None:
    """Copy the header and keyslot areas to OUT_FILE (which must not exist)."""
    size = run(lambda: luks.backup_header(path, out_file, header=header))
    click.echo(f"Header backup of {size} bytes written to {out_file}.")


@volume.command("restore-header")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.argument("backup_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@header_option
@on_signals
def restore_header_cmd(path: str, backup_file: str, yes: bool, header: str | None) -> None:
    """Write a header backup back to PATH (validated first)."""
    if not yes:
        click.confirm(f"Replace the header of {path} with {backup_file}?", abort=True,
                      err=True)
    run(lambda: luks.restore_header(path, backup_file, header=header))
    click.echo("Header restored.")


@volume.command("erase")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@header_option
@on_signals
def erase_cmd(path: str, yes: bool, header: str | None) -> None:
    """Crypto-erase: destroy every keyslot so the data can never be opened again."""
    if not yes:
        click.confirm(f"Destroy all keyslots of {path}? Its data will be lost for good.",
                      abort=True, err=True)
    run(lambda: luks.erase(path, header=header))
    click.echo("All keyslots destroyed.")


__all__ = ["volume"]
