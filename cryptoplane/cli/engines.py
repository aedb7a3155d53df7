"""``cryptoplane engines``: the engines a default plane starts, their self-test results."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .. import _native
from ..algorithms import CATALOGUE
from ..engines import REGISTRY
from ..plane import Plane


def describe(names: list[str]) -> dict[str, Any]:
    with Plane(engines=names) as plane:
        return {
            "sector_kernel": {"backend": _native.BACKEND, "reason": _native.BACKEND_REASON},
            "engines": [e.describe() for e in plane.engines.values()],
        }


@click.command()
@click.option("--engine", "engine_names", default=",".join(REGISTRY), show_default=True,
              help="Comma-separated engines to start.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def engines(engine_names: str, as_json: bool) -> None:
    """List engines, their capabilities and self-test results.

    Each engine runs one known answer per algorithm when it starts (like the Linux
    kernel's testmgr); an algorithm whose answer is wrong is withdrawn from that engine
    and shown here as FAILED with the reason.
    """
    names = [n.strip() for n in engine_names.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise click.BadParameter(f"unknown engine(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(REGISTRY)}", param_hint="--engine")
    info = describe(names)
    if as_json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    console = Console()
    kernel = info["sector_kernel"]
    note = f" ({kernel['reason']})" if kernel["reason"] else ""
    console.print(f"sector kernel: [bold]{kernel['backend']}[/bold]{note}")
    for e in info["engines"]:
        table = Table(title=f"engine {e['name']} (priority {e['priority']}, "
                            f"health {e['health']})", title_justify="left")
        table.add_column("algorithm")
        table.add_column("kind")
        table.add_column("operations")
        table.add_column("self-test")
        for name, result in sorted(e["self_tests"].items()):
            alg = CATALOGUE[name]
            status = "[green]passed[/green]" if result["passed"] else (
                f"[red]FAILED[/red] {result['detail']}")
            table.add_row(name, alg.kind.value, ", ".join(sorted(o.value for o in alg.ops)),
                          status)
        console.print(table)
