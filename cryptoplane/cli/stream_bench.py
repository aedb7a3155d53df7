"""``cryptoplane stream bench``: age-format encryption beside ``age`` and ``openssl``
(see ``cryptoplane.stream.bench``), as a table of throughputs and ratios against age."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from cryptoplane.cli.signals import on_signals
from cryptoplane.cli.sizes import parse_size
from cryptoplane.stream import bench as sb


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
    console = Console(stderr=as_json)
    try:
        rows = sb.run_bench(parse_size(size, least=1 << 20), workdir=workdir, rounds=rounds,
                            console=console)
    except sb.BenchError as exc:
        Console(stderr=True).print(f"[red]error:[/] {exc}")
        sys.exit(1)
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=1))
