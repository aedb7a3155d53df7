"""``cryptoplane volume bench`` on tiny images: real servers, real loads, medians of rounds.

What the bench reports must be what it measured: each cell's value is the median of its
rounds' samples, every sample is a positive rate from the real program, and the ratios
are computed from those medians."""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import support

from cryptoplane.yardstick import volume_bench as vb


def test_rounds_interleave_servers_and_report_medians(tmp_path: Path) -> None:
    missing = [p for p in ("fio", "nbdcopy", "nbdkit", "qemu-nbd") if not shutil.which(p)]
    if missing:
        support.unavailable(f"needs {', '.join(missing)} (Debian: fio libnbd-bin nbdkit "
                            "qemu-utils)")
    seen: list[str] = []
    results = vb.run_bench(16 << 20, 0.5, only=["ours-raw", "ours-luks1"],
                           load_names=["nbdcopy read", "fio seq read 1M"],
                           workdir=str(tmp_path), rounds=3, progress=seen.append)
    assert [(r.server, r.load) for r in results] == [
        ("ours-raw", "nbdcopy read"), ("ours-raw", "fio seq read 1M"),
        ("ours-luks1", "nbdcopy read"), ("ours-luks1", "fio seq read 1M")]
    for r in results:
        assert len(r.samples) == 3 and all(v > 0 for v in r.samples)
        assert r.value == statistics.median(r.samples)
        # the server's own CPU per unit of work, read from /proc around each run
        assert r.cpu is not None and len(r.cpu_samples) == 3
        assert r.cpu == statistics.median(r.cpu_samples)
        # a 16 MiB nbdcopy ends within a clock tick; fio runs for 0.5 s
        assert all(c > 0 if r.load.startswith("fio") else c >= 0 for c in r.cpu_samples)
    # the second round starts with the other server: drift is shared, not one-sided
    firsts = [line for line in seen if line.endswith("nbdcopy read")]
    assert "ours-raw" in firsts[0] and "ours-luks1" in firsts[2]
    by = {(r.server, r.load): r.value for r in results}
    rows = {(load, peer): ratio for load, _, peer, ratio, _, _ in vb.ratios(results)}
    assert rows[("fio seq read 1M", "ours-raw")] == (
        by[("ours-luks1", "fio seq read 1M")] / by[("ours-raw", "fio seq read 1M")])
    assert not list(tmp_path.iterdir())  # images removed


def test_cli_prints_rates_cpu_and_the_bars(tmp_path: Path) -> None:
    missing = [p for p in ("fio", "nbdcopy", "nbdkit", "qemu-nbd") if not shutil.which(p)]
    if missing:
        support.unavailable(f"needs {', '.join(missing)} (Debian: fio libnbd-bin nbdkit "
                            "qemu-utils)")
    from click.testing import CliRunner

    from cryptoplane.cli.volume_bench import bench

    done = CliRunner().invoke(bench, ["--size", "16M", "--runtime", "0.5", "--rounds", "1",
                                      "--server", "ours-raw", "--server", "ours-luks2-4k",
                                      "--load", "fio rand read 4k QD32", "--dir",
                                      str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert "IOPS" in done.output and "server CPU" in done.output and " µs" in done.output
    assert "ours-luks2-4k / ours-raw" in done.output  # issue 18's bar, with its verdict
    assert "fio --name=bench" in done.output  # every command, to reproduce by hand
