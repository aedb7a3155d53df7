"""``cryptoplane stream bench``: age-format encryption beside ``age`` and ``openssl``
(measured by ``cryptoplane.yardstick.stream_bench``), as a table of throughputs and
ratios against age."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from cryptoplane.cli.signals import on_signals
from cryptoplane.cli.sizes import parse_size
from cryptoplane.yardstick import stream_bench as sb


def render(report: sb.BenchReport, console: Console) -> None:
    """The table, then every command, so any figure can be reproduced by hand."""
    load = report.load
    table = Table(title=f"age-format encryption of {report.size >> 20} MiB in "
                        f"{report.workdir}: median of {report.rounds} interleaved rounds "
                        f"after a warm-up (load average {load[0]:.2f} before, "
                        f"{load[1]:.2f} after)",
                  caption="cryptoplane runs in-process, through cryptoplane.stream.encrypt/"
                          "decrypt, or, marked (payload), header + seal_payload/open_payload;"
                          " spread: slowest / fastest round")
    for name, justify in (("op", "left"), ("tool", "left"), ("workers", "right"),
                          ("MB/s", "right"), ("vs age", "right"), ("spread", "right"),
                          ("CPU s", "right"), ("age CPU/CPU", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in report.rows:
        table.add_row(r.op, r.tool, "" if r.workers is None else str(r.workers),
                      f"{r.mb_s:,.0f}", "" if r.vs_age is None else f"{r.vs_age:.2f}x",
                      f"{r.spread:.2f}", f"{r.cpu_s:.2f}",
                      "" if r.cpu_vs_age is None else f"{r.cpu_vs_age:.2f}x")
    console.print(table)
    console.print("commands (cryptoplane's as the equivalent CLI; it runs in-process):")
    for r in report.rows:
        console.print(f"  {r.command}", soft_wrap=True, highlight=False, markup=False)


@click.command("bench")
@click.option("--size", default="1G", show_default=True,
              help="Size of the random file to encrypt (e.g. 256M, 1G).")
@click.option("--rounds", default=9, show_default=True, type=click.IntRange(1, 50),
              help="Interleaved rounds; each figure is the median (tmpfs writes here vary up "
                   "to 3x between rounds: page faults on fresh memory).")
@click.option("--dir", "workdir", default="/dev/shm", show_default=True,
              help="Where the files are made (RAM-backed, so the disk is not measured).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@on_signals  # the work directory (a file of --size, and its copies) goes, whatever stops it
def bench(size: str, rounds: int, workdir: str, as_json: bool) -> None:
    """Encrypt and decrypt a file with cryptoplane (one worker, every core), age and
    openssl enc -aes-256-ctr, side by side.

    Prints MB/s (10**6 bytes/s), the ratio to age for each operation (the target:
    >= 1.5x on one core, >= 2x on all), how noisy the rounds were, and every command.
    SIGINT, SIGTERM and SIGHUP stop it, removing its files (exit status 130, 143, 129).
    """
    try:
        report = sb.run_bench(parse_size(size, least=1 << 20), workdir=workdir,
                              rounds=rounds)
    except sb.BenchError as exc:
        Console(stderr=True).print(f"[red]error:[/] {exc}")
        sys.exit(1)
    render(report, Console(stderr=as_json))
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in report.rows], indent=1))
