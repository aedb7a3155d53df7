"""``cryptoplane serve``: export images (LUKS volumes, or raw files) over NBD."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click

from ..exceptions import CryptoplaneError
from ..nbd.blockdev import BlockDevice, FileDevice
from ..nbd.limits import MIN_BUDGET, Limits
from .sizes import parse_size

_DEFAULTS = Limits()


def _budget(ctx: click.Context, param: click.Parameter, value: str) -> int:
    return parse_size(value, least=MIN_BUDGET)


def _read_fd(fd: int) -> bytes:
    with os.fdopen(fd, "rb", closefd=False) as f:
        data = f.read(64 * 1024 + 1)
    if len(data) > 64 * 1024:
        raise click.UsageError("the passphrase read from --passphrase-fd is over 64 KiB")
    return data.rstrip(b"\n")  # one trailing newline, as from echo, is not part of it


def _socket_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise click.BadParameter(f"{text!r} is not an octal permission mode such as 0600",
                                 param_hint="--socket-mode")
    return mode


def _processes(text: str) -> int | None:
    """``--processes``: a count, or None for auto."""
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(f"{text!r} is not a number of processes (1 or more) or "
                                 "auto", param_hint="--processes")
    return n


def _exposure(socket_path: str | None, mode: int, port: int | None,
              bind: str) -> list[str]:
    """Why serving without client authentication lets others read the disk, if it does."""
    from ..nbd.tls import is_loopback

    out = []
    if port is not None and not is_loopback(bind):
        out.append(f"serving on {bind or 'every address'} (not loopback) without client "
                   "authentication: anyone who reaches the port can read and write the "
                   "disk; use --tls-verify-peer with --tls-ca, or --tls-psk")
    if socket_path is not None and mode & 0o002:
        out.append(f"the socket {socket_path} is open to every local user ({mode:04o}) "
                   "without client authentication")
    return out


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
@click.option("--memory-budget", default="256M", show_default=True, callback=_budget,
              help="Memory for request payloads and replies, all clients together; past "
                   "it, clients wait (their sockets are not read) until some is freed.")
@click.option("--max-connections", type=click.IntRange(1), show_default=True,
              default=_DEFAULTS.max_connections,
              help="Connections served at once; more are closed as soon as accepted.")
@click.option("--handshake-timeout", type=click.FloatRange(0, min_open=True),
              default=_DEFAULTS.handshake_timeout, show_default=True, metavar="SECONDS",
              help="Close a connection that has not finished negotiating (TLS included).")
@click.option("--idle-timeout", type=click.FloatRange(0), show_default=True,
              default=_DEFAULTS.idle_timeout, metavar="SECONDS",
              help="Close a connection with nothing pending that sends nothing for this "
                   "long (0: never; a quiet disk is no fault).")
@click.option("--stall-timeout", type=click.FloatRange(0, min_open=True), show_default=True,
              default=_DEFAULTS.stall_timeout, metavar="SECONDS",
              help="Close a connection that makes no progress (sends nothing, reads none "
                   "of its replies) while a request or reply of its holds memory.")
@click.option("--max-options", type=click.IntRange(1), default=_DEFAULTS.max_options,
              show_default=True, help="Negotiation options allowed per connection.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
              help="PEM certificate: clients must then use STARTTLS (nbds://).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False),
              help="PEM private key for --tls-cert.")
@click.option("--tls-verify-peer", is_flag=True,
              help="Require a client certificate signed by --tls-ca (else the handshake "
                   "fails and nothing can be listed or read).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False),
              help="PEM CA certificate(s) that client certificates must chain to.")
@click.option("--tls-psk", type=click.Path(exists=True, dir_okay=False),
              help="TLS-PSK instead of certificates: a file of username:hexkey lines "
                   "(nbdkit's and psktool's format); only clients with a key connect.")
@click.option("--processes", default="1", show_default=True, metavar="N|auto",
              callback=lambda ctx, param, value: _processes(value),
              help="Server processes sharing the socket, for clients with several "
                   "connections (fio --numjobs, nbdcopy's multi-conn): each serves its "
                   "connections on its own core. The memory budget and the connection "
                   "limit are divided among them. auto: one per core, as many as the "
                   "memory budget allows (64 MiB each).")
@click.option("--socket-mode", default="0600", show_default=True, metavar="OCTAL",
              help="Permissions of the --socket file (0660: its group may connect too).")
def serve(images: tuple[str, ...], socket_path: str | None, port: int | None, bind: str,
          read_only: bool, names: tuple[str, ...], raw: bool, key_file: str | None,
          passphrase_fd: int | None, header: str | None, block_size: int,
          inline_limit: int | None, memory_budget: int, max_connections: int,
          handshake_timeout: float, idle_timeout: float, stall_timeout: float,
          max_options: int, tls_cert: str | None, tls_key: str | None,
          tls_verify_peer: bool, tls_ca: str | None, tls_psk: str | None,
          processes: int | None, socket_mode: str) -> None:
    """Export IMAGEs as NBD disks for qemu, nbdcopy, fio or any NBD client.

    Each IMAGE is a LUKS volume (LUKS2, or LUKS1 as qemu-img makes them), unlocked with a
    passphrase asked for once (hidden) or given by --key-file / --passphrase-fd — never
    on the command line — and served decrypted; with --raw, images are served as they
    are. Listen on a Unix socket (--socket) or on TCP (--port, 127.0.0.1 by default);
    the URLs to give clients are printed once the server is ready, e.g.

    \b
      cryptoplane serve disk.img --socket /tmp/nbd.sock
      qemu-system-x86_64 -drive file=nbd+unix:///disk?socket=/tmp/nbd.sock,format=raw

    Anyone who can reach the socket or port can read the disk unless clients must
    authenticate: --tls-cert/--tls-key with --tls-verify-peer and --tls-ca (client
    certificates), or --tls-psk (pre-shared keys). The Unix socket is 0600 by default.

    Several clients and connections at once are fine (multi-conn: a flush on any
    connection makes every completed write durable), up to --max-connections; what
    they can make the server hold is bounded by --memory-budget and the timeouts.
    SIGTERM or Ctrl-C stops accepting, finishes requests in flight, flushes and exits.
    """
    from ..nbd.runner import serve as run_server

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
    if tls_psk is not None and tls_cert is not None:
        raise click.UsageError("--tls-psk replaces --tls-cert/--tls-key: give one or the other")
    if tls_verify_peer and tls_cert is None:
        raise click.UsageError("--tls-verify-peer needs --tls-cert and --tls-key")
    if tls_verify_peer != (tls_ca is not None):
        raise click.UsageError("--tls-verify-peer and --tls-ca go together")
    mode = _socket_mode(socket_mode)
    export_names = list(names) or [Path(p).stem for p in images]
    if len(set(export_names)) != len(export_names):
        raise click.UsageError("two images would have the same export name: use --name")

    from ..nbd import tls as nbd_tls

    tls: nbd_tls.ServerTLS | None = None
    try:
        if tls_psk is not None:
            tls = nbd_tls.PSKContext(nbd_tls.load_psk_file(tls_psk))
        elif tls_cert is not None and tls_key is not None:
            tls = nbd_tls.certificate_context(tls_cert, tls_key, ca=tls_ca,
                                              verify_peer=tls_verify_peer)
    except nbd_tls.TLSConfigError as exc:
        raise click.ClickException(str(exc)) from None
    authenticated = tls_psk is not None or tls_verify_peer
    if not authenticated:
        for warning in _exposure(socket_path, mode, port, bind):
            click.echo(f"warning: {warning}", err=True)

    limits = Limits(memory_budget=memory_budget, max_connections=max_connections,
                    handshake_timeout=handshake_timeout, idle_timeout=idle_timeout,
                    stall_timeout=stall_timeout, max_options=max_options)
    from ..nbd import processes as nbd_processes

    if processes is None:
        processes = nbd_processes.auto_processes(limits)
    try:
        nbd_processes.share(limits, processes)
    except CryptoplaneError as exc:
        raise click.UsageError(str(exc)) from None
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

        where = dict(unix=socket_path, tcp=None if port is None else (bind, port),
                     socket_mode=mode, ready=ready, limits=limits)
        if processes > 1:
            # the exports are open: each worker inherits them (one unlock, one lock)
            nbd_processes.serve_processes(devices, processes, tls=tls,
                                          read_only=read_only, inline_limit=inline_limit,
                                          **where)  # type: ignore[arg-type]
        else:
            run_server(devices, tls=tls, read_only=read_only, inline_limit=inline_limit,
                       **where)  # type: ignore[arg-type]
    except (CryptoplaneError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        for dev in devices.values():
            with contextlib.suppress(OSError, CryptoplaneError):
                dev.close()
