"""``cryptoplane volume bench``: the Cloudflare experiment in user space (see
``cryptoplane.yardstick.volume_bench``), as a table of throughputs and the acceptance ratios."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import click
from rich.console import Console
from rich.table import Table

from cryptoplane.cli.sizes import parse_size
from cryptoplane.exceptions import CryptoplaneError
from cryptoplane.yardstick import volume_bench as vb

from .signals import on_signals


@click.command("bench")
@click.option("--size", default="1G", show_default=True,
              help="Data size of each image in /dev/shm (e.g. 256M, 1G).")
@click.option("--runtime", default=5.0, show_default=True,
              help="Seconds per fio load.")
@click.option("--server", "servers", multiple=True,
              type=click.Choice([s for s in ("ours-raw", "ours-luks1", "nbdkit-luks",
                                             "qemu-nbd-luks", "nbdkit-raw", "ours-luks2-4k")]),
              help="Only these servers (repeatable); default: all.")
@click.option("--load", "load_names", multiple=True,
              help="Only these loads (repeatable, e.g. 'fio rand read 4k QD32').")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1),
              help="Measure every cell this many times, the servers interleaved, and "
                   "report the median (this VM's single runs moved by up to 2x).")
@click.option("--quick", is_flag=True,
              help="A short run (~1 min): 256M images, 2 s per fio load, one round; ours on LUKS2 "
                   "and LUKS1 beside nbdkit + luks filter and our unencrypted server.")
@click.option("--dir", "workdir", default="/dev/shm", show_default=True,
              help="Where the images are made (RAM-backed, so the disk is not measured).")
@click.option("--processes", type=click.IntRange(1), default=None,
              help="Worker processes of our servers (serve --processes); default: one "
                   "per core. nbdkit and qemu-nbd use their own threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@on_signals
def bench(size: str, runtime: float, servers: tuple[str, ...], load_names: tuple[str, ...],
          rounds: int, quick: bool, workdir: str, processes: int | None,
          as_json: bool) -> None:
    """Serve a LUKS volume over NBD and load it with fio and nbdcopy, beside the peers.

    Makes a raw image, a LUKS1 and a LUKS2 (4096-byte sectors) volume in /dev/shm, then
    serves each with cryptoplane, nbdkit (file, and file + luks filter) and qemu-nbd (luks
    driver) on Unix sockets, and measures sequential 1 MiB and random 4 KiB (queue depth
    32) reads and writes. Prints MB/s and IOPS, the ratios the project is held to, and
    every command, so any figure can be reproduced by hand.
    """
    console = Console(stderr=True)
    data_size = parse_size("256M" if quick and size == "1G" else size, least=16 << 20)
    data_size -= data_size % (1 << 20)
    if quick:
        runtime = min(runtime, 2.0)
        rounds = 1
        servers = servers or ("ours-raw", "ours-luks2-4k", "ours-luks1", "nbdkit-luks")
        load_names = load_names or ("nbdcopy read", "nbdcopy write", "fio rand read 4k QD32",
                                    "fio rand write 4k QD32")
    try:
        with console.status("preparing images") as status:
            results = vb.run_bench(data_size, runtime, only=servers or None,
                                   load_names=load_names or None, workdir=workdir,
                                   rounds=rounds, processes=processes,
                                   progress=lambda what: status.update(what))
    except (CryptoplaneError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(1)
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in results], indent=1))
        return
    out = Console(width=None if sys.stdout.isatty() else 200)  # a log keeps whole rows
    names = list(dict.fromkeys(r.server for r in results))
    table = _grid(f"NBD over a Unix socket, {data_size >> 20} MiB images in {workdir}"
                  + (f", median of {rounds} rounds" if rounds > 1 else ""), results, names,
                  _rate_cell)
    out.print(table)
    if any(r.cpu is not None for r in results):
        out.print(_cpu_table(results, names))
    rows = vb.ratios(results)
    if rows:
        ratio_table = Table(title="ratios (the issue's bars)")
        for col in ("load", "ours / peer", "ratio", "bar", ""):
            ratio_table.add_column(col)
        for load, ours, peer, ratio, bar_value, met in rows:
            ratio_table.add_row(load, f"{ours} / {peer}", f"{ratio:.2f}", f">= {bar_value}",
                                "[green]met[/]" if met else "[red]below[/]")
        out.print(ratio_table)
    out.print("[bold]commands[/]")
    for r in results:
        out.print(f"  {r.server}: {r.command}", soft_wrap=True, highlight=False)


def _rate_cell(r: vb.Result) -> str:
    spread = (f" ({min(r.samples):,.0f}-{max(r.samples):,.0f})" if len(r.samples) > 1
              else "")
    return f"{r.value:,.0f} {r.unit}{spread}"


def _cpu_cell(r: vb.Result) -> str:
    if r.cpu is None:
        return ""
    return f"{r.cpu:.2f} µs" if r.unit == "IOPS" else f"{r.cpu:.2f} s/GiB"


def _cpu_table(results: list[vb.Result], names: list[str]) -> Table:
    """What each server spent per unit of work: steadier than the rates on a shared
    machine, and where the cost of encryption shows (ours-luks1 against ours-raw)."""
    return _grid("server CPU (all its processes and threads): µs per I/O, or CPU seconds "
                 "per GiB moved", results, names, _cpu_cell)


def _grid(title: str, results: list[vb.Result], names: list[str],
          cell: Callable[[vb.Result], str]) -> Table:
    """A table of loads (rows) by servers (columns), each cell drawn by ``cell``."""
    table = Table(title=title)
    table.add_column("load")
    for name in names:
        table.add_column(name, justify="right")
    by = {(r.server, r.load): r for r in results}
    for load in dict.fromkeys(r.load for r in results):
        rs = [by.get((name, load)) for name in names]
        table.add_row(load, *("" if r is None else cell(r) for r in rs))
    return table
