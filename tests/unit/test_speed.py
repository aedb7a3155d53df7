"""`cryptoplane speed`: a smoke test of the command and its output's shape.

Speeds are never asserted here (timed unit tests on shared machines only flake); the
benchmark itself checks the targets (`cryptoplane speed --check`).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from typing import Any

import pytest
from click.testing import CliRunner
from support import IN_CI

from cryptoplane.cli.main import cli
from cryptoplane.cli.speed import build_config, parse_sizes, plot_available
from cryptoplane.yardstick import engine_paths as se
from cryptoplane.yardstick import openssl_speed as ossl
from cryptoplane.yardstick import speed as sp

TINY = ["--seconds", "0.02", "--rounds", "2"]
ROW_KEYS = {"algorithm", "op", "size", "path", "rounds", "note"}


def run_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["speed", "--json", *TINY, *args], env=env)
    assert result.exit_code == 0, result.output
    out: dict[str, Any] = json.loads(result.output)
    return out


def check_row(row: dict[str, Any]) -> None:
    figures = {"mb_per_s", "ops_per_s"} & set(row)
    assert len(figures) == 1, row
    (figure,) = figures
    assert set(row) == ROW_KEYS | {figure, f"best_{figure}"}
    if row["path"] != "openssl" and row["note"] is None:
        assert row[figure] > 0 and row[f"best_{figure}"] >= row[figure]


def test_json_rows_meta_and_ratios() -> None:
    out = run_json("--algorithms", "aes-256-gcm,sha256,hmac-sha256", "--bytes", "64,1k",
                   "--no-openssl")
    assert set(out) == {"meta", "rows", "ratios"}
    meta = out["meta"]
    for key in ("cryptoplane", "cryptography", "cryptography_openssl", "system_openssl",
                "sector_kernel", "cpu", "seconds_per_cell", "rounds", "engine"):
        assert key in meta
    assert meta["engine"] == "inline" and meta["seconds_per_cell"] == 0.02
    for row in out["rows"]:
        check_row(row)
    cells = {(r["algorithm"], r["op"], r["size"]) for r in out["rows"]}
    assert cells == {(a, op, s) for a, op in (("aes-256-gcm", "encrypt"), ("sha256", "digest"),
                                              ("hmac-sha256", "mac")) for s in (64, 1024)}
    assert {r["path"] for r in out["rows"]} == {"direct", "plane", "openssl"}
    openssl = [r for r in out["rows"] if r["path"] == "openssl"]
    assert all(r["mb_per_s"] is None and "not measured" in r["note"] for r in openssl)
    assert {r["ratio"] for r in out["ratios"]} == {"plane/direct"}
    target = [r for r in out["ratios"] if r["target"] is not None]
    assert [(r["algorithm"], r["size"]) for r in target] == [("aes-256-gcm", 1024)]
    assert meta["fast_path_overhead"]["overhead_ns"] == pytest.approx(
        meta["fast_path_overhead"]["plane_ns"] - meta["fast_path_overhead"]["direct_ns"],
        abs=1e9)


def test_sectors_and_signatures() -> None:
    out = run_json("--algorithms", "aes-256-xts,ed25519", "--sector-sizes", "4096",
                   "--no-openssl")
    for row in out["rows"]:
        check_row(row)
    paths = {(r["algorithm"], r["path"]) for r in out["rows"] if r["note"] is None}
    assert {("aes-256-xts", "naive"), ("aes-256-xts", "plane"), ("aes-256-xts", "direct"),
            ("ed25519", "direct"), ("ed25519", "plane")} <= paths
    sign = [r for r in out["rows"] if r["algorithm"] == "ed25519"]
    assert {r["op"] for r in sign} == {"sign"} and all("ops_per_s" in r for r in sign)
    assert {r["ratio"] for r in out["ratios"] if r["algorithm"] == "aes-256-xts"} == {
        "plane/direct", "plane/naive"}


def test_missing_openssl_is_reported_not_fatal(tmp_path: Any) -> None:
    out = run_json("--algorithms", "aes-256-gcm", "--bytes", "64", env={"PATH": str(tmp_path)})
    (row,) = [r for r in out["rows"] if r["path"] == "openssl"]
    assert row["mb_per_s"] is None and "no openssl" in row["note"]
    assert out["meta"]["system_openssl"] is None


# under CI=true a missing tool is a failure, never a skip (the set-up installs openssl)
@pytest.mark.skipif(shutil.which("openssl") is None and not IN_CI,
                    reason="needs the openssl program")
def test_openssl_column_and_table() -> None:
    result = CliRunner().invoke(cli, ["speed", *TINY, "--algorithms", "aes-256-gcm",
                                      "--bytes", "64"])
    assert result.exit_code == 0, result.output
    for text in ("cryptography", "sector kernel", "plane/direct", "plane/openssl",
                 "fast path overhead"):
        assert text in result.output


def test_bad_options_are_refused() -> None:
    runner = CliRunner()
    unknown = runner.invoke(cli, ["speed", "--engine", "warp"])
    assert unknown.exit_code == 2 and "inline, threads, pool, auto" in unknown.output
    mixed = runner.invoke(cli, ["speed", "--engine", "threads,warp"])
    assert mixed.exit_code == 2 and "'warp'" in mixed.output
    assert runner.invoke(cli, ["speed", "--engine", ","]).exit_code == 2
    assert runner.invoke(cli, ["speed", "--algorithms", "rot13"]).exit_code == 2
    assert runner.invoke(cli, ["speed", "--bytes", "12x"]).exit_code == 2
    assert runner.invoke(cli, ["speed", "--sector-sizes", "100"]).exit_code == 2


def test_engine_paths_rows_ratios_and_usage() -> None:
    out = run_json("--engine", "threads,auto", "--algorithms",
                   "aes-256-gcm,ecdsa-p256-sha256", "--bytes", "64,128k", "--no-openssl")
    meta = out["meta"]
    assert meta["engine_paths"] == ["inline", "threads", "auto"]
    assert set(meta["engine_planes"]) == {"inline", "threads", "auto"}
    for row in out["rows"]:
        check_row(row)  # the same shape as every other row, path = the engine
    cells = {(r["algorithm"], r["op"], r["size"]) for r in out["rows"]}
    assert cells == {("aes-256-gcm", "encrypt", 64), ("aes-256-gcm", "encrypt", 128 * 1024),
                     ("ecdsa-p256-sha256", "sign", 256)}
    for cell in cells:
        paths = {r["path"] for r in out["rows"] if (r["algorithm"], r["op"], r["size"]) == cell}
        assert {"direct", "plane", "inline", "threads", "auto"} <= paths
    auto = {r["size"]: r["note"] for r in out["rows"] if r["path"] == "auto"}
    # small symmetric requests take the fast path: the balancer never sees them
    assert auto[64] == "fast path: used inline 100%"
    assert auto[128 * 1024].startswith("map x") and auto[256].startswith("map x")
    usage = {u["size"]: u["requests"] for u in meta["engine_usage"]}
    assert set(usage) == {64, 128 * 1024, 256} and usage[64]["inline"] > 0
    assert sum(usage[256].values()) > 0
    names = {(r["size"], r["ratio"]) for r in out["ratios"]}
    assert {(64, "auto/plane"), (64, "auto/inline"), (64, "threads/inline")} <= names
    assert (128 * 1024, "auto/plane") not in names  # auto queued those: no fast path
    target = [r for r in out["ratios"] if r["ratio"] == "auto/plane" and r["size"] == 64]
    assert target[0]["target"] == se.TARGETS[("aes-256-gcm", "encrypt", 64, "auto/plane")]


@pytest.mark.skipif(se.pool_unavailable() is not None and not IN_CI,
                    reason="no pool engine")
def test_pool_path_and_table() -> None:
    result = CliRunner().invoke(cli, ["speed", *TINY, "--engine", "pool,auto", "--algorithms",
                                      "aes-256-xts", "--sector-sizes", "4096", "--no-openssl"])
    assert result.exit_code == 0, result.output
    for text in ("engine paths", "pool/inline", "auto/inline", "auto, aes-256-xts",
                 "Plane(inline+threads+pool)", "warmed up", "targets:"):
        assert text in result.output, text
    assert not multiprocessing.active_children()  # the planes were closed, workers gone


def test_engine_defaults_and_parse() -> None:
    assert se.parse("auto, inline,auto") == ("inline", "auto")
    assert se.parse("pool") == ("inline", "pool")  # the baseline of every ratio
    config = build_config(None, None, None, None, 3, "inline,threads,pool,auto", False, True,
                          False)
    assert config.engines == se.PATHS
    assert config.seconds == se.ENGINE_SECONDS  # rounds long enough for auto's batches
    assert (config.algorithms, config.sizes, config.sector_sizes) == (
        se.ALGORITHMS, se.SIZES, se.SECTOR_SIZES)
    plain = build_config(None, None, None, None, 3, None, False, True, False)
    assert plain.engines == () and plain.algorithms == sp.DEFAULT_ALGORITHMS
    # every target of the issue is on a cell of the default --engine run
    cells = {(c.algorithm, c.op, c.size) for c in sp.cells(config)}
    assert {k[:3] for k in se.TARGETS} <= cells


def test_auto_batches_hold_about_batch_seconds_of_work_or_batch_bytes() -> None:
    import cryptoplane as cp

    with cp.Plane(engines=["inline", "threads"]) as plane:
        fill = 2 * plane.engines["threads"].capacity
        assert se.batch(plane) == fill  # nothing measured: fill the engines twice
        # ~250 µs requests (RSA-2048 signing): BATCH_SECONDS of them, not 2 x capacity
        assert se.batch(plane, 0, 250e-6) == round(se.BATCH_SECONDS / 250e-6) > fill
        assert se.batch(plane, 0, 1.0) == fill  # slow requests: still the engines filled
        # big results are held until map returns: their bytes bound the batch
        assert se.batch(plane, 1 << 20, 1e-6) == se.BATCH_BYTES >> 20
        assert se.batch(plane, 64 << 20, 1e-6) == 2
        # sector runs' own output buffers: a bigger budget, still a bound
        assert se.batch(plane, 1 << 20, 1e-6, se.RING_BYTES) == se.RING_BYTES >> 20


def test_auto_batches_of_a_chunk_are_even() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.batches: list[int] = []

        def map(self, items: list[int]) -> None:
            self.batches.append(len(items))

    for n, size, expected in ((2060, 256, [229] * 8 + [228]), (10, 256, [10]),
                              (512, 256, [256, 256]), (0, 5, [])):
        rec = Recorder()
        se.batch_loop(rec, lambda i: i, size)(n)  # type: ignore[arg-type]
        assert rec.batches == expected  # no tiny last batch paying a whole fixed cost


@pytest.mark.skipif(plot_available(), reason="matplotlib is installed")
def test_plot_without_matplotlib_says_how_to_install(tmp_path: Any) -> None:
    result = CliRunner().invoke(cli, ["speed", "--plot", str(tmp_path / "x.svg")])
    assert result.exit_code == 2 and "cryptoplane[plot]" in result.output


def test_parse_sizes() -> None:
    assert parse_sizes("64, 1k,16KiB,1m") == (64, 1024, 16384, 1 << 20)


OPENSSL_EVP = """\
version: 3.0.19
The 'numbers' are in 1000s of bytes per second processed.
type             64 bytes
ChaCha20-Poly1305   519182.46k
"""
OPENSSL_HMAC = "type           1024 bytes\nhmac(sha256)   1330295.98k\n"
OPENSSL_RSA_30 = """\
                  sign    verify    sign/s verify/s
rsa 2048 bits 0.000252s 0.000016s   3975.0  60786.0
"""
OPENSSL_RSA_35 = """\
                   sign    verify   encrypt   decrypt   sign/s verify/s  encr./s  decr./s
rsa  2048 bits 0.000571s 0.000017s 0.000018s 0.000560s   1751.4  58582.9  55510.7   1785.1
"""
OPENSSL_ECDSA = """\
                              sign    verify    sign/s verify/s
 256 bits ecdsa (nistp256)   0.0000s   0.0001s  50225.0  16337.8
"""


def test_parse_openssl_output() -> None:
    assert ossl.parse_openssl_bytes(OPENSSL_EVP, "chacha20-poly1305") == pytest.approx(519182460)
    assert ossl.parse_openssl_bytes(OPENSSL_HMAC, "sha256") == pytest.approx(1330295980)
    assert ossl.parse_openssl_signatures(OPENSSL_RSA_30) == {"sign": 3975.0, "verify": 60786.0}
    assert ossl.parse_openssl_signatures(OPENSSL_RSA_35) == {"sign": 1751.4, "verify": 58582.9}
    assert ossl.parse_openssl_signatures(OPENSSL_ECDSA)["sign"] == 50225.0
    with pytest.raises(ValueError):
        ossl.parse_openssl_bytes("garbage", "aes-256-gcm")
    with pytest.raises(ValueError):
        ossl.parse_openssl_signatures("garbage")
