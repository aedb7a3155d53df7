"""``cryptoplane remote-speed``: a fabric server's figures and their ratios, in one run.

The measuring lives in ``cryptoplane.yardstick.remote_speed``; this module parses options
and prints the report (rich tables, or JSON with ``--json``).
"""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from ..yardstick import kmip_peer
from ..yardstick import remote_speed as rs
from .signals import on_signals
from .sizes import parse_size


def _value(value: float, unit: str) -> str:
    if unit == "µs":
        return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def _status(met: bool | None) -> str:
    return "" if met is None else "[green]met[/green]" if met else "[bold red]MISSED[/bold red]"


def render(report: rs.Report, console: Console) -> None:
    meta = report.meta
    console.print(f"cryptoplane remote-speed · {meta.get('cpus')} CPUs · Python "
                  f"{meta.get('python')} · {meta.get('duration_s'):g} s per figure after "
                  f"{meta.get('warmup_s'):g} s of warm-up · load average "
                  f"{meta.get('load_average_before', 0):.2f} before, "
                  f"{meta.get('load_average_after', 0):.2f} after", highlight=False)
    table = Table(title="figures (server and clients on loopback, this machine)",
                  title_justify="left")
    for name, justify in (("section", "left"), ("figure", "left"), ("value", "right"),
                          ("unit", "left"), ("target", "right"), ("", "left"),
                          ("how", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    hows: dict[str, int] = {}
    for f in report.figures:
        mark = hows.setdefault(f.load, len(hows) + 1) if f.load else None
        table.add_row(f.section, f.name, _value(f.value, f.unit), f.unit,
                      "" if f.target is None else f"≥ {f.target:,.0f}", _status(f.met),
                      ("" if mark is None else f"[{mark}]")
                      + (f" [red]{f.errors} errors[/red]" if f.errors else ""))
    console.print(table)
    for how, mark in hows.items():
        console.print(f"\\[{mark}] {how}", highlight=False)
    ratios = Table(title="ratios", title_justify="left")
    for name, justify in (("ratio", "left"), ("value", "right"), ("target", "right"),
                          ("", "left"), ("of", "left")):
        ratios.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in report.ratios:
        unit = "" if r.below else "x"
        target = "" if r.target is None else (f"< {r.target:g}" if r.below
                                               else f"≥ {r.target:g}x")
        ratios.add_row(r.name, f"{r.value:,.2f}{unit}" if r.value < 1000 else
                       f"{r.value:,.0f}{unit}", target, _status(r.met), r.what)
    console.print(ratios)
    for note in report.notes:
        console.print(note, highlight=False)
    missed = report.targets_missed()
    checked = sum(1 for f in report.figures if f.target is not None) + sum(
        1 for r in report.ratios if r.target is not None)
    console.print(f"targets: {checked - len(missed)}/{checked} met"
                  + "".join(f"; MISSED {m}" for m in missed), highlight=False)
    other = meta.get("other_processes_cores")
    console.print(f"took {meta.get('elapsed_s', 0):.1f} s" + (
        "" if other is None else f"; other processes used {other:.2f} of "
        f"{meta.get('cpus')} cores meanwhile (on average)"), highlight=False)


@click.command("remote-speed")
@click.option("--duration", type=float, default=None,
              help="Seconds per measurement (default 3, or 0.25 with --quick).")
@click.option("--quick", is_flag=True, help="Every figure, briefly (a smoke run: the "
              "figures are then rough), small streams.")
@click.option("--skip-kmip", is_flag=True, help="Leave PyKMIP's server out.")
@click.option("--tls", "tls_mode", type=click.Choice(["both", "on", "off"]), default="both",
              show_default=True, help="Measure the server with mutual TLS, without, or both.")
@click.option("--server", metavar="URL", help="Measure this server (tcp:// or tls://) "
              "instead of starting one; keys bench-aes and bench-rsa are created if missing.")
@click.option("--token", envvar="CRYPTOPLANE_TOKEN", help="Token for --server.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False),
              help="CA of a tls:// --server.")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False),
              help="Client certificate for a tls:// --server.")
@click.option("--key", "cert_key", type=click.Path(exists=True, dir_okay=False),
              help="Key of --cert.")
@click.option("--stream-clients", type=click.IntRange(1, 1000), default=None,
              help="Concurrent encrypt_stream clients (default 100; 4 with --quick).")
@click.option("--stream-size", default=None, metavar="SIZE",
              help="Bytes each stream client sends, k/M/G suffixes (default 64M; 4M "
                   "with --quick).")
@click.option("--in-flight", type=click.IntRange(1, 4096), default=1024, show_default=True,
              help="Requests the load generator keeps in flight per connection.")
@click.option("--load-processes", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Load generator processes for the pipelined figures.")
@click.option("--only", type=click.Choice(["remote-engine", "stream"]), default=None,
              help="Measure only this section (remote-engine: a plane on core 0 with and "
                   "without a remote engine to a server pinned to core 1; stream: "
                   "encrypt_stream from --stream-clients clients, plain TCP).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout "
              "(the tables go to stderr).")
@click.option("--check", is_flag=True, help="Exit 1 when a target is missed.")
@on_signals  # servers and their temporary folder go, whatever stops the run
def remote_speed(duration: float | None, quick: bool, skip_kmip: bool, tls_mode: str,
                 server: str | None, token: str | None, ca: str | None, cert: str | None,
                 cert_key: str | None, stream_clients: int | None, stream_size: str | None,
                 in_flight: int, load_processes: int, only: str | None, as_json: bool,
                 check: bool) -> None:
    """A fabric server's throughput, latency and ratios, server and clients on loopback.

    Pipelined 64-byte AES-256-GCM encrypts (with and without mutual TLS) and batches of
    1,000; RSA-2048 signs through the server beside this machine's local rate; a plane
    with a remote engine to a server on the other core; encrypt_stream from many clients;
    p50/p99 of single requests; PyKMIP's server on the same operations. The load comes
    from a lean generator (pre-encoded frames, many in flight): each figure says how.
    """
    kw: dict[str, object] = {
        "kmip": not skip_kmip, "tls": tls_mode != "off", "plain": tls_mode != "on",
        "server": server, "token": token, "ca": ca, "cert": cert, "cert_key": cert_key,
        "in_flight": in_flight, "load_processes": load_processes, "only": only}
    if duration is not None:
        kw["duration"] = duration
    if stream_clients is not None:
        kw["stream_clients"] = stream_clients
    if stream_size is not None:
        kw["stream_size"] = parse_size(stream_size, least=1 << 20)
    cfg = rs.Config.quick_config(**kw) if quick else rs.Config(**kw)  # type: ignore[arg-type]
    if only and server:
        raise click.UsageError("--only starts its own server")
    if server and server.startswith("tls://") and not (ca and cert and cert_key):
        raise click.UsageError("a tls:// --server needs --ca, --cert and --key")
    console = Console(stderr=True)
    try:
        with console.status("starting") as status:
            report = rs.run(cfg, progress=lambda text: status.update(text))
    except (rs.BenchError, kmip_peer.KmipUnavailable) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    render(report, console if as_json else Console())
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=1))
    if check and report.targets_missed():
        sys.exit(1)
