"""The plane's yardstick as a script: the same measurement and output as `cryptoplane speed`.

    python benchmarks/plane_speed.py [--quick] [--seconds 1] [--algorithms a,b]
        [--bytes 64,1k] [--sector-sizes 512,4096] [--rounds 5] [--no-openssl] [--json]
        [--plot FILE.svg] [--check] [--engine inline,threads,pool,auto]

For each algorithm and size: the bare `cryptography` call (direct), the plane's fast
path, for sector runs a naive per-sector loop and the Python fallback, and `openssl
speed` in the same run; ratios between them, and the acceptance targets. --engine adds a
path per engine (each on its own plane, work submitted concurrently) and the scaling
ratios over inline alone. --check exits 1 when a target is missed. Runs from a checkout
without installing. benchmarks/scaling.py repeats the scaling targets to show the noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a checkout without installing: the package sits next to benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryptoplane.cli.speed import PLOT_HINT, build_config, execute, plot_available
from cryptoplane.yardstick import speed as sp
from cryptoplane.yardstick import timing as tm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--algorithms", help=f"comma-separated, of: {','.join(tm.SUPPORTED)}")
    ap.add_argument("--bytes", dest="sizes", help="request sizes, e.g. 64,1k,16k,1m")
    ap.add_argument("--sector-sizes", help="XTS sector sizes, e.g. 512,4096")
    ap.add_argument("--seconds", type=float, help="seconds per path per cell")
    ap.add_argument("--rounds", type=int, default=sp.DEFAULT_ROUNDS)
    ap.add_argument("--engine", help="engine paths, e.g. inline,threads,pool,auto")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-openssl", dest="openssl", action="store_false")
    ap.add_argument("--all-paths", action="store_true")
    ap.add_argument("--json", dest="as_json", action="store_true")
    ap.add_argument("--plot", dest="plot_path")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    a = ap.parse_args(argv)
    try:
        config = build_config(a.algorithms, a.sizes, a.sector_sizes, a.seconds, a.rounds,
                              a.engine, a.quick, a.openssl, a.all_paths)
    except ValueError as e:
        ap.error(str(e))
    if a.plot_path and not plot_available():
        ap.error(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}")
    report = execute(config, as_json=a.as_json, plot_path=a.plot_path)
    return 1 if a.check and report.targets_missed() else 0


if __name__ == "__main__":
    sys.exit(main())
