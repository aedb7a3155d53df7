"""``cryptoplane serve``: export images (LUKS volumes, or raw files) over NBD."""

from __future__ import annotations

import contextlib
import os
import ssl
import sys
from pathlib import Path

import click

from ..blockdev import BlockDevice, FileDevice
from ..exceptions import CryptoplaneError


def _read_fd(fd: int) -> bytes:
    with os.fdopen(fd, "rb", closefd=False) as f:
        data = f.read(64 * 1024 + 1)
    if len(data) > 64 * 1024:
        raise click.UsageError("the passphrase read from --passphrase-fd is over 64 KiB")
    return data.rstrip(b"\n")  # one trailing newline, as from echo, is not part of it


@click.command()
@click.argument("images", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Listen on this Unix socket.")
@click.option("--port", type=click.IntRange(0, 65535),
              help="Listen on this TCP port (0: any free port).")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address for --port.")
@click.option("--read-only", is_flag=True, help="Refuse every write (clients get EPERM).")
@click.option("--name", "names", multiple=True,
              help="Export name, once per IMAGE in order (default: the file's stem).")
@click.option("--raw", is_flag=True, help="Serve the images as they are, unencrypted.")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False),
              help="Unlock with this file's contents instead of a prompted passphrase.")
@click.option("--passphrase-fd", type=int,
              help="Read the passphrase from this open file descriptor.")
@click.option("--header", type=click.Path(exists=True, dir_okay=False),
              help="Detached LUKS header (only with a single IMAGE).")
@click.option("--block-size", type=click.IntRange(512, 65536), default=4096,
              show_default=True, help="Minimum I/O size advertised for --raw images.")
@click.option("--inline-limit", type=click.IntRange(0, 32 << 20), default=None,
              help="Requests up to this many bytes run on the event loop, bigger ones in a "
                   "thread pool (default: all inline for --raw, 64 KiB for volumes).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
              help="PEM certificate: clients must then use STARTTLS (nbds://).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False),
              help="PEM private key for --tls-cert.")
def serve(images: tuple[str, ...], socket_path: str | None, port: int | None, bind: str,
          read_only: bool, names: tuple[str, ...], raw: bool, key_file: str | None,
          passphrase_fd: int | None, header: str | None, block_size: int,
          inline_limit: int | None, tls_cert: str | None, tls_key: str | None) -> None:
    """Export IMAGEs as NBD disks for qemu, nbdcopy, fio or any NBD client.

    Each IMAGE is a LUKS volume (LUKS2, or LUKS1 as qemu-img makes them), unlocked with a
    passphrase asked for once (hidden) or given by --key-file / --passphrase-fd — never
    on the command line — and served decrypted; with --raw, images are served as they
    are. Listen on a Unix socket (--socket) or on TCP (--port, 127.0.0.1 by default);
    the URLs to give clients are printed once the server is ready, e.g.

    \b
      cryptoplane serve disk.img --socket /tmp/nbd.sock
      qemu-system-x86_64 -drive file=nbd+unix:///disk?socket=/tmp/nbd.sock,format=raw

    Several clients and connections at once are fine (multi-conn: a flush on any
    connection makes every completed write durable). SIGTERM or Ctrl-C stops accepting,
    finishes requests in flight, flushes and exits.
    """
    from ..nbd.server import serve as run_server

    if socket_path is None and port is None:
        raise click.UsageError("give --socket PATH or --port N")
    if names and len(names) != len(images):
        raise click.UsageError("give --name once per IMAGE, or not at all")
    if header is not None and len(images) != 1:
        raise click.UsageError("--header works with a single IMAGE")
    if raw and (key_file or passphrase_fd is not None or header):
        raise click.UsageError("--raw images take no key, passphrase or header")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    export_names = list(names) or [Path(p).stem for p in images]
    if len(set(export_names)) != len(export_names):
        raise click.UsageError("two images would have the same export name: use --name")

    tls = None
    if tls_cert is not None and tls_key is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(tls_cert, tls_key)

    devices: dict[str, BlockDevice] = {}
    try:
        if raw:
            for name, path in zip(export_names, images, strict=True):
                devices[name] = FileDevice(path, read_only=read_only, block_size=block_size)
        else:
            from ..volume import open_volume

            passphrase = None
            if passphrase_fd is not None:
                passphrase = _read_fd(passphrase_fd)
            elif key_file is None:
                passphrase = click.prompt("Passphrase", hide_input=True,
                                          err=True).encode("utf-8")
            for name, path in zip(export_names, images, strict=True):
                devices[name] = open_volume(path, passphrase=passphrase, key_file=key_file,
                                            header=header, read_only=read_only)
            passphrase = None

        def ready(urls: list[str]) -> None:
            for url in urls:
                click.echo(url)
            sys.stdout.flush()

        run_server(devices, unix=socket_path,
                   tcp=None if port is None else (bind, port), tls=tls,
                   read_only=read_only, ready=ready, inline_limit=inline_limit)
    except (CryptoplaneError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        for dev in devices.values():
            with contextlib.suppress(OSError, CryptoplaneError):
                dev.close()
