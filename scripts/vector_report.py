#!/usr/bin/env python3
"""Run every known-answer file through the plane and print what happened to each vector.

    .venv/bin/python scripts/vector_report.py [--failures N] [--plain]

The checks are the ones the test suite runs (``tests/vectors/kat.py``). Per file:
valid vectors that passed, invalid vectors rejected (with a typed error), acceptable
vectors accepted / rejected, vectors the API cannot express by design (by reason; the
plane must still refuse them), and failures. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "vectors"))
sys.path.insert(0, str(ROOT))

import kat  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import cryptoplane as cp  # noqa: E402


def _types(c: Counter[str]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(c.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[1])
    ap.add_argument("--failures", type=int, default=20, metavar="N",
                    help="failing vectors to list per file (default 20)")
    ap.add_argument("--plain", action="store_true", help="ASCII only, no colours")
    args = ap.parse_args(argv)
    console = Console(no_color=args.plain, width=140, highlight=False, markup=False,
                      force_terminal=False if args.plain else None)

    table = Table(title="cryptoplane known-answer vectors, through the plane API",
                  box=box.ASCII if args.plain else box.SIMPLE_HEAD, title_justify="left")
    table.add_column("file", no_wrap=True)
    for col in ("vectors", "valid ok", "invalid rejected", "acceptable acc/rej",
                "unsupported", "failed"):
        table.add_column(col, justify="right")

    tallies: list[kat.Tally] = []
    start = time.perf_counter()
    with cp.Plane() as plane:
        for source, name in kat.all_checks():
            tallies.append(kat.run_check(plane, source, name))
    elapsed = time.perf_counter() - start

    total = Counter[str]()
    for t in tallies:
        acc = (f"{t.acceptable_accepted}/{t.acceptable_rejected}"
               if t.acceptable_accepted or t.acceptable_rejected else "-")
        unsupported = sum(t.unsupported.values())
        table.add_row(f"{t.source} {t.name}", str(t.seen), str(t.valid),
                      str(t.invalid_rejected), acc, str(unsupported or "-"),
                      str(t.failed), style="bold red" if t.failed else None)
        total["vectors"] += t.seen
        total["valid"] += t.valid
        total["invalid"] += t.invalid_rejected
        total["acc"] += t.acceptable_accepted
        total["rej"] += t.acceptable_rejected
        total["unsupported"] += unsupported
        total["failed"] += t.failed
    table.add_section()
    table.add_row(f"TOTAL ({len(tallies)} files)", str(total["vectors"]), str(total["valid"]),
                  str(total["invalid"]), f"{total['acc']}/{total['rej']}",
                  str(total["unsupported"]), str(total["failed"]))
    console.print(table)

    console.print("Unsupported by design, by reason and by the vector's own verdict (each one "
                  "was still refused by the plane with a typed error, except data units of a "
                  "fractional byte, which cannot be submitted at all):")
    for t in tallies:
        for line in kat.unsupported_summary(t):
            console.print(f"  {t.source} {t.name}: {line}")
    console.print("\nTyped errors the rejections ended in:")
    for t in tallies:
        if t.rejected_as:
            console.print(f"  {t.source} {t.name}: {_types(t.rejected_as)}")
    notes = [(t, reason, n) for t in tallies for reason, n in t.notes.items()]
    if notes:
        console.print("\nHow vectors were mapped onto the API:")
        for t, reason, n in notes:
            console.print(f"  {t.source} {t.name}: {n} x {reason}")

    failing = [t for t in tallies if t.failures]
    for t in failing:
        console.print()
        console.print(kat.failure_report(t, limit=args.failures))
    verdict = "FAIL" if failing else "OK"
    console.print(f"\n{verdict}: {len(tallies)} files, {total['vectors']} vectors, "
                  f"{total['failed']} failing, in {elapsed:.1f} s")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
