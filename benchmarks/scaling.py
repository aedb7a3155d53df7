"""The scaling targets, measured several times: how much of a ratio is the machine's noise.

    python benchmarks/scaling.py [--repeat 3] [--seconds 1] [--engine inline,threads,pool,auto]
        [--json]

Runs the cells that carry an engine target (RSA-2048 sign, AES-256-XTS sector runs,
AES-256-GCM at 64 B and 1 MiB) with `cryptoplane speed --engine`'s measure, ``--repeat``
times in one process, and prints every engine ratio per run, its spread, and how much
CPU other processes took meanwhile (a neighbour on one of two cores caps any scaling
ratio near 1x). Exits 1 if the median of a target over the runs misses it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the package sits next to benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryptoplane.yardstick import engine_paths as se
from cryptoplane.yardstick import speed as sp
from cryptoplane.yardstick import timing as tm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=sp.DEFAULT_SECONDS)
    ap.add_argument("--rounds", type=int, default=sp.DEFAULT_ROUNDS)
    ap.add_argument("--engine", default=",".join(se.PATHS))
    ap.add_argument("--json", dest="as_json", action="store_true")
    a = ap.parse_args(argv)
    config = sp.Config(algorithms=("aes-256-gcm", "aes-256-xts", "rsa-pss-sha256"),
                       sizes=(64, tm.MIB), sector_sizes=(4096,), seconds=a.seconds,
                       rounds=a.rounds, openssl=False, engines=se.parse(a.engine))
    runs: list[dict[tuple[str, str, int, str], float]] = []
    labels: dict[tuple[str, str, int, str], str] = {}
    others: list[float | None] = []
    for i in range(a.repeat):
        report = sp.run(config)
        run: dict[tuple[str, str, int, str], float] = {}
        for q in report.ratios:
            # rsa verify and the plane/* ratios are not what this script is about
            if q.name in se.RATIOS and q.cell.op != "verify":
                key = (q.cell.algorithm, q.cell.op, q.cell.size, q.name)
                run[key] = q.value
                labels[key] = f"{q.cell.algorithm} {q.cell.op} {q.cell.label} {q.name}"
        runs.append(run)
        others.append(report.meta["other_processes_cores"])
        if not a.as_json:
            print(f"run {i + 1}/{a.repeat}: {report.meta['elapsed_s']:.0f} s, other processes "
                  f"{others[-1]} cores", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for key in runs[0]:
        values = [r[key] for r in runs if key in r]
        rows.append({"ratio": labels[key], "runs": [round(v, 3) for v in values],
                     "median": round(statistics.median(values), 3),
                     "spread": round(max(values) - min(values), 3),
                     "target": se.TARGETS.get(key)})
    missed = [r for r in rows if r["target"] is not None and r["median"] < r["target"]]
    if a.as_json:
        json.dump({"rows": rows, "other_processes_cores": others}, sys.stdout, indent=1)
        print()
    else:
        width = max(len(r["ratio"]) for r in rows)
        for r in rows:
            target = "" if r["target"] is None else (
                f"  target {r['target']:g}: " + ("met" if r["median"] >= r["target"] else "MISSED"))
            runs_text = " ".join(f"{v:5.2f}" for v in r["runs"])
            print(f"{r['ratio']:<{width}}  {runs_text}  median {r['median']:5.2f} "
                  f"spread {r['spread']:4.2f}{target}")
        print(f"other processes, cores per run: {others}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
