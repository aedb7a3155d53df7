"""age-format file encryption: cryptoplane (1 worker, all cores) vs age vs openssl enc.

    python benchmarks/stream_bench.py [--size-mib 1024] [--rounds 3] [--dir /dev/shm]
                                      [--json out.json]

The same measurement as ``cryptoplane stream bench`` (``cryptoplane.yardstick.stream_bench``):
medians over interleaved rounds, MB/s and ratios against the age CLI, every command.
Targets (acceptance): encrypt and decrypt >= 1.5x age with one worker, >= 2.0x with all
cores; --check exits 1 when one is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rich.console import Console

from cryptoplane.cli.stream_bench import render
from cryptoplane.yardstick.stream_bench import run_bench

TARGETS = {1: 1.5}  # workers -> ratio to age; more than one worker: 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    report = run_bench(args.size_mib << 20, workdir=args.dir, rounds=args.rounds)
    render(report, Console())
    rows = report.rows
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    missed = [r for r in rows if r.workers is not None and r.vs_age is not None
              and r.vs_age < TARGETS.get(r.workers, 2.0)]
    for r in missed:
        print(f"target missed: {r.op} with {r.workers} worker(s): {r.vs_age:.2f}x age")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
