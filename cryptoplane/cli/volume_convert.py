"""``cryptoplane volume convert-ivs``: tell whether a volume's data follows the IV rule of
cryptoplane before it learnt dm-crypt's, and re-encrypt it in place if so."""

from __future__ import annotations

import contextlib

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TransferSpeedColumn

from ..volume import convert_ivs
from .signals import on_signals
from .sizes import parse_size
from .volume_options import Failed, header_option, read_secret, run, secret_options

_EXPLAIN = {
    "legacy": "its data follows the old IVs (sector-size units): dm-crypt and cryptsetup "
              "read it as garbage. Convert it with `cryptoplane volume convert-ivs PATH`.",
    "dm-crypt": "its data follows dm-crypt's IVs (512-byte units): nothing to do.",
    "converting": "a conversion was interrupted: run `cryptoplane volume convert-ivs PATH` "
                  "again to finish it (until then neither cryptsetup nor cryptoplane opens "
                  "the volume).",
    "unaffected": "it has 512-byte sectors (or is LUKS1), where both rules give the same "
                  "IVs: nothing to do.",
    "unknown": "no sampled sector looks like data under either rule (never written, or "
               "holding only compressed or encrypted files): cannot tell. If cryptoplane "
               "0.1 wrote it with sectors over 512 bytes, it needs converting "
               "(--force).",
}


@click.command("convert-ivs")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@secret_options
@header_option
@click.option("--check", is_flag=True,
              help="Only tell which IV rule the data follows (reads, writes nothing).")
@click.option("--hotzone-size", default="4M", show_default=True, metavar="BYTES",
              help="How much data is re-encrypted between two journal commits.")
@click.option("--force", is_flag=True,
              help="Convert even when the check cannot tell that the data follows the "
                   "old IVs (converting data that already follows dm-crypt's garbles it).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@on_signals
def convert_ivs_cmd(path: str, key_file: str | None, passphrase_fd: int | None,
                    header: str | None, check: bool, hotzone_size: str, force: bool,
                    yes: bool) -> None:
    """Convert a LUKS2 volume from cryptoplane's old data IVs to dm-crypt's.

    cryptoplane 0.1 counted the IVs of LUKS2 data in sector-size units; dm-crypt
    (and so cryptsetup, the kernel and every other reader) counts 512-byte units at every
    sector size. Volumes with 512-byte sectors, LUKS1 volumes and volumes cryptsetup
    wrote are not affected. With --check, this command decrypts sampled sectors both ways
    and says which rule the data follows. Otherwise it re-encrypts the data in place,
    hotzone by hotzone, each journalled in the header's keyslots area first: after a
    crash or Ctrl-C, run it again and it resumes where it stopped, losing nothing.
    """
    hotzone = parse_size(hotzone_size, least=512)
    secret = read_secret(key_file, passphrase_fd, "Enter passphrase")
    with contextlib.ExitStack() as stack:
        # one open, one KDF: an Argon2 keyslot costs a second and a gigabyte each time
        vol = run(lambda: stack.enter_context(
            convert_ivs.opened(path, secret, header=header, write=not check)))
        found = run(vol.inspect)
        click.echo(f"{path}: {_EXPLAIN[found.verdict]}", err=check)
        if found.sampled:
            click.echo(f"  sampled {found.sampled} sectors of {found.sector_size} bytes: "
                       f"{found.structured_old} look like data under the old IVs, "
                       f"{found.structured_new} under dm-crypt's", err=check)
        if check:
            click.echo(found.verdict)
            return
        if found.verdict in ("dm-crypt", "unaffected"):
            return
        if found.verdict == "unknown" and not force:
            raise Failed("not converting without --force: the check cannot tell which IVs "
                         "the data has")
        if not yes and found.verdict != "converting":
            click.confirm(f"Re-encrypt {found.size} bytes of {path} in place?", abort=True,
                          err=True)
        columns = (TextColumn("converting"), BarColumn(), TransferSpeedColumn())
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task("convert", total=found.size, completed=found.converted)
            size = run(lambda: vol.convert(
                hotzone=hotzone,
                progress=lambda done, total: bar.update(task, completed=done)))
    click.echo(f"Converted {size} bytes: the data now follows dm-crypt's IVs.")
