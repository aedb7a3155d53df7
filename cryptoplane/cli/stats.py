"""``cryptoplane stats``: a plane's counters as tables, JSON or Prometheus text.

The numbers come from a running plane's ``StatsServer`` (``--socket``), read over HTTP
on its Unix socket, or from a plane this command starts and loads for a moment
(``--demo``). Either way they are ``Plane.stats()``; this module only presents them.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import socket
import sys
import time
from concurrent.futures import Future, wait
from typing import Any

import click
from rich import box
from rich.columns import Columns
from rich.console import Console
from rich.table import Table

from ..exceptions import AuthenticationFailed, CryptoplaneError
from ..keys import Key
from ..plane import Plane
from ..requests import Encrypt
from ..telemetry.metrics import prometheus_text

SOCKET_ENV = "CRYPTOPLANE_STATS_SOCKET"
TIMEOUT = 10.0  # seconds for a whole exchange with a stats server
HEALTH_STYLE = {"ok": "green", "degraded": "yellow", "broken": "red"}
UNBOUNDED = 1 << 30  # the base Engine's default capacity, which means "no bound"


# -- reading a running plane's stats -------------------------------------------------------

class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket: the host name only fills the Host header."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def fetch(path: str, route: str, timeout: float = TIMEOUT) -> bytes:
    """GET ``route`` from the stats server at ``path``; errors become ClickExceptions
    that say what is wrong with the socket, not only the errno."""
    conn = UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", route)
        resp = conn.getresponse()
        body = resp.read()
    except FileNotFoundError:
        raise click.ClickException(
            f"no stats socket at {path}: start the plane's stats server there "
            "(cryptoplane.telemetry.stats_server.serve_stats(plane, path)), or try --demo"
        ) from None
    except ConnectionRefusedError:
        raise click.ClickException(
            f"{path} refused the connection: a stale socket, whose plane has exited") from None
    except PermissionError:
        raise click.ClickException(
            f"no permission to connect to {path} (the socket is private to the user "
            "running the plane)") from None
    except TimeoutError:
        raise click.ClickException(f"{path} did not answer within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as e:
        raise click.ClickException(f"cannot read stats from {path}: "
                                   f"{type(e).__name__}: {e}") from None
    finally:
        conn.close()
    if resp.status != 200:
        text = body.decode(errors="replace").strip()
        raise click.ClickException(f"{path}{route}: HTTP {resp.status} {text}")
    return body


# -- the demo load -------------------------------------------------------------------------

DEMO_CLIENT = "tenant-a"
DEMO_LIMIT_OPS = 200.0
MAX_ROUNDS = 1_000_000  # the clock ends the loop; this bounds it if the clock stalls
MAX_PENDING = 32  # outstanding requests of the limited client (its QoS queue stays short)


def demo_load(plane: Plane, seconds: float) -> None:
    """A short mixed load, so that every table has rows: fast-path AES-GCM, failing
    decrypts, sector runs, ECDSA signatures, queued work at each priority, and a client
    limited to ``DEMO_LIMIT_OPS`` requests/s. Throwaway keys, distinct nonces."""
    gcm = Key.generate("aes-256-gcm")
    xts = Key.generate("aes-256-xts")
    ec = Key.generate("ecdsa-p256-sha256")
    plane.limit(client=DEMO_CLIENT, ops=DEMO_LIMIT_OPS)
    nonces = (n.to_bytes(12, "big") for n in itertools.count())
    small, run, big = bytes(1024), bytearray(64 * 1024), bytes(256 * 1024)
    pending: list[Future[Any]] = []
    deadline = time.monotonic() + seconds
    for i in range(MAX_ROUNDS):
        if time.monotonic() >= deadline:
            break
        nonce = next(nonces)
        ct = plane.encrypt(gcm, small, nonce=nonce)
        if i % 10 == 0:  # a tampered tag: counted as an AuthenticationFailed error
            with contextlib.suppress(AuthenticationFailed):
                plane.decrypt(gcm, ct[:-1] + bytes([ct[-1] ^ 1]), nonce=nonce)
        else:
            plane.decrypt(gcm, ct, nonce=nonce)
        plane.encrypt_sectors(xts, run, sector=i * 16, sector_size=4096, out=run)
        plane.sign(ec, small)
        if i % 8 == 0:  # bigger than the fast path takes: queued, timed, balanced
            plane.map([Encrypt(gcm, big, nonce=next(nonces)) for _ in range(4)],
                      priority="bulk")
            plane.run(Encrypt(gcm, big, nonce=next(nonces)), priority="high")
        pending = [f for f in pending if not f.done()]
        if len(pending) < MAX_PENDING:
            pending.append(plane.submit(Encrypt(gcm, small, nonce=next(nonces)),
                                        client=DEMO_CLIENT))
    # what the limit still holds would take up to MAX_PENDING / DEMO_LIMIT_OPS seconds
    _, not_done = wait(pending, timeout=MAX_PENDING / DEMO_LIMIT_OPS + 1.0)
    for f in not_done:
        f.cancel()


# -- presenting ----------------------------------------------------------------------------

def _n(value: int | float) -> str:
    return f"{value:,}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # the loop returns at TiB


def _3(value: float) -> str:
    """Three significant digits without exponents: 251, 12.3, 1.23."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{_3(seconds * 1e6)} µs"
    if seconds < 1:
        return f"{_3(seconds * 1e3)} ms"
    return f"{_3(seconds)} s"


def _errors(errors: dict[str, int]) -> str:
    """The total; the types are in the "errors by type" table (a column of them would
    not fit in 80 columns)."""
    total = sum(errors.values())
    return f"[red]{total:,}[/red]" if total else "[dim]0[/dim]"


def _rate(value: float, fmt: Any) -> str:
    return "[dim]unlimited[/dim]" if not value else f"{fmt(value)}/s"


def _table(title: str, *columns: str, right: int = 0) -> Table:
    """A table whose last ``right`` columns are numbers (right-aligned). Long names fold
    onto a second line rather than lose their ends: "...-sha256" vs "...-sha384"."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, name in enumerate(columns):
        number = i >= len(columns) - right
        table.add_column(name, justify="right" if number else "left",
                         overflow="fold", no_wrap=number)
    return table


def render(stats: dict[str, Any], console: Console) -> None:
    """``Plane.stats()`` as tables."""
    kernel, fast = stats["sector_kernel"], stats["fast_path"]
    console.print(
        f"sector kernel: [bold]{kernel['backend']}[/bold]"
        f"{' (' + kernel['reason'] + ')' if kernel['reason'] else ''} · fast path: "
        f"[bold]{fast['backend']}[/bold]{' (' + fast['reason'] + ')' if fast['reason'] else ''}"
        f" · policy: [bold]{stats['scheduler'].get('policy', '?')}[/bold]", highlight=False)

    engines = _table("engines", "engine", "health", "requests", "bytes", "errors",
                     "inflight", "busy", right=5)
    for name, e in stats["engines"].items():
        style = HEALTH_STYLE.get(e["health"], "")
        cap = "∞" if e["capacity"] >= UNBOUNDED else _n(e["capacity"])
        engines.add_row(name, f"[{style}]{e['health']}[/{style}]" if style else e["health"],
                        _n(e["requests"]), _bytes(e["bytes"]), _errors(e["errors"]),
                        f"{e['inflight']:,}/{cap}", _time(e["busy_seconds"]))
    console.print(engines)

    algorithms = _table("algorithms", "algorithm", "op", "requests", "bytes", "errors",
                        right=3)
    for alg, ops in sorted(stats["algorithms"].items()):
        for op, a in sorted(ops.items()):
            algorithms.add_row(alg, op, _n(a["requests"]), _bytes(a["bytes"]),
                               _errors(a["errors"]))
    console.print(algorithms)
    by_type = [(alg, op, err, n) for alg, ops in sorted(stats["algorithms"].items())
               for op, a in sorted(ops.items()) for err, n in sorted(a["errors"].items())]
    if by_type:
        errors = _table("errors by type", "algorithm", "op", "error", "count", right=1)
        for alg, op, err, n in by_type:
            errors.add_row(alg, op, f"[red]{err}[/red]", _n(n))
        console.print(errors)

    clients = _table("clients", "client", "requests", "bytes", "errors", "ops limit",
                     "bytes limit", right=5)
    limits = stats["limits"]
    for name in sorted({*stats["clients"], *limits}):
        c = stats["clients"].get(name, {"requests": 0, "bytes": 0, "errors": {}})
        lim = limits.get(name, {"ops_per_s": 0, "bytes_per_s": 0})
        clients.add_row("[dim](default)[/dim]" if name == "-" else name, _n(c["requests"]),
                        _bytes(c["bytes"]), _errors(c["errors"]),
                        _rate(lim["ops_per_s"], lambda v: f"{v:,g}"),
                        _rate(lim["bytes_per_s"], _bytes))
    console.print(clients)

    latency = _table("latency of queued work", "engine", "algorithm", "op", "count", "p50",
                     "p90", "p99", "max", right=5)
    for path, h in stats["latency"].items():
        engine, alg, op = path.split("/", 2)
        latency.add_row(engine, alg, op, _n(h["count"]), _time(h["p50"]), _time(h["p90"]),
                        _time(h["p99"]), _time(h["max"]))
    if not stats["latency"]:
        latency.add_row("[dim]none[/dim]", "[dim]nothing queued yet: the fast path is not "
                        "timed[/dim]", "", "", "", "", "", "")
    console.print(latency)

    queues = _table("queues", "priority", "waiting", right=1)
    for priority, n in stats["queues"].items():
        queues.add_row(priority, _n(n))
    sched = _table("scheduler", "counter", "value", right=1)
    for field, value in stats["scheduler"].items():
        if field != "policy":
            sched.add_row(field, _n(value))
    console.print(Columns([queues, sched]))


# -- the command ---------------------------------------------------------------------------

@click.command()
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), envvar=SOCKET_ENV,
              metavar="PATH", help=f"A running plane's stats socket (or ${SOCKET_ENV}).")
@click.option("--demo", is_flag=True,
              help="Start a plane here, run a short mixed load on it, show its stats.")
@click.option("--seconds", type=click.FloatRange(0, 600), default=2.0, show_default=True,
              help="How long --demo runs its load.")
@click.option("--json", "as_json", is_flag=True, help="Plane.stats() as JSON.")
@click.option("--prometheus", is_flag=True, help="The Prometheus text export.")
def stats(socket_path: str | None, demo: bool, seconds: float, as_json: bool,
          prometheus: bool) -> None:
    """Show a plane's statistics: per engine, algorithm/operation and client.

    \b
    Where the numbers come from:
      --socket PATH  a running plane that serves its stats on the Unix socket PATH
                     (cryptoplane.telemetry.stats_server.serve_stats(plane, PATH)); this command
                     reads GET /stats (JSON) or GET /metrics (Prometheus) from it.
      --demo         a plane started here and loaded for --seconds: AES-GCM on the fast
                     path, some decrypts with a bad tag (errors), XTS sector runs, ECDSA
                     signatures, queued work at high and bulk priority, and a client
                     limited to 200 requests/s.

    \b
    Every figure is Plane.stats(), counted since the plane started:
      requests, bytes  completed requests and their payload bytes (fast path included);
      errors           failed requests by error type;
      busy             seconds an engine spent running requests;
      latency          submission to completion of queued work, time held by a QoS
                       limit included (p50/p90/p99 are upper bounds of log buckets, at
                       most 26% high); the fast path runs in the caller and is not
                       timed, as timing it would cost more than the call;
      queues           requests waiting now ('delayed': held by a QoS limit);
      scheduler        counts of queued requests: completed, failed, timeouts,
                       cancellations, Busy refusals, failovers to another engine.

    Statistics never contain key material.
    """
    if as_json and prometheus:
        raise click.UsageError("--json and --prometheus are exclusive")
    if demo == (socket_path is not None):
        raise click.UsageError("give --socket PATH (a running plane) or --demo")
    out = sys.stdout
    if socket_path is not None:
        path = os.fspath(socket_path)
        if prometheus:
            out.write(fetch(path, "/metrics").decode())
            return
        info = json.loads(fetch(path, "/stats"))
    else:
        try:
            with Plane() as plane:
                demo_load(plane, seconds)
                if prometheus:
                    out.write(prometheus_text(plane).decode())
                    return
                info = plane.stats()
        except CryptoplaneError as e:
            raise click.ClickException(f"the demo failed: {type(e).__name__}: {e}") from None
    if as_json:
        json.dump(info, out, indent=2)
        out.write("\n")
        return
    render(info, Console())
