"""``cryptoplane speed``: the yardstick, in the manner of ``openssl speed -evp``.

The measuring lives in ``cryptoplane.yardstick.speed``; this module parses options and
presents the report (a rich table, JSON, or a bar chart), so ``benchmarks/plane_speed.py``
shows the same thing.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..yardstick import engine_paths as se
from ..yardstick import speed as sp
from ..yardstick import timing as tm
from .signals import on_signals

PATHS = ("direct", "plane", "naive", "fallback", "openssl")
RATIOS = ("plane/direct", "plane/openssl", "plane/naive")


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def header(meta: dict[str, Any]) -> list[str]:
    kernel = meta["sector_kernel"]
    why = f" ({kernel['reason']})" if kernel["reason"] else ""
    return [
        f"cryptoplane {meta['cryptoplane']} · cryptography {meta['cryptography']} "
        f"({meta['cryptography_openssl']}) · system {meta['system_openssl'] or 'openssl: none'}",
        f"sector kernel: {kernel['backend']}{why} · CPU: {meta['cpu']['model']} "
        f"x{meta['cpu']['cores']} · engine {meta['engine']} · {meta['seconds_per_cell']:g} s "
        f"per path per cell in {meta['rounds']} interleaved rounds (median)",
    ]


def _table(report: sp.Report, paths: tuple[str, ...], ratio_names: tuple[str, ...],
           quiet: tuple[str, ...] = ()) -> tuple[Table, dict[str, int], dict[str, None]]:
    """A table of ``paths`` and ``ratio_names`` per cell, its footnotes, and the notes of
    paths that have no column (said once, below it); notes of ``quiet`` paths are left
    to the caller."""
    present = [p for p in paths if any(r.path == p and r.samples for r in report.results)]
    shown_ratios = [n for n in ratio_names if any(r.name == n for r in report.ratios)]
    table = Table(title_justify="left")
    for name in ("algorithm", "op", "size", "unit"):
        table.add_column(name)
    for name in (*present, *shown_ratios):
        table.add_column(name, justify="right")
    notes: dict[str, int] = {}
    rows: dict[tm.Cell, dict[str, str]] = {}
    absent: dict[str, None] = {}
    for r in report.results:
        if r.path not in paths:
            continue
        cell_text = _fmt(r.median)
        if r.note and r.path not in present:
            absent[f"{r.path}: {r.note}"] = None
        elif r.note and r.path not in quiet:
            mark = notes.setdefault(r.note, len(notes) + 1)
            cell_text = f"{cell_text} [{mark}]"
        rows.setdefault(r.cell, {})[r.path] = cell_text
    for q in report.ratios:
        if q.name not in shown_ratios:
            continue
        style = "" if q.met is None else "green" if q.met else "bold red"
        text = f"{q.value:.2f}x" + ("" if q.target is None else f" (≥{q.target:g})")
        rows.setdefault(q.cell, {})[q.name] = f"[{style}]{text}[/{style}]" if style else text
    for cell, values in rows.items():
        table.add_row(cell.algorithm, cell.op, cell.label, cell.unit,
                      *(values.get(p, "") for p in (*present, *shown_ratios)))
    return table, notes, absent


def _print_notes(console: Console, notes: dict[str, int], absent: dict[str, None]) -> None:
    for text, mark in notes.items():
        console.print(f"[{mark}] {text}", highlight=False)
    for text in absent:
        console.print(text, highlight=False)


def render_engines(report: sp.Report, console: Console) -> None:
    """The engine paths: each engine beside inline alone, and what auto used."""
    table, notes, absent = _table(report, se.PATHS, se.RATIOS, quiet=("auto",))
    console.print("engine paths (each on its own plane; auto/plane: over the plane column "
                  "above):", highlight=False)
    console.print(table)
    _print_notes(console, notes, absent)
    for r in report.results:
        if r.path == "auto" and r.samples and r.note:
            console.print(f"auto, {r.cell.algorithm} {r.cell.op} {r.cell.label}: {r.note}",
                          highlight=False)
    planes = report.meta.get("engine_planes", {})
    for name, info in planes.items():
        if "engines" in info:
            console.print(f"{name}: Plane({'+'.join(info['engines'])}), {info['submission']}",
                          highlight=False)
    console.print(f"each engine path warmed up {report.meta.get('engine_warmup_s', 0):g} s "
                  "per cell before timing (the balancer measures engines it has no "
                  "figure for first); 'auto used' counts requests per engine over the "
                  "calibration and the timed rounds", highlight=False)


def render(report: sp.Report, console: Console) -> None:
    """The table, its notes, the fast path's per-call overhead and the targets."""
    for line in header(report.meta):
        console.print(line, highlight=False)
    table, notes, absent = _table(report, PATHS, RATIOS)
    console.print(table)
    _print_notes(console, notes, absent)
    if any(r.cell.op.endswith("_sectors") for r in report.results):
        console.print(f"sector runs: {tm.size_label(sp.SECTOR_RUN)} per call; naive = a new "
                      "Cipher(AES, XTS(tweak)) per sector", highlight=False)
    if report.meta.get("engine_paths"):
        render_engines(report, console)
    over = report.overhead_ns()
    if over is not None:
        console.print(f"plane fast path overhead (aes-256-gcm, 64 B): "
                      f"{over['overhead_ns']:+.0f} ns/call (direct {over['direct_ns']:.0f} ns, "
                      f"plane {over['plane_ns']:.0f} ns)", highlight=False)
    checked = [q for q in report.ratios if q.target is not None]
    if checked:
        missed = report.targets_missed()
        console.print(f"targets: {len(checked) - len(missed)}/{len(checked)} met" + "".join(
            f"; MISSED {q.cell.algorithm} {q.cell.op} {q.cell.label} {q.name} "
            f"{q.value:.2f} < {q.target:g}" for q in missed), highlight=False)
    other = report.meta.get("other_processes_cores")
    console.print(f"took {report.meta['elapsed_s']:.1f} s" + (
        "" if other is None else f"; other processes used {other:.2f} of "
        f"{report.meta['cpu']['cores']} cores meanwhile (on average)"), highlight=False)


def plot(report: sp.Report, path: str) -> None:
    """Grouped bars: one group per cell, one bar per path, a panel per unit (log scale)."""
    # imported by name: matplotlib is optional and ships no type information here
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")  # files only: no display needed
    plt: Any = importlib.import_module("matplotlib.pyplot")

    units = [u for u in ("MB/s", "ops/s") if any(r.cell.unit == u for r in report.results)]
    fig, axes = plt.subplots(len(units), 1, figsize=(14, 5 * len(units)), squeeze=False)
    for ax, unit in zip(axes[:, 0], units, strict=True):
        cells = list(dict.fromkeys(r.cell for r in report.results if r.cell.unit == unit))
        paths = [p for p in (*PATHS, *se.PATHS) if any(
            r.path == p and r.samples and r.cell.unit == unit for r in report.results)]
        width = 0.8 / max(len(paths), 1)
        lowest = math.inf
        for j, p in enumerate(paths):
            heights = []
            for c in cells:
                got = report.figure(c.algorithm, c.op, c.size, p)
                heights.append((got.median if got is not None else None) or 0.0)
            lowest = min([lowest, *(h for h in heights if h > 0)])
            ax.bar([i + j * width for i in range(len(cells))], heights, width, label=p)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cells))])
        ax.set_xticklabels([f"{c.algorithm}\n{c.op} {c.label}" for c in cells], fontsize=7,
                           rotation=45, ha="right")
        ax.set_yscale("log")
        if lowest < math.inf:  # from a whole decade below the smallest bar, so bars compare
            ax.set_ylim(bottom=10 ** math.floor(math.log10(lowest)))
        ax.set_ylabel(unit)
        ax.legend()
    fig.suptitle("cryptoplane speed — " + header(report.meta)[0], fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@contextmanager
def progress_for(enabled: bool) -> Iterator[sp.Progress | None]:
    """A progress bar on stderr, only where a person is watching it."""
    if not enabled:
        yield None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}"
                   "/{task.total}"), TimeElapsedColumn(), console=Console(stderr=True),
                   transient=True)
    task = bar.add_task("starting", total=None)
    with bar:
        def update(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=f"measuring {label}")
        yield update


# -- options ------------------------------------------------------------------------------

PLOT_HINT = "pip install 'cryptoplane[plot]'  (or: pip install matplotlib)"


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"64,1k,16k,1m"`` -> bytes (k and m are binary: 1k = 1024, as sizes go)."""
    out: list[int] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*([km]i?b?|b)?", part)
        if m is None or int(m.group(1)) <= 0:
            raise ValueError(f"not a size in bytes: {part!r} (use e.g. 64,1k,16k,1m)")
        scale = {"k": tm.KIB, "m": tm.MIB}.get((m.group(2) or "b")[0], 1)
        out.append(int(m.group(1)) * scale)
    if not out:
        raise ValueError("no sizes given")
    return tuple(out)


def parse_algorithms(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in tm.SUPPORTED]
    if unknown or not names:
        raise ValueError(f"cannot measure {', '.join(unknown) or 'nothing'}; "
                         f"known: {', '.join(tm.SUPPORTED)}")
    return names


def plot_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def build_config(algorithms: str | None, sizes: str | None, sector_sizes: str | None,
                 seconds: float | None, rounds: int, engine: str | None, quick: bool,
                 openssl: bool, all_paths: bool) -> sp.Config:
    """Options to a ``Config``; ``ValueError`` with a message fit for the user.
    ``engine``: a comma list of engine paths, or None for the fast-path comparison."""
    if seconds is not None and seconds <= 0:
        raise ValueError("--seconds must be positive")
    if rounds < 1:
        raise ValueError("--rounds must be at least 1")
    engines = se.parse(engine) if engine is not None else ()
    # an --engine run has its own cells (where engines differ), to stay a few minutes
    default_algorithms, default_sizes, default_sectors = (
        (sp.QUICK_ALGORITHMS, sp.QUICK_SIZES, sp.QUICK_SECTOR_SIZES) if quick else
        (se.ALGORITHMS, se.SIZES, se.SECTOR_SIZES) if engines else
        (sp.DEFAULT_ALGORITHMS, sp.DEFAULT_SIZES, sp.DEFAULT_SECTOR_SIZES))
    return sp.Config(
        algorithms=parse_algorithms(algorithms) if algorithms else default_algorithms,
        sizes=parse_sizes(sizes) if sizes else default_sizes,
        sector_sizes=_sector_sizes(sector_sizes) if sector_sizes else default_sectors,
        seconds=seconds if seconds is not None else (
            sp.QUICK_SECONDS if quick else se.ENGINE_SECONDS if engines
            else sp.DEFAULT_SECONDS),
        rounds=rounds, openssl=openssl, all_paths=all_paths, engines=engines)


def _sector_sizes(text: str) -> tuple[int, ...]:
    sizes = parse_sizes(text)
    bad = [s for s in sizes if s not in (512, 1024, 2048, 4096)]
    if bad:
        raise ValueError(f"sector sizes are 512, 1024, 2048 or 4096 bytes, not {bad}")
    return sizes


def execute(config: sp.Config, *, as_json: bool, plot_path: str | None) -> sp.Report:
    """Measure and present: shared by the command and ``benchmarks/plane_speed.py``."""
    with progress_for(sys.stderr.isatty()) as update:
        report = sp.run(config, update)
    if as_json:
        json.dump(report.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        # a pipe or a log gets the whole table, not 80 columns of it
        render(report, Console(width=None if sys.stdout.isatty() else 170))
    if plot_path:
        plot(report, plot_path)
        if not as_json:
            print(f"chart written to {plot_path}")
    return report


@click.command()
@click.option("--algorithms", "-a", metavar="A,B", help="Comma-separated algorithms "
              f"(default: {','.join(sp.DEFAULT_ALGORITHMS)}; known: {','.join(tm.SUPPORTED)}).")
@click.option("--bytes", "sizes", metavar="N,M", help="Request sizes in bytes, k/m suffixes "
              "allowed (default 64,1k,16k,1m).")
@click.option("--sector-sizes", metavar="N,M",
              help="Sector sizes for XTS sector runs (default 512,4096).")
@click.option("--seconds", type=float, help="Seconds per path per cell, split over the "
              f"rounds (default {sp.DEFAULT_SECONDS:g}; {se.ENGINE_SECONDS:g} with --engine; "
              f"{sp.QUICK_SECONDS:g} with --quick).")
@click.option("--rounds", type=int, default=sp.DEFAULT_ROUNDS, show_default=True,
              help="Interleaved rounds per cell, the median reported (at most one per "
              "20 ms of --seconds: shorter chunks would time the scheduler).")
@click.option("--engine", metavar="E,F", help="Also time these engine paths, comma-separated "
              f"({','.join(se.PATHS)}; inline, the baseline, always): each on its own plane, "
              "work submitted concurrently, "
              "with the scaling ratios and targets. Default cells then: "
              f"{','.join(se.ALGORITHMS)} at {','.join(map(tm.size_label, se.SIZES))}.")
@click.option("--quick", is_flag=True, help="A short run (few algorithms and sizes, "
              f"{sp.QUICK_SECONDS:g} s per cell): about ten seconds.")
@click.option("--openssl/--no-openssl", default=True, show_default=True,
              help="Also run the system's `openssl speed` for each cell.")
@click.option("--all-paths", is_flag=True, help="Measure slow paths (the Python sector "
              "fallback) even where one call outlasts a round.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"meta": ..., "rows": [...], "ratios": [...]} instead of a table.')
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write a grouped bar chart (.svg, .png; needs matplotlib).")
@click.option("--check", is_flag=True, help="Exit 1 when an acceptance target is missed.")
@on_signals
def speed(algorithms: str | None, sizes: str | None, sector_sizes: str | None,
          seconds: float | None, rounds: int, engine: str | None, quick: bool, openssl: bool,
          all_paths: bool, as_json: bool, plot_path: str | None, check: bool) -> None:
    """Throughput of the plane's fast path beside the bare library and `openssl speed`.

    For each algorithm and size: `direct` (the bare `cryptography` call on an object
    made once), `plane` (plane.encrypt/sign/encrypt_sectors...), for sector runs `naive`
    (a new Cipher per sector) and `fallback` (the pure-Python sector kernel), and
    `openssl` (`openssl speed -elapsed` in the same run); with --engine, the engine
    paths (inline, threads, pool, auto) and their ratios to inline alone. MB/s are
    10**6 bytes/s, as openssl counts; signatures in operations/s. Ratios are the
    measure, never absolute speeds: the paths are timed interleaved in short rounds on
    the same machine.
    """
    try:
        config = build_config(algorithms, sizes, sector_sizes, seconds, rounds, engine,
                              quick, openssl, all_paths)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if plot_path and not plot_available():
        raise click.UsageError(f"--plot needs matplotlib, which is not installed: "
                               f"{PLOT_HINT}")
    report = execute(config, as_json=as_json, plot_path=plot_path)
    if check and report.targets_missed():
        sys.exit(1)
