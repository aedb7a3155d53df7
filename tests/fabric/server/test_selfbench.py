"""The capacity self-benchmark and the --capacity override."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cryptoplane.fabric.capacity import BYTE_CLASSES, CLASSES
from cryptoplane.fabric.selfbench import measure_capacity, parse_capacity


def test_every_class_measured_within_budget() -> None:
    start = time.monotonic()
    one = measure_capacity(1, budget=0.5)
    took = time.monotonic() - start
    assert took < 0.5 + 0.5, took  # plus at most one op per class, and key loading
    assert set(one) == set(CLASSES)
    for cls, rate in one.items():
        assert rate["ops"] > 0, cls
        assert (rate["bytes"] > 0) == (cls in BYTE_CLASSES), cls
    # the costs' order is the algorithms' (loose: a loaded machine is noisy)
    assert one["rsa2048"]["ops"] > one["rsa4096"]["ops"]
    assert one["aead"]["ops"] > one["rsa2048"]["ops"]
    # workers multiply (one core each, by assumption)
    four = measure_capacity(4, budget=0.2)
    assert four["ed25519"]["ops"] > one["ed25519"]["ops"]


def test_default_budget_about_a_second() -> None:
    # about 1.0-1.1 s on a quiet machine; a loaded one (tests beside it on two cores)
    # stretches the ops that end each slice, hence the room
    start = time.monotonic()
    measure_capacity(2)
    assert time.monotonic() - start < 2.5


def test_parse_capacity() -> None:
    assert parse_capacity("rsa2048=3000,aead=200000:1e9") == {
        "rsa2048": {"ops": 3000.0, "bytes": 0.0},
        "aead": {"ops": 200000.0, "bytes": 1e9}}
    assert parse_capacity(" hmac=0:5e8 , ") == {"hmac": {"ops": 0.0, "bytes": 5e8}}


@pytest.mark.parametrize("text,message", [
    ("rsa1024=5", "unknown algorithm class 'rsa1024'"),
    ("rsa2048", "not CLASS=OPS"),
    ("rsa2048=fast", "rsa2048 ops/s: 'fast' is not a number"),
    ("rsa2048=-1", "finite number >= 0"),
    ("rsa2048=inf", "finite number >= 0"),
    ("rsa2048=nan", "finite number >= 0"),
    ("rsa2048=5:100", "counted in ops/s only"),
    ("aead=1:x", "aead bytes/s"),
    ("aead=1,aead=2", "given twice"),
    ("aead=0", "declares nothing"),
    ("", "names no class"),
])
def test_parse_capacity_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_capacity(text)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        measure_capacity(0)
    with pytest.raises(ValueError):
        measure_capacity(1, budget=0)


@pytest.mark.parametrize("args,message", [
    (["--manager", "manager://127.0.0.1:1", "--capacity", "rsa1024=5"],
     "unknown algorithm class 'rsa1024'"),
    (["--capacity", "aead=5"], "--advertise and --capacity need --manager"),
    (["--grants", "required"], "--grants required needs --manager or --manager-key"),
    (["--manager-key", "bm90IGEga2V5"], "not a manager public key"),
])
def test_server_options_refused_before_anything_opens(args: list[str], message: str,
                                                      tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "cryptoplane", "server", "--store",
                          f"sqlite://{tmp_path / 'k.db'}", *args], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2, out
    assert message in " ".join(out.stderr.split()), out.stderr
    assert not (tmp_path / "k.db").exists()
