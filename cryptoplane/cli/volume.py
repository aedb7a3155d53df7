"""``cryptoplane volume``: LUKS1/LUKS2 volumes that cryptsetup itself can open.

Thin over ``cryptoplane.volume.luks``. Passphrases never come from the command line:
they are prompted for (hidden; new ones twice), read whole from ``--key-file FILE``
(``-`` is stdin), or read as one line from ``--passphrase-fd N``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from ..exceptions import CryptoplaneError
from ..volume import kdf as kdfs
from ..volume import luks
from ..volume.errors import WrongPassphrase
from .signals import on_signals

F = TypeVar("F", bound=Callable[..., Any])
EXIT_WRONG_PASSPHRASE = 2  # as cryptsetup


class _Failed(click.ClickException):
    exit_code = 1


class _WrongPassphraseFailed(_Failed):
    exit_code = EXIT_WRONG_PASSPHRASE


def _run(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except WrongPassphrase as e:
        raise _WrongPassphraseFailed(str(e)) from None
    except CryptoplaneError as e:
        raise _Failed(f"{type(e).__name__}: {e}") from None


# -- secrets -------------------------------------------------------------------------

def _read_fd(fd: int) -> bytes:
    if fd == 0:
        data = sys.stdin.buffer.read(luks.KEY_FILE_MAX + 1)
    else:
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(luks.KEY_FILE_MAX + 1)
    line = data.split(b"\n", 1)[0]
    return line


def _read_key_file(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(luks.KEY_FILE_MAX + 1)
    try:
        with open(path, "rb") as f:
            return f.read(luks.KEY_FILE_MAX + 1)
    except OSError as e:
        raise _Failed(f"cannot read key file {path}: {e.strerror}") from None


def _secret(key_file: str | None, fd: int | None, prompt: str, new: bool = False) -> bytes:
    if key_file is not None and fd is not None:
        raise _Failed("give --key-file or --passphrase-fd, not both")
    if key_file is not None:
        data = _read_key_file(key_file)
    elif fd is not None:
        data = _read_fd(fd)
    else:
        text = click.prompt(prompt, hide_input=True, confirmation_prompt=new,
                            err=True, show_default=False)
        data = text.encode("utf-8")
    if len(data) > luks.KEY_FILE_MAX:
        raise _Failed(f"passphrase is longer than {luks.KEY_FILE_MAX} bytes")
    if new and not data:
        raise _Failed("refusing an empty passphrase")
    return data


def _secret_options(fn: F) -> F:
    fn = click.option("--passphrase-fd", type=int, metavar="N",
                      help="Read the passphrase (one line) from file descriptor N.")(fn)
    fn = click.option("--key-file", "-d", metavar="FILE",
                      help="Use the whole contents of FILE ('-': stdin) as passphrase.")(fn)
    return fn


def _new_secret_options(fn: F) -> F:
    fn = click.option("--new-passphrase-fd", type=int, metavar="N",
                      help="New passphrase: one line from file descriptor N.")(fn)
    fn = click.option("--new-key-file", metavar="FILE",
                      help="New passphrase: this file's contents.")(fn)
    return fn


def _header_option(fn: F) -> F:
    return click.option("--header", metavar="FILE", type=click.Path(dir_okay=False),
                        help="Detached LUKS header file (like cryptsetup --header).")(fn)


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
    return int(_run(lambda: luks.dump(path, header=header))["version"])


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
@_secret_options
@_header_option
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
    secret = _secret(key_file, passphrase_fd, "New passphrase", new=True)
    params = _run(lambda: _kdf_params(pbkdf, version, pbkdf_force_iterations, pbkdf_memory,
                                      pbkdf_parallel, hash_name, iter_time))
    info = _run(lambda: luks.format(
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

    layout = _run(lambda: luks.unlock(path, passphrase=secret, header=header))
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
@_secret_options
@_header_option
def open_test(path: str, key_slot: int | None, key_file: str | None,
              passphrase_fd: int | None, header: str | None) -> None:
    """Check a passphrase (cryptsetup open --test-passphrase); exit 2 if it is wrong."""
    secret = _secret(key_file, passphrase_fd, "Passphrase")
    slot = _run(lambda: luks.test_passphrase(path, passphrase=secret, header=header,
                                             slot=key_slot))
    click.echo(f"Passphrase opens keyslot {slot}.")


@volume.command("dump")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_header_option
def dump_cmd(path: str, as_json: bool, header: str | None) -> None:
    """Show the header: segments, keyslots, digests (no secrets)."""
    d = _run(lambda: luks.dump(path, header=header))
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
    return _run(lambda: _kdf_params(pbkdf, version, iterations, memory, parallel, hash_name,
                                    iter_time))


@volume.command("add-key")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--key-slot", "-S", type=int, help="Put the new passphrase in this slot.")
@_new_secret_options
@_kdf_options
@_secret_options
@_header_option
@on_signals
def add_key_cmd(path: str, key_slot: int | None, new_key_file: str | None,
                new_passphrase_fd: int | None, pbkdf: str | None, iter_time: int | None,
                pbkdf_force_iterations: int | None, pbkdf_memory: int | None,
                pbkdf_parallel: int | None, hash_name: str, key_file: str | None,
                passphrase_fd: int | None, header: str | None) -> None:
    """Add a passphrase, authorised by an existing one."""
    old = _secret(key_file, passphrase_fd, "Existing passphrase")
    new = _secret(new_key_file, new_passphrase_fd, "New passphrase", new=True)
    params = _params_for(path, header, pbkdf, pbkdf_force_iterations, pbkdf_memory,
                         pbkdf_parallel, hash_name, iter_time)
    slot = _run(lambda: luks.add_key(path, passphrase=old, new_passphrase=new, slot=key_slot,
                                     kdf=pbkdf, kdf_params=params, iter_time_ms=iter_time,
                                     header=header))
    click.echo(f"Added keyslot {slot}.")


@volume.command("remove-key")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--key-slot", "-S", type=int,
              help="Destroy this slot (luksKillSlot) instead of the passphrase's.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before removing the last slot.")
@_secret_options
@_header_option
@on_signals
def remove_key_cmd(path: str, key_slot: int | None, yes: bool, key_file: str | None,
                   passphrase_fd: int | None, header: str | None) -> None:
    """Remove the keyslot a passphrase opens, or the slot --key-slot names.

    With --key-slot, a passphrase of another keyslot is asked for (of this one, if it is
    the last), as cryptsetup luksKillSlot does: a wrong one exits 2 and changes nothing.
    """
    secret = _secret(key_file, passphrase_fd, "Passphrase to remove" if key_slot is None
                     else "Enter any remaining passphrase")
    d = _run(lambda: luks.dump(path, header=header))
    if len(d["keyslots"]) == 1 and not yes:
        click.confirm("This is the last keyslot: the volume will be unusable. Continue?",
                      abort=True, err=True)
    slot = _run(lambda: luks.remove_key(path, slot=key_slot, passphrase=secret,
                                        header=header))
    click.echo(f"Removed keyslot {slot}.")


@volume.command("change-key")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--key-slot", "-S", type=int, help="Change this slot only.")
@_new_secret_options
@_kdf_options
@_secret_options
@_header_option
@on_signals
def change_key_cmd(path: str, key_slot: int | None, new_key_file: str | None,
                   new_passphrase_fd: int | None, pbkdf: str | None, iter_time: int | None,
                   pbkdf_force_iterations: int | None, pbkdf_memory: int | None,
                   pbkdf_parallel: int | None, hash_name: str, key_file: str | None,
                   passphrase_fd: int | None, header: str | None) -> None:
    """Change a passphrase, crash-safely (the old one works until the new one does)."""
    old = _secret(key_file, passphrase_fd, "Current passphrase")
    new = _secret(new_key_file, new_passphrase_fd, "New passphrase", new=True)
    params = _params_for(path, header, pbkdf, pbkdf_force_iterations, pbkdf_memory,
                         pbkdf_parallel, hash_name, iter_time)
    slot = _run(lambda: luks.change_key(path, old, new, slot=key_slot, kdf=pbkdf,
                                        kdf_params=params, iter_time_ms=iter_time,
                                        header=header))
    click.echo(f"Passphrase changed; it is in keyslot {slot}.")


@volume.command("backup-header")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_file", type=click.Path(dir_okay=False))
@_header_option
def backup_header_cmd(path: str, out_file: str, header: str | None) -> None:
    """Copy the header and keyslot areas to OUT_FILE (which must not exist)."""
    size = _run(lambda: luks.backup_header(path, out_file, header=header))
    click.echo(f"Header backup of {size} bytes written to {out_file}.")


@volume.command("restore-header")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.argument("backup_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_header_option
@on_signals
def restore_header_cmd(path: str, backup_file: str, yes: bool, header: str | None) -> None:
    """Write a header backup back to PATH (validated first)."""
    if not yes:
        click.confirm(f"Replace the header of {path} with {backup_file}?", abort=True,
                      err=True)
    _run(lambda: luks.restore_header(path, backup_file, header=header))
    click.echo("Header restored.")


@volume.command("erase")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_header_option
@on_signals
def erase_cmd(path: str, yes: bool, header: str | None) -> None:
    """Crypto-erase: destroy every keyslot so the data can never be opened again."""
    if not yes:
        click.confirm(f"Destroy all keyslots of {path}? Its data will be lost for good.",
                      abort=True, err=True)
    _run(lambda: luks.erase(path, header=header))
    click.echo("All keyslots destroyed.")


__all__ = ["volume"]
